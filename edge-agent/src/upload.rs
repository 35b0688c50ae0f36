//! Upload a snapshot of the spool repository to the collector.
//!
//! 1. Walk the snapshot's trees from the root, children before parents,
//!    skipping any tree the collector already acknowledged (a Merkle tree: an
//!    acknowledged tree implies its whole subtree was acknowledged before it),
//!    a window of blobs at a time (steps 2-3 run per window: memory is
//!    bounded by the window, not by the snapshot).
//! 2. Ask which of those blobs the site lacks, 4096 ids per call.
//! 3. Stream the lacking blobs' sealed bytes from the spool's packs, in that
//!    order; record each acknowledgement (durable at the collector) locally,
//!    so a cut transfer resumes without resending anything acknowledged.
//! 4. Commit, with the local snapshot id as idempotency key: a retried commit
//!    returns the same collector snapshot.
//!
//! Blocking work (spool reads, SQLite) runs in `spawn_blocking`.

use std::sync::Arc;

use anyhow::{Context, Result, bail};
use proto::limits::{MAX_IDS_PER_REQUEST, PROTOCOL};
use proto::pb;
use proto::pb::agent_service_client::AgentServiceClient;
use repo_format::blob::BlobKind;
use repo_format::{Id, Repository};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::acked::Acked;
use crate::throttle::{self, Throttle};

/// Bandwidth limits and live progress of one upload.
#[derive(Default, Clone)]
pub struct UploadControl {
    /// Every limit the upload is under (the source's and the agent's).
    pub throttles: Vec<Arc<Throttle>>,
    /// Sealed bytes sent so far (for progress and the bytes-pending report).
    pub sent: Arc<std::sync::atomic::AtomicU64>,
    /// Sealed bytes the local backup added, about what the upload will send.
    pub planned: Arc<std::sync::atomic::AtomicU64>,
    /// The agent's upload gate and this upload's priority: taken per window,
    /// so a long, throttled upload lets a higher-priority source in between.
    pub gate: Option<(crate::gate::PriorityGate, i32)>,
}

/// What an upload did.
#[derive(Debug, Default)]
pub struct UploadReport {
    /// Blobs the walk found not yet acknowledged.
    pub candidates: u64,
    /// Blobs actually sent.
    pub sent: u64,
    /// Sealed bytes sent.
    pub bytes_sent: u64,
    /// Collector snapshot id.
    pub snapshot: Option<Id>,
    /// Collector time of the snapshot, ns since the epoch.
    pub time_ns: i64,
}

/// Blobs per upload window: the walk, the missing-blobs questions and the
/// upload stream work on this many at a time, so memory stays bounded by
/// the window, not by the number of files in the snapshot.
const WINDOW: usize = 16_384;

/// The blobs below a snapshot's root not yet acknowledged, children before
/// parents, produced a window at a time. Windows are sent in order, so an
/// acknowledged tree implies its whole subtree was sent before it.
struct PendingWalk {
    /// (tree, children already expanded?)
    stack: Vec<(Id, bool)>,
}

impl PendingWalk {
    fn new(root: Id) -> Self {
        PendingWalk {
            stack: vec![(root, false)],
        }
    }

    /// The next window (empty when the walk is done). A blob repeated within
    /// a window is listed once; one repeated in a later window is found
    /// acknowledged by then.
    fn next_window(&mut self, repo: &Repository, acked: &Acked) -> Result<Vec<(BlobKind, Id)>> {
        let mut out = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let mut emitted = std::collections::HashSet::new();
        while out.len() < WINDOW {
            let Some((t, expanded)) = self.stack.pop() else {
                break;
            };
            if expanded {
                // An identical directory met again in this window, after the
                // first was expanded in an earlier one: send it once.
                if emitted.insert(t) {
                    out.push((BlobKind::Tree, t));
                }
                continue;
            }
            if !seen.insert(t) || acked.contains(&t)? {
                continue;
            }
            self.stack.push((t, true));
            for e in repo.read_tree(&t)? {
                if let Some(s) = e.subtree {
                    self.stack.push((s, false));
                }
                for c in e.chunks {
                    if seen.insert(c) && !acked.contains(&c)? {
                        out.push((BlobKind::Data, c));
                    }
                }
            }
        }
        Ok(out)
    }
}

/// Upload snapshot `snap_id` of `repo` and commit it as `source`.
pub async fn upload_snapshot(
    client: &mut AgentServiceClient<Channel>,
    repo: Arc<Repository>,
    acked: Arc<Acked>,
    snap_id: Id,
    source: &str,
    control: &UploadControl,
) -> Result<UploadReport> {
    let (_, snap) = repo.find_snapshot(&snap_id.to_hex())?;
    let mut report = UploadReport::default();
    let mut walk = PendingWalk::new(snap.tree);
    loop {
        let (r, a) = (repo.clone(), acked.clone());
        let (w, window) = tokio::task::spawn_blocking(move || {
            let window = walk.next_window(&r, &a);
            (walk, window)
        })
        .await?;
        walk = w;
        let window = window?;
        if window.is_empty() {
            break;
        }
        report.candidates += window.len() as u64;
        let _permit = match &control.gate {
            Some((g, priority)) => Some(g.acquire(*priority).await),
            None => None,
        };
        let (sent, bytes) = send_blobs(client, &repo, &acked, &window, control).await?;
        report.sent += sent;
        report.bytes_sent += bytes;
    }

    let resp = client
        .commit_snapshot(pb::CommitSnapshotRequest {
            protocol: PROTOCOL,
            idempotency_key: snap_id.0[..16].to_vec(),
            source: source.to_string(),
            root_tree: snap.tree.0.to_vec(),
            paths: snap.paths.clone(),
            hostname: snap.hostname.clone(),
            stats_json: serde_json::to_string(&snap.stats)?,
            issues_json: serde_json::to_string(&snap.issues)?,
        })
        .await
        .context("committing the snapshot")?
        .into_inner();
    report.snapshot = Id::from_slice(&resp.snapshot_id);
    report.time_ns = resp.time_ns;
    Ok(report)
}

/// Ask which of `pending` the site lacks (recording the rest as acknowledged),
/// stream those from the spool, and record each acknowledgement (durable at
/// the collector). Returns (blobs sent, sealed bytes sent).
pub async fn send_blobs(
    client: &mut AgentServiceClient<Channel>,
    repo: &Arc<Repository>,
    acked: &Arc<Acked>,
    pending: &[(BlobKind, Id)],
    control: &UploadControl,
) -> Result<(u64, u64)> {
    let mut lacking = Vec::new();
    for batch in pending.chunks(MAX_IDS_PER_REQUEST) {
        let ids = batch.iter().map(|(_, id)| id.0.to_vec()).collect();
        let missing = client
            .missing_blobs(pb::MissingBlobsRequest {
                protocol: PROTOCOL,
                ids,
            })
            .await
            .context("asking the collector which blobs it lacks")?
            .into_inner()
            .missing;
        let missing: std::collections::HashSet<Vec<u8>> = missing.into_iter().collect();
        let mut held = Vec::new();
        for (kind, id) in batch {
            if missing.contains(&id.0[..]) {
                lacking.push((*kind, *id));
            } else {
                held.push(*id);
            }
        }
        let a = acked.clone();
        tokio::task::spawn_blocking(move || a.insert(&held)).await??;
    }
    if lacking.is_empty() {
        return Ok((0, 0));
    }
    let (tx, rx) = mpsc::channel::<pb::UploadRequest>(8);
    let reader_repo = repo.clone();
    let to_send = lacking.clone();
    let ctl = control.clone();
    // Read sealed blobs off the runtime and feed the stream (bounded).
    let feeder = tokio::task::spawn_blocking(move || -> Result<u64> {
        let mut bytes = 0u64;
        for (kind, id) in to_send {
            let loc = reader_repo
                .catalog()?
                .lookup(&id)?
                .with_context(|| format!("blob {id} missing from the local spool"))?;
            let mut sealed = vec![0u8; loc.length as usize];
            reader_repo
                .store()
                .read_at(&loc.pack, loc.offset, &mut sealed)?;
            bytes += sealed.len() as u64;
            throttle::wait_all(&ctl.throttles, sealed.len() as u64);
            ctl.sent
                .fetch_add(sealed.len() as u64, std::sync::atomic::Ordering::Relaxed);
            let msg = pb::UploadRequest {
                protocol: PROTOCOL,
                kind: kind as u32,
                id: id.0.to_vec(),
                sealed,
                raw_length: loc.raw_length,
            };
            if tx.blocking_send(msg).is_err() {
                break;
            }
        }
        Ok(bytes)
    });
    let mut acks = client
        .upload(ReceiverStream::new(rx))
        .await
        .context("opening the upload stream")?
        .into_inner();
    let mut confirmed = 0usize;
    while let Some(ack) = acks.next().await {
        let ack = ack.context("upload refused by the collector")?;
        let ids: Vec<Id> = ack.ids.iter().filter_map(|b| Id::from_slice(b)).collect();
        confirmed += ids.len();
        let a = acked.clone();
        tokio::task::spawn_blocking(move || a.insert(&ids)).await??;
    }
    let bytes = feeder.await??;
    if confirmed < lacking.len() {
        bail!(
            "the collector acknowledged {confirmed} of {} blobs; run the backup again to resume",
            lacking.len()
        );
    }
    Ok((lacking.len() as u64, bytes))
}
