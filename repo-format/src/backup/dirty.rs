//! Dirty directories: what an incremental (continuous) backup lists again.
//!
//! A watcher (the edge agent's inotify watcher) records the directory whose
//! listing an event touched: for a change to `/src/a/f` that is `/src/a`.
//! An incremental backup then lists and stats only the dirty directories and
//! their ancestors; every other directory is taken from the parent snapshot
//! as it was (its tree id reused, nothing below it read), so the work per
//! batch grows with the change, not with the tree. Directories that are new
//! since the parent are walked whole.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// A set of absolute directory paths whose listings changed.
///
/// Paths are ordered component-wise ([`PathBuf`]'s order), so every
/// descendant of a directory sorts right after it: "does anything below X
/// need listing" is one ordered lookup.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DirtySet {
    dirs: BTreeSet<PathBuf>,
}

impl DirtySet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Mark directory `dir` dirty (its listing or an entry's metadata changed).
    pub fn mark(&mut self, dir: impl Into<PathBuf>) {
        self.dirs.insert(dir.into());
    }

    /// Mark the directory holding `path` dirty: where a change to `path`
    /// shows up in a listing.
    pub fn mark_parent_of(&mut self, path: &Path) {
        match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => self.mark(p),
            _ => self.mark(path),
        }
    }

    /// True when nothing is dirty.
    pub fn is_empty(&self) -> bool {
        self.dirs.is_empty()
    }

    /// Number of dirty directories.
    pub fn len(&self) -> usize {
        self.dirs.len()
    }

    /// Add every path of `other`.
    pub fn merge(&mut self, other: DirtySet) {
        self.dirs.extend(other.dirs);
    }

    /// The dirty directories, in order.
    pub fn iter(&self) -> impl Iterator<Item = &Path> {
        self.dirs.iter().map(PathBuf::as_path)
    }

    /// True when `dir` itself or anything below it is dirty: it must be listed.
    pub fn needs_listing(&self, dir: &Path) -> bool {
        self.dirs
            .range::<Path, _>((std::ops::Bound::Included(dir), std::ops::Bound::Unbounded))
            .next()
            .is_some_and(|d| d.starts_with(dir))
    }
}

impl FromIterator<PathBuf> for DirtySet {
    fn from_iter<T: IntoIterator<Item = PathBuf>>(iter: T) -> Self {
        DirtySet {
            dirs: iter.into_iter().collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descendants_sort_right_after_their_directory() {
        let d: DirtySet = ["/s/a/b/c", "/s/ab", "/t"]
            .into_iter()
            .map(PathBuf::from)
            .collect();
        assert!(d.needs_listing(Path::new("/s")));
        assert!(d.needs_listing(Path::new("/s/a")));
        assert!(d.needs_listing(Path::new("/s/a/b")));
        assert!(d.needs_listing(Path::new("/s/a/b/c")));
        assert!(!d.needs_listing(Path::new("/s/a/b/c/d")));
        assert!(!d.needs_listing(Path::new("/s/a/bb")));
        assert!(d.needs_listing(Path::new("/s/ab")));
        assert!(!d.needs_listing(Path::new("/s/b")));
        assert!(!d.needs_listing(Path::new("/u")));
    }

    #[test]
    fn parent_of_a_change_is_marked() {
        let mut d = DirtySet::new();
        d.mark_parent_of(Path::new("/s/a/file"));
        assert!(d.needs_listing(Path::new("/s/a")));
        assert!(!d.needs_listing(Path::new("/s/a/file")));
    }
}
