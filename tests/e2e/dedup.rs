//! Deduplication within one backup: a chunk met many times, by several
//! workers, across many pack commits, is stored once (see
//! repo-format/src/backup/claims.rs: lookups run in renewed catalog
//! snapshots, which must not let a catalogued chunk slip by).

use integration_tests::fixture::{self, Fill};
use integration_tests::repo::{self, TestRepo};

#[test]
fn a_chunk_met_many_times_across_many_packs_is_stored_once() {
    // 1 KiB / 4 KiB / 16 KiB chunks and 1 MiB packs: many pack commits.
    let repo = TestRepo::new();
    let work = tempfile::tempdir().expect("tempdir");
    let src = work.path().join("src");
    // 60 directories × 60 files; each file's content is one of 90 variants,
    // small (one chunk, sealed by the file workers) or large (many chunks,
    // sealed by the seal workers), with unique filler files so packs keep
    // committing while repeats come in.
    let variant = |v: usize| -> Vec<u8> {
        let len = if v.is_multiple_of(3) {
            40_000 + v * 97
        } else {
            200 + v * 13
        };
        fixture::content(len, v as u64, Fill::Random)
    };
    for d in 0..60 {
        let dir = src.join(format!("d{d:02}"));
        std::fs::create_dir_all(&dir).expect("mkdir");
        for f in 0..60 {
            let v = (d * 7 + f * 11) % 90;
            std::fs::write(dir.join(format!("v{f:02}")), variant(v)).expect("write");
            let unique = fixture::content(3000, 1000 + (d * 60 + f) as u64, Fill::Random);
            std::fs::write(dir.join(format!("u{f:02}")), unique).expect("write");
        }
    }
    let r = repo.open();
    repo::backup(&r, &[&src]);
    let c = r.catalog().expect("catalog");
    let in_packs: u64 = c.packs().expect("packs").iter().map(|p| p.2).sum();
    let catalogued = c.blob_count().expect("count");
    assert!(
        c.packs().expect("packs").len() > 5,
        "the test needs many pack commits"
    );
    assert_eq!(
        in_packs, catalogued,
        "packs hold {in_packs} blobs but only {catalogued} are distinct: a chunk was stored twice"
    );
    drop(c);
    // And the content is all there.
    let target = work.path().join("restore");
    repo::restore_clean(&r, "latest", &target);
    integration_tests::compare::assert_same_tree(&src, &target.join("src"));
}
