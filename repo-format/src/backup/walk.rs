//! The walker: lists directories in name order, compares each file with the
//! parent snapshot, and feeds the file workers and the tree builder.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use crossbeam_channel::{Sender, bounded};

use crate::backup::Shared;
use crate::backup::stages::{BuildItem, FileJob};
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

impl<'s, 'r> Walker<'s, 'r> {
    pub(crate) fn new(
        shared: &'s Shared<'r>,
        files: Sender<FileJob>,
        build: Sender<BuildItem>,
        excludes: &'s crate::glob::Excludes,
    ) -> Result<Self> {
        Ok(Walker {
            shared,
            excludes,
            verify_parent: shared
                .repo
                .root()
                .join(crate::rebuild::DEGRADED_MARKER)
                .exists(),
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

    /// Walk every root; the root tree's end is emitted last.
    pub(crate) fn run(
        mut self,
        roots: Vec<(Vec<u8>, PathBuf)>,
        parent_root: Option<Vec<Entry>>,
    ) -> Result<()> {
        self.entries(roots, parent_root.as_deref())?;
        self.emit(BuildItem::End)
    }

    /// Emit one item per (name, path), in the given (sorted) order.
    fn entries(&mut self, list: Vec<(Vec<u8>, PathBuf)>, parent: Option<&[Entry]>) -> Result<()> {
        self.entries_at(list, parent, false)
    }

    fn entries_at(
        &mut self,
        list: Vec<(Vec<u8>, PathBuf)>,
        parent: Option<&[Entry]>,
        is_root: bool,
    ) -> Result<()> {
        for (name, path) in list {
            let rel_len = self.rel.len();
            if !is_root {
                if !self.rel.is_empty() {
                    self.rel.push(b'/');
                }
                self.rel.extend_from_slice(&name);
                if !self.excludes.is_empty() && self.excludes.excluded(&name, &self.rel) {
                    self.rel.truncate(rel_len);
                    continue;
                }
            }
            let r = self.entry(name, path, parent);
            self.rel.truncate(rel_len);
            r?;
        }
        Ok(())
    }

    fn entry(&mut self, name: Vec<u8>, path: PathBuf, parent: Option<&[Entry]>) -> Result<()> {
        {
            if self.shared.aborted() {
                return Err(Error::Pipeline("backup aborted".into()));
            }
            self.shared.progress.entries.fetch_add(1, Ordering::Relaxed);
            let md = match std::fs::symlink_metadata(&path) {
                Ok(m) => m,
                Err(e) => {
                    self.shared.issue(&path, format!("cannot stat: {e}"));
                    return Ok(());
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
                EntryKind::Dir => self.dir(path, entry, old)?,
                EntryKind::Symlink => {
                    match std::fs::read_link(&path) {
                        Ok(t) => entry.target = t.as_os_str().as_bytes().to_vec(),
                        Err(e) => {
                            self.shared.issue(&path, format!("cannot read link: {e}"));
                            return Ok(());
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
        Ok(())
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
        let old = match old.filter(|o| unchanged(o, &entry)) {
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

    fn dir(&mut self, path: PathBuf, mut entry: Entry, old: Option<&Entry>) -> Result<()> {
        self.xattrs(&path, &mut entry);
        let old_tree = match old
            .filter(|o| o.kind == EntryKind::Dir)
            .and_then(|o| o.subtree)
        {
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
                            list.push((n.as_bytes().to_vec(), de.path()));
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
        self.entries(list, old_tree.as_deref())?;
        self.emit(BuildItem::End)
    }
}
