//! Damaged packs at rest (RELIABILITY.md scenario 5), end to end with the
//! real binaries on loopback: `hubvault scrub` names and sets aside damaged
//! packs, and the next backup heals the old snapshots.

use std::path::{Path, PathBuf};

mod support;

use support::*;

/// The pack files under the collector's `repo/packs`, smallest first.
fn packs_by_size(c: &Collector) -> Vec<PathBuf> {
    let packs = c.dir.path().join("data/repo/packs");
    let mut all: Vec<(u64, PathBuf)> = std::fs::read_dir(&packs)
        .expect("packs dir")
        .flatten()
        .flat_map(|d| std::fs::read_dir(d.path()).into_iter().flatten().flatten())
        .map(|f| (f.metadata().expect("stat").len(), f.path()))
        .collect();
    all.sort();
    all.into_iter().map(|(_, p)| p).collect()
}

/// RELIABILITY.md scenario 5 (damaged packs at rest): one data pack with a
/// flipped bit, the tree pack truncated to half. A scrub names both, the
/// site that held their blobs and the snapshot and path that need them;
/// it sets them aside. A restore then fails loudly; the agent's next
/// backup (data unchanged) uploads the lost chunks and trees again, after
/// which the OLD snapshot restores bit-exact and the repository checks
/// clean.
#[test]
fn a_damaged_pack_is_set_aside_and_the_next_backup_heals_old_snapshots() {
    use integration_tests::compare;
    let (c, tmp, paris, lyon) = paris_and_lyon();
    let src = tmp.path().join("src");
    std::fs::create_dir_all(src.join("sub")).expect("mkdir");
    let big =
        integration_tests::fixture::content(3 << 20, 7, integration_tests::fixture::Fill::Random);
    std::fs::write(src.join("sub/big.bin"), big).expect("write");
    std::fs::write(src.join("small.txt"), b"small and untouched").expect("write");
    let o = agent_backup(&paris, &src);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let first = c.snapshot_ids()[0].clone();
    // A second snapshot of the same data shares every tree: the report must
    // list its paths too (a memoised walk once listed them only for the
    // first snapshot that reached a tree).
    let o = agent_backup(&paris, &src);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(c.snapshot_ids().len(), 2);

    let all = packs_by_size(&c);
    let (trees, pack) = (all[0].clone(), all[all.len() - 1].clone());
    let name_of = |p: &Path| -> String {
        p.file_name()
            .and_then(|n| n.to_str())
            .expect("name")
            .to_string()
    };
    let mut bytes = std::fs::read(&pack).expect("read pack");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x10;
    std::fs::write(&pack, &bytes).expect("flip a bit");
    // The sites that held the pack's blobs: Paris, and Lyon once a restore
    // job granted it the snapshot's blobs.
    let damaged = |v: &serde_json::Value, sites: &[&str]| -> Vec<String> {
        let d = v["damaged"].as_array().expect("damaged");
        assert!(
            d.iter().all(|p| p["sites"] == serde_json::json!(sites)),
            "{v}"
        );
        d.iter()
            .map(|p| p["pack"].as_str().expect("pack").to_string())
            .collect()
    };

    let (code, dry) = scrub(&c, true);
    assert_eq!(code, 3, "{dry}");
    assert_eq!(damaged(&dry, &["paris"]), [name_of(&pack)], "{dry}");
    assert!(pack.exists(), "a dry run moves nothing");

    let (code, done) = scrub(&c, false);
    assert_eq!(code, 3, "{done}");
    assert_eq!(damaged(&done, &["paris"]), [name_of(&pack)], "{done}");
    let affected = done["affected"].as_array().expect("affected");
    assert_eq!(affected.len(), 2, "{done}");
    assert!(affected.iter().any(|a| a["snapshot"] == first.as_str()));
    for a in affected {
        assert!(
            a["paths"]
                .as_array()
                .expect("paths")
                .iter()
                .any(|p| p.as_str().is_some_and(|p| p.ends_with("sub/big.bin"))),
            "{done}"
        );
    }
    // The trees are intact: a restore job starts and fails on the lost
    // chunks, saying the collector lost them, not that it has a bug.
    let _agent = KillOnDrop(spawn_agent(&lyon));
    let lyon_id = c.online_agent("lyon");
    let partial = tmp.path().join("partial");
    let job = c.ok(&[
        "restore",
        &first,
        "--to-agent",
        &lyon_id,
        "--target",
        partial.to_str().expect("utf8"),
    ]);
    let o = c.hubvault(&["jobs", "--wait", job.trim(), "--timeout", "120"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(!o.status.success(), "{out}");
    assert!(out.contains("no longer in the repository"), "{out}");
    // Then the tree pack, truncated to half: every tree is lost.
    let half = std::fs::metadata(&trees).expect("stat").len() / 2;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&trees)
        .and_then(|f| f.set_len(half))
        .expect("truncate");
    let (code, done) = scrub(&c, false);
    assert_eq!(code, 3, "{done}");
    assert_eq!(
        damaged(&done, &["lyon", "paris"]),
        [name_of(&trees)],
        "{done}"
    );
    assert!(
        done["damaged"][0]["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("size ")),
        "{done}"
    );
    assert_eq!(done["affected"][0]["paths"], serde_json::json!(["/"]));
    for p in [&pack, &trees] {
        assert!(!p.exists());
        assert!(
            c.dir
                .path()
                .join("data/repo/damaged")
                .join(name_of(p))
                .exists()
        );
    }

    // A restore that needs the lost blobs fails, and says so: at once, as
    // DATA_LOSS naming the way back (its root tree is gone).
    let broken = tmp.path().join("broken");
    let o = c.hubvault(&[
        "restore",
        &first,
        "--to-agent",
        &lyon_id,
        "--target",
        broken.to_str().expect("utf8"),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains("no longer in the repository") && err.contains("scrub --dry-run"),
        "{err}"
    );

    // The data is unchanged at Paris: the next backup reads the file again
    // (its chunks are no longer known) and uploads them.
    let o = agent_backup(&paris, &src);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        !err.contains(" 0 sent"),
        "the lost chunks are sent again: {err}"
    );
    let (code, clean) = scrub(&c, false);
    assert_eq!(code, 0, "{clean}");
    c.check_repo();

    let healed = tmp.path().join("healed");
    c.restore_job(&first, &lyon_id, &healed);
    compare::assert_same_tree(&src, &healed.join("src"));
    assert_eq!(c.snapshot_ids().len(), 3);
}
