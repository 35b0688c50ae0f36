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

/// Ids per `ReadBlobs` request.
const FETCH_BATCH: usize = 512;
/// `ReadBlobs` requests in flight at once: while one request's blobs stream
/// back, the next ones are already asked for. One at a time, with its pack
/// written and fsynced before the next was sent, left the link idle for a
/// round trip and a sync per batch: at 150 ms RTT, 256 small files'
/// worth of blobs per 150 ms.
const FETCH_IN_FLIGHT: usize = 4;
/// Received blobs waiting for the writer thread (memory: this many blobs,
/// whatever the number of requests in flight).
const WRITE_QUEUE: usize = 16;

/// A blob as received, not yet verified.
type Received = (BlobKind, Id, Vec<u8>);

/// Fetch `ids` from the collector and store them in the spool (verified).
///
/// Requests (of [`FETCH_BATCH`] ids, [`FETCH_IN_FLIGHT`] at once) feed one
/// writer thread through a bounded queue; it opens each blob (authenticated,
/// id re-derived) and packs them into spool packs of the repository's pack
/// size. When this returns, every fetched blob is durable and catalogued.
async fn fetch(
    client: &mut AgentServiceClient<Channel>,
    repo: &Arc<Repository>,
    acked: &Arc<Acked>,
    job_id: u64,
    ids: Vec<Id>,
) -> Result<()> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Received>(WRITE_QUEUE);
    let (r, a) = (repo.clone(), acked.clone());
    let writer = tokio::task::spawn_blocking(move || write_pulled(&r, &a, rx));
    let mut batches = ids.chunks(FETCH_BATCH).map(<[Id]>::to_vec);
    let mut requests = tokio::task::JoinSet::new();
    let mut failed: Option<anyhow::Error> = None;
    loop {
        while failed.is_none() && requests.len() < FETCH_IN_FLIGHT {
            let Some(batch) = batches.next() else { break };
            let (c, tx) = (client.clone(), tx.clone());
            requests.spawn(fetch_batch(c, job_id, batch, tx));
        }
        let Some(done) = requests.join_next().await else {
            break;
        };
        match done {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                failed.get_or_insert(e);
            }
            Err(e) => {
                failed.get_or_insert(anyhow::anyhow!("a blob request task failed: {e}"));
            }
        }
        if failed.is_some() {
            requests.abort_all();
        }
    }
    // The writer ends once every sender is gone, finishing its last pack.
    drop(tx);
    let written = writer.await?;
    match failed {
        // A closed queue is the writer's failure: say that one.
        Some(e) => Err(written.err().unwrap_or(e)),
        None => written,
    }
}

/// One `ReadBlobs` request: every blob of `batch`, and nothing else, into `tx`.
async fn fetch_batch(
    mut client: AgentServiceClient<Channel>,
    job_id: u64,
    batch: Vec<Id>,
    tx: tokio::sync::mpsc::Sender<Received>,
) -> Result<()> {
    let mut want: HashSet<Id> = batch.iter().copied().collect();
    let mut stream = client
        .read_blobs(pb::ReadBlobsRequest {
            protocol: PROTOCOL,
            job_id,
            ids: batch.iter().map(|i| i.0.to_vec()).collect(),
        })
        .await
        .context("requesting blobs from the collector")?
        .into_inner();
    while let Some(b) = stream.next().await {
        let b = b.context("reading blobs from the collector")?;
        let id = Id::from_slice(&b.id).context("collector sent a malformed id")?;
        let kind =
            BlobKind::from_u8(b.kind as u8).context("collector sent an unknown blob kind")?;
        if !want.remove(&id) {
            bail!("collector sent blob {id} that was not asked for (or twice)");
        }
        if tx.send((kind, id, b.sealed)).await.is_err() {
            bail!("the spool writer stopped");
        }
    }
    if !want.is_empty() {
        bail!(
            "collector sent {} of {} blobs",
            batch.len() - want.len(),
            batch.len()
        );
    }
    Ok(())
}

/// The writer thread of [`fetch`]: verify each received blob, pack it,
/// and make each pack durable and catalogued when it reaches the
/// repository's pack size and when the queue closes.
fn write_pulled(
    repo: &Repository,
    acked: &Acked,
    mut rx: tokio::sync::mpsc::Receiver<Received>,
) -> Result<()> {
    let target = repo.config().pack_target;
    let mut pack: Option<(PackWriter, Vec<Id>)> = None;
    let finish = |(w, ids): (PackWriter, Vec<Id>)| -> Result<()> {
        let fp = w.finish(repo.store().as_ref(), &repo.keys().metadata)?;
        repo.catalog()?
            .insert_pack(&fp.name, fp.size, &fp.entries)?;
        // The collector holds the job's blobs for this site (the job
        // granted them): acknowledged, so a trim may drop them again.
        acked.insert(&ids)
    };
    while let Some((kind, id, sealed)) = rx.blocking_recv() {
        let plain = blob::open(repo.keyset(kind)?, kind, &id, &sealed)
            .with_context(|| format!("blob {id} from the collector failed verification"))?;
        let (w, ids) = match pack.as_mut() {
            Some(p) => p,
            None => pack.insert((PackWriter::new(repo.store().as_ref())?, Vec::new())),
        };
        w.add(kind, id, &sealed, plain.len() as u32)?;
        ids.push(id);
        if w.size() >= target
            && let Some(full) = pack.take()
        {
            finish(full)?;
        }
    }
    match pack.take() {
        Some(last) => finish(last),
        None => Ok(()),
    }
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
                        let missing = r.catalog()?.not_local(&e.chunks)?;
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
                let missing = r.catalog()?.not_local(&chunks)?;
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
    let missing = tokio::task::spawn_blocking(move || r.catalog()?.not_local(&want)).await??;
    let n = missing.len() as u64;
    if !missing.is_empty() {
        fetch(client, repo, acked, job_id, missing).await?;
    }
    Ok(n)
}
