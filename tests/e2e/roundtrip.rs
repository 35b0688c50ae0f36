//! Backup → restore round trips compared byte for byte, with metadata.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use integration_tests::compare::{allocated_bytes, diff_trees, xattrs_of};
use integration_tests::fixture::{self, Meta, Node};
use integration_tests::repo::{self, TestRepo};
use integration_tests::{assert_same_tree, restore_options};
use proptest::prelude::*;
use repo_format::backup::ParentChoice;
use repo_format::tree::EntryKind;

/// The small chunker's (min, avg, max) as the fixtures take them.
const CHUNKS: (usize, usize, usize) = (1024, 4096, 16384);

/// Build `node` as `<tmp>/src`, back it up, restore it, return the differences.
fn round_trip(node: &Node) -> Vec<String> {
    let repo = TestRepo::new();
    let r = repo.open();
    let work = tempfile::tempdir().expect("tempdir");
    let src = work.path().join("src");
    fixture::build(&src, node).expect("build fixture");
    let out = repo::backup(&r, &[&src]);
    assert!(!out.snapshot.is_partial(), "{:?}", out.snapshot.issues);
    let target = work.path().join("target");
    repo::restore_clean(&r, &out.id.to_hex(), &target);
    diff_trees(&src, &target.join("src"))
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 20,
        max_shrink_iters: 200,
        // Never write regression files into the source tree.
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// Random trees (names, sizes around the chunk limits, modes, owners,
    /// mtimes, xattrs, symlinks, fifos, hard links) restore identically.
    #[test]
    fn random_trees_round_trip(tree in fixture::arb_tree()) {
        let diffs = round_trip(&tree);
        prop_assert!(diffs.is_empty(), "differences:\n  {}", diffs.join("\n  "));
    }
}

#[test]
fn standard_tree_round_trips_with_all_metadata() {
    let repo = TestRepo::new();
    let r = repo.open();
    let work = tempfile::tempdir().expect("tempdir");
    let src = work.path().join("src");
    let built = fixture::build(&src, &fixture::standard_tree(CHUNKS)).expect("build");
    let out = repo::backup(&r, &[&src]);
    assert!(!out.snapshot.is_partial(), "{:?}", out.snapshot.issues);
    let target = work.path().join("target");
    repo::restore_clean(&r, "latest", &target);
    let dst = target.join("src");
    assert_same_tree(&src, &dst);

    // The properties the comparison implies, spelled out.
    let md = |p: &str| std::fs::symlink_metadata(dst.join(p)).expect("restored entry");
    assert_eq!(md("hardlink-a").ino(), md("sub/hardlink-b").ino());
    assert_eq!(md("hardlink-a").ino(), md("hardlink-c").ino());
    assert_eq!(md("hardlink-a").nlink(), 3);
    assert!(md("fifo").file_type().is_fifo());
    assert_eq!(md("setuid").mode() & 0o7777, 0o4755);
    assert_eq!(md("old").mtime(), -1_234_567_891);
    assert_eq!(md("old").mtime_nsec(), 876_543_211);
    assert_eq!(
        std::fs::read_link(dst.join("link-dangling"))
            .expect("link")
            .as_os_str()
            .as_bytes(),
        b"../missing/\xff"
    );
    assert!(md("empty-dir").is_dir());
    assert_eq!(
        std::fs::read_dir(dst.join("empty-dir"))
            .expect("ls")
            .count(),
        0
    );
    assert!(
        dst.join(OsStr::from_bytes(b"sub/bad-\xff\xfe-name"))
            .is_file()
    );
    if fixture::is_root() {
        assert_eq!((md("secret").uid(), md("secret").gid()), (1234, 5678));
    }
    if built.xattrs_refused == 0 {
        assert!(
            xattrs_of(&dst.join("hello.txt"))
                .contains(&(b"user.comment".to_vec(), b"hello \x00 bytes".to_vec()))
        );
    }
    let sparse = allocated_bytes(&dst.join("sparse.img"));
    assert!(
        sparse <= 256 * 1024,
        "sparse file takes {sparse} bytes on disk"
    );
    assert_eq!(md("sparse.img").len(), 4 * 1024 * 1024);
}

/// Files are cut within the repository's chunk limits, and sizes exactly at
/// a limit and one byte over it are stored and restored intact.
#[test]
fn chunk_limits_are_honoured() {
    let repo = TestRepo::new();
    let r = repo.open();
    let work = tempfile::tempdir().expect("tempdir");
    let src = work.path().join("src");
    fixture::build(&src, &fixture::standard_tree(CHUNKS)).expect("build");
    let out = repo::backup(&r, &[&src]);
    let dir = repo_format::restore::find_entry(&r, &out.id, &out.snapshot.tree, "src/chunks")
        .expect("chunks dir in snapshot");
    let entries = r
        .read_tree(&dir.subtree.expect("dir has a subtree"))
        .expect("read tree");
    let (min, _, max) = CHUNKS;
    for e in entries.iter().filter(|e| e.kind == EntryKind::File) {
        let name = String::from_utf8_lossy(&e.name);
        let lens: Vec<usize> = e
            .chunks
            .iter()
            .map(|c| {
                r.catalog()
                    .expect("catalog")
                    .lookup(c)
                    .expect("lookup")
                    .expect("chunk catalogued")
                    .raw_length as usize
            })
            .collect();
        assert_eq!(lens.iter().sum::<usize>() as u64, e.size, "{name}");
        assert!(lens.iter().all(|&l| l <= max), "{name}: {lens:?}");
        if let Some((_, init)) = lens.split_last() {
            assert!(init.iter().all(|&l| l >= min), "{name}: {lens:?}");
        }
        if e.size as usize <= min {
            assert_eq!(lens.len(), 1, "{name}: {lens:?}");
        }
        if e.size as usize > max {
            assert!(lens.len() >= 2, "{name}: {lens:?}");
        }
    }
}

/// A second backup of unchanged data reads nothing and stores nothing; one
/// changed file is the only one read again.
#[test]
fn unchanged_data_adds_no_blobs() {
    let repo = TestRepo::new();
    let r = repo.open();
    let work = tempfile::tempdir().expect("tempdir");
    let src = work.path().join("src");
    fixture::build(&src, &fixture::standard_tree(CHUNKS)).expect("build");
    // Files changed within a clock tick of a backup's start are read again
    // by the next one (racily clean): leave more than that.
    std::thread::sleep(std::time::Duration::from_millis(50));
    let first = repo::backup(&r, &[&src]);
    let mut opts = repo::backup_options();
    opts.parent = ParentChoice::Auto;
    let paths = [src.clone()];
    let second = repo_format::backup::backup(&r, &paths, &opts).expect("second backup");
    let s = &second.snapshot.stats;
    assert_eq!(second.snapshot.parent, Some(first.id));
    assert_eq!(s.new_blobs, 0, "{s:?}");
    assert_eq!(s.files_unchanged, s.files, "{s:?}");
    assert_eq!(s.bytes_read, 0, "{s:?}");
    assert_eq!(second.snapshot.tree, first.snapshot.tree);

    std::fs::write(src.join("hello.txt"), b"changed content").expect("write");
    let third = repo_format::backup::backup(&r, &paths, &opts).expect("third backup");
    let s = &third.snapshot.stats;
    assert_eq!(s.files_unchanged, s.files - 1, "{s:?}");
    assert_eq!(s.bytes_read, 15, "{s:?}");
    assert!(s.new_blobs >= 1, "{s:?}");
    let target = work.path().join("target");
    repo::restore_clean(&r, &third.id.to_hex(), &target);
    assert_same_tree(&src, &target.join("src"));
}

/// Restoring one path of a snapshot gives that entry alone, as `target/<name>`.
#[test]
fn restore_of_a_subpath() {
    let repo = TestRepo::new();
    let r = repo.open();
    let work = tempfile::tempdir().expect("tempdir");
    let src = work.path().join("src");
    fixture::build(&src, &fixture::standard_tree(CHUNKS)).expect("build");
    let out = repo::backup(&r, &[&src]);
    let target = work.path().join("target");
    for (path, name) in [("src/sub", "sub"), ("/src/chunks/max+1", "max+1")] {
        let opts = repo_format::restore::RestoreOptions {
            path: Some(path.into()),
            ..restore_options()
        };
        let res =
            repo_format::restore::restore(&r, &out.id.to_hex(), &target, &opts).expect("restore");
        assert!(res.errors.is_empty(), "{:?}", res.errors);
        let rel = Path::new(path.trim_start_matches('/'))
            .strip_prefix("src")
            .expect("prefix");
        let d = diff_trees(&src.join(rel), &target.join(name));
        assert!(d.is_empty(), "{path}: {d:#?}");
    }
    let names: Vec<_> = std::fs::read_dir(&target)
        .expect("ls")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
    let opts = repo_format::restore::RestoreOptions {
        path: Some("src/no/such".into()),
        ..restore_options()
    };
    let err = repo_format::restore::restore(&r, "latest", &target, &opts).expect_err("no path");
    assert!(
        matches!(err, repo_format::Error::NoSuchPath { .. }),
        "{err}"
    );
}

/// Names up to the file system's 255-byte limit, and non-UTF-8 names, are
/// legal; a restore must recreate them.
#[test]
fn long_names_round_trip() {
    let long = vec![b'l'; 255];
    let mut dir_name = vec![b'd'; 250];
    dir_name.extend_from_slice(b"-dir");
    let non_utf8 = vec![0xff; 100];
    let m = || Meta::new(0o644, 1_700_000_000_000_000_001);
    let tree = Node::dir(
        Meta::new(0o755, 1_700_000_000_000_000_000),
        vec![
            (&long, Node::file(10, 1, m())),
            (&non_utf8, Node::file(10, 2, m())),
            (b"short", Node::symlink(&long, 1_700_000_000_000_000_002)),
            (
                &dir_name,
                Node::dir(m(), vec![(&long[..200], Node::symlink(b"x", 5))]),
            ),
            (&[b's'; 254][..], Node::symlink(b"target", 7)),
        ],
    );
    let d = round_trip(&tree);
    assert!(d.is_empty(), "{d:#?}");
}

/// A POSIX access ACL: owner rw, user 1234 r, group r, mask r, other none
/// (mode 0640), in the kernel's `system.posix_acl_*` xattr encoding.
fn acl(default_dir: bool) -> Vec<u8> {
    const UNDEFINED: u32 = u32::MAX;
    let (u, g, o) = if default_dir { (7, 5, 5) } else { (6, 4, 0) };
    let entries: [(u16, u16, u32); 5] = [
        (0x01, u, UNDEFINED), // user::
        (0x02, 4, 1234),      // user:1234:r
        (0x04, g, UNDEFINED), // group::
        (0x10, g, UNDEFINED), // mask::
        (0x20, o, UNDEFINED), // other::
    ];
    let mut out = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in entries {
        out.extend_from_slice(&tag.to_le_bytes());
        out.extend_from_slice(&perm.to_le_bytes());
        out.extend_from_slice(&id.to_le_bytes());
    }
    out
}

/// A file capability (cap_net_bind_service, effective), VFS_CAP_REVISION_2.
fn capability() -> Vec<u8> {
    let mut out = 0x0200_0001u32.to_le_bytes().to_vec();
    for v in [1u32 << 10, 0, 0, 0] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// A directory with a default ACL, a file with an access ACL, a file with a
/// capability.
fn acl_tree() -> Node {
    let t = 1_700_000_000_000_000_000;
    Node::dir(
        Meta::new(0o755, t),
        vec![
            (
                b"acl-dir",
                Node::dir(
                    Meta::new(0o755, t).xattr("system.posix_acl_default", &acl(true)),
                    vec![(b"plain", Node::file(10, 1, Meta::new(0o644, t)))],
                ),
            ),
            (
                b"acl-file",
                Node::file(
                    10,
                    2,
                    Meta::new(0o640, t).xattr("system.posix_acl_access", &acl(false)),
                ),
            ),
            (
                b"cap-file",
                Node::file(
                    10,
                    3,
                    Meta::new(0o755, t).xattr("security.capability", &capability()),
                ),
            ),
        ],
    )
}

/// Back up [`acl_tree`], restore it `rounds` times into one target, and
/// return the differences after each round.
fn acl_round_trips(rounds: usize) -> Vec<Vec<String>> {
    let repo = TestRepo::new();
    let r = repo.open();
    let work = tempfile::tempdir().expect("tempdir");
    let src = work.path().join("src");
    let built = fixture::build(&src, &acl_tree()).expect("build");
    if built.xattrs_refused > 0 {
        eprintln!("file system refused ACLs or capabilities ({built:?}); comparing what it took");
    }
    let out = repo::backup(&r, &[&src]);
    let target = work.path().join("target");
    (0..rounds)
        .map(|_| {
            repo::restore_clean(&r, &out.id.to_hex(), &target);
            diff_trees(&src, &target.join("src"))
        })
        .collect()
}

/// ACLs (access and default) and file capabilities travel as xattrs and
/// are restored as captured (chown before xattrs, chmod after: the ACL mask
/// and the capability survive).
#[test]
fn acls_and_capabilities_round_trip() {
    let d = acl_round_trips(1);
    assert!(d[0].is_empty(), "{:#?}", d[0]);
}

/// Restoring again into the same target: the directory restored the first
/// time already carries its default ACL, and the kernel gives files created
/// in it an access ACL the snapshot does not have. Restore must remove it.
#[test]
fn second_restore_does_not_inherit_default_acls() {
    for (round, d) in acl_round_trips(2).iter().enumerate() {
        assert!(d.is_empty(), "restore {round}: {d:#?}");
    }
}

/// Restoring the same snapshot twice into one target gives the same tree.
#[test]
fn restore_twice_into_the_same_target() {
    let repo = TestRepo::new();
    let r = repo.open();
    let work = tempfile::tempdir().expect("tempdir");
    let src = work.path().join("src");
    fixture::build(&src, &fixture::standard_tree(CHUNKS)).expect("build");
    let out = repo::backup(&r, &[&src]);
    let target = work.path().join("target");
    for round in 0..2 {
        repo::restore_clean(&r, &out.id.to_hex(), &target);
        let d = diff_trees(&src, &target.join("src"));
        assert!(d.is_empty(), "restore {round}: {d:#?}");
    }
}

/// Every name under `root` that looks like a restore's temporary name.
fn temporary_names(root: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).expect("read_dir") {
            let e = e.expect("dir entry");
            if e.file_name().as_bytes().windows(5).any(|w| w == b".tmp-") {
                found.push(e.path().display().to_string());
            }
            if e.file_type().expect("file type").is_dir() {
                stack.push(e.path());
            }
        }
    }
    found
}

/// New directories are built under temporary names and renamed into place
/// when complete; existing ones get each file through a temporary name.
/// Either way nothing temporary is left, and a hard link whose first copy
/// sits in another new directory (renamed separately) is still a link.
#[test]
fn restore_leaves_no_temporary_names_and_links_across_new_directories() {
    let repo = TestRepo::new();
    let r = repo.open();
    let work = tempfile::tempdir().expect("tempdir");
    let (a, b) = (work.path().join("a"), work.path().join("b"));
    std::fs::create_dir_all(a.join("deep/er")).expect("mkdir a");
    std::fs::create_dir(&b).expect("mkdir b");
    std::fs::write(a.join("deep/er/first"), b"linked content").expect("write");
    std::fs::hard_link(a.join("deep/er/first"), b.join("second")).expect("link");
    std::fs::write(b.join("plain"), b"plain").expect("write");
    let out = repo::backup(&r, &[&a, &b]);
    assert!(!out.snapshot.is_partial(), "{:?}", out.snapshot.issues);
    let target = work.path().join("target");
    for round in 0..2 {
        // Round 0: a fresh target (staged directories); round 1: the same
        // target again (existing directories, per-file temporary names).
        repo::restore_clean(&r, &out.id.to_hex(), &target);
        assert_eq!(
            temporary_names(&target),
            Vec::<String>::new(),
            "round {round}"
        );
        for d in ["a", "b"] {
            let diffs = diff_trees(&work.path().join(d), &target.join(d));
            assert!(diffs.is_empty(), "round {round}, {d}: {diffs:#?}");
        }
        let md = |p: &str| std::fs::metadata(target.join(p)).expect("restored");
        assert_eq!(
            md("a/deep/er/first").ino(),
            md("b/second").ino(),
            "round {round}"
        );
    }
}
