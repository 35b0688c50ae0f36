//! Incremental (continuous) backups: listing only the directories a watcher
//! marked dirty must give exactly the snapshot a full walk gives (same root
//! tree id, same totals), whatever the change: new, rewritten and deleted
//! files, new, removed and renamed directories, changed modes and xattrs.
//! The dirty set is what the agent's watcher marks: the parent directory of
//! every path an event names (both ends of a rename).

use std::path::{Path, PathBuf};

use integration_tests::repo::{self, TestRepo};
use proptest::prelude::*;
use repo_format::Repository;
use repo_format::backup::{BackupOutcome, DirtySet, ParentChoice};

/// One change to the source tree, as the watcher would see it.
#[derive(Debug, Clone)]
enum Op {
    /// Write (create or replace) file `name` in directory number `dir`.
    Write { dir: usize, name: u8, len: usize },
    /// Append to the n-th existing file.
    Append { file: usize },
    /// Delete the n-th existing file.
    Delete { file: usize },
    /// Create directory `name` (with a file inside) in directory number `dir`.
    Mkdir { dir: usize, name: u8 },
    /// Remove the n-th directory (not the root) with everything below.
    RemoveDir { dir: usize },
    /// Move the n-th directory under directory number `to` (when legal).
    RenameDir { dir: usize, to: usize, name: u8 },
    /// Remove directory `to` and move directory `dir` onto its name
    /// (`rm -rf to; mv dir to`): same names below, other directories.
    RenameOver { dir: usize, to: usize },
    /// chmod the n-th directory.
    ChmodDir { dir: usize },
    /// Set a user xattr on the n-th file.
    Xattr { file: usize },
}

fn arb_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0..64usize, 0..6u8, 0..5000usize).prop_map(|(dir, name, len)| Op::Write {
            dir,
            name,
            len
        }),
        (0..64usize).prop_map(|file| Op::Append { file }),
        (0..64usize).prop_map(|file| Op::Delete { file }),
        (0..64usize, 0..4u8).prop_map(|(dir, name)| Op::Mkdir { dir, name }),
        (0..64usize).prop_map(|dir| Op::RemoveDir { dir }),
        (0..64usize, 0..64usize, 0..4u8).prop_map(|(dir, to, name)| Op::RenameDir {
            dir,
            to,
            name
        }),
        (0..64usize, 0..64usize).prop_map(|(dir, to)| Op::RenameOver { dir, to }),
        (0..64usize).prop_map(|dir| Op::ChmodDir { dir }),
        (0..64usize).prop_map(|file| Op::Xattr { file }),
    ]
}

/// Directories (root first) and files below `root`, sorted.
fn listing(root: &Path) -> (Vec<PathBuf>, Vec<PathBuf>) {
    let (mut dirs, mut files) = (vec![root.to_path_buf()], Vec::new());
    let mut i = 0;
    while i < dirs.len() {
        let mut rd: Vec<_> = std::fs::read_dir(&dirs[i])
            .expect("list")
            .map(|e| e.expect("entry").path())
            .collect();
        rd.sort();
        for p in rd {
            if p.is_dir() {
                dirs.push(p);
            } else {
                files.push(p);
            }
        }
        i += 1;
    }
    (dirs, files)
}

/// Apply `op` below `root`; returns the paths an event would name.
fn apply(root: &Path, op: &Op, seq: usize) -> Vec<PathBuf> {
    let (dirs, files) = listing(root);
    let pick = |v: &[PathBuf], n: usize| (!v.is_empty()).then(|| v[n % v.len()].clone());
    let content = |len: usize| -> Vec<u8> { (0..len).map(|i| (i * 7 + seq * 13) as u8).collect() };
    match op {
        Op::Write { dir, name, len } => {
            let p = dirs[dir % dirs.len()].join(format!("f{name}"));
            if p.is_dir() {
                return Vec::new();
            }
            std::fs::write(&p, content(*len)).expect("write");
            vec![p]
        }
        Op::Append { file } => match pick(&files, *file) {
            Some(p) => {
                use std::io::Write;
                let mut f = std::fs::OpenOptions::new()
                    .append(true)
                    .open(&p)
                    .expect("open");
                f.write_all(&content(100)).expect("append");
                vec![p]
            }
            None => Vec::new(),
        },
        Op::Delete { file } => match pick(&files, *file) {
            Some(p) => {
                std::fs::remove_file(&p).expect("delete");
                vec![p]
            }
            None => Vec::new(),
        },
        Op::Mkdir { dir, name } => {
            let p = dirs[dir % dirs.len()].join(format!("d{name}"));
            if p.exists() {
                return Vec::new();
            }
            std::fs::create_dir(&p).expect("mkdir");
            std::fs::write(p.join("inner"), content(300)).expect("write");
            // The watcher sees the directory's creation, then (once it
            // watches it) the file; either way the new directory is walked whole.
            vec![p.clone(), p.join("inner")]
        }
        Op::RemoveDir { dir } => match pick(&dirs[1..], *dir) {
            Some(p) => {
                std::fs::remove_dir_all(&p).expect("rm -r");
                vec![p]
            }
            None => Vec::new(),
        },
        Op::RenameDir { dir, to, name } => {
            let (Some(from), Some(to)) = (pick(&dirs[1..], *dir), pick(&dirs, *to)) else {
                return Vec::new();
            };
            let dest = to.join(format!("m{name}"));
            if to.starts_with(&from) || dest.exists() {
                return Vec::new();
            }
            std::fs::rename(&from, &dest).expect("rename");
            vec![from, dest]
        }
        Op::RenameOver { dir, to } => {
            let (Some(from), Some(to)) = (pick(&dirs[1..], *dir), pick(&dirs[1..], *to)) else {
                return Vec::new();
            };
            if to.starts_with(&from) || from.starts_with(&to) {
                return Vec::new();
            }
            std::fs::remove_dir_all(&to).expect("rm -r");
            std::fs::rename(&from, &to).expect("rename over");
            vec![to, from]
        }
        Op::ChmodDir { dir } => {
            use std::os::unix::fs::PermissionsExt;
            let p = dirs[dir % dirs.len()].clone();
            let mode = if seq.is_multiple_of(2) { 0o750 } else { 0o755 };
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).expect("chmod");
            vec![p]
        }
        Op::Xattr { file } => match pick(&files, *file) {
            Some(p) => match xattr::set(&p, "user.hv", format!("v{seq}").as_bytes()) {
                Ok(()) => vec![p],
                // tmpfs without user xattrs: nothing changed.
                Err(_) => Vec::new(),
            },
            None => Vec::new(),
        },
    }
}

fn build_start(root: &Path) {
    for d in ["a", "a/b", "a/b/c", "d", "e"] {
        std::fs::create_dir_all(root.join(d)).expect("mkdir");
    }
    for (i, f) in ["a/1", "a/b/2", "a/b/c/3", "d/4", "e/5", "6"]
        .iter()
        .enumerate()
    {
        std::fs::write(root.join(f), vec![i as u8; 1000 + i * 777]).expect("write");
    }
}

fn backup(
    r: &Repository,
    src: &Path,
    parent: ParentChoice,
    dirty: Option<DirtySet>,
) -> BackupOutcome {
    let mut opts = repo::backup_options();
    opts.parent = parent;
    opts.dirty = dirty;
    repo_format::backup::backup(r, &[src.to_path_buf()], &opts).expect("backup")
}

fn same_snapshot(inc: &BackupOutcome, full: &BackupOutcome) {
    let (a, b) = (&inc.snapshot.stats, &full.snapshot.stats);
    assert_eq!(
        (a.files, a.dirs, a.others, a.bytes),
        (b.files, b.dirs, b.others, b.bytes),
        "incremental totals differ from a full walk's"
    );
    assert_eq!(
        inc.snapshot.tree, full.snapshot.tree,
        "incremental tree differs from a full walk's"
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Several batches of random changes: every incremental snapshot equals
    /// a full walk of the same state.
    #[test]
    fn incremental_equals_full_walk(batches in proptest::collection::vec(proptest::collection::vec(arb_op(), 1..6), 1..4)) {
        let repo = TestRepo::new();
        let r = repo.open();
        let work = tempfile::tempdir().expect("tempdir");
        let src = work.path().join("src");
        build_start(&src);
        let mut last = backup(&r, &src, ParentChoice::None, None);
        for (b, ops) in batches.iter().enumerate() {
            let mut dirty = DirtySet::new();
            for (i, op) in ops.iter().enumerate() {
                for p in apply(&src, op, b * 10 + i) {
                    dirty.mark_parent_of(&p);
                }
            }
            let inc = backup(&r, &src, ParentChoice::Snapshot(last.id), Some(dirty));
            let full = backup(&r, &src, ParentChoice::None, None);
            same_snapshot(&inc, &full);
            last = inc;
        }
    }
}

/// A clean directory is taken over unread: a file changed without an event
/// (which the reconcile scan exists for) stays as it was, proving nothing
/// outside the dirty set was listed; the dirty directory's change is in.
#[test]
fn clean_directories_are_not_listed() {
    let repo = TestRepo::new();
    let r = repo.open();
    let work = tempfile::tempdir().expect("tempdir");
    let src = work.path().join("src");
    build_start(&src);
    std::thread::sleep(std::time::Duration::from_millis(50));
    let first = backup(&r, &src, ParentChoice::None, None);
    std::fs::write(src.join("d/4"), b"changed behind the watcher's back").expect("write");
    std::fs::write(src.join("a/b/new"), b"seen").expect("write");
    let mut dirty = DirtySet::new();
    dirty.mark_parent_of(&src.join("a/b/new"));
    let inc = backup(&r, &src, ParentChoice::Snapshot(first.id), Some(dirty));
    let s = &inc.snapshot.stats;
    assert_eq!(s.files, first.snapshot.stats.files + 1, "{s:?}");
    assert_eq!(s.bytes_read, 4, "only a/b/new is read: {s:?}");
    let target = work.path().join("out");
    repo::restore_clean(&r, &inc.id.to_hex(), &target);
    let restored = std::fs::read(target.join("src/d/4")).expect("read");
    assert_eq!(
        restored,
        vec![3u8; 1000 + 3 * 777],
        "d/ was not listed, so its old content stays"
    );
    assert_eq!(
        std::fs::read(target.join("src/a/b/new")).expect("read"),
        b"seen"
    );
}

/// `rm -rf a; mv b a` where both held an (unchanged) subdirectory of the
/// same name: only the parent is marked dirty, and the new `a/sub` must not
/// be taken for the old one.
#[test]
fn a_directory_moved_over_a_removed_one_is_listed() {
    let repo = TestRepo::new();
    let r = repo.open();
    let work = tempfile::tempdir().expect("tempdir");
    let src = work.path().join("src");
    for d in ["a/sub", "b/sub"] {
        std::fs::create_dir_all(src.join(d)).expect("mkdir");
    }
    std::fs::write(src.join("b/sub/file"), b"only in b").expect("write");
    let first = backup(&r, &src, ParentChoice::None, None);
    std::fs::remove_dir_all(src.join("a")).expect("rm -r");
    std::fs::rename(src.join("b"), src.join("a")).expect("mv");
    let mut dirty = DirtySet::new();
    dirty.mark_parent_of(&src.join("a"));
    dirty.mark_parent_of(&src.join("b"));
    let inc = backup(&r, &src, ParentChoice::Snapshot(first.id), Some(dirty));
    let full = backup(&r, &src, ParentChoice::None, None);
    same_snapshot(&inc, &full);
}
