//! Two backups of overlapping data at once into one repository (shared
//! lock): both commit, the blobs they both stored are catalogued once, and
//! everything checks, restores and rebuilds cleanly.

use std::path::PathBuf;

use integration_tests::diff_trees;
use integration_tests::fixture;
use integration_tests::repo::{self, PASSPHRASE, TestRepo};

#[test]
fn concurrent_backups_of_overlapping_data() {
    let repo = TestRepo::new();
    let work = tempfile::tempdir().expect("tempdir");
    let shared = work.path().join("shared");
    fixture::build(&shared, &fixture::bulk_tree(6, 256 * 1024, 500)).expect("build shared");
    let own: Vec<PathBuf> = (0..2)
        .map(|i| {
            let p = work.path().join(format!("own-{i}"));
            fixture::build(&p, &fixture::bulk_tree(2, 100_000, 600 + 10 * i)).expect("build own");
            p
        })
        .collect();

    let outcomes: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = own
            .iter()
            .map(|o| {
                let (repo, shared) = (&repo, &shared);
                s.spawn(move || {
                    let r = repo.open();
                    let mut opts = repo::backup_options();
                    opts.threads = 1;
                    repo_format::backup::backup(&r, &[shared.clone(), o.clone()], &opts)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("backup thread").expect("concurrent backup"))
            .collect()
    });

    let r = repo.open();
    assert_eq!(r.snapshots().expect("snapshots").len(), 2);
    let report = repo_format::check::check(&r, true).expect("check");
    assert!(report.is_ok(), "{:#?}", report.problems);
    let restore_all = |r: &repo_format::Repository, tag: &str| {
        for (i, out) in outcomes.iter().enumerate() {
            let t = work.path().join(format!("{tag}-{i}"));
            repo::restore_clean(r, &out.id.to_hex(), &t);
            for src in [&shared, &own[i]] {
                let name = src.file_name().expect("name");
                let d = diff_trees(src, &t.join(name));
                assert!(d.is_empty(), "{tag} {i}: {d:#?}");
            }
        }
    };
    restore_all(&r, "t");
    drop(r);

    repo.delete_catalog();
    let (rebuilt, rep) =
        repo_format::rebuild::rebuild_catalog(repo.root(), PASSPHRASE).expect("rebuild");
    assert!(rep.skipped.is_empty(), "{:?}", rep.skipped);
    let report = repo_format::check::check(&rebuilt, true).expect("check");
    assert!(report.is_ok(), "{:#?}", report.problems);
    restore_all(&rebuilt, "rebuilt");
}
