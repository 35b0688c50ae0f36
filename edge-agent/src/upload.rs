//! Upload a snapshot of the spool repository to the collector.
//!
//! 1. Walk the snapshot's trees from the root, children before parents,
//!    skipping any tree the collector already acknowledged (a Merkle tree: an
//!    acknowledged tree implies its whole subtree was acknowledged before it),
//!    a window of blobs at a time (steps 2-3 run per window: memory is
//!    bounded by the window, not by the snapshot). Data blobs are listed
//!    only while some spool data pack is not known to be held whole by the
//!    collector; usually the early upload has seen to that ([`EarlyUpload`]),
//!    and the walk reads trees alone.
//! 2. Ask which of those blobs the site lacks, 4096 ids per call.
//! 3. Stream the lacking blobs' sealed bytes from the spool's packs, in that
//!    order, on one stream kept open across windows; record each
//!    acknowledgement (durable at the collector) locally, so a cut transfer
//!    resumes without resending anything acknowledged: a data pack sent
//!    whole as the backup wrote it ([`EarlyUpload`]) is marked uploaded in
//!    the spool's catalog once the collector holds its every blob (one row
//!    per pack); anything else goes into the acknowledged set (a row per blob).
//! 4. Commit, with the local snapshot id as idempotency key: a retried commit
//!    returns the same collector snapshot.
//!
//! Blocking work (spool reads, SQLite) runs in `spawn_blocking`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, bail};
use proto::limits::{MAX_BLOBS_PER_UPLOAD, MAX_IDS_PER_REQUEST, PROTOCOL};
use proto::pb;
use proto::pb::agent_service_client::AgentServiceClient;
use repo_format::blob::BlobKind;
use repo_format::catalog::{BlobLocation, PackState};
use repo_format::direct::{ALIGN, AlignedBuf};
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

/// A blob to upload: its kind and id, and where the spool holds it when
/// that is known already (a pack just written: no catalog lookup per blob).
#[derive(Debug, Clone, Copy)]
struct Outgoing {
    kind: BlobKind,
    id: Id,
    at: Option<BlobLocation>,
}

impl Outgoing {
    /// A blob whose place in the spool is looked up when it is sent.
    fn lookup(kind: BlobKind, id: Id) -> Self {
        Outgoing { kind, id, at: None }
    }
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
    /// Whether data blobs are listed at all: not when every data blob the
    /// spool catalogues is known held (see [`Catalog::any_local_data`]).
    ///
    /// [`Catalog::any_local_data`]: repo_format::catalog::Catalog::any_local_data
    with_data: bool,
}

impl PendingWalk {
    fn new(root: Id, with_data: bool) -> Self {
        PendingWalk {
            stack: vec![(root, false)],
            with_data,
        }
    }

    /// The next window (empty when the walk is done). A blob repeated within
    /// a window is listed once; one repeated in a later window is either
    /// acknowledged by then or still in flight on the stream, which does not
    /// send it twice (see [`BlobStream`]).
    fn next_window(&mut self, repo: &Repository, acked: &Acked) -> Result<Vec<Outgoing>> {
        loop {
            let raw = self.next_candidates(repo, acked)?;
            if raw.is_empty() {
                return Ok(raw); // the walk is done
            }
            // Data blobs are located in the spool in one batch: those in
            // uploaded or dropped packs are held by the collector; the rest
            // are checked against the acknowledged set in one batch (trees
            // were, one by one, before their expansion). A window whose
            // every blob is held is skipped: an empty window means the end
            // of the walk.
            let (mut data, trees): (Vec<Outgoing>, Vec<Outgoing>) =
                raw.into_iter().partition(|b| b.kind == BlobKind::Data);
            locate_unsent(repo, &mut data)?;
            let ids: Vec<Id> = data.iter().map(|b| b.id).collect();
            let mut done = acked.contains_each(&ids)?.into_iter();
            data.retain(|_| done.next() == Some(false));
            if data.is_empty() && trees.is_empty() {
                continue;
            }
            // Data first, in pack order, so the stream reads packs in long
            // spans; then the trees in walk order (after their subtrees).
            data.sort_by_key(|b| b.at.map(|l| (l.pack, l.offset)));
            data.extend(trees);
            return Ok(data);
        }
    }

    /// Up to [`WINDOW`] blobs in walk order: trees not acknowledged, and
    /// every data blob of their entries (acknowledged or not).
    fn next_candidates(&mut self, repo: &Repository, acked: &Acked) -> Result<Vec<Outgoing>> {
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
                    out.push(Outgoing::lookup(BlobKind::Tree, t));
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
                for c in e.chunks.into_iter().filter(|_| self.with_data) {
                    if seen.insert(c) {
                        out.push(Outgoing::lookup(BlobKind::Data, c));
                    }
                }
            }
        }
        Ok(out)
    }
}

/// Keep those of `blobs` whose spool pack is not known to be held by the
/// collector (uploaded or dropped), filling in where the spool holds them
/// (one read transaction); a blob the spool does not catalogue keeps `None`
/// and is decided when sent.
fn locate_unsent(repo: &Repository, blobs: &mut Vec<Outgoing>) -> Result<()> {
    let cat = repo.catalog()?;
    cat.begin_read()?;
    let mut found: repo_format::Result<()> = Ok(());
    blobs.retain_mut(|b| match cat.locate(&b.id) {
        Ok(Some((loc, PackState::Local))) => {
            b.at = Some(loc);
            true
        }
        Ok(Some(_)) => false,
        Ok(None) => true,
        Err(e) => {
            found = Err(e);
            true
        }
    });
    cat.end_read()?;
    Ok(found?)
}

/// Data packs an upload sends whole, each with the number of its blobs the
/// collector is not yet known to hold. When that reaches zero the pack is
/// marked [`PackState::Uploaded`] in the spool's catalog: one row for the
/// pack instead of a row per blob in the acknowledged set. Bounded by the
/// packs in flight.
#[derive(Default, Clone)]
struct PackTally(Arc<Mutex<HashMap<Id, usize>>>);

impl PackTally {
    fn lock(&self) -> Result<std::sync::MutexGuard<'_, HashMap<Id, usize>>> {
        self.0
            .lock()
            .map_err(|_| anyhow::anyhow!("pack tally poisoned"))
    }

    /// Count `blobs` (the pack's every blob) for `pack`.
    fn expect(&self, pack: Id, blobs: usize) -> Result<()> {
        if blobs > 0 {
            self.lock()?.insert(pack, blobs);
        }
        Ok(())
    }

    /// Of `held` (ids the collector holds, each with its spool pack where
    /// known): the ids of packs not counted here, for the acknowledged set,
    /// and the counted packs whose last blob this was.
    fn settle(&self, held: impl IntoIterator<Item = (Id, Option<Id>)>) -> Result<Settled> {
        let mut out = Settled::default();
        let mut t = self.lock()?;
        for (id, pack) in held {
            let Some(pack) = pack else {
                out.ids.push(id);
                continue;
            };
            match t.get_mut(&pack) {
                Some(n) if *n > 1 => *n -= 1,
                Some(_) => {
                    t.remove(&pack);
                    out.packs.push(pack);
                }
                None => out.ids.push(id),
            }
        }
        Ok(out)
    }
}

/// What [`PackTally::settle`] found.
#[derive(Default)]
struct Settled {
    /// Ids to record in the acknowledged set.
    ids: Vec<Id>,
    /// Packs the collector now holds whole.
    packs: Vec<Id>,
}

impl Settled {
    /// Record it: blocking (SQLite), call off the runtime.
    fn record(self, repo: &Repository, acked: &Acked) -> Result<()> {
        if !self.ids.is_empty() {
            acked.insert(&self.ids)?;
        }
        if !self.packs.is_empty() {
            repo.catalog()?
                .set_pack_state(&self.packs, PackState::Uploaded)
                .context("marking uploaded spool packs")?;
        }
        Ok(())
    }
}

/// Packs queued for [`EarlyUpload`] at most; a pack finished while the queue
/// is full is left to the final walk, so a slow link never slows the local
/// backup and the queue never grows with the snapshot.
const EARLY_QUEUE: usize = 4;

/// Uploads the data blobs of each spool pack as soon as the local backup
/// made it durable, so the transfer overlaps the backup instead of following
/// it. Only data blobs go early: a tree is sent by [`upload_snapshot`]'s walk,
/// after its subtree, which keeps "an acknowledged tree implies its subtree
/// was acknowledged" true whatever is cut when. Anything not sent early (a
/// full queue, an error) is found by that walk: this is only a head start.
pub struct EarlyUpload {
    /// A pack's data blobs, with the pack's name when they are all it holds.
    tx: Option<mpsc::Sender<(Option<Id>, Vec<Outgoing>)>>,
    task: Option<tokio::task::JoinHandle<EarlyReport>>,
}

impl EarlyUpload {
    /// Start the uploading task on `client` (a clone of the run's client).
    pub fn start(
        mut client: AgentServiceClient<Channel>,
        repo: Arc<Repository>,
        acked: Arc<Acked>,
        control: UploadControl,
    ) -> EarlyUpload {
        let (tx, mut rx) = mpsc::channel::<(Option<Id>, Vec<Outgoing>)>(EARLY_QUEUE);
        let task = tokio::spawn(async move {
            let mut r = EarlyReport::default();
            let mut stream: Option<BlobStream> = None;
            let mut failed = false;
            let tally = PackTally::default();
            while let Some((whole, blobs)) = rx.recv().await {
                r.candidates += blobs.len() as u64;
                if failed {
                    continue; // drain; the final walk sends these
                }
                if let Some(pack) = whole
                    && let Err(e) = tally.expect(pack, blobs.len())
                {
                    tracing::debug!("early upload stopped: {e:#}");
                    failed = true;
                    continue;
                }
                let _permit = match &control.gate {
                    Some((g, priority)) => Some(g.acquire(*priority).await),
                    None => None,
                };
                let step = queue_lacking(
                    &mut stream,
                    &mut client,
                    (&repo, &acked, &tally),
                    &blobs,
                    &control,
                );
                if let Err(e) = step.await {
                    // Not fatal here: the final upload retries and reports.
                    tracing::debug!("early upload stopped: {e:#}");
                    failed = true;
                }
            }
            if let Some(s) = stream {
                match s.close().await {
                    Ok((n, b)) => {
                        r.sent = n;
                        r.bytes_sent = b;
                    }
                    Err(e) => tracing::debug!("early upload stream failed: {e:#}"),
                }
            }
            r
        });
        EarlyUpload {
            tx: Some(tx),
            task: Some(task),
        }
    }

    /// The hook for [`repo_format::backup::BackupOptions::on_pack`]: queues
    /// the pack's data blobs without blocking the packer (drops them when full).
    pub fn sink(&self) -> Option<repo_format::backup::PackSink> {
        let tx = self.tx.clone()?;
        Some(repo_format::backup::PackSink(Arc::new(
            move |pack, entries| {
                let data: Vec<Outgoing> = entries
                    .iter()
                    .filter(|e| e.kind == BlobKind::Data)
                    .map(|e| Outgoing {
                        kind: e.kind,
                        id: e.id,
                        at: Some(BlobLocation {
                            kind: e.kind,
                            pack,
                            offset: e.offset,
                            length: e.length,
                            raw_length: e.raw_length,
                        }),
                    })
                    .collect();
                let whole = (data.len() == entries.len()).then_some(pack);
                if !data.is_empty() {
                    let _ = tx.try_send((whole, data));
                }
            },
        )))
    }

    /// Wait until everything queued is sent (call once the backup returned,
    /// so no sink is left).
    pub async fn finish(mut self) -> EarlyReport {
        self.tx = None;
        match self.task.take() {
            Some(t) => t.await.unwrap_or_default(),
            None => EarlyReport::default(),
        }
    }
}

impl Drop for EarlyUpload {
    /// A run cancelled mid-way (policy change, shutdown) stops its uploads too.
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

/// What [`EarlyUpload`] did.
#[derive(Debug, Default)]
pub struct EarlyReport {
    /// Data blobs it was handed (new in the spool).
    pub candidates: u64,
    /// Blobs it sent (the rest the site held already, or were left to the walk).
    pub sent: u64,
    /// Sealed bytes it sent.
    pub bytes_sent: u64,
}

/// Upload snapshot `snap_id` of `repo` and commit it as `source`.
///
/// `on_acked` runs once every blob is acknowledged, before the commit is
/// sent: work that needs only the blobs durable (the spool's trim) overlaps
/// the collector's check of the commit; its result is awaited after it.
pub async fn upload_snapshot<T: Send + 'static>(
    client: &mut AgentServiceClient<Channel>,
    repo: Arc<Repository>,
    acked: Arc<Acked>,
    snap_id: Id,
    source: &str,
    control: &UploadControl,
    on_acked: impl FnOnce() -> T + Send + 'static,
) -> Result<(UploadReport, T)> {
    let (_, snap) = repo.find_snapshot(&snap_id.to_hex())?;
    let mut report = UploadReport::default();
    // A snapshot of the spool references only catalogued chunks (or, in a
    // spool trimmed before catalog schema 3, acknowledged ones). When no
    // data pack is left that the collector is not known to hold whole
    // (the usual case once the early upload has sent this backup's packs),
    // every data chunk is held, and the walk lists trees alone: no lookup
    // per chunk. The collector's commit check stands behind this either way.
    let r = repo.clone();
    let with_data = tokio::task::spawn_blocking(move || r.catalog()?.any_local_data()).await??;
    let mut walk = PendingWalk::new(snap.tree, with_data);
    let mut stream: Option<BlobStream> = None;
    // Empty: the walk's blobs go into the acknowledged set one by one.
    let tally = PackTally::default();
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
        queue_lacking(
            &mut stream,
            client,
            (&repo, &acked, &tally),
            &window,
            control,
        )
        .await?;
    }
    if let Some(s) = stream {
        let (sent, bytes) = s.close().await?;
        report.sent += sent;
        report.bytes_sent += bytes;
    }

    tracing::debug!(
        candidates = report.candidates,
        sent = report.sent,
        "every blob acknowledged; committing"
    );
    let side = tokio::task::spawn_blocking(on_acked);
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
        .context("committing the snapshot");
    let side = side.await?;
    let resp = resp?.into_inner();
    report.snapshot = Id::from_slice(&resp.snapshot_id);
    report.time_ns = resp.time_ns;
    Ok((report, side))
}

/// Where an upload records what the collector holds: the spool (packs
/// marked uploaded), the acknowledged set, and the tally of packs sent whole.
type Ledger<'a> = (&'a Arc<Repository>, &'a Arc<Acked>, &'a PackTally);

/// Ask which of `pending` the site lacks, record the rest as held, and
/// return the lacking ones in order.
async fn lacking(
    client: &mut AgentServiceClient<Channel>,
    (repo, acked, tally): Ledger<'_>,
    pending: &[Outgoing],
) -> Result<Vec<Outgoing>> {
    let mut lacking = Vec::new();
    for batch in pending.chunks(MAX_IDS_PER_REQUEST) {
        let ids = batch.iter().map(|b| b.id.0.to_vec()).collect();
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
        for b in batch {
            if missing.contains(&b.id.0[..]) {
                lacking.push(*b);
            } else {
                held.push((b.id, b.at.map(|l| l.pack)));
            }
        }
        let settled = tally.settle(held)?;
        let (r, a) = (repo.clone(), acked.clone());
        tokio::task::spawn_blocking(move || settled.record(&r, &a)).await??;
    }
    Ok(lacking)
}

/// Ask which of `blobs` the site lacks and queue those on `stream`, opening
/// it on first need (one stream serves a whole run).
async fn queue_lacking(
    stream: &mut Option<BlobStream>,
    client: &mut AgentServiceClient<Channel>,
    ledger: Ledger<'_>,
    blobs: &[Outgoing],
    control: &UploadControl,
) -> Result<()> {
    let lacking = lacking(client, ledger, blobs).await?;
    if lacking.is_empty() {
        return Ok(());
    }
    let s = match stream {
        Some(s) => s,
        None => stream.insert(BlobStream::open(client, ledger).await?),
    };
    s.send(ledger.0, lacking, control).await
}

/// Largest span of a pack read at once for an upload.
const SPAN: u64 = 4 << 20;

/// The end (exclusive) of the run of blobs starting at `i` that lie back to
/// back in one pack, at most [`SPAN`] bytes in all.
fn run_end(blobs: &[Outgoing], i: usize) -> usize {
    let Some(first) = blobs[i].at else {
        return i + 1;
    };
    let mut end = first.offset + first.length as u64;
    let mut j = i + 1;
    while let Some(Some(b)) = blobs.get(j).map(|b| b.at) {
        if b.pack != first.pack || b.offset != end || end + b.length as u64 - first.offset > SPAN {
            break;
        }
        end += b.length as u64;
        j += 1;
    }
    j
}

/// Whether the collector is known to hold `id`: acknowledged, or in a spool
/// pack marked uploaded or dropped.
fn held_elsewhere(repo: &Repository, acked: &Acked, id: &Id) -> Result<bool> {
    if acked.contains(id)? {
        return Ok(true);
    }
    Ok(matches!(
        repo.catalog()?.locate(id)?,
        Some((_, PackState::Uploaded | PackState::Dropped))
    ))
}

/// One blob's location (looked up unless known) and sealed bytes; `None`
/// when the spool does not catalogue it.
fn read_blob(
    repo: &Repository,
    id: &Id,
    at: Option<BlobLocation>,
) -> repo_format::Result<Option<(BlobLocation, Vec<u8>)>> {
    let loc = match at {
        Some(at) => Some(at),
        None => repo.catalog()?.lookup(id)?,
    };
    let Some(loc) = loc else { return Ok(None) };
    let mut sealed = vec![0u8; loc.length as usize];
    repo.store().read_at(&loc.pack, loc.offset, &mut sealed)?;
    Ok(Some((loc, sealed)))
}

/// Messages queued between the spool reader and the upload stream.
const STREAM_QUEUE: usize = 8;

/// Sealed bytes gathered into one upload message before it is sent. A
/// message per blob cost more than the blob for small files (a channel
/// hand-over, a gRPC frame, a decode and a budget check each, at both ends:
/// a fifth of the agent's upload work on 200 000 files of 2 KiB).
const MESSAGE_BYTES: usize = 1 << 20;

/// The upload message being filled.
#[derive(Default)]
struct Message {
    blobs: Vec<pb::UploadBlob>,
    bytes: usize,
}

impl Message {
    /// Add `blob`; returns the message to send when this one is full (the
    /// blob then starts the next one).
    fn add(&mut self, blob: pb::UploadBlob) -> Option<pb::UploadRequest> {
        let full = !self.blobs.is_empty()
            && (self.bytes + blob.sealed.len() > MESSAGE_BYTES
                || self.blobs.len() >= MAX_BLOBS_PER_UPLOAD);
        let out = if full { self.take() } else { None };
        self.bytes += blob.sealed.len();
        self.blobs.push(blob);
        out
    }

    /// The message so far, if it holds any blob.
    fn take(&mut self) -> Option<pb::UploadRequest> {
        if self.blobs.is_empty() {
            return None;
        }
        self.bytes = 0;
        Some(pb::UploadRequest {
            protocol: PROTOCOL,
            blobs: std::mem::take(&mut self.blobs),
        })
    }
}

/// One upload stream, kept open across many batches of blobs so the link
/// never drains between them: blobs are read from the spool off the runtime
/// and queued (bounded); acknowledgements (durable at the collector) are
/// recorded locally as they arrive, by a task of their own.
///
/// Blobs sent and not yet acknowledged are tracked (bounded by what is in
/// flight): a blob met again meanwhile (a later window, another pack) is not
/// sent twice, and `close` checks that every one was acknowledged.
struct BlobStream {
    tx: mpsc::Sender<pb::UploadRequest>,
    acks: tokio::task::JoinHandle<Result<()>>,
    /// Sent, not yet acknowledged, with the spool pack each was read from.
    in_flight: Arc<Mutex<HashMap<Id, Option<Id>>>>,
    /// Set when the acknowledgement task ends (stream over, or it failed):
    /// the sender stops instead of queueing into a stream nobody reads.
    ended: Arc<std::sync::atomic::AtomicBool>,
    acked: Arc<Acked>,
    /// Blobs queued so far.
    queued: u64,
    /// Sealed bytes queued so far.
    bytes: u64,
    /// Where pack spans are read (see [`SPAN`]).
    span_buf: Option<AlignedBuf>,
}

impl BlobStream {
    /// Open the stream and start recording acknowledgements in `ledger`.
    async fn open(client: &mut AgentServiceClient<Channel>, ledger: Ledger<'_>) -> Result<Self> {
        let (repo, acked, tally) = (ledger.0.clone(), ledger.1.clone(), ledger.2.clone());
        let (tx, rx) = mpsc::channel::<pb::UploadRequest>(STREAM_QUEUE);
        let mut acks = client
            .upload(ReceiverStream::new(rx))
            .await
            .context("opening the upload stream")?
            .into_inner();
        let in_flight = Arc::new(Mutex::new(HashMap::new()));
        let ended = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (a, f, e) = (acked.clone(), in_flight.clone(), ended.clone());
        let acks = tokio::spawn(async move {
            let r = async {
                while let Some(ack) = acks.next().await {
                    let ack = ack.context("upload refused by the collector")?;
                    let ids: Vec<Id> = ack.ids.iter().filter_map(|b| Id::from_slice(b)).collect();
                    let (r, a, f, t) = (repo.clone(), a.clone(), f.clone(), tally.clone());
                    tokio::task::spawn_blocking(move || -> Result<()> {
                        // Recorded before leaving the in-flight set: close()
                        // returns only once every acknowledgement is kept.
                        let held: Vec<(Id, Option<Id>)> = {
                            let f = f
                                .lock()
                                .map_err(|_| anyhow::anyhow!("in-flight set poisoned"))?;
                            ids.iter()
                                .map(|id| (*id, f.get(id).copied().flatten()))
                                .collect()
                        };
                        t.settle(held)?.record(&r, &a)?;
                        let mut f = f
                            .lock()
                            .map_err(|_| anyhow::anyhow!("in-flight set poisoned"))?;
                        for id in &ids {
                            f.remove(id);
                        }
                        Ok(())
                    })
                    .await??;
                }
                Ok(())
            }
            .await;
            e.store(true, std::sync::atomic::Ordering::Release);
            r
        });
        Ok(BlobStream {
            tx,
            acks,
            in_flight,
            ended,
            acked,
            queued: 0,
            bytes: 0,
            span_buf: None,
        })
    }

    /// Queue `blobs`' sealed bytes from the spool (under the throttles);
    /// returns once all are queued, not acknowledged.
    async fn send(
        &mut self,
        repo: &Arc<Repository>,
        blobs: Vec<Outgoing>,
        control: &UploadControl,
    ) -> Result<()> {
        let (repo, tx, ctl) = (repo.clone(), self.tx.clone(), control.clone());
        let (in_flight, ended, acked) = (
            self.in_flight.clone(),
            self.ended.clone(),
            self.acked.clone(),
        );
        // Reused by every call: a fresh multi-megabyte buffer costs page faults.
        let mut span_buf = self
            .span_buf
            .take()
            .unwrap_or_else(|| AlignedBuf::new(SPAN as usize + 2 * ALIGN, 0));
        let (n, bytes, span_buf) = tokio::task::spawn_blocking(move || -> Result<_> {
            let (mut n, mut bytes) = (0u64, 0u64);
            let mut message = Message::default();
            let mut i = 0;
            while i < blobs.len() {
                if ended.load(std::sync::atomic::Ordering::Acquire) {
                    break; // close() says why
                }
                // A run of blobs lying back to back in one pack is read in
                // one direct span, not a read per blob.
                let j = run_end(&blobs, i);
                let span = match blobs[i].at {
                    Some(a) if j - i > 1 => {
                        let last = blobs[j - 1]
                            .at
                            .map_or(a.offset, |b| b.offset + b.length as u64);
                        let len = (last - a.offset) as usize;
                        match repo
                            .store()
                            .read_span(&a.pack, a.offset, len, &mut span_buf)
                        {
                            Ok(s) => Some((a.offset, s)),
                            // Dropped meanwhile, or damaged: each blob decides below.
                            Err(e) => {
                                tracing::debug!("reading a span of spool pack {}: {e}", a.pack);
                                None
                            }
                        }
                    }
                    _ => None,
                };
                for &Outgoing { kind, id, at } in &blobs[i..j] {
                    let fresh = {
                        let mut f = in_flight
                            .lock()
                            .map_err(|_| anyhow::anyhow!("in-flight set poisoned"))?;
                        match f.entry(id) {
                            std::collections::hash_map::Entry::Occupied(_) => false,
                            std::collections::hash_map::Entry::Vacant(v) => {
                                v.insert(at.map(|l| l.pack));
                                true
                            }
                        }
                    };
                    if !fresh {
                        continue; // sent already on this stream, acknowledgement pending
                    }
                    let read = match (span, at) {
                        (Some((start, s)), Some(loc)) => {
                            let from = (loc.offset - start) as usize;
                            Ok(Some((loc, s[from..from + loc.length as usize].to_vec())))
                        }
                        _ => read_blob(&repo, &id, at),
                    };
                    let (loc, sealed) = match read {
                        Ok(Some(found)) => found,
                        // Dropped from the spool meanwhile by a trim after another
                        // source's upload: the collector holds it, nothing to send.
                        _ if held_elsewhere(&repo, &acked, &id)? => {
                            if let Ok(mut f) = in_flight.lock() {
                                f.remove(&id);
                            }
                            continue;
                        }
                        Ok(None) => bail!("blob {id} missing from the local spool"),
                        Err(e) => {
                            return Err(e)
                                .with_context(|| format!("reading blob {id} from the spool"));
                        }
                    };
                    throttle::wait_all(&ctl.throttles, sealed.len() as u64);
                    ctl.sent
                        .fetch_add(sealed.len() as u64, std::sync::atomic::Ordering::Relaxed);
                    bytes += sealed.len() as u64;
                    n += 1;
                    let blob = pb::UploadBlob {
                        kind: kind as u32,
                        id: id.0.to_vec(),
                        sealed,
                        raw_length: loc.raw_length,
                    };
                    if let Some(full) = message.add(blob)
                        && tx.blocking_send(full).is_err()
                    {
                        // The stream ended early: close() reports why.
                        return Ok((n, bytes, span_buf));
                    }
                }
                i = j;
            }
            // The window's last blobs go now, not with the next window's.
            if let Some(last) = message.take() {
                let _ = tx.blocking_send(last);
            }
            Ok((n, bytes, span_buf))
        })
        .await??;
        self.span_buf = Some(span_buf);
        self.queued += n;
        self.bytes += bytes;
        Ok(())
    }

    /// End the stream and wait for every acknowledgement. Returns (blobs
    /// sent, sealed bytes sent); an error if any sent blob was not acknowledged.
    async fn close(self) -> Result<(u64, u64)> {
        drop(self.tx);
        self.acks.await??;
        let left = self
            .in_flight
            .lock()
            .map_err(|_| anyhow::anyhow!("in-flight set poisoned"))?
            .len();
        if left > 0 {
            bail!(
                "the collector did not acknowledge {left} of {} blobs; run the backup again to resume",
                self.queued
            );
        }
        Ok((self.queued, self.bytes))
    }
}
