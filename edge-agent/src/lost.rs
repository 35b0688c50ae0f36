//! Blobs the collector lost: before each backup the agent reads the
//! collector's list of blobs its site held that a scrub found damaged
//! (`LostBlobs`, from where it last stopped) and forgets those it has in its
//! spool's catalog. Unknown again, they are stored by the next backup that
//! meets them, which verifies its parent's chunks (so an unchanged file
//! whose chunk was lost is read again) and so uploads them; every
//! acknowledgement is dropped too, so the upload walk asks about every tree.

use std::sync::Arc;

use anyhow::{Context, Result};
use proto::limits::PROTOCOL;
use proto::pb;
use proto::pb::agent_service_client::AgentServiceClient;
use repo_format::{Id, Repository};
use tonic::transport::Channel;

use crate::acked::Acked;

/// Read the collector's lost list past what was read before; forget what
/// of it the spool holds. Returns the number of spool rows forgotten.
pub async fn reconcile(
    client: &mut AgentServiceClient<Channel>,
    repo: &Arc<Repository>,
    acked: &Arc<Acked>,
) -> Result<u64> {
    let a = acked.clone();
    let mut after = tokio::task::spawn_blocking(move || a.lost_seq()).await??;
    let mut forgotten = 0;
    loop {
        let resp = match client
            .lost_blobs(pb::LostBlobsRequest {
                protocol: PROTOCOL,
                after,
            })
            .await
        {
            Ok(r) => r.into_inner(),
            // A collector from before scrubs: it never loses a blob.
            Err(s) if s.code() == tonic::Code::Unimplemented => return Ok(0),
            Err(s) => return Err(s).context("asking the collector which blobs it lost"),
        };
        let ids: Vec<Id> = resp.ids.iter().filter_map(|b| Id::from_slice(b)).collect();
        let (r, a, next) = (repo.clone(), acked.clone(), resp.next);
        let n = tokio::task::spawn_blocking(move || -> Result<u64> {
            let n = r.catalog()?.forget_blobs(&ids)?;
            a.lost_read(next, n > 0)?;
            Ok(n)
        })
        .await??;
        if n > 0 {
            tracing::warn!(
                blobs = n,
                "the collector lost blobs this agent had sent; the next backup reads and uploads them again"
            );
        }
        forgotten += n;
        if !resp.more || next <= after {
            return Ok(forgotten);
        }
        after = next;
    }
}
