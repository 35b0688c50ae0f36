//! What an agent's spool relies on: trees and data in separate packs, data
//! packs dropped once stored elsewhere, and chunks stored elsewhere recorded
//! by id without being stored again.

use std::collections::HashSet;
use std::sync::Arc;

use integration_tests::fixture;
use integration_tests::repo::{self, TestRepo};
use repo_format::Id;
use repo_format::backup::StoredElsewhere;
use repo_format::blob::BlobKind;

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
        .collect();
    let trees: HashSet<Id> = c
        .packs_only_of(BlobKind::Tree)
        .expect("trees")
        .into_iter()
        .collect();
    assert!(!data.is_empty() && !trees.is_empty());
    let all: HashSet<Id> = c.packs().expect("packs").into_iter().map(|p| p.0).collect();
    assert_eq!(all, &data | &trees, "a pack holds both kinds");
}

#[test]
fn dropped_data_is_not_stored_again_when_stored_elsewhere() {
    let repo = TestRepo::new();
    let work = tempfile::tempdir().expect("tempdir");
    let src = work.path().join("src");
    fixture::build(&src, &fixture::bulk_tree(4, 300 * 1024, 3)).expect("build");
    let r = repo.open();
    let first = repo::backup(&r, &[&src]);

    // Drop every data pack, remembering its blobs as "stored elsewhere".
    let data_packs = r
        .catalog()
        .expect("c")
        .packs_only_of(BlobKind::Data)
        .expect("data");
    let mut elsewhere = HashSet::new();
    for p in &data_packs {
        let blobs = r.catalog().expect("c").blobs_in_pack(p).expect("blobs");
        for b in &blobs {
            elsewhere.insert(b.id);
        }
        r.drop_pack(p, &blobs).expect("drop");
    }
    assert!(
        r.catalog()
            .expect("c")
            .packs_only_of(BlobKind::Data)
            .expect("d")
            .is_empty()
    );
    let on_disk = repo.pack_paths().len();
    assert_eq!(
        on_disk,
        r.catalog().expect("c").packs().expect("p").len(),
        "files went with rows"
    );
    assert!(!elsewhere.is_empty());
    // The tree packs stay: the snapshot's trees still read.
    r.read_tree(&first.snapshot.tree).expect("trees kept");

    // A changed file next to unchanged ones: only its new chunks are stored.
    let changed = std::fs::read_dir(&src)
        .expect("ls")
        .next()
        .expect("a file")
        .expect("entry")
        .path();
    let mut bytes = std::fs::read(&changed).expect("read");
    bytes.extend_from_slice(b"appended");
    std::fs::write(&changed, &bytes).expect("write");
    let known = Arc::new(elsewhere);
    let k = known.clone();
    let mut opts = repo::backup_options();
    opts.stored_elsewhere = Some(StoredElsewhere(Arc::new(move |id| k.contains(id))));
    let out = repo_format::backup::backup(&r, std::slice::from_ref(&src), &opts).expect("backup");
    assert!(
        out.snapshot.stats.new_bytes < 300 * 1024,
        "only the changed file's tail was stored again: {:?}",
        out.snapshot.stats
    );

    // Without the hook, the same chunks are stored again (the control).
    std::fs::write(&changed, b"different again").expect("write");
    let plain = repo::backup(&r, &[&src]);
    assert!(
        plain.snapshot.stats.new_bytes >= 3 * 300 * 1024,
        "without the hook every dropped chunk is stored again: {:?}",
        plain.snapshot.stats
    );
}
