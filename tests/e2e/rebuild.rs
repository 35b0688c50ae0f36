//! The catalog is an index: lost, it is rebuilt from pack trailers and
//! snapshot files, and every snapshot restores as before. A damaged pack is
//! reported and skipped, and `check` names what it held.

use std::collections::BTreeSet;
use std::path::PathBuf;

use integration_tests::fixture::{self, Meta, Node};
use integration_tests::repo::{self, PASSPHRASE, TestRepo};
use integration_tests::{assert_same_tree, diff_trees, restore_options};
use repo_format::rebuild::rebuild_catalog;
use repo_format::{Error, LockMode, Repository};

const CHUNKS: (usize, usize, usize) = (1024, 4096, 16384);

#[test]
fn lost_catalog_is_rebuilt_and_every_snapshot_restores_identically() {
    let repo = TestRepo::new();
    let work = tempfile::tempdir().expect("tempdir");
    let src = work.path().join("src");
    fixture::build(&src, &fixture::standard_tree(CHUNKS)).expect("build");
    let mut ids = Vec::new();
    let blobs_before;
    {
        let r = repo.open();
        ids.push(repo::backup(&r, &[&src]).id);
        std::fs::write(src.join("hello.txt"), b"second version").expect("write");
        fixture::build(&src.join("bulk"), &fixture::bulk_tree(6, 300 * 1024, 7)).expect("bulk");
        ids.push(repo::backup(&r, &[&src]).id);
        std::fs::remove_dir_all(src.join("chunks")).expect("rm");
        ids.push(repo::backup(&r, &[&src]).id);
        blobs_before = r.catalog().expect("catalog").blob_count().expect("count");
    }
    let before_snaps = repo.open().snapshots().expect("snapshots");
    let restored_before: Vec<PathBuf> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let t = work.path().join(format!("before-{i}"));
            repo::restore_clean(&repo.open(), &id.to_hex(), &t);
            t
        })
        .collect();

    repo.delete_catalog();
    let err = Repository::open(repo.root(), PASSPHRASE, LockMode::Shared)
        .err()
        .expect("open without a catalog must fail");
    assert!(err.to_string().contains("rebuild-catalog"), "{err}");

    let (rebuilt, report) = rebuild_catalog(repo.root(), PASSPHRASE).expect("rebuild");
    assert!(report.skipped.is_empty(), "{:?}", report.skipped);
    assert_eq!(report.snapshots, 3);
    assert_eq!(report.packs as usize, repo.pack_paths().len());
    assert_eq!(report.blobs, blobs_before);
    assert_eq!(report.old_catalog, None);
    assert_eq!(rebuilt.snapshots().expect("snapshots"), before_snaps);
    for (i, id) in ids.iter().enumerate() {
        let t = work.path().join(format!("after-{i}"));
        repo::restore_clean(&rebuilt, &id.to_hex(), &t);
        assert_same_tree(&restored_before[i].join("src"), &t.join("src"));
    }
    let check = repo_format::check::check(&rebuilt, true).expect("check");
    assert!(check.is_ok(), "{:#?}", check.problems);
    drop(rebuilt);

    // A rebuild over an existing catalog keeps the old one aside.
    let (_, report) = rebuild_catalog(repo.root(), PASSPHRASE).expect("second rebuild");
    let old = report.old_catalog.expect("old catalog kept");
    assert!(std::path::Path::new(&old).exists(), "{old}");
    assert_eq!(repo.open().snapshots().expect("snapshots"), before_snaps);
}

#[test]
fn rebuild_skips_a_truncated_pack_and_check_names_what_it_held() {
    let repo = TestRepo::new();
    let work = tempfile::tempdir().expect("tempdir");
    let (one, two) = (work.path().join("one"), work.path().join("two"));
    fixture::build(&one, &fixture::standard_tree(CHUNKS)).expect("build");
    let t = 1_700_000_000_000_000_000;
    let tree = Node::dir(
        Meta::new(0o755, t),
        vec![
            (b"big", Node::file(700 * 1024, 77, Meta::new(0o644, t))),
            (b"small", Node::file(3000, 78, Meta::new(0o644, t))),
        ],
    );
    fixture::build(&two, &tree).expect("build");
    let (s1, s2);
    let packs_one: BTreeSet<PathBuf>;
    {
        let r = repo.open();
        s1 = repo::backup(&r, &[&one]).id;
        packs_one = repo.pack_paths().into_iter().collect();
        s2 = repo::backup(&r, &[&two]).id;
    }
    let all: BTreeSet<PathBuf> = repo.pack_paths().into_iter().collect();
    let new: Vec<&PathBuf> = all.difference(&packs_one).collect();
    assert!(!new.is_empty());
    let victim = new[0];
    let len = std::fs::metadata(victim).expect("stat").len();
    std::fs::File::options()
        .write(true)
        .open(victim)
        .and_then(|f| f.set_len(len / 2))
        .expect("truncate");
    let victim_name = victim
        .file_name()
        .expect("name")
        .to_string_lossy()
        .into_owned();

    repo.delete_catalog();
    let (rebuilt, report) = rebuild_catalog(repo.root(), PASSPHRASE).expect("rebuild");
    assert_eq!(report.skipped.len(), 1, "{:?}", report.skipped);
    assert!(
        report.skipped[0].contains(&victim_name),
        "{:?}",
        report.skipped
    );
    assert_eq!(report.packs as usize, all.len() - 1);
    assert_eq!(report.snapshots, 2);

    let check = repo_format::check::check(&rebuilt, false).expect("check");
    assert!(!check.is_ok());
    // The skipped pack is on disk but no longer catalogued.
    assert_eq!(check.unreferenced_packs.len(), 1);
    for p in &check.problems {
        assert_eq!(p.what, "blob", "{p:?}");
        assert!(!p.used_by.is_empty(), "{p:?}");
        assert!(p.used_by.iter().all(|(s, _)| *s == s2), "{p:?}");
    }

    // The untouched snapshot restores bit-exact; the damaged one fails loudly.
    let t1 = work.path().join("t1");
    repo::restore_clean(&rebuilt, &s1.to_hex(), &t1);
    let d = diff_trees(&one, &t1.join("one"));
    assert!(d.is_empty(), "{d:#?}");
    let t2 = work.path().join("t2");
    match repo_format::restore::restore(&rebuilt, &s2.to_hex(), &t2, &restore_options()) {
        Err(e) => assert!(matches!(e, Error::MissingBlob(_)), "{e}"),
        Ok(out) => assert!(
            !out.errors.is_empty(),
            "damaged snapshot restored without error"
        ),
    }
}

/// A snapshot file with a flipped bit: `check` names it, a rebuild skips
/// it, and the other snapshots are untouched.
#[test]
fn damaged_snapshot_file_is_reported_and_skipped() {
    let repo = TestRepo::new();
    let work = tempfile::tempdir().expect("tempdir");
    let src = work.path().join("src");
    fixture::build(&src, &fixture::standard_tree(CHUNKS)).expect("build");
    let (good, bad) = {
        let r = repo.open();
        let good = repo::backup(&r, &[&src]).id;
        std::fs::write(src.join("hello.txt"), b"v2").expect("write");
        (good, repo::backup(&r, &[&src]).id)
    };
    let path = repo.root().join("snapshots").join(bad.to_hex());
    let mut bytes = std::fs::read(&path).expect("read snapshot");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    std::fs::write(&path, &bytes).expect("write snapshot");

    let report = repo_format::check::check(&repo.open(), false).expect("check");
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.what == "snapshot" && p.id == Some(bad)),
        "{:#?}",
        report.problems
    );

    repo.delete_catalog();
    let (r, rep) = rebuild_catalog(repo.root(), PASSPHRASE).expect("rebuild");
    assert_eq!(rep.skipped.len(), 1, "{:?}", rep.skipped);
    assert!(rep.skipped[0].contains(&bad.to_hex()), "{:?}", rep.skipped);
    let ids: Vec<_> = r
        .snapshots()
        .expect("snapshots")
        .into_iter()
        .map(|s| s.0)
        .collect();
    assert_eq!(ids, vec![good]);
    let t = work.path().join("t");
    repo::restore_clean(&r, &good.to_hex(), &t);
    let d = diff_trees(&t.join("src").join("sub"), &src.join("sub"));
    assert!(d.is_empty(), "{d:#?}");
}
