//! Recursive comparison of two trees: names, kinds, content and metadata.
//!
//! Compared: file type; permission bits (not of symlinks); owner and group;
//! mtime to the nanosecond (symlinks and directories included); file size
//! and bytes; symlink targets; extended attributes (not of symlinks); and
//! hard links: two files share an inode in one tree exactly when they do in
//! the other. Not compared: atime, ctime, inode numbers, directory sizes.

use std::collections::HashMap;
use std::fs::Metadata;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// Most differences reported before giving up.
const MAX_DIFFS: usize = 40;

/// Differences between the trees at `expected` and `actual` (empty = same).
pub fn diff_trees(expected: &Path, actual: &Path) -> Vec<String> {
    diff_trees_except(expected, actual, &[])
}

/// Like [`diff_trees`], ignoring the entries at `skip` (paths relative to
/// the two roots) on both sides.
pub fn diff_trees_except(expected: &Path, actual: &Path, skip: &[&Path]) -> Vec<String> {
    let mut w = Walk {
        exp: expected,
        act: actual,
        skip,
        diffs: Vec::new(),
        inodes: HashMap::new(),
        inodes_rev: HashMap::new(),
    };
    w.node(Path::new(""));
    w.diffs
}

/// Panic with every difference when the trees differ.
pub fn assert_same_tree(expected: &Path, actual: &Path) {
    let d = diff_trees(expected, actual);
    assert!(
        d.is_empty(),
        "{} differs from {}:\n  {}",
        actual.display(),
        expected.display(),
        d.join("\n  ")
    );
}

/// Bytes the file system allocated for `path` (`st_blocks` × 512).
pub fn allocated_bytes(path: &Path) -> u64 {
    std::fs::symlink_metadata(path)
        .map(|m| m.blocks() * 512)
        .unwrap_or(0)
}

/// Extended attributes of `path` (not following symlinks), sorted.
pub fn xattrs_of(path: &Path) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut out = Vec::new();
    if let Ok(names) = xattr::list(path) {
        for n in names {
            if let Ok(Some(v)) = xattr::get(path, &n) {
                out.push((n.as_bytes().to_vec(), v));
            }
        }
    }
    out.sort();
    out
}

struct Walk<'a> {
    exp: &'a Path,
    act: &'a Path,
    skip: &'a [&'a Path],
    diffs: Vec<String>,
    /// Source inode → restored inode, and back (hard-link structure).
    inodes: HashMap<(u64, u64), (u64, u64)>,
    inodes_rev: HashMap<(u64, u64), (u64, u64)>,
}

fn kind(m: &Metadata) -> &'static str {
    let t = m.file_type();
    if t.is_file() {
        "file"
    } else if t.is_dir() {
        "dir"
    } else if t.is_symlink() {
        "symlink"
    } else if t.is_fifo() {
        "fifo"
    } else if t.is_socket() {
        "socket"
    } else if t.is_char_device() {
        "char device"
    } else if t.is_block_device() {
        "block device"
    } else {
        "unknown"
    }
}

impl Walk<'_> {
    fn diff(&mut self, rel: &Path, what: String) {
        if self.diffs.len() < MAX_DIFFS {
            self.diffs.push(format!("{}: {what}", rel.display()));
        }
    }

    /// `root/rel`, without the trailing slash `join("")` would add.
    fn at(root: &Path, rel: &Path) -> PathBuf {
        if rel.as_os_str().is_empty() {
            root.to_path_buf()
        } else {
            root.join(rel)
        }
    }

    fn node(&mut self, rel: &Path) {
        let (ep, ap) = (Self::at(self.exp, rel), Self::at(self.act, rel));
        let e = match std::fs::symlink_metadata(&ep) {
            Ok(m) => m,
            Err(err) => return self.diff(rel, format!("cannot stat expected: {err}")),
        };
        let a = match std::fs::symlink_metadata(&ap) {
            Ok(m) => m,
            Err(err) => return self.diff(rel, format!("missing ({err})")),
        };
        if kind(&e) != kind(&a) {
            return self.diff(rel, format!("is a {}, expected a {}", kind(&a), kind(&e)));
        }
        self.metadata(rel, &e, &a);
        let t = e.file_type();
        if t.is_file() {
            self.file(rel, &ep, &ap, &e, &a);
        } else if t.is_symlink() {
            let (te, ta) = (std::fs::read_link(&ep), std::fs::read_link(&ap));
            match (te, ta) {
                (Ok(te), Ok(ta)) if te == ta => {}
                (te, ta) => self.diff(rel, format!("symlink target {ta:?}, expected {te:?}")),
            }
        } else if t.is_dir() {
            self.dir(rel, &ep, &ap);
        }
    }

    fn metadata(&mut self, rel: &Path, e: &Metadata, a: &Metadata) {
        if !e.file_type().is_symlink() && e.mode() & 0o7777 != a.mode() & 0o7777 {
            self.diff(
                rel,
                format!(
                    "mode {:o}, expected {:o}",
                    a.mode() & 0o7777,
                    e.mode() & 0o7777
                ),
            );
        }
        if (e.uid(), e.gid()) != (a.uid(), a.gid()) {
            self.diff(
                rel,
                format!(
                    "owner {}:{}, expected {}:{}",
                    a.uid(),
                    a.gid(),
                    e.uid(),
                    e.gid()
                ),
            );
        }
        if (e.mtime(), e.mtime_nsec()) != (a.mtime(), a.mtime_nsec()) {
            self.diff(
                rel,
                format!(
                    "mtime {}.{:09}, expected {}.{:09}",
                    a.mtime(),
                    a.mtime_nsec(),
                    e.mtime(),
                    e.mtime_nsec()
                ),
            );
        }
        if !e.file_type().is_symlink() {
            let (xe, xa) = (
                xattrs_of(&Self::at(self.exp, rel)),
                xattrs_of(&Self::at(self.act, rel)),
            );
            if xe != xa {
                self.diff(rel, format!("xattrs {xa:?}, expected {xe:?}"));
            }
        }
    }

    fn file(&mut self, rel: &Path, ep: &Path, ap: &Path, e: &Metadata, a: &Metadata) {
        if e.len() != a.len() {
            self.diff(rel, format!("size {}, expected {}", a.len(), e.len()));
        } else {
            match (std::fs::read(ep), std::fs::read(ap)) {
                (Ok(be), Ok(ba)) if be == ba => {}
                (Ok(be), Ok(ba)) => {
                    let at = be.iter().zip(&ba).position(|(x, y)| x != y).unwrap_or(0);
                    self.diff(rel, format!("content differs from byte {at}"));
                }
                (re, ra) => self.diff(rel, format!("unreadable: {:?} / {:?}", re.err(), ra.err())),
            }
        }
        let (ie, ia) = ((e.dev(), e.ino()), (a.dev(), a.ino()));
        match (self.inodes.get(&ie), self.inodes_rev.get(&ia)) {
            (None, None) => {
                self.inodes.insert(ie, ia);
                self.inodes_rev.insert(ia, ie);
            }
            (Some(x), _) if *x != ia => {
                self.diff(rel, "hard link not preserved (a separate file)".into())
            }
            (_, Some(y)) if *y != ie => {
                self.diff(rel, "hard-linked to a file it is not linked to".into())
            }
            _ => {}
        }
    }

    fn dir(&mut self, rel: &Path, ep: &Path, ap: &Path) {
        let names = |p: &Path| -> std::io::Result<Vec<PathBuf>> {
            let mut v: Vec<PathBuf> = std::fs::read_dir(p)?
                .map(|d| d.map(|d| PathBuf::from(d.file_name())))
                .collect::<std::io::Result<_>>()?;
            v.retain(|n| !self.skip.contains(&rel.join(n).as_path()));
            v.sort();
            Ok(v)
        };
        let (ne, na) = match (names(ep), names(ap)) {
            (Ok(ne), Ok(na)) => (ne, na),
            (re, ra) => {
                return self.diff(rel, format!("cannot list: {:?} / {:?}", re.err(), ra.err()));
            }
        };
        for n in na.iter().filter(|n| !ne.contains(n)) {
            self.diff(&rel.join(n), "unexpected extra entry".into());
        }
        for n in ne {
            if na.contains(&n) {
                self.node(&rel.join(&n));
            } else {
                self.diff(&rel.join(&n), "missing".into());
            }
        }
    }
}
