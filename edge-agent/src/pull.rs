//! Pull what a restore job needs into the spool repository: every tree of
//! the snapshot and every chunk the agent does not already hold. Each blob
//! is opened (authenticated, id re-derived from its plaintext) before it is
//! stored, so nothing wrong enters the spool; then the ordinary restore
//! engine writes the files.

use std::collections::HashSet;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use proto::limits::PROTOCOL;
use proto::pb;
use proto::pb::agent_service_client::AgentServiceClient;
use repo_format::blob::{self, BlobKind};
use repo_format::pack::writer::PackWriter;
use repo_format::{Id, Repository};
use tokio_stream::StreamExt;
use tonic::transport::Channel;

/// Fetch `ids` from the collector and store them in the spool (verified).
async fn fetch(
    client: &mut AgentServiceClient<Channel>,
    repo: &Arc<Repository>,
    job_id: u64,
    ids: Vec<Id>,
) -> Result<()> {
    for batch in ids.chunks(256) {
        let want: HashSet<Id> = batch.iter().copied().collect();
        let mut stream = client
            .read_blobs(pb::ReadBlobsRequest {
                protocol: PROTOCOL,
                job_id,
                ids: batch.iter().map(|i| i.0.to_vec()).collect(),
            })
            .await
            .context("requesting blobs from the collector")?
            .into_inner();
        let mut got = Vec::new();
        while let Some(b) = stream.next().await {
            let b = b.context("reading blobs from the collector")?;
            let id = Id::from_slice(&b.id).context("collector sent a malformed id")?;
            let kind =
                BlobKind::from_u8(b.kind as u8).context("collector sent an unknown blob kind")?;
            if !want.contains(&id) {
                bail!("collector sent blob {id} that was not asked for");
            }
            got.push((kind, id, b.sealed));
        }
        if got.len() != batch.len() {
            bail!("collector sent {} of {} blobs", got.len(), batch.len());
        }
        let r = repo.clone();
        tokio::task::spawn_blocking(move || -> Result<()> {
            let mut w = PackWriter::new(r.store().as_ref())?;
            for (kind, id, sealed) in &got {
                let plain = blob::open(r.keyset(*kind)?, *kind, id, sealed)
                    .with_context(|| format!("blob {id} from the collector failed verification"))?;
                w.add(*kind, *id, sealed, plain.len() as u32)?;
            }
            let fp = w.finish(r.store().as_ref(), &r.keys().metadata)?;
            r.catalog()?.insert_pack(&fp.name, fp.size, &fp.entries)?;
            Ok(())
        })
        .await??;
    }
    Ok(())
}

/// Make every blob below `root` present in the spool; returns how many were pulled.
pub async fn pull_tree(
    client: &mut AgentServiceClient<Channel>,
    repo: Arc<Repository>,
    job_id: u64,
    root: Id,
) -> Result<u64> {
    let mut pulled = 0u64;
    let mut stack = vec![root];
    let mut seen = HashSet::new();
    while let Some(t) = stack.pop() {
        if !seen.insert(t) {
            continue;
        }
        let r = repo.clone();
        let have =
            tokio::task::spawn_blocking(move || r.catalog().and_then(|c| c.contains(&t))).await??;
        if !have {
            fetch(client, &repo, job_id, vec![t]).await?;
            pulled += 1;
        }
        let r = repo.clone();
        let (subtrees, missing) =
            tokio::task::spawn_blocking(move || -> Result<(Vec<Id>, Vec<Id>)> {
                let mut subs = Vec::new();
                let mut chunks = Vec::new();
                for e in r.read_tree(&t)? {
                    subs.extend(e.subtree);
                    chunks.extend(e.chunks);
                }
                chunks.sort();
                chunks.dedup();
                // Chunks the agent already holds are taken locally, not pulled.
                let missing = r.catalog()?.missing(&chunks)?;
                Ok((subs, missing))
            })
            .await??;
        pulled += missing.len() as u64;
        if !missing.is_empty() {
            fetch(client, &repo, job_id, missing).await?;
        }
        stack.extend(subtrees);
    }
    Ok(pulled)
}
