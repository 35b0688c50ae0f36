//! Backup: walk → read/chunk/id → seal/verify → pack → catalog, on all cores.
//!
//! Threads and bounded channels (memory is bounded by what is in flight,
//! never by the number or size of files):
//!
//! ```text
//! walker (caller's thread) ──FileJob──► file workers ──RawBlob──► seal workers ──SealedBlob──► packer
//!        │                                   │ (reply, one per file)                               │
//!        └──BuildItem (walk order)──► tree builder ──tree blobs────────────────────────────────────┘
//! ```
//!
//! The walker lists each directory sorted by name and sends the tree builder
//! one item per entry in that order: ready entries (unchanged files taken from
//! the parent snapshot, symlinks, special files) or a pending reply from the
//! file worker reading that file. The builder assembles each directory's tree
//! bottom-up as its end marker arrives, so trees are deterministic while files
//! are read in parallel. Chunks are claimed once per backup (a session set in
//! front of the catalog) so no chunk is sealed twice.
//!
//! Commit order (DESIGN.md invariant 1): packs are fsynced and catalogued as
//! they fill; the snapshot file and row are written only after the packer has
//! made the last pack durable. A failure anywhere aborts before that point:
//! whatever packs were written stay as unreferenced (harmless) data.

mod claims;
mod dirty;
mod stages;
mod walk;

pub use dirty::DirtySet;

/// The absolute paths a backup of `paths` records (and walks): `.` and `..`
/// resolved and the parent directory canonicalised, the last component kept
/// as given. A watcher must watch these same spellings for its dirty set to
/// match the walk.
pub fn resolved_paths(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    Ok(walk::resolve_roots(paths)?
        .into_iter()
        .map(|(_, p)| p)
        .collect())
}

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::error::{Error, Result};
use crate::id::Id;
use crate::pack::PackEntry;
use crate::repo::Repository;
use crate::snapshot::{BackupIssue, Snapshot, SnapshotStats};
use claims::Claims;

/// Most issues recorded in a snapshot; the rest are counted.
const MAX_ISSUES: usize = 1000;

/// Files changed less than this before the parent backup started are read
/// again (see `Shared::trust_before_ns`): file times come from the kernel's
/// coarse clock, which lags the precise clock of `time_ns` by up to a tick
/// (10 ms at HZ=100).
pub const RACY_MARGIN_NS: i64 = 20_000_000;

/// Which snapshot to compare against to skip unchanged files.
#[derive(Debug, Clone, Default)]
pub enum ParentChoice {
    /// The latest snapshot of the same host and paths.
    #[default]
    Auto,
    /// None: read every file.
    None,
    /// This one.
    Snapshot(Id),
}

/// Live counters a caller can poll to draw progress.
#[derive(Debug, Default)]
pub struct Progress {
    /// Entries walked so far.
    pub entries: AtomicU64,
    /// Files whose content is done (read or taken from the parent).
    pub files_done: AtomicU64,
    /// Bytes of file content done.
    pub bytes_done: AtomicU64,
    /// Sealed bytes written to packs.
    pub bytes_stored: AtomicU64,
}

/// Told about each pack once it is durable (fsynced and catalogued), with
/// the blobs it holds. The agent uses it to start uploading while the backup
/// is still running. It runs on the packer thread: it must not block (hand
/// the entries to another thread; dropping them is allowed, a later full
/// walk of the snapshot finds whatever was not sent).
#[derive(Clone)]
pub struct PackSink(pub Arc<PackHook>);

/// The function inside a [`PackSink`]: (pack name, its blobs).
pub type PackHook = dyn Fn(Id, &[PackEntry]) + Send + Sync;

impl std::fmt::Debug for PackSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PackSink")
    }
}

/// Options of one backup.
#[derive(Debug, Clone)]
pub struct BackupOptions {
    /// Parent snapshot choice.
    pub parent: ParentChoice,
    /// Threads per CPU stage: this many seal workers and twice as many
    /// readers (reading/chunking; a reader waiting for the disk leaves its
    /// core to another).
    pub threads: usize,
    /// Host name recorded in the snapshot.
    pub hostname: String,
    /// Optional live progress counters.
    pub progress: Option<Arc<Progress>>,
    /// Entries to leave out (see [`crate::glob`]); excluded entries are not recorded.
    pub excludes: Vec<String>,
    /// Incremental (continuous) backup: list only these directories and
    /// their ancestors, take every other directory from the parent snapshot
    /// unread (see [`DirtySet`]). `None`, or no parent snapshot: walk all.
    pub dirty: Option<DirtySet>,
    /// Told about each durable pack (see [`PackSink`]).
    pub on_pack: Option<PackSink>,
    /// Check that every chunk of an unchanged file taken from the parent is
    /// still catalogued, and read the file again when one is not (and walk
    /// every directory: `dirty` is ignored). Always on after a catalog
    /// rebuild (its marker file); an agent sets it after forgetting blobs
    /// its collector lost.
    pub verify_parent: bool,
}

impl Default for BackupOptions {
    fn default() -> Self {
        BackupOptions {
            parent: ParentChoice::Auto,
            threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
            hostname: hostname(),
            progress: None,
            excludes: Vec::new(),
            dirty: None,
            on_pack: None,
            verify_parent: false,
        }
    }
}

/// The host's name, from /proc or the environment.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| "unknown".into())
}

/// The result of a backup.
#[derive(Debug, Clone)]
pub struct BackupOutcome {
    /// Id of the committed snapshot.
    pub id: Id,
    /// The snapshot as committed.
    pub snapshot: Snapshot,
}

/// State shared by every stage of one backup.
pub(crate) struct Shared<'r> {
    pub(crate) repo: &'r Repository,
    abort: AtomicBool,
    fatal: Mutex<Option<Error>>,
    /// Ids claimed by this backup (see [`claims`]).
    pub(crate) claims: Claims,
    issues: Mutex<Vec<BackupIssue>>,
    issues_dropped: AtomicU64,
    pub(crate) progress: Arc<Progress>,
    pub(crate) files_unchanged: AtomicU64,
    pub(crate) bytes_read: AtomicU64,
    pub(crate) new_blobs: AtomicU64,
    pub(crate) new_bytes: AtomicU64,
    pub(crate) new_bytes_stored: AtomicU64,
    /// Files whose ctime is at or after this (ns) are read even when they
    /// look unchanged: they may have been written again within the clock tick
    /// of the parent's read ("racily clean", as git calls it).
    pub(crate) trust_before_ns: i64,
    /// See [`BackupOptions::on_pack`].
    pub(crate) on_pack: Option<PackSink>,
    /// See [`BackupOptions::verify_parent`].
    pub(crate) verify_parent: bool,
}

impl<'r> Shared<'r> {
    fn new(repo: &'r Repository, progress: Arc<Progress>) -> Self {
        Shared {
            repo,
            abort: AtomicBool::new(false),
            fatal: Mutex::new(None),
            claims: Claims::default(),
            issues: Mutex::new(Vec::new()),
            issues_dropped: AtomicU64::new(0),
            progress,
            files_unchanged: AtomicU64::new(0),
            bytes_read: AtomicU64::new(0),
            new_blobs: AtomicU64::new(0),
            new_bytes: AtomicU64::new(0),
            new_bytes_stored: AtomicU64::new(0),
            trust_before_ns: i64::MAX,
            on_pack: None,
            verify_parent: false,
        }
    }

    /// Record a fatal error (the first one wins) and make every stage drain and stop.
    pub(crate) fn fail(&self, e: Error) {
        if let Ok(mut f) = self.fatal.lock()
            && f.is_none()
        {
            *f = Some(e);
        }
        self.abort.store(true, Ordering::SeqCst);
    }

    pub(crate) fn aborted(&self) -> bool {
        self.abort.load(Ordering::Relaxed)
    }

    /// Record a path that could not be backed up as it was.
    pub(crate) fn issue(&self, path: &Path, reason: impl Into<String>) {
        if let Ok(mut v) = self.issues.lock() {
            if v.len() < MAX_ISSUES {
                v.push(BackupIssue {
                    path: path.to_string_lossy().into_owned(),
                    reason: reason.into(),
                });
            } else {
                self.issues_dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// True when the caller must store blob `id`: it is neither catalogued
    /// (`contains` asks the catalog; a blob of a dropped spool pack counts,
    /// see [`crate::catalog::PackState::Dropped`]) nor already claimed by
    /// this backup. (A race with a concurrent writer can store a blob twice;
    /// the catalog keeps the first copy.)
    pub(crate) fn claim(
        &self,
        id: &Id,
        mut contains: impl FnMut(&Id) -> Result<bool>,
    ) -> Result<bool> {
        if self.claims.is_claimed(id)? || contains(id)? {
            return Ok(false);
        }
        self.claims.try_claim(id)
    }
}

/// Back up `paths` into `repo` and commit a snapshot.
///
/// Each path becomes an entry of the snapshot's root tree, named by its last
/// component (two paths with the same last component are refused). Unreadable
/// files and files that change while read are recorded as issues and the
/// backup goes on; the snapshot is then partial ([`Snapshot::is_partial`]).
pub fn backup(repo: &Repository, paths: &[PathBuf], opts: &BackupOptions) -> Result<BackupOutcome> {
    let started = Instant::now();
    repo.sweep_temporary_packs();
    let time_ns = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0);
    let roots = walk::resolve_roots(paths)?;
    let abs_paths: Vec<String> = roots
        .iter()
        .map(|(_, p)| p.to_string_lossy().into_owned())
        .collect();
    let parent = match &opts.parent {
        ParentChoice::None => None,
        ParentChoice::Snapshot(id) => Some(*id),
        ParentChoice::Auto => {
            let mut want = abs_paths.clone();
            want.sort();
            repo.snapshots()?
                .into_iter()
                .rev()
                .find(|(_, s)| {
                    let mut p = s.paths.clone();
                    p.sort();
                    p == want && s.hostname == opts.hostname
                })
                .map(|(id, _)| id)
        }
    };
    // A damaged or vanished parent only costs speed: back up without it.
    let (parent_tree, parent_snap) = parent
        .and_then(|id| {
            let (_, snap) = repo.find_snapshot(&id.to_hex()).ok()?;
            Some((repo.read_tree(&snap.tree).ok()?, snap))
        })
        .unzip();
    let incremental = opts.dirty.as_ref().filter(|_| parent_tree.is_some());

    let progress = opts.progress.clone().unwrap_or_default();
    let mut shared = Shared::new(repo, progress);
    shared.on_pack = opts.on_pack.clone();
    shared.verify_parent = opts.verify_parent;
    if let Some(p) = &parent_snap {
        // The parent started at p.time_ns: a file changed within a coarse
        // clock tick (or a small clock step) before that may have been
        // written again after it was read with the same mtime and ctime.
        shared.trust_before_ns = p.time_ns.saturating_sub(RACY_MARGIN_NS);
    }
    let excludes = crate::glob::Excludes::new(&opts.excludes);
    let (root, walked, replaced) = stages::run(
        &shared,
        roots,
        parent_tree,
        opts.threads.max(1),
        &excludes,
        incremental,
    )?;
    // Incremental: the parent's totals, with what was walked in place of
    // what it replaced.
    let counts = match (incremental, parent_snap.map(|s| s.stats)) {
        (Some(_), Some(p)) => stages::Counts {
            files: (p.files + walked.files).saturating_sub(replaced.files),
            dirs: (p.dirs + walked.dirs).saturating_sub(replaced.dirs),
            others: (p.others + walked.others).saturating_sub(replaced.others),
            bytes: (p.bytes + walked.bytes).saturating_sub(replaced.bytes),
        },
        _ => walked,
    };

    let stats = SnapshotStats {
        files: counts.files,
        dirs: counts.dirs,
        others: counts.others,
        bytes: counts.bytes,
        files_unchanged: shared.files_unchanged.load(Ordering::Relaxed),
        bytes_read: shared.bytes_read.load(Ordering::Relaxed),
        new_blobs: shared.new_blobs.load(Ordering::Relaxed),
        new_bytes: shared.new_bytes.load(Ordering::Relaxed),
        new_bytes_stored: shared.new_bytes_stored.load(Ordering::Relaxed),
        duration_ms: started.elapsed().as_millis() as u64,
    };
    let issues = shared.issues.lock().map(|v| v.clone()).unwrap_or_default();
    let snapshot = Snapshot {
        time_ns,
        hostname: opts.hostname.clone(),
        paths: abs_paths,
        tree: root,
        parent,
        stats,
        issues,
        issues_dropped: shared.issues_dropped.load(Ordering::Relaxed),
        site: None,
        agent: None,
        source: None,
    };
    let id = repo.commit_snapshot(&snapshot)?;
    Ok(BackupOutcome { id, snapshot })
}
