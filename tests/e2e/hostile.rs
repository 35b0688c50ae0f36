//! Hostile input to restore (DESIGN.md invariant 4): tree blobs crafted by
//! hand with names that would escape the target, and symlinks planted in
//! the target. Nothing may be written outside the target.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use integration_tests::fixture::{self, Meta, Node};
use integration_tests::repo::{self, TestRepo, commit_tree, store_blobs};
use integration_tests::restore_options;
use repo_format::blob::BlobKind;
use repo_format::consts::TREE_VERSION;
use repo_format::restore::{RestoreOptions, restore};
use repo_format::tree::{self, Entry, EntryKind};
use repo_format::{Id, Repository};
use tempfile::TempDir;

/// One entry of a hand-encoded tree (other fields zero, nlink 1).
struct Raw<'a> {
    name: &'a [u8],
    kind: EntryKind,
    mode: u32,
    size: u64,
    chunks: Vec<Id>,
    subtree: Option<Id>,
}

impl<'a> Raw<'a> {
    fn file(name: &'a [u8], size: u64, chunk: Id) -> Self {
        Raw {
            name,
            kind: EntryKind::File,
            mode: 0o644,
            size,
            chunks: vec![chunk],
            subtree: None,
        }
    }

    fn dir(name: &'a [u8], subtree: Id) -> Self {
        Raw {
            name,
            kind: EntryKind::Dir,
            mode: 0o755,
            size: 0,
            chunks: Vec::new(),
            subtree: Some(subtree),
        }
    }
}

/// Encode a tree byte by byte as documented at the top of `tree.rs`,
/// without `tree::encode`'s name checks. Entries are sorted by name.
fn raw_tree(mut entries: Vec<Raw<'_>>) -> Vec<u8> {
    entries.sort_by(|a, b| a.name.cmp(b.name));
    let mut out = vec![TREE_VERSION];
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for e in &entries {
        out.extend_from_slice(&(e.name.len() as u16).to_le_bytes());
        out.extend_from_slice(e.name);
        out.push(e.kind as u8);
        for v in [e.mode, 0, 0] {
            out.extend_from_slice(&v.to_le_bytes()); // mode, uid, gid
        }
        out.extend_from_slice(&[0, 0]); // empty user and group names
        out.extend_from_slice(&1_700_000_000_000_000_000i64.to_le_bytes()); // mtime
        out.extend_from_slice(&0i64.to_le_bytes()); // ctime
        for v in [0u64, 0, 1, e.size, 0] {
            out.extend_from_slice(&v.to_le_bytes()); // dev, ino, nlink, size, rdev
        }
        out.extend_from_slice(&0u16.to_le_bytes()); // no xattrs
        out.extend_from_slice(&0u32.to_le_bytes()); // no symlink target
        out.extend_from_slice(&(e.chunks.len() as u32).to_le_bytes());
        for c in &e.chunks {
            out.extend_from_slice(&c.0);
        }
        match e.subtree {
            Some(id) => {
                out.push(1);
                out.extend_from_slice(&id.0);
            }
            None => out.push(0),
        }
    }
    out
}

fn store_tree(r: &Repository, bytes: &[u8]) -> Id {
    store_blobs(r, &[(BlobKind::Tree, bytes)]).expect("store tree")[0]
}

/// Positive control: the hand encoder agrees with `tree::encode`, so the
/// hostile trees below are refused for their names and nothing else.
#[test]
fn hand_encoder_matches_tree_encode() {
    let chunk = Id([7; 32]);
    let sub = Id([9; 32]);
    let mut f = Entry::new(b"file".to_vec(), EntryKind::File);
    f.mode = 0o644;
    f.size = 5;
    f.chunks = vec![chunk];
    f.mtime_ns = 1_700_000_000_000_000_000;
    let mut d = Entry::new(b"dir".to_vec(), EntryKind::Dir);
    d.mode = 0o755;
    d.subtree = Some(sub);
    d.mtime_ns = 1_700_000_000_000_000_000;
    let ours = raw_tree(vec![Raw::file(b"file", 5, chunk), Raw::dir(b"dir", sub)]);
    assert_eq!(ours, tree::encode(&[d, f]).expect("encode"));
}

/// `<tmp>/target` to restore into, `<tmp>/sentinel` (empty) beside it.
struct Layout {
    base: TempDir,
    target: PathBuf,
    sentinel: PathBuf,
}

impl Layout {
    fn new() -> Self {
        let base = tempfile::tempdir().expect("tempdir");
        let target = base.path().join("target");
        let sentinel = base.path().join("sentinel");
        std::fs::create_dir(&sentinel).expect("sentinel");
        Layout {
            base,
            target,
            sentinel,
        }
    }

    /// Every path below the base directory (symlinks not followed), sorted.
    fn all_paths(&self) -> Vec<PathBuf> {
        fn walk(p: &Path, out: &mut Vec<PathBuf>) {
            if let Ok(rd) = std::fs::read_dir(p) {
                for e in rd.flatten() {
                    out.push(e.path());
                    if e.file_type().is_ok_and(|t| t.is_dir()) {
                        walk(&e.path(), out);
                    }
                }
            }
        }
        let mut v = Vec::new();
        walk(self.base.path(), &mut v);
        v.sort();
        v
    }

    /// Nothing was written outside the target, and nothing "pwned" anywhere.
    fn assert_untouched(&self, case: &str) {
        let sentinel: Vec<_> = std::fs::read_dir(&self.sentinel)
            .expect("ls sentinel")
            .collect();
        assert!(
            sentinel.is_empty(),
            "{case}: wrote into sentinel: {sentinel:?}"
        );
        for p in self.all_paths() {
            let inside = p.starts_with(&self.target) || p == self.sentinel;
            assert!(inside, "{case}: wrote outside the target: {}", p.display());
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned());
            assert!(
                !name.unwrap_or_default().contains("pwned"),
                "{case}: hostile entry restored at {}",
                p.display()
            );
        }
    }
}

/// Restore a snapshot whose root (depth 0) or `ok/` subdirectory (depth 1)
/// holds `name` as a file and, separately, as a directory with more below.
fn hostile_case(r: &Repository, lay: &Layout, name: &[u8], depth: usize) {
    let case = format!("{:?} at depth {depth}", String::from_utf8_lossy(name));
    let data = store_blobs(
        r,
        &[
            (BlobKind::Data, b"pwned".as_slice()),
            (BlobKind::Data, b"good!".as_slice()),
        ],
    )
    .expect("store data");
    let (pwned, good) = (data[0], data[1]);
    // Below a hostile directory: pwned, and sentinel/pwned (reached via "..").
    let inner = store_tree(r, &raw_tree(vec![Raw::file(b"pwned", 5, pwned)]));
    let below = store_tree(
        r,
        &raw_tree(vec![
            Raw::file(b"pwned", 5, pwned),
            Raw::dir(b"sentinel", inner),
        ]),
    );
    for as_dir in [false, true] {
        let hostile = if as_dir {
            Raw::dir(name, below)
        } else {
            Raw::file(name, 5, pwned)
        };
        let mut top = vec![Raw::file(b"good.txt", 5, good)];
        if depth == 0 {
            top.push(hostile);
        } else {
            let ok = store_tree(r, &raw_tree(vec![hostile]));
            top.push(Raw::dir(b"ok", ok));
        }
        let root = store_tree(r, &raw_tree(top));
        let snap = commit_tree(r, root).expect("commit");
        let case = format!("{case}, as {}", if as_dir { "dir" } else { "file" });
        let messages = match restore(r, &snap.to_hex(), &lay.target, &restore_options()) {
            Err(e) => vec![e.to_string()],
            Ok(out) => {
                assert!(
                    std::fs::read(lay.target.join("good.txt")).is_ok_and(|b| b == b"good!"),
                    "{case}: the rest of the snapshot was not restored"
                );
                out.errors
            }
        };
        assert!(
            messages
                .iter()
                .any(|m| m.contains("hostile or invalid name") || m.contains("refusing entry name")),
            "{case}: no clear error: {messages:?}"
        );
        lay.assert_untouched(&case);
    }
}

fn hostile_names(sentinel: &Path) -> Vec<Vec<u8>> {
    let mut abs = sentinel.as_os_str().as_encoded_bytes().to_vec();
    abs.extend_from_slice(b"/pwned-abs");
    vec![
        b"..".to_vec(),
        b".".to_vec(),
        Vec::new(),
        abs,
        b"../sentinel/pwned-rel".to_vec(),
        b"../../sentinel/pwned-rel".to_vec(),
        b"a/b".to_vec(),
        b"pwned\0nul".to_vec(),
        b"\0".to_vec(),
        vec![b'x'; 5000],
    ]
}

#[test]
fn hostile_names_are_refused_and_nothing_is_written_outside() {
    let repo = TestRepo::new();
    let r = repo.open();
    let count = hostile_names(Path::new("/x")).len();
    for depth in [0, 1] {
        for i in 0..count {
            // A fresh layout per case; the absolute name points into its sentinel.
            let lay = Layout::new();
            let name = hostile_names(&lay.sentinel).swap_remove(i);
            hostile_case(&r, &lay, &name, depth);
        }
    }
}

/// A restore into a target where a directory of the snapshot is already a
/// symlink (to a directory outside), or a file of the snapshot is a symlink
/// to a file outside: nothing is written through the symlinks.
#[test]
fn symlinks_planted_in_the_target_are_not_followed() {
    let repo = TestRepo::new();
    let r = repo.open();
    let work = tempfile::tempdir().expect("tempdir");
    let src = work.path().join("src");
    let t = 1_650_000_000_000_000_000;
    let f = |seed| Node::file(100, seed, Meta::new(0o644, t));
    let tree = Node::dir(
        Meta::new(0o755, t),
        vec![
            (b"d", Node::dir(Meta::new(0o777, t), vec![(b"f", f(1))])),
            (b"g", f(2)),
            (
                b"e",
                Node::dir(
                    Meta::new(0o755, t),
                    vec![(b"sub", Node::dir(Meta::new(0o777, t), vec![(b"h", f(3))]))],
                ),
            ),
        ],
    );
    fixture::build(&src, &tree).expect("build");
    let snap = repo::backup(&r, &[&src]);

    let outside = work.path().join("outside");
    std::fs::create_dir(&outside).expect("outside");
    std::fs::write(outside.join("victim"), b"original").expect("victim");
    let before = std::fs::metadata(&outside).expect("stat outside");
    let target = work.path().join("target");
    let dst = target.join("src");
    std::fs::create_dir_all(dst.join("e")).expect("mkdir");
    std::os::unix::fs::symlink(&outside, dst.join("d")).expect("symlink d");
    std::os::unix::fs::symlink(outside.join("victim"), dst.join("g")).expect("symlink g");
    std::os::unix::fs::symlink(&outside, dst.join("e/sub")).expect("symlink e/sub");

    let out = restore(&r, &snap.id.to_hex(), &target, &restore_options()).expect("restore");
    for p in ["d", "e/sub"] {
        assert!(
            out.errors
                .iter()
                .any(|e| e.contains(&*dst.join(p).to_string_lossy())
                    && e.contains("not a directory")),
            "no error for {p}: {:?}",
            out.errors
        );
        assert!(dst.join(p).is_symlink(), "{p} replaced");
    }
    // `g` is a file in the snapshot: the symlink is replaced, never written through.
    assert!(!dst.join("g").is_symlink());
    assert_eq!(
        std::fs::read(dst.join("g")).expect("g"),
        std::fs::read(src.join("g")).expect("src g")
    );
    let names: Vec<_> = std::fs::read_dir(&outside)
        .expect("ls outside")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(names, vec!["victim"]);
    assert_eq!(
        std::fs::read(outside.join("victim")).expect("victim"),
        b"original"
    );
    let after = std::fs::metadata(&outside).expect("stat outside");
    assert_eq!(before.mode(), after.mode(), "outside dir chmodded");
    assert_eq!(
        (before.mtime(), before.mtime_nsec()),
        (after.mtime(), after.mtime_nsec()),
        "outside dir touched"
    );

    // The same through `--path`, and a target that is itself a symlink.
    let opts = RestoreOptions {
        path: Some("src/d".into()),
        ..restore_options()
    };
    let sub_target = work.path().join("target2");
    std::fs::create_dir(&sub_target).expect("mkdir");
    std::os::unix::fs::symlink(&outside, sub_target.join("d")).expect("symlink");
    let out = restore(&r, "latest", &sub_target, &opts).expect("restore --path");
    assert!(!out.errors.is_empty());
    let link_target = work.path().join("target3");
    std::os::unix::fs::symlink(&outside, &link_target).expect("symlink target");
    let err = restore(&r, "latest", &link_target, &restore_options()).expect_err("refused");
    assert!(err.to_string().contains("not a directory"), "{err}");
    let names: Vec<_> = std::fs::read_dir(&outside).expect("ls").collect();
    assert_eq!(names.len(), 1, "{names:?}");
}

/// `--path` never resolves through a symlink stored in the snapshot.
#[test]
fn restore_path_does_not_traverse_snapshot_symlinks() {
    let repo = TestRepo::new();
    let r = repo.open();
    let work = tempfile::tempdir().expect("tempdir");
    let src = work.path().join("src");
    let tree = Node::dir(
        Meta::new(0o755, 0),
        vec![
            (b"link", Node::symlink(b"real", 0)),
            (
                b"real",
                Node::dir(
                    Meta::new(0o755, 0),
                    vec![(b"f", Node::file(3, 1, Meta::new(0o644, 0)))],
                ),
            ),
        ],
    );
    fixture::build(&src, &tree).expect("build");
    repo::backup(&r, &[&src]);
    let opts = RestoreOptions {
        path: Some("src/link/f".into()),
        ..restore_options()
    };
    let err = restore(&r, "latest", &work.path().join("t"), &opts).expect_err("no such path");
    assert!(
        matches!(err, repo_format::Error::NoSuchPath { .. }),
        "{err}"
    );
}

/// A snapshot whose trees name one subtree twice at every level (T_k =
/// {a: T_k-1, b: T_k-1}, 40 levels: 2^40 paths from 41 trees) above a file
/// whose chunk is missing: `check` names the chunk with at most
/// `PATHS_PER_SNAPSHOT` of its uses, visiting each distinct tree once, where a
/// walk path by path (as `check` did) would not finish. (The collector
/// refuses to commit such a snapshot; a local repository's owner can still
/// write one, or a damaged tree can look like one.)
#[test]
fn check_names_a_missing_chunk_below_a_tree_named_2_to_the_40_times() {
    let repo = TestRepo::new();
    let r = repo.open();
    let missing = Id([0x5a; 32]);
    let mut below = store_tree(&r, &raw_tree(vec![Raw::file(b"f", 5, missing)]));
    for _ in 0..40 {
        below = store_tree(
            &r,
            &raw_tree(vec![Raw::dir(b"a", below), Raw::dir(b"b", below)]),
        );
    }
    let snap = commit_tree(&r, below).expect("commit");
    std::thread::sleep(std::time::Duration::from_millis(2));
    let other = commit_tree(&r, below).expect("second snapshot");
    let report = repo_format::check::check(&r, false).expect("check");
    let p = report
        .problems
        .iter()
        .find(|p| p.id == Some(missing))
        .expect("the missing chunk is named");
    // Every snapshot is named, each with its share of paths.
    for s in [snap, other] {
        let paths: std::collections::HashSet<&String> = p
            .used_by
            .iter()
            .filter(|(id, _)| *id == s)
            .map(|(_, p)| p)
            .collect();
        assert_eq!(paths.len(), repo_format::check::PATHS_PER_SNAPSHOT, "{s}");
    }
    assert_eq!(p.used_by.len(), 2 * repo_format::check::PATHS_PER_SNAPSHOT);
    // "/a" or "/b" at each of the 40 levels, then "/f".
    let odd = p
        .used_by
        .iter()
        .find(|(_, p)| !(p.ends_with("/f") && p.len() == 82));
    assert!(odd.is_none(), "{odd:?}");
}
