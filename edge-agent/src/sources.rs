//! The sources the collector assigned, and the task that keeps each one
//! backed up: a real-time loop (watch → debounce → incremental backup →
//! upload → commit) or a schedule loop (cron in the site's time zone), or
//! none (backup-now only).
//!
//! Policies arrive with every `Sources` command ([`Sources::apply`]): a
//! source whose policy changed is restarted, so changes apply without
//! restarting the agent; the last set is kept in `sources.pb` and applied at
//! start, before the collector is reachable. Uploads share one
//! [`PriorityGate`] and the agent's bandwidth [`Throttle`]; each source may
//! add its own limit. [`Sources::lag`] is what heartbeats report: per source,
//! the age of the oldest change not yet committed and the bytes pending.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use prost::Message;
use proto::pb;
use proto::pb::agent_service_client::AgentServiceClient;
use repo_format::Repository;
use repo_format::backup::ParentChoice;
use tonic::transport::Channel;

use crate::acked::Acked;
use crate::backup::{BackupRun, RunSpec};
use crate::gate::PriorityGate;
use crate::history::History;
use crate::schedule::{Due, Schedule};
use crate::state::StateDir;
use crate::throttle::{Limit, Throttle};
use crate::upload::UploadControl;
use crate::watch::WatchHub;

/// Defaults of a real-time policy (DESIGN.md "Flow of a change").
const DEFAULT_QUIET_MS: u32 = 1000;
const DEFAULT_MAX_DELAY_MS: u32 = 5000;
const DEFAULT_RECONCILE_SECS: u64 = 86_400;
/// Longest reconcile or rescan period honoured (ten years): longer ones
/// would overflow `Instant` arithmetic.
const MAX_PERIOD: Duration = Duration::from_secs(10 * 365 * 86_400);

/// Options of the source manager.
#[derive(Debug, Clone, Default)]
pub struct SourcesOptions {
    /// Cap on inotify watches (None: the kernel's limit). For tests and for
    /// hosts where other programs need the watches.
    pub watch_limit: Option<usize>,
    /// How often the unwatched part of a source (beyond the watch limit) is
    /// scanned; None = every minute.
    pub unwatched_scan: Option<Duration>,
}

#[derive(Default)]
struct Live {
    /// Oldest change of the batch being backed up or uploaded.
    inflight_since: Option<SystemTime>,
    /// The running upload's progress (pending = planned − sent).
    upload: UploadControl,
    last_commit_ns: i64,
    /// The last failure, until a run succeeds.
    error: Option<String>,
}

struct Running {
    fingerprint: Vec<u8>,
    task: tokio::task::JoinHandle<()>,
}

/// The agent's sources and their tasks.
pub struct Sources {
    st: StateDir,
    collector: String,
    opts: SourcesOptions,
    gate: PriorityGate,
    history: Arc<History>,
    hub: Mutex<Option<Arc<WatchHub>>>,
    running: Mutex<HashMap<String, Running>>,
    live: Mutex<HashMap<String, Live>>,
    current: Mutex<pb::Sources>,
    client: tokio::sync::Mutex<Option<AgentServiceClient<Channel>>>,
    /// The agent-wide bucket, shared by every upload (rebuilt when the
    /// limit or the time zone changes).
    agent_throttle: Mutex<Option<(Limit, chrono_tz::Tz, Arc<Throttle>)>>,
    spool: tokio::sync::OnceCell<(Arc<Repository>, Arc<Acked>)>,
    /// One run at a time per source: a backup-now and a real-time batch of
    /// the same source must not race for the parent snapshot.
    run_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

impl Sources {
    /// The manager for the agent at `st`.
    pub fn new(st: &StateDir, opts: SourcesOptions) -> Result<Arc<Sources>> {
        let cfg = st.config()?;
        Ok(Arc::new(Sources {
            st: StateDir::new(st.root()),
            collector: cfg.collector,
            opts,
            gate: PriorityGate::new(),
            history: Arc::new(History::open(&st.path("history.db"))?),
            hub: Mutex::new(None),
            running: Mutex::new(HashMap::new()),
            live: Mutex::new(HashMap::new()),
            current: Mutex::new(pb::Sources::default()),
            client: tokio::sync::Mutex::new(None),
            agent_throttle: Mutex::new(None),
            run_locks: Mutex::new(HashMap::new()),
            spool: tokio::sync::OnceCell::new(),
        }))
    }

    /// Apply the sources saved by the last run, if any.
    pub fn apply_saved(self: &Arc<Self>) {
        match std::fs::read(self.st.path("sources.pb")) {
            Ok(b) => match pb::Sources::decode(&b[..]) {
                Ok(s) => self.apply(s, false),
                Err(e) => tracing::warn!("ignoring a malformed sources.pb: {e}"),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!("reading sources.pb: {e}"),
        }
    }

    /// Take a new set of sources: start new ones, restart changed ones,
    /// stop removed ones; `save` keeps it for the next start.
    pub fn apply(self: &Arc<Self>, set: pb::Sources, save: bool) {
        if save && let Err(e) = self.st.write("sources.pb", &set.encode_to_vec(), false) {
            tracing::warn!("saving sources: {e:#}");
        }
        let agent_fp = set
            .agent
            .as_ref()
            .map(|a| a.encode_to_vec())
            .unwrap_or_default();
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        let keep: Vec<String> = set.sources.iter().map(|s| s.name.clone()).collect();
        let gone: Vec<String> = running
            .keys()
            .filter(|n| !keep.contains(n))
            .cloned()
            .collect();
        for name in gone {
            if let Some(r) = running.remove(&name) {
                r.task.abort();
            }
            self.unwatch(&name);
            tracing::info!(source = %name, "source removed");
        }
        for src in &set.sources {
            let mut fp = src.encode_to_vec();
            fp.extend_from_slice(&agent_fp);
            if running.get(&src.name).is_some_and(|r| r.fingerprint == fp) {
                continue;
            }
            if let Some(r) = running.remove(&src.name) {
                r.task.abort();
                self.unwatch(&src.name);
            }
            let (me, s) = (self.clone(), src.clone());
            let task = if src.realtime {
                tokio::spawn(async move { me.realtime_loop(s).await })
            } else if !src.schedule.is_empty() {
                tokio::spawn(async move { me.schedule_loop(s).await })
            } else {
                tokio::spawn(async {})
            };
            tracing::info!(source = %src.name, realtime = src.realtime, schedule = %src.schedule, priority = src.priority, "source policy applied");
            running.insert(
                src.name.clone(),
                Running {
                    fingerprint: fp,
                    task,
                },
            );
        }
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = set;
    }

    fn unwatch(&self, name: &str) {
        if let Some(h) = self.hub.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            h.remove_source(name);
        }
        self.live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
    }

    /// The current sources.
    pub fn list(&self) -> Vec<pb::Source> {
        self.current
            .lock()
            .map(|c| c.sources.clone())
            .unwrap_or_default()
    }

    fn time_zone(&self) -> chrono_tz::Tz {
        let name = self
            .current
            .lock()
            .ok()
            .and_then(|c| c.agent.as_ref().map(|a| a.timezone.clone()))
            .unwrap_or_default();
        crate::schedule::time_zone(&name).unwrap_or_else(|e| {
            tracing::warn!("{e}; using UTC");
            chrono_tz::UTC
        })
    }

    fn agent_limit(&self) -> Limit {
        self.current
            .lock()
            .ok()
            .map(|c| Limit::from_pb(c.agent.as_ref().and_then(|a| a.bandwidth.as_ref())))
            .unwrap_or_default()
    }

    /// Forget the cached connection (after a failure or a renewed certificate).
    pub async fn reset_connection(&self) {
        *self.client.lock().await = None;
    }

    async fn client(&self) -> Result<AgentServiceClient<Channel>> {
        let mut c = self.client.lock().await;
        if let Some(c) = c.as_ref() {
            return Ok(c.clone());
        }
        let fresh = crate::control::connect(&self.st, &self.collector).await?;
        *c = Some(fresh.clone());
        Ok(fresh)
    }

    async fn spool(&self) -> Result<(Arc<Repository>, Arc<Acked>)> {
        let st = StateDir::new(self.st.root());
        self.spool
            .get_or_try_init(|| async move {
                let (r, a) = tokio::task::spawn_blocking(move || st.spool()).await??;
                anyhow::Ok((Arc::new(r), Arc::new(a)))
            })
            .await
            .cloned()
    }

    fn hub(&self) -> Result<Arc<WatchHub>> {
        let mut h = self.hub.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(h) = h.as_ref() {
            return Ok(h.clone());
        }
        let fresh = WatchHub::start(self.opts.watch_limit)?;
        *h = Some(fresh.clone());
        Ok(fresh)
    }

    fn with_live<T>(&self, name: &str, f: impl FnOnce(&mut Live) -> T) -> T {
        let mut l = self.live.lock().unwrap_or_else(|p| p.into_inner());
        f(l.entry(name.to_string()).or_default())
    }

    /// Back up one source now (incrementally when `dirty` is given), upload
    /// and commit; records the commit for the next run's parent.
    pub async fn run_source(
        &self,
        src: &pb::Source,
        dirty: Option<repo_format::backup::DirtySet>,
    ) -> Result<BackupRun> {
        let lock = self
            .run_locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(src.name.clone())
            .or_default()
            .clone();
        let _one_at_a_time = lock.lock().await;
        let (repo, acked) = self.spool().await?;
        let (h, name) = (self.history.clone(), src.name.clone());
        let rec = tokio::task::spawn_blocking(move || h.get(&name, now_ns())).await??;
        let parent = match rec.last_local {
            Some(id) => ParentChoice::Snapshot(id),
            None => ParentChoice::Auto,
        };
        let tz = self.time_zone();
        let mut throttles = vec![self.agent_throttle(tz)];
        let own = Limit::from_pb(src.bandwidth.as_ref());
        if own.bytes_per_sec > 0 {
            throttles.push(Throttle::new(own, tz));
        }
        let (sent, planned) = self.with_live(&src.name, |l| {
            l.upload = UploadControl::default();
            (l.upload.sent.clone(), l.upload.planned.clone())
        });
        let spec = RunSpec {
            source: src.name.clone(),
            paths: src.paths.iter().map(PathBuf::from).collect(),
            excludes: src.excludes.clone(),
            dirty,
            parent,
            priority: src.priority,
            upload: UploadControl {
                throttles,
                sent,
                planned,
                gate: None,
            },
        };
        let mut client = self.client().await?;
        let run = match crate::backup::run_with(repo, acked, &mut client, &self.gate, spec).await {
            Ok(r) => r,
            Err(e) => {
                self.reset_connection().await;
                self.with_live(&src.name, |l| l.error = Some(format!("{e:#}")));
                return Err(e);
            }
        };
        let (h, name, local, t) = (
            self.history.clone(),
            src.name.clone(),
            run.local_id,
            run.upload.time_ns,
        );
        tokio::task::spawn_blocking(move || h.committed(&name, &local, t)).await??;
        self.with_live(&src.name, |l| {
            l.last_commit_ns = t;
            l.error = None;
            l.upload = UploadControl::default();
        });
        Ok(run)
    }

    fn agent_throttle(&self, tz: chrono_tz::Tz) -> Arc<Throttle> {
        let limit = self.agent_limit();
        let mut g = self
            .agent_throttle
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        match g.as_ref() {
            Some((l, z, t)) if *l == limit && *z == tz => t.clone(),
            _ => {
                let t = Throttle::new(limit, tz);
                *g = Some((limit, tz, t.clone()));
                t
            }
        }
    }

    async fn realtime_loop(self: Arc<Self>, src: pb::Source) {
        let name = src.name.clone();
        let hub = match self.hub() {
            Ok(h) => h,
            Err(e) => {
                tracing::error!(source = %name, "cannot watch: {e:#}; falling back to the reconcile scan only");
                self.with_live(&name, |l| l.error = Some(format!("cannot watch: {e:#}")));
                return;
            }
        };
        // Watch the same spellings the walker records, or the dirty set
        // would never match (a symlinked parent, `..`).
        let given: Vec<PathBuf> = src.paths.iter().map(PathBuf::from).collect();
        let roots = repo_format::backup::resolved_paths(&given).unwrap_or(given);
        hub.add_source(&name, roots, &src.excludes).await;
        let st = hub.status(&name);
        tracing::info!(source = %name, watched = st.watched, unwatched = st.unwatched, "watching");
        let ms = |v: u32, d: u32| Duration::from_millis(u64::from(if v == 0 { d } else { v }));
        let quiet = ms(src.quiet_ms, DEFAULT_QUIET_MS);
        let max_delay = ms(src.max_delay_ms, DEFAULT_MAX_DELAY_MS).max(quiet);
        let reconcile = Duration::from_secs(if src.reconcile_secs == 0 {
            DEFAULT_RECONCILE_SECS
        } else {
            src.reconcile_secs
        });
        // Periods come from the collector (capped at a year there) and the
        // state file: bounded again here, as an Instant past its range panics.
        let reconcile = reconcile.min(MAX_PERIOD);
        let mut next_reconcile = Instant::now() + reconcile;
        let fallback = self
            .opts
            .unwatched_scan
            .unwrap_or(Duration::from_secs(60))
            .min(MAX_PERIOD);
        let mut next_fallback = Instant::now() + fallback;
        let mut backoff = Duration::from_secs(1);
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let now = Instant::now();
            if now >= next_reconcile {
                hub.mark_full(&name);
                next_reconcile = now + reconcile;
            }
            if now >= next_fallback {
                next_fallback = now + fallback;
                if hub.status(&name).unwatched > 0 {
                    let (h, n) = (hub.clone(), name.clone());
                    let _ = tokio::task::spawn_blocking(move || h.scan_unwatched(&n)).await;
                }
            }
            let Some(batch) = hub.take_batch(&name, quiet, max_delay, Instant::now()) else {
                continue;
            };
            self.with_live(&name, |l| l.inflight_since = Some(batch.since));
            let dirty = (!batch.full).then(|| batch.dirty.clone());
            let started = Instant::now();
            match self.run_source(&src, dirty).await {
                Ok(run) => {
                    backoff = Duration::from_secs(1);
                    // A file still being written is read again next batch.
                    for i in &run.local.issues {
                        if i.reason.contains("changed while being read") {
                            hub.mark_parent_of(&name, std::path::Path::new(&i.path));
                        }
                    }
                    tracing::info!(
                        source = %name,
                        snapshot = %run.snapshot().map(|i| i.short()).unwrap_or_default(),
                        full = batch.full,
                        dirs = batch.dirty.len(),
                        files_read = run.local.stats.files - run.local.stats.files_unchanged,
                        sent = run.upload.bytes_sent,
                        secs = started.elapsed().as_secs_f64(),
                        "continuous snapshot committed"
                    );
                    self.with_live(&name, |l| l.inflight_since = None);
                }
                Err(e) => {
                    tracing::warn!(source = %name, "continuous backup failed: {e:#}; retrying in {backoff:?}");
                    hub.give_back(&name, batch);
                    self.with_live(&name, |l| l.inflight_since = None);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(60));
                }
            }
        }
    }

    async fn schedule_loop(self: Arc<Self>, src: pb::Source) {
        let name = src.name.clone();
        let sched = match Schedule::new(&src.schedule, self.time_zone()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(source = %name, "{e}");
                self.with_live(&name, |l| l.error = Some(e.to_string()));
                return;
            }
        };
        let mut backoff = Duration::from_secs(60);
        loop {
            let (h, n) = (self.history.clone(), name.clone());
            let rec = match tokio::task::spawn_blocking(move || h.get(&n, now_ns())).await {
                Ok(Ok(r)) => r,
                _ => {
                    tokio::time::sleep(Duration::from_secs(10)).await;
                    continue;
                }
            };
            let last = if rec.last_run_ns > 0 {
                rec.last_run_ns
            } else {
                rec.assigned_ns
            };
            let last = chrono::DateTime::from_timestamp_nanos(last);
            let now = chrono::Utc::now();
            match sched.next_due(last, now) {
                Due::Now => {
                    if src.jitter_secs > 0 {
                        let j = crate::control::jitter_ms(u64::from(src.jitter_secs) * 1000);
                        tokio::time::sleep(Duration::from_millis(j)).await;
                    }
                    let started = now_ns();
                    self.with_live(&name, |l| {
                        l.inflight_since = Some(SystemTime::now());
                    });
                    let r = self.run_source(&src, None).await;
                    self.with_live(&name, |l| l.inflight_since = None);
                    match r {
                        Ok(run) => {
                            backoff = Duration::from_secs(60);
                            tracing::info!(source = %name, snapshot = %run.snapshot().map(|i| i.short()).unwrap_or_default(), "scheduled snapshot committed");
                            let (h, n) = (self.history.clone(), name.clone());
                            let _ = tokio::task::spawn_blocking(move || h.ran(&n, started)).await;
                        }
                        Err(e) => {
                            tracing::warn!(source = %name, "scheduled backup failed: {e:#}; retrying in {backoff:?}");
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(Duration::from_secs(1800));
                        }
                    }
                }
                // Wall clocks jump (suspend, NTP): look again at least every minute.
                Due::At(t) => {
                    let wait = (t - now)
                        .to_std()
                        .unwrap_or_default()
                        .min(Duration::from_secs(60));
                    tokio::time::sleep(wait.max(Duration::from_millis(50))).await;
                }
                Due::Never => return,
            }
        }
    }

    /// Per source: age of the oldest change not yet committed, bytes
    /// pending, and anything to act on.
    pub fn lag(&self) -> Vec<pb::SourceLag> {
        let hub = self.hub.lock().ok().and_then(|h| h.clone());
        let now = SystemTime::now();
        let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        self.list()
            .iter()
            .map(|s| {
                let w = hub
                    .as_ref()
                    .filter(|_| s.realtime)
                    .map(|h| h.status(&s.name));
                let l = live.get(&s.name);
                let oldest = [
                    l.and_then(|l| l.inflight_since),
                    w.as_ref().and_then(|w| w.pending_since),
                ]
                .into_iter()
                .flatten()
                .min();
                let mut notes: Vec<String> = Vec::new();
                if let Some(n) = w.as_ref().map(|w| w.note.clone()).filter(|n| !n.is_empty()) {
                    notes.push(n);
                }
                if let Some(e) = l.and_then(|l| l.error.clone()) {
                    notes.push(format!("last run failed: {e}"));
                }
                pb::SourceLag {
                    source: s.name.clone(),
                    oldest_change_age_secs: oldest
                        .and_then(|o| now.duration_since(o).ok())
                        .map_or(0, |d| d.as_secs()),
                    pending_bytes: l.map_or(0, |l| {
                        l.upload
                            .planned
                            .load(Ordering::Relaxed)
                            .saturating_sub(l.upload.sent.load(Ordering::Relaxed))
                    }),
                    note: notes.join("; ").chars().take(1000).collect(),
                    last_commit_ns: l.map_or(0, |l| l.last_commit_ns),
                }
            })
            .collect()
    }

    /// Run a backup-now job over the matching sources, reporting through `tx`.
    pub async fn backup_now(
        self: Arc<Self>,
        cmd: pb::BackupNow,
        tx: tokio::sync::mpsc::Sender<pb::AgentEvent>,
    ) {
        let id = cmd.job_id;
        let _ = tx
            .send(crate::control::report(
                id,
                pb::JobState::Running,
                "backing up".into(),
                0,
                0,
            ))
            .await;
        let mut done = Vec::new();
        let (mut files, mut bytes) = (0, 0);
        let mut failed = None;
        for s in self
            .list()
            .iter()
            .filter(|s| cmd.source.is_empty() || s.name == cmd.source)
        {
            match self
                .run_source(s, None)
                .await
                .with_context(|| s.name.clone())
            {
                Ok(run) => {
                    files += run.local.stats.files;
                    bytes += run.upload.bytes_sent;
                    done.push(format!(
                        "{}: snapshot {}",
                        s.name,
                        run.snapshot().map(|i| i.short()).unwrap_or_default()
                    ));
                }
                Err(e) => {
                    failed = Some(format!("{e:#}"));
                    break;
                }
            }
        }
        let ev = match failed {
            Some(msg) => crate::control::report(id, pb::JobState::Failed, msg, files, bytes),
            None if done.is_empty() => crate::control::report(
                id,
                pb::JobState::Failed,
                format!("no source {:?}", cmd.source),
                0,
                0,
            ),
            None => crate::control::report(id, pb::JobState::Done, done.join("; "), files, bytes),
        };
        let _ = tx.send(ev).await;
    }
}
