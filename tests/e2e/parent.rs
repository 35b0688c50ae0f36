//! Backups against a damaged parent snapshot: the parent only saves reading
//! unchanged files, it must never carry lost data into a new snapshot
//! (DESIGN.md invariant 1: every blob a committed snapshot references is
//! durable and catalogued) nor stop a backup of healthy data.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use integration_tests::assert_same_tree;
use integration_tests::fixture::{self, Meta, Node};
use integration_tests::repo::{self, PASSPHRASE, TestRepo};
use repo_format::Repository;
use repo_format::backup::{BackupOutcome, ParentChoice};
use repo_format::blob::BlobKind;

fn backup_auto(r: &Repository, src: &Path) -> repo_format::Result<BackupOutcome> {
    let mut opts = repo::backup_options();
    opts.parent = ParentChoice::Auto;
    repo_format::backup::backup(r, &[src.to_path_buf()], &opts)
}

/// Pack files whose catalogued blobs are all of `kind`.
fn packs_of_kind(repo: &TestRepo, r: &Repository, kind: BlobKind) -> Vec<PathBuf> {
    let cat = r.catalog().expect("catalog");
    let store = repo.dir_store();
    cat.packs()
        .expect("packs")
        .into_iter()
        .filter(|(name, _, _)| {
            let blobs = cat.blobs_in_pack(name).expect("blobs");
            !blobs.is_empty() && blobs.iter().all(|b| b.kind == kind)
        })
        .map(|(name, _, _)| store.path_of(&name))
        .collect()
}

fn truncate_half(path: &Path) {
    let len = std::fs::metadata(path).expect("stat").len();
    std::fs::File::options()
        .write(true)
        .open(path)
        .and_then(|f| f.set_len(len / 2))
        .expect("truncate");
}

fn flat_tree(t: i64) -> Node {
    Node::dir(
        Meta::new(0o755, t),
        vec![
            (b"big", Node::file(3 * 1024 * 1024, 5, Meta::new(0o644, t))),
            (b"small", Node::file(2000, 6, Meta::new(0o644, t))),
        ],
    )
}

/// A pack is lost (truncated, so a rebuild drops its blobs from the
/// catalog); the source still holds the file intact. The next backup must
/// store that file again instead of pointing at blobs the repository no
/// longer has.
#[test]
fn unchanged_file_whose_chunks_were_lost_is_stored_again() {
    let repo = TestRepo::new();
    let work = tempfile::tempdir().expect("tempdir");
    let src = work.path().join("src");
    fixture::build(&src, &flat_tree(1_700_000_000_000_000_000)).expect("build");
    let s1 = {
        let r = repo.open();
        let s1 = repo::backup(&r, &[&src]).id;
        let data_packs = packs_of_kind(&repo, &r, BlobKind::Data);
        assert!(
            !data_packs.is_empty(),
            "3 MiB fills at least one data-only pack"
        );
        truncate_half(&data_packs[0]);
        s1
    };
    repo.delete_catalog();
    let (r, report) =
        repo_format::rebuild::rebuild_catalog(repo.root(), PASSPHRASE).expect("rebuild");
    assert_eq!(report.skipped.len(), 1, "{:?}", report.skipped);

    let s2 = backup_auto(&r, &src).expect("backup of intact source data");
    assert_eq!(s2.snapshot.parent, Some(s1));
    let check = repo_format::check::check(&r, false).expect("check");
    let users: BTreeSet<_> = check
        .problems
        .iter()
        .flat_map(|p| p.used_by.iter().map(|(s, _)| *s))
        .collect();
    assert!(
        !users.contains(&s2.id),
        "the new snapshot references lost blobs: {:#?}",
        check.problems
    );
    let target = work.path().join("target");
    repo::restore_clean(&r, &s2.id.to_hex(), &target);
    assert_same_tree(&src, &target.join("src"));
}

/// The parent's root tree cannot be read (its pack is damaged); the source
/// is healthy. walk.rs says a damaged parent only costs speed: the backup
/// must read everything and succeed.
#[test]
fn unreadable_parent_tree_only_costs_speed() {
    let repo = TestRepo::new();
    let r = repo.open();
    let work = tempfile::tempdir().expect("tempdir");
    let src = work.path().join("src");
    fixture::build(&src, &flat_tree(1_700_000_000_000_000_000)).expect("build");
    repo::backup(&r, &[&src]);
    let before: BTreeSet<PathBuf> = repo.pack_paths().into_iter().collect();
    // A metadata change: the next snapshot adds trees only, in a pack of its own.
    fixture::set_mtime(&src.join("small"), 1_700_000_000_000_000_001).expect("touch");
    let s1 = repo::backup(&r, &[&src]);
    let after: BTreeSet<PathBuf> = repo.pack_paths().into_iter().collect();
    let tree_packs = packs_of_kind(&repo, &r, BlobKind::Tree);
    let new: Vec<&PathBuf> = after.difference(&before).collect();
    assert!(!new.is_empty() && new.iter().all(|p| tree_packs.contains(p)));
    for p in new {
        truncate_half(p);
    }
    assert!(
        r.read_tree(&s1.snapshot.tree).is_err(),
        "parent tree still readable"
    );

    std::fs::write(src.join("small"), b"new content").expect("write");
    let s2 = backup_auto(&r, &src).expect("backup of a healthy source");
    let target = work.path().join("target");
    repo::restore_clean(&r, &s2.id.to_hex(), &target);
    assert_same_tree(&src, &target.join("src"));
}
