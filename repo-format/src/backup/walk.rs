//! The walker: lists directories in name order, compares each file with the
//! parent snapshot, and feeds the file workers and the tree builder.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use crossbeam_channel::{Sender, bounded};

use crate::backup::Shared;
use crate::backup::dirty::DirtySet;
use crate::backup::stages::{BuildItem, Counts, FileJob};
use crate::error::{Error, Result};
use crate::meta::{self, NameCache};
use crate::tree::{Entry, EntryKind, valid_name};

/// Make backup paths absolute and name each root entry by its last component.
pub(crate) fn resolve_roots(paths: &[PathBuf]) -> Result<Vec<(Vec<u8>, PathBuf)>> {
    if paths.is_empty() {
        return Err(Error::Refused("no paths to back up".into()));
    }
    let mut roots = Vec::new();
    for p in paths {
        let abs = std::path::absolute(p).map_err(|e| Error::io("resolving", p, e))?;
        // Normalise `.` and `..` lexically without following a final symlink.
        let parent = abs
            .parent()
            .map(|d| d.canonicalize().unwrap_or_else(|_| d.to_path_buf()));
        let name = abs.file_name().map(|n| n.as_bytes().to_vec());
        let (abs, name) = match (parent, name) {
            (Some(d), Some(n)) if valid_name(&n) => (d.join(OsStr::from_bytes(&n)), n),
            _ => {
                let c = abs
                    .canonicalize()
                    .map_err(|e| Error::io("resolving", &abs, e))?;
                let n = c
                    .file_name()
                    .map(|n| n.as_bytes().to_vec())
                    .unwrap_or_else(|| b"root".to_vec());
                (c, n)
            }
        };
        std::fs::symlink_metadata(&abs).map_err(|e| Error::io("reading", &abs, e))?;
        roots.push((name, abs));
    }
    roots.sort();
    for w in roots.windows(2) {
        if w[0].0 == w[1].0 {
            return Err(Error::Refused(format!(
                "{} and {} would both be named {:?} in the snapshot; back them up separately",
                w[0].1.display(),
                w[1].1.display(),
                String::from_utf8_lossy(&w[0].0)
            )));
        }
    }
    Ok(roots)
}

pub(crate) struct Walker<'s, 'r> {
    shared: &'s Shared<'r>,
    excludes: &'s crate::glob::Excludes,
    /// Check that a parent's chunks still exist before reusing them: only
    /// after a catalog rebuild (the one way blobs vanish), see rebuild.rs.
    verify_parent: bool,
    /// Path below the current root, `/`-separated (for exclude patterns).
    rel: Vec<u8>,
    reader: crate::catalog::Catalog,
    files: Sender<FileJob>,
    build: Sender<BuildItem>,
    names: NameCache,
    /// Small files waiting to go to a file worker as one job.
    batch: Vec<(PathBuf, Entry)>,
    batch_bytes: u64,
    /// Incremental mode: list only these directories (and new ones); take
    /// every other directory from the parent snapshot as it was.
    dirty: Option<&'s DirtySet>,
    /// Incremental mode: totals of the parent's entries replaced by what was
    /// walked (the snapshot's totals are the parent's + walked − these).
    replaced: Counts,
}

/// A batch is sent when it holds this many files...
const BATCH_FILES: usize = 128;
/// ...or this many bytes.
const BATCH_BYTES: u64 = 2 * 1024 * 1024;

/// Same file as in the parent snapshot: nothing needs reading.
fn unchanged(old: &Entry, new: &Entry) -> bool {
    old.kind == EntryKind::File
        && new.kind == EntryKind::File
        && old.dev == new.dev
        && old.ino == new.ino
        && old.size == new.size
        && old.mtime_ns == new.mtime_ns
        && old.ctime_ns == new.ctime_ns
        && old.ctime_ns != 0
        && (old.size == 0 || !old.chunks.is_empty())
}

/// A directory entry to walk: name, full path and, when listing gave it, its
/// metadata (`None`: stat the path).
type Listed = (Vec<u8>, PathBuf, Option<std::io::Result<std::fs::Metadata>>);

impl<'s, 'r> Walker<'s, 'r> {
    pub(crate) fn new(
        shared: &'s Shared<'r>,
        files: Sender<FileJob>,
        build: Sender<BuildItem>,
        excludes: &'s crate::glob::Excludes,
        dirty: Option<&'s DirtySet>,
    ) -> Result<Self> {
        let verify_parent = shared.verify_parent
            || shared
                .repo
                .root()
                .join(crate::rebuild::DEGRADED_MARKER)
                .exists();
        Ok(Walker {
            shared,
            excludes,
            verify_parent,
            rel: Vec::new(),
            reader: {
                let r = crate::catalog::Catalog::open_reader(&shared.repo.catalog_path())?;
                r.hold_read_snapshot()?;
                r
            },
            files,
            build,
            names: NameCache::default(),
            batch: Vec::new(),
            batch_bytes: 0,
            // After a catalog rebuild every parent chunk is checked: walk all.
            dirty: dirty.filter(|_| !verify_parent),
            replaced: Counts::default(),
        })
    }

    /// Send the pending batch of files, and tell the builder to expect its results here.
    fn flush(&mut self) -> Result<()> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let items = std::mem::take(&mut self.batch);
        self.batch_bytes = 0;
        let (reply, rx) = bounded(1);
        self.files
            .send(FileJob { items, reply })
            .map_err(|_| Error::Pipeline("file workers stopped".into()))?;
        self.build
            .send(BuildItem::Pending(rx))
            .map_err(|_| Error::Pipeline("tree builder stopped".into()))
    }

    /// Emit an item after any pending batch (the builder consumes in walk order).
    fn emit(&mut self, item: BuildItem) -> Result<()> {
        self.flush()?;
        self.build
            .send(item)
            .map_err(|_| Error::Pipeline("tree builder stopped".into()))
    }

    /// Walk every root; the root tree's end is emitted last. Returns the
    /// totals of the parent entries replaced (incremental mode only).
    pub(crate) fn run(
        mut self,
        roots: Vec<(Vec<u8>, PathBuf)>,
        parent_root: Option<Vec<Entry>>,
    ) -> Result<Counts> {
        if parent_root.is_none() {
            // Nothing to take over: the totals are all walked.
            self.dirty = None;
        }
        let roots = roots
            .into_iter()
            .map(|(name, path)| (name, path, None))
            .collect();
        self.entries(roots, parent_root.as_deref())?;
        self.emit(BuildItem::End)?;
        Ok(self.replaced)
    }

    /// Incremental mode: count the parent's entries of one listed directory
    /// as replaced; a parent directory whose contents were neither walked
    /// against it nor taken over is counted whole (it vanished or changed kind).
    fn replace_old(&mut self, parent: Option<&[Entry]>, accounted: &[Vec<u8>]) {
        let Some(old) = parent.filter(|_| self.dirty.is_some()) else {
            return;
        };
        for e in old {
            self.replaced.add(e);
            if e.kind == EntryKind::Dir
                && let Some(t) = e.subtree
                && accounted.binary_search(&e.name).is_err()
            {
                self.count_old_subtree(t);
            }
        }
    }

    /// Add everything below parent tree `root` to the replaced totals.
    fn count_old_subtree(&mut self, root: crate::id::Id) {
        let mut stack = vec![root];
        while let Some(t) = stack.pop() {
            // A damaged parent tree only makes the totals approximate.
            let Ok(entries) = self.shared.repo.read_tree(&t) else {
                continue;
            };
            for e in entries {
                self.replaced.add(&e);
                if let Some(s) = e.subtree.filter(|_| e.kind == EntryKind::Dir) {
                    stack.push(s);
                }
            }
        }
    }

    /// Emit one item per (name, path), in the given (sorted) order.
    fn entries(&mut self, list: Vec<Listed>, parent: Option<&[Entry]>) -> Result<()> {
        // Names (in order) of parent directories whose contents were walked
        // against the parent or taken over (incremental totals).
        let mut accounted = Vec::new();
        for (name, path, md) in list {
            let rel_len = self.rel.len();
            if !self.rel.is_empty() {
                self.rel.push(b'/');
            }
            self.rel.extend_from_slice(&name);
            if !self.excludes.is_empty() && self.excludes.excluded(&name, &self.rel) {
                self.rel.truncate(rel_len);
                continue;
            }
            let r = self.entry(name.clone(), path, md, parent);
            self.rel.truncate(rel_len);
            if r? {
                accounted.push(name);
            }
        }
        self.replace_old(parent, &accounted);
        Ok(())
    }

    /// Walk one entry; true when it was a directory whose parent contents
    /// were accounted for (walked against them or taken over).
    fn entry(
        &mut self,
        name: Vec<u8>,
        path: PathBuf,
        md: Option<std::io::Result<std::fs::Metadata>>,
        parent: Option<&[Entry]>,
    ) -> Result<bool> {
        {
            if self.shared.aborted() {
                return Err(Error::Pipeline("backup aborted".into()));
            }
            self.shared.progress.entries.fetch_add(1, Ordering::Relaxed);
            let md = match md.unwrap_or_else(|| std::fs::symlink_metadata(&path)) {
                Ok(m) => m,
                Err(e) => {
                    self.shared.issue(&path, format!("cannot stat: {e}"));
                    return Ok(false);
                }
            };
            let mut entry = meta::entry_from_metadata(name, &md);
            self.names.fill(&mut entry);
            let old = parent.and_then(|p| {
                p.binary_search_by(|e| e.name.as_slice().cmp(&entry.name))
                    .ok()
                    .map(|i| &p[i])
            });
            match entry.kind {
                EntryKind::File => self.file(path, entry, old)?,
                EntryKind::Dir => return self.dir(path, entry, old),
                EntryKind::Symlink => {
                    match std::fs::read_link(&path) {
                        Ok(t) => entry.target = t.as_os_str().as_bytes().to_vec(),
                        Err(e) => {
                            self.shared.issue(&path, format!("cannot read link: {e}"));
                            return Ok(false);
                        }
                    }
                    self.emit(BuildItem::Ready(entry))?;
                }
                _ => {
                    self.xattrs(&path, &mut entry);
                    self.emit(BuildItem::Ready(entry))?;
                }
            }
        }
        Ok(false)
    }

    fn xattrs(&self, path: &Path, entry: &mut Entry) {
        match meta::read_xattrs(path) {
            Ok(x) => entry.xattrs = x,
            Err(e) => self.shared.issue(path, format!("cannot read xattrs: {e}")),
        }
    }

    fn file(&mut self, path: PathBuf, mut entry: Entry, old: Option<&Entry>) -> Result<()> {
        // Reuse the parent's chunks only if they are all still catalogued: a
        // pack lost since (and dropped by a rebuild) must be stored again.
        let trust = self.shared.trust_before_ns;
        let old = match old.filter(|o| unchanged(o, &entry) && o.ctime_ns < trust) {
            Some(o) if !self.verify_parent || self.reader.all_present(&o.chunks)? => Some(o),
            _ => None,
        };
        if let Some(old) = old {
            // An xattr or owner change moves ctime, so these are still current.
            entry.chunks = old.chunks.clone();
            entry.xattrs = old.xattrs.clone();
            self.shared.files_unchanged.fetch_add(1, Ordering::Relaxed);
            self.shared
                .progress
                .files_done
                .fetch_add(1, Ordering::Relaxed);
            self.shared
                .progress
                .bytes_done
                .fetch_add(entry.size, Ordering::Relaxed);
            return self.emit(BuildItem::Ready(entry));
        }
        self.batch_bytes += entry.size;
        self.batch.push((path, entry));
        if self.batch.len() >= BATCH_FILES || self.batch_bytes >= BATCH_BYTES {
            self.flush()?;
        }
        Ok(())
    }

    fn dir(&mut self, path: PathBuf, mut entry: Entry, old: Option<&Entry>) -> Result<bool> {
        self.xattrs(&path, &mut entry);
        let old_subtree = old
            .filter(|o| o.kind == EntryKind::Dir)
            .and_then(|o| o.subtree);
        // Taken over only if it is the same directory, untouched: a directory
        // renamed over this name, or recreated, has another inode or ctime
        // (a rename or an entry change moves the ctime).
        let same_dir = old.is_some_and(|o| {
            o.dev == entry.dev && o.ino == entry.ino && o.ctime_ns == entry.ctime_ns
        });
        if let (Some(dirty), Some(id)) = (self.dirty, old_subtree)
            && same_dir
            && !dirty.needs_listing(&path)
        {
            // Nothing below changed: take the parent's tree as it was, with
            // this directory's own metadata as it is now.
            entry.subtree = Some(id);
            self.emit(BuildItem::Ready(entry))?;
            return Ok(true);
        }
        let old_tree = match old_subtree {
            // A damaged parent only costs speed: read everything below.
            Some(id) => self.shared.repo.read_tree(&id).ok(),
            None => None,
        };
        let mut list = Vec::new();
        match std::fs::read_dir(&path) {
            Ok(rd) => {
                for de in rd {
                    match de {
                        Ok(de) => {
                            let n = de.file_name();
                            // Stat relative to the open directory (no path
                            // walk from the root per entry); never follows a symlink.
                            let md = de.metadata();
                            list.push((n.as_bytes().to_vec(), de.path(), Some(md)));
                        }
                        Err(e) => self
                            .shared
                            .issue(&path, format!("listing interrupted: {e}")),
                    }
                }
            }
            Err(e) => self
                .shared
                .issue(&path, format!("cannot list directory: {e}")),
        }
        list.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        self.emit(BuildItem::Start(entry))?;
        let walked_against_parent = old_tree.is_some();
        self.entries(list, old_tree.as_deref())?;
        self.emit(BuildItem::End)?;
        Ok(walked_against_parent)
    }
}
