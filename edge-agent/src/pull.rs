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

use crate::acked::Acked;

/// Fetch `ids` from the collector and store them in the spool (verified).
async fn fetch(
    client: &mut AgentServiceClient<Channel>,
    repo: &Arc<Repository>,
    acked: &Arc<Acked>,
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
        let a = acked.clone();
        tokio::task::spawn_blocking(move || -> Result<()> {
            let mut w = PackWriter::new(r.store().as_ref())?;
            for (kind, id, sealed) in &got {
                let plain = blob::open(r.keyset(*kind)?, *kind, id, sealed)
                    .with_context(|| format!("blob {id} from the collector failed verification"))?;
                w.add(*kind, *id, sealed, plain.len() as u32)?;
            }
            let fp = w.finish(r.store().as_ref(), &r.keys().metadata)?;
            r.catalog()?.insert_pack(&fp.name, fp.size, &fp.entries)?;
            // The collector holds the job's blobs for this site (the job
            // granted them): acknowledged, so a trim may drop them again.
            let ids: Vec<Id> = got.iter().map(|(_, id, _)| *id).collect();
            a.insert(&ids)?;
            Ok(())
        })
        .await??;
    }
    Ok(())
}

/// What [`pull_tree`] did to make a job's blobs present.
#[derive(Debug, Default, Clone, Copy)]
pub struct Pulled {
    /// Blobs (trees and chunks) fetched from the collector.
    pub pulled: u64,
    /// Chunks taken from the agent's own files instead.
    pub local: crate::local::Taken,
}

/// Make every blob a restore of `path` (or the whole snapshot) below `root`
/// needs present in the spool. Trees are fetched level by level in batches;
/// the chunks the spool lacks are looked for in the agent's own files
/// ([`crate::local`]) and only the rest is pulled.
pub async fn pull_tree(
    client: &mut AgentServiceClient<Channel>,
    repo: Arc<Repository>,
    acked: Arc<Acked>,
    job_id: u64,
    root: Id,
    path: Option<&str>,
) -> Result<Pulled> {
    let mut done = Pulled::default();
    let mut need = crate::local::Needed::new()?;
    // Down to the entry `path` names: its trees are needed whatever it is.
    let mut frontier = vec![root];
    if let Some(p) = path {
        let comps: Vec<Vec<u8>> = p
            .split('/')
            .filter(|c| !c.is_empty() && *c != ".")
            .map(|c| c.as_bytes().to_vec())
            .collect();
        for (i, comp) in comps.iter().enumerate() {
            done.pulled += ensure_trees(client, &repo, &acked, job_id, &frontier).await?;
            let r = repo.clone();
            let t = frontier[0];
            let comp = comp.clone();
            let e =
                tokio::task::spawn_blocking(move || -> Result<Option<repo_format::tree::Entry>> {
                    Ok(r.read_tree(&t)?.into_iter().find(|e| e.name == comp))
                })
                .await??;
            // A missing path is the restore's to report.
            let Some(e) = e else { return Ok(done) };
            frontier = match e.subtree {
                Some(sub) => vec![sub],
                None if i + 1 == comps.len() => {
                    let r = repo.clone();
                    need = tokio::task::spawn_blocking(move || -> Result<_> {
                        let missing = r.catalog()?.missing(&e.chunks)?;
                        need.add(&missing)?;
                        Ok(need)
                    })
                    .await??;
                    Vec::new()
                }
                None => return Ok(done),
            };
        }
    }
    // Level by level: fetch the level's missing trees, read them, note the
    // chunks the spool lacks, go down.
    while !frontier.is_empty() {
        done.pulled += ensure_trees(client, &repo, &acked, job_id, &frontier).await?;
        let r = repo.clone();
        let level = std::mem::take(&mut frontier);
        let (n, next) = tokio::task::spawn_blocking(move || -> Result<_> {
            let mut subs = Vec::new();
            for t in &level {
                let mut chunks = Vec::new();
                for e in r.read_tree(t)? {
                    subs.extend(e.subtree);
                    chunks.extend(e.chunks);
                }
                chunks.sort_unstable();
                chunks.dedup();
                let missing = r.catalog()?.missing(&chunks)?;
                need.add(&missing)?;
            }
            subs.sort_unstable();
            subs.dedup();
            Ok((need, subs))
        })
        .await??;
        need = n;
        frontier = next;
    }
    // The agent's own files first, then the collector for the rest.
    let r = repo.clone();
    let a = acked.clone();
    let (n, local) = tokio::task::spawn_blocking(move || -> Result<_> {
        let t = crate::local::take_from_files(&r, &a, &mut need)?;
        Ok((need, t))
    })
    .await??;
    need = n;
    done.local = local;
    let mut after: Option<Id> = None;
    loop {
        let (n, batch) = tokio::task::spawn_blocking(move || -> Result<_> {
            let b = need.batch_after(after.as_ref(), 4096)?;
            Ok((need, b))
        })
        .await??;
        need = n;
        let Some(last) = batch.last().copied() else {
            break;
        };
        after = Some(last);
        done.pulled += batch.len() as u64;
        fetch(client, &repo, &acked, job_id, batch).await?;
    }
    Ok(done)
}

/// Fetch those of `trees` the spool lacks; returns how many.
async fn ensure_trees(
    client: &mut AgentServiceClient<Channel>,
    repo: &Arc<Repository>,
    acked: &Arc<Acked>,
    job_id: u64,
    trees: &[Id],
) -> Result<u64> {
    let r = repo.clone();
    let want = trees.to_vec();
    let missing = tokio::task::spawn_blocking(move || r.catalog()?.missing(&want)).await??;
    let n = missing.len() as u64;
    if !missing.is_empty() {
        fetch(client, repo, acked, job_id, missing).await?;
    }
    Ok(n)
}
