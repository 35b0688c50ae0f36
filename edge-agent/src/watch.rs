//! Real-time watching: inotify (through `notify`) on every directory of the
//! real-time sources, feeding each source's dirty set.
//!
//! - One non-recursive watch per directory, added by the `hv-watch` thread:
//!   at start, and for directories that appear later (created or moved in).
//!   Watching ourselves, rather than `notify`'s recursive mode, tells us
//!   exactly which directories could not be watched.
//! - An event on `/src/a/f` marks `/src/a` dirty (see
//!   [`repo_format::backup::DirtySet`]); both ends of a rename are marked.
//!   Opens and closes-without-write are ignored (our own reads cause them).
//! - Never silently missed: a queue overflow (IN_Q_OVERFLOW) or a watcher
//!   error marks the source for a full rescan; so does (re)starting. A
//!   directory that cannot be watched because the watch limit is reached
//!   (`fs.inotify.max_user_watches`) is recorded with everything below it as
//!   unwatched: [`WatchHub::scan_unwatched`] marks that part dirty (the
//!   realtime loop calls it every minute) and retries the watches; the
//!   source's note says so and what to raise.
//! - Debounce: a batch is ready after a quiet period without events, or a
//!   maximum delay after its first event ([`WatchHub::take_batch`]).
//!
//! Known gaps, covered by the periodic reconcile scan: writes through mmap
//! and through a hard link in another directory raise no event here.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Instant, SystemTime};

use anyhow::{Context, Result};
use notify::event::{EventKind, ModifyKind, RenameMode};
use notify::{RecursiveMode, Watcher as _};
use repo_format::backup::DirtySet;
use repo_format::glob::Excludes;

/// Changes of one source, taken for one incremental backup.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Directories to list again.
    pub dirty: DirtySet,
    /// Everything must be rescanned (overflow, watcher error, start).
    pub full: bool,
    /// Wall time of the oldest change in the batch.
    pub since: SystemTime,
}

/// What the source's watching looks like now.
#[derive(Debug, Clone, Default)]
pub struct WatchStatus {
    /// Oldest change not yet taken into a batch.
    pub pending_since: Option<SystemTime>,
    /// Something central IT must act on (watch limit, overflows).
    pub note: String,
    /// Directories watched (all sources).
    pub watched: usize,
    /// Top directories of this source without a watch.
    pub unwatched: usize,
}

#[derive(Debug)]
struct SourceState {
    roots: Vec<PathBuf>,
    excludes: Arc<Excludes>,
    dirty: DirtySet,
    full: bool,
    first: Option<Instant>,
    last: Option<Instant>,
    first_wall: Option<SystemTime>,
    /// Directories whose watch could not be added (everything below them is
    /// unwatched too).
    unwatched: BTreeSet<PathBuf>,
    overflows: u64,
    error: Option<String>,
}

impl SourceState {
    fn touch(&mut self) {
        let now = Instant::now();
        if self.first.is_none() {
            self.first = Some(now);
            self.first_wall = Some(SystemTime::now());
        }
        self.last = Some(now);
    }

    fn contains(&self, p: &Path) -> bool {
        self.roots.iter().any(|r| p.starts_with(r))
    }
}

#[derive(Debug, Default)]
struct HubState {
    sources: BTreeMap<String, SourceState>,
    /// Directories with a watch.
    watched: BTreeSet<PathBuf>,
    /// Most watches to hold (None = until the kernel refuses).
    limit: Option<usize>,
}

impl HubState {
    /// Forget `p` and everything below it (notify dropped those watches).
    fn forget_watched(&mut self, p: &Path) {
        let below: Vec<PathBuf> = self
            .watched
            .range::<Path, _>((std::ops::Bound::Included(p), std::ops::Bound::Unbounded))
            .take_while(|d| d.starts_with(p))
            .cloned()
            .collect();
        for d in below {
            self.watched.remove(&d);
        }
    }
}

enum Cmd {
    Add {
        name: String,
        state: Box<SourceState>,
        done: mpsc::Sender<()>,
    },
    Remove(String),
    /// Watch the directory tree at `path` (if it is one) for sources holding it.
    Watch(PathBuf),
    /// Mark the unwatched part of a source dirty and retry its watches.
    ScanUnwatched(String, mpsc::Sender<()>),
}

/// The agent's watcher, shared by every real-time source.
pub struct WatchHub {
    state: Arc<Mutex<HubState>>,
    cmds: Mutex<mpsc::Sender<Cmd>>,
}

fn lock(m: &Mutex<HubState>) -> MutexGuard<'_, HubState> {
    // A panic while holding the lock leaves plain data; keep going.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl WatchHub {
    /// Start the watcher. `limit` caps the number of watches (None: until
    /// the kernel's `fs.inotify.max_user_watches`).
    pub fn start(limit: Option<usize>) -> Result<Arc<WatchHub>> {
        let state = Arc::new(Mutex::new(HubState {
            limit,
            ..Default::default()
        }));
        let (tx, rx) = mpsc::channel::<Cmd>();
        let (st, cmd_tx) = (state.clone(), tx.clone());
        let watcher = notify::INotifyWatcher::new(
            move |res: notify::Result<notify::Event>| on_event(&st, &cmd_tx, res),
            notify::Config::default(),
        )
        .context("starting the inotify watcher")?;
        let st = state.clone();
        std::thread::Builder::new()
            .name("hv-watch".into())
            .spawn(move || watch_thread(watcher, st, rx))
            .context("starting the watch thread")?;
        Ok(Arc::new(WatchHub {
            state,
            cmds: Mutex::new(tx),
        }))
    }

    fn send(&self, c: Cmd) {
        if let Ok(tx) = self.cmds.lock() {
            let _ = tx.send(c);
        }
    }

    /// Watch a source (replacing any of that name); returns when its
    /// directories are watched. The source starts dirty (full rescan): a
    /// change made while the agent was down is found.
    pub async fn add_source(&self, name: &str, roots: Vec<PathBuf>, excludes: &[String]) {
        // Inserted by the watch thread, in order with removals.
        let mut s = SourceState {
            roots,
            excludes: Arc::new(Excludes::new(excludes)),
            dirty: DirtySet::new(),
            full: true,
            first: None,
            last: None,
            first_wall: None,
            unwatched: BTreeSet::new(),
            overflows: 0,
            error: None,
        };
        s.touch();
        let (done, wait) = mpsc::channel();
        self.send(Cmd::Add {
            name: name.to_string(),
            state: Box::new(s),
            done,
        });
        let _ = tokio::task::spawn_blocking(move || wait.recv()).await;
    }

    /// Stop watching a source.
    pub fn remove_source(&self, name: &str) {
        self.send(Cmd::Remove(name.to_string()));
    }

    /// Mark the whole source for a rescan (reconcile, or a failed batch).
    pub fn mark_full(&self, name: &str) {
        if let Some(s) = lock(&self.state).sources.get_mut(name) {
            s.full = true;
            s.touch();
        }
    }

    /// Mark the directory holding `path` dirty.
    pub fn mark_parent_of(&self, name: &str, path: &Path) {
        if let Some(s) = lock(&self.state).sources.get_mut(name) {
            s.dirty.mark_parent_of(path);
            s.touch();
        }
    }

    /// Take the source's changes if they are ready: no event for `quiet`, or
    /// the first one at least `max_delay` ago.
    pub fn take_batch(
        &self,
        name: &str,
        quiet: std::time::Duration,
        max_delay: std::time::Duration,
        now: Instant,
    ) -> Option<Batch> {
        let mut st = lock(&self.state);
        let s = st.sources.get_mut(name)?;
        let (first, last) = (s.first?, s.last?);
        if !s.full && s.dirty.is_empty() {
            s.first = None;
            s.last = None;
            s.first_wall = None;
            return None;
        }
        if now.saturating_duration_since(last) < quiet
            && now.saturating_duration_since(first) < max_delay
        {
            return None;
        }
        let b = Batch {
            dirty: std::mem::take(&mut s.dirty),
            full: std::mem::replace(&mut s.full, false),
            since: s.first_wall.unwrap_or_else(SystemTime::now),
        };
        s.first = None;
        s.last = None;
        s.first_wall = None;
        Some(b)
    }

    /// Put a batch that could not be committed back (it is retried).
    pub fn give_back(&self, name: &str, b: Batch) {
        if let Some(s) = lock(&self.state).sources.get_mut(name) {
            s.dirty.merge(b.dirty);
            s.full |= b.full;
            s.touch();
            if s.first_wall.is_none_or(|w| b.since < w) {
                s.first_wall = Some(b.since);
            }
        }
    }

    /// The source's watching status.
    pub fn status(&self, name: &str) -> WatchStatus {
        let st = lock(&self.state);
        let Some(s) = st.sources.get(name) else {
            return WatchStatus::default();
        };
        let mut notes = Vec::new();
        if !s.unwatched.is_empty() {
            let max = read_sysctl("fs/inotify/max_user_watches");
            notes.push(format!(
                "real-time watching stopped at the inotify watch limit (fs.inotify.max_user_watches = {max}, {} watched): {} directories and everything below them are scanned periodically instead; raise the limit, e.g. `sysctl fs.inotify.max_user_watches=1048576`",
                st.watched.len(),
                s.unwatched.len()
            ));
        }
        if s.overflows > 0 {
            let max = read_sysctl("fs/inotify/max_queued_events");
            notes.push(format!(
                "the inotify queue overflowed {} times (fs.inotify.max_queued_events = {max}); each forced a full rescan",
                s.overflows
            ));
        }
        if let Some(e) = &s.error {
            notes.push(format!("watcher error (forced a full rescan): {e}"));
        }
        WatchStatus {
            pending_since: s.first_wall,
            note: notes.join("; "),
            watched: st.watched.len(),
            unwatched: s.unwatched.len(),
        }
    }

    /// Mark the unwatched part of a source dirty (a periodic scan instead of
    /// events) and try to watch it again. Blocking: call off the runtime.
    pub fn scan_unwatched(&self, name: &str) {
        let (done, wait) = mpsc::channel();
        self.send(Cmd::ScanUnwatched(name.to_string(), done));
        let _ = wait.recv();
    }
}

fn read_sysctl(name: &str) -> String {
    std::fs::read_to_string(Path::new("/proc/sys").join(name))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into())
}

/// The notify callback (on notify's thread): cheap, never blocks on I/O.
fn on_event(state: &Mutex<HubState>, cmds: &mpsc::Sender<Cmd>, res: notify::Result<notify::Event>) {
    let ev = match res {
        Ok(ev) => ev,
        Err(e) => {
            let mut st = lock(state);
            for s in st.sources.values_mut() {
                s.full = true;
                s.error = Some(e.to_string());
                s.touch();
            }
            rewatch_roots(&st, cmds);
            return;
        }
    };
    if ev.need_rescan() {
        tracing::warn!("inotify queue overflowed: every real-time source will be rescanned");
        let mut st = lock(state);
        for s in st.sources.values_mut() {
            s.full = true;
            s.overflows += 1;
            s.touch();
        }
        // Directories created during the overflow were never announced:
        // walk every root again and watch what is not watched yet.
        rewatch_roots(&st, cmds);
        return;
    }
    let (gone, appeared) = match ev.kind {
        // Our own reads (and everyone's) open and close files: no change.
        EventKind::Access(_) => return,
        EventKind::Remove(_) => (true, false),
        EventKind::Create(_) => (false, true),
        EventKind::Modify(ModifyKind::Name(RenameMode::From)) => (true, false),
        EventKind::Modify(ModifyKind::Name(RenameMode::To)) => (false, true),
        // `Both` repeats the paths of a From and a To already handled.
        EventKind::Modify(ModifyKind::Name(RenameMode::Both)) => return,
        _ => (false, false),
    };
    let mut st = lock(state);
    for p in &ev.paths {
        let mut held = false;
        for s in st.sources.values_mut().filter(|s| s.contains(p)) {
            if s.roots.iter().any(|r| r == p) {
                // The root itself changed (replaced, recreated, attributes):
                // rescan, and watch it again below.
                s.full = true;
                let _ = cmds.send(Cmd::Watch(p.clone()));
            } else {
                s.dirty.mark_parent_of(p);
            }
            s.touch();
            held = true;
        }
        if held && gone {
            st.forget_watched(p);
        }
        if held && appeared {
            let _ = cmds.send(Cmd::Watch(p.clone()));
        }
    }
}

/// Ask the watch thread to walk every root and watch what is not watched.
fn rewatch_roots(st: &HubState, cmds: &mpsc::Sender<Cmd>) {
    for s in st.sources.values() {
        for r in &s.roots {
            let _ = cmds.send(Cmd::Watch(r.clone()));
        }
    }
}

fn watch_thread(
    mut w: notify::INotifyWatcher,
    state: Arc<Mutex<HubState>>,
    rx: mpsc::Receiver<Cmd>,
) {
    for cmd in rx {
        match cmd {
            Cmd::Add {
                name,
                state: s,
                done,
            } => {
                let roots = s.roots.clone();
                lock(&state).sources.insert(name.clone(), *s);
                for r in roots {
                    // The source starts with a full rescan: no need to mark.
                    watch_tree(&mut w, &state, &name, &r, false);
                }
                let _ = done.send(());
            }
            Cmd::Remove(name) => {
                let mut st = lock(&state);
                let Some(src) = st.sources.remove(&name) else {
                    continue;
                };
                let still: Vec<PathBuf> =
                    st.sources.values().flat_map(|s| s.roots.clone()).collect();
                let unwatch: Vec<PathBuf> = st
                    .watched
                    .iter()
                    .filter(|d| src.contains(d) && !still.iter().any(|r| d.starts_with(r)))
                    .cloned()
                    .collect();
                for d in &unwatch {
                    st.watched.remove(d);
                }
                drop(st);
                for d in unwatch {
                    let _ = w.unwatch(&d);
                }
            }
            Cmd::Watch(p) => {
                let names: Vec<String> = lock(&state)
                    .sources
                    .iter()
                    .filter(|(_, s)| s.contains(&p))
                    .map(|(n, _)| n.clone())
                    .collect();
                for n in names {
                    watch_tree(&mut w, &state, &n, &p, true);
                }
            }
            Cmd::ScanUnwatched(name, done) => {
                let tops: Vec<PathBuf> = lock(&state)
                    .sources
                    .get_mut(&name)
                    .map(|s| std::mem::take(&mut s.unwatched).into_iter().collect())
                    .unwrap_or_default();
                for top in tops {
                    // Every directory below is listed by the next batch...
                    let mut dirs = Vec::new();
                    each_dir(&top, &mut |d| {
                        dirs.push(d.to_path_buf());
                        true
                    });
                    if let Some(s) = lock(&state).sources.get_mut(&name) {
                        for d in dirs {
                            s.dirty.mark(d);
                        }
                        s.touch();
                    }
                    // ...and watched if the limit allows now.
                    watch_tree(&mut w, &state, &name, &top, false);
                }
                let _ = done.send(());
            }
        }
    }
}

/// Visit `top` and the directories below it (not following symlinks),
/// depth first; `visit` returns false to skip a directory's children.
fn each_dir(top: &Path, visit: &mut dyn FnMut(&Path) -> bool) {
    let mut stack = vec![top.to_path_buf()];
    while let Some(d) = stack.pop() {
        if !visit(&d) {
            continue;
        }
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(e.path());
            }
        }
    }
}

/// Watch `top` and every directory below it for source `name`; directories
/// that cannot be watched (limit) are recorded as unwatched, with their
/// subtrees. With `mark_new`, every directory that gets a new watch is also
/// marked dirty: whatever was created in it before the watch existed raised
/// no event, so the next batch lists it. Never holds the state lock while
/// talking to notify (its thread takes that lock in the callback).
fn watch_tree(
    w: &mut notify::INotifyWatcher,
    state: &Mutex<HubState>,
    name: &str,
    top: &Path,
    mark_new: bool,
) {
    let Some((root, excludes)) = lock(state).sources.get(name).and_then(|s| {
        s.roots
            .iter()
            .find(|r| top.starts_with(r))
            .map(|r| (r.clone(), s.excludes.clone()))
    }) else {
        return;
    };
    if !std::fs::symlink_metadata(top).is_ok_and(|m| m.is_dir()) {
        return;
    }
    each_dir(top, &mut |d| {
        if !excludes.is_empty() && excluded(&excludes, &root, d) {
            return false;
        }
        {
            let st = lock(state);
            if st.watched.contains(d) {
                return true;
            }
            if st.limit.is_some_and(|l| st.watched.len() >= l) {
                drop(st);
                unwatched(state, name, d);
                return false;
            }
        }
        match w.watch(d, RecursiveMode::NonRecursive) {
            Ok(()) => {
                let mut st = lock(state);
                st.watched.insert(d.to_path_buf());
                if mark_new && let Some(s) = st.sources.get_mut(name) {
                    s.dirty.mark(d);
                    s.touch();
                }
                true
            }
            Err(e) if matches!(e.kind, notify::ErrorKind::MaxFilesWatch) => {
                unwatched(state, name, d);
                false
            }
            // Vanished meanwhile, or unreadable: the listing reports it.
            Err(e) => {
                tracing::debug!("not watching {}: {e}", d.display());
                false
            }
        }
    });
}

fn unwatched(state: &Mutex<HubState>, name: &str, d: &Path) {
    if let Some(s) = lock(state).sources.get_mut(name) {
        s.unwatched.insert(d.to_path_buf());
    }
}

/// True when directory `d` (below source root `root`) is excluded: the same
/// relative names the backup walker matches (root's own name first).
fn excluded(ex: &Excludes, root: &Path, d: &Path) -> bool {
    let Ok(below) = d.strip_prefix(root) else {
        return false;
    };
    let mut rel: Vec<u8> = root
        .file_name()
        .map(|n| n.as_bytes().to_vec())
        .unwrap_or_default();
    for c in below.components() {
        rel.push(b'/');
        rel.extend_from_slice(c.as_os_str().as_bytes());
    }
    let name = d.file_name().map(|n| n.as_bytes()).unwrap_or_default();
    ex.excluded(name, &rel)
}
