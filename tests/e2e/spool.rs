//! What an agent's spool relies on: trees and data in separate packs, data
//! packs dropped once stored elsewhere, and their chunks still recorded by
//! id without being stored again.

use std::collections::HashSet;

use integration_tests::fixture;
use integration_tests::repo::{self, TestRepo};
use repo_format::Id;
use repo_format::blob::BlobKind;
use repo_format::catalog::PackState;

#[test]
fn trees_and_data_never_share_a_pack() {
    let repo = TestRepo::new();
    let work = tempfile::tempdir().expect("tempdir");
    let src = work.path().join("src");
    fixture::build(&src, &fixture::standard_tree((1024, 4096, 16384))).expect("build");
    let r = repo.open();
    repo::backup(&r, &[&src]);
    let c = r.catalog().expect("catalog");
    let data: HashSet<Id> = c
        .packs_only_of(BlobKind::Data)
        .expect("data")
        .into_iter()
        .map(|p| p.0)
        .collect();
    let trees: HashSet<Id> = c
        .packs_only_of(BlobKind::Tree)
        .expect("trees")
        .into_iter()
        .map(|p| p.0)
        .collect();
    assert!(!data.is_empty() && !trees.is_empty());
    let all: HashSet<Id> = c.packs().expect("packs").into_iter().map(|p| p.0).collect();
    assert_eq!(all, &data | &trees, "a pack holds both kinds");
}

#[test]
fn dropped_data_is_not_stored_again() {
    let repo = TestRepo::new();
    let work = tempfile::tempdir().expect("tempdir");
    let src = work.path().join("src");
    fixture::build(&src, &fixture::bulk_tree(4, 300 * 1024, 3)).expect("build");
    let r = repo.open();
    let first = repo::backup(&r, &[&src]);

    // Drop every data pack's file, as an agent does once they are uploaded.
    let data_packs = r
        .catalog()
        .expect("c")
        .packs_only_of(BlobKind::Data)
        .expect("data");
    assert!(data_packs.iter().all(|(_, s)| *s == PackState::Local));
    let mut dropped = Vec::new();
    for (p, _) in &data_packs {
        let blobs = r.catalog().expect("c").blobs_in_pack(p).expect("blobs");
        dropped.extend(blobs.iter().map(|b| b.id));
        r.retire_pack(p).expect("drop");
    }
    assert!(!dropped.is_empty());
    assert!(
        r.catalog()
            .expect("c")
            .packs_only_of(BlobKind::Data)
            .expect("d")
            .is_empty()
    );
    assert_eq!(
        repo.pack_paths().len(),
        r.catalog().expect("c").packs().expect("p").len(),
        "the files are gone, and no longer listed as here"
    );
    // Still stored (for deduplication), no longer readable here.
    let mut cat = r.catalog().expect("c");
    assert!(cat.missing(&dropped).expect("missing").is_empty());
    assert_eq!(cat.not_local(&dropped).expect("not local"), dropped);
    assert!(cat.lookup(&dropped[0]).expect("lookup").is_none());
    drop(cat);
    // The tree packs stay: the snapshot's trees still read.
    r.read_tree(&first.snapshot.tree).expect("trees kept");

    // A changed file next to unchanged ones, and a copy of an old file:
    // only the changed file's new chunks are stored.
    let mut files: Vec<_> = std::fs::read_dir(&src)
        .expect("ls")
        .map(|e| e.expect("entry").path())
        .collect();
    files.sort();
    let changed = &files[0];
    std::fs::copy(&files[1], src.join("copy")).expect("copy");
    let mut bytes = std::fs::read(changed).expect("read");
    bytes.extend_from_slice(b"appended");
    std::fs::write(changed, &bytes).expect("write");
    let out = repo::backup(&r, &[&src]);
    assert!(
        out.snapshot.stats.new_bytes < 300 * 1024,
        "only the changed file's tail was stored again: {:?}",
        out.snapshot.stats
    );
}
