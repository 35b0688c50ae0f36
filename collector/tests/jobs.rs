//! The control stream and the jobs it carries, end to end with the real
//! binaries on loopback: reconnection after collector restarts, a restore at
//! another site, pushed sources and backup-now, quickstart, prune and
//! retention policy.

use std::process::Command;
use std::time::{Duration, Instant};

mod support;

use support::*;

#[test]
fn backup_at_one_site_restores_bit_exact_at_another() {
    use integration_tests::{compare, fixture};
    let (c, tmp, paris, lyon) = paris_and_lyon();
    let src = tmp.path().join("src");
    // The standard fixture: every file type and metadata kind, sized around the default chunker.
    fixture::build(
        &src,
        &fixture::standard_tree((256 * 1024, 1024 * 1024, 4 * 1024 * 1024)),
    )
    .expect("fixture");

    let o = agent_backup(&paris, &src);
    assert!(
        o.status.success(),
        "backup: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let again = agent_backup(&paris, &src);
    assert!(again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains(" 0 sent"),
        "unchanged data is not sent again: {}",
        String::from_utf8_lossy(&again.stderr)
    );

    let snaps: Vec<serde_json::Value> =
        serde_json::from_str(&c.ok(&["snapshots", "--site", "paris", "--json"])).expect("json");
    assert_eq!(snaps.len(), 2);
    let snap = snaps[0]["id"].as_str().expect("id").to_string();
    assert!(c.ok(&["status"]).contains("paris"));

    let _agent = KillOnDrop(spawn_agent(&lyon));
    let lyon_id = c.online_agent("lyon");
    // One file first: only the trees down to it and its chunks are pulled.
    let one = tmp.path().join("one");
    let jobs = c.restore_job_path(&snap, &lyon_id, &one, Some("src/chunks/avg+1"));
    assert_eq!(
        std::fs::read(one.join("avg+1")).expect("restored file"),
        std::fs::read(src.join("chunks/avg+1")).expect("source file")
    );
    let pulled: u64 = number_before(&jobs, "pulled,", 2);
    assert!(
        (4..=6).contains(&pulled),
        "3 trees and the file's 1-3 chunks: {jobs}"
    );
    let target = tmp.path().join("restored");
    c.restore_job(&snap, &lyon_id, &target);
    compare::assert_same_tree(&src, &target.join("src"));

    // The collector's repository is structurally sound with its metadata key alone.
    c.check_repo();
}

/// An agent whose control stream was up starts its reconnection backoff
/// over: after each of several collector restarts it is back within
/// seconds. Without the reset the delay doubles per lost session (1, 2, 4,
/// 8, 16 s, ...), and the fifth restart would take 16 s or more.
#[test]
fn agent_reconnects_promptly_after_each_of_many_collector_restarts() {
    let mut c = Collector::start();
    c.ok(&["site", "add", "nice"]);
    let tmp = tempfile::tempdir().expect("tmp");
    let state = enrolled(&c, "nice", tmp.path());
    let _agent = KillOnDrop(spawn_agent(&state));
    c.online_agent("nice");
    for round in 0..6 {
        c.child.kill().expect("kill -9");
        let _ = c.child.wait();
        c.restart();
        let start = Instant::now();
        while !c.agents().iter().any(|a| a["online"] == true) {
            assert!(
                start.elapsed() < Duration::from_secs(15),
                "restart {round}: the agent did not reconnect within 15 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("restart {round}: back online after {:?}", start.elapsed());
    }
}

#[test]
fn quickstart_runs_the_main_job_on_embedded_defaults() {
    let tmp = tempfile::tempdir().expect("tmp");
    let src = tmp.path().join("docs");
    std::fs::create_dir_all(&src).expect("mkdir");
    std::fs::write(src.join("a.txt"), b"hello").expect("write");
    // Both runs must use the same port (the agent keeps the collector's
    // address). Taken below Linux's ephemeral range (32768-60999), where no
    // `:0` bind of another test can land between our check and the
    // collector's bind.
    let port = (20_000 + (std::process::id() % 10_000) as u16..32_000)
        .find(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
        .expect("a free port below the ephemeral range");
    let run = || {
        Command::new(bin("hubvault"))
            .args([
                "quickstart",
                "--once",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--data",
            ])
            .arg(tmp.path().join("data"))
            .arg(&src)
            .env_remove("RUST_BACKTRACE")
            .output()
            .expect("quickstart")
    };
    let first = run();
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let out = String::from_utf8_lossy(&first.stdout);
    assert!(
        out.contains("enrolled an agent") && out.contains("hubvault") && out.contains("restore"),
        "{out}"
    );
    let second = run();
    assert!(
        second.status.success(),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    assert!(
        !String::from_utf8_lossy(&second.stdout).contains("enrolled"),
        "second run reuses the agent"
    );
    assert!(
        String::from_utf8_lossy(&second.stderr).contains(" 0 sent"),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
}

#[test]
fn sources_are_pushed_and_backup_now_runs_as_a_job() {
    let c = Collector::start();
    c.ok(&["site", "add", "nice"]);
    let tmp = tempfile::tempdir().expect("tmp");
    let state = enrolled(&c, "nice", tmp.path());
    let src = tmp.path().join("share");
    std::fs::create_dir_all(src.join("cache")).expect("mkdir");
    std::fs::write(src.join("keep.txt"), b"keep").expect("w");
    std::fs::write(src.join("drop.tmp"), b"drop").expect("w");
    std::fs::write(src.join("cache").join("x"), b"x").expect("w");
    let id = c.agents()[0]["id"].as_str().expect("id").to_string();
    // A bad schedule is refused with a clear message.
    let bad = c.hubvault(&[
        "source",
        "add",
        "--agent",
        &id,
        "--path",
        "/x",
        "--schedule",
        "every day",
    ]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("schedule"));
    c.ok(&[
        "source",
        "add",
        "--agent",
        &id,
        "--name",
        "share",
        "--path",
        src.to_str().expect("utf8"),
        "--exclude",
        "*.tmp",
        "--exclude",
        "cache",
        "--schedule",
        "0 0 2 * * *",
    ]);
    let _agent = KillOnDrop(spawn_agent(&state));
    wait_for("agent online", || {
        c.agents().first().is_some_and(|a| a["online"] == true)
    });
    wait_for("sources pushed", || state.join("sources.pb").exists());
    let job = c.ok(&["backup-now", "--agent", &id]);
    let o = c.hubvault(&["jobs", "--wait", job.trim(), "--timeout", "60", "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    let snaps: Vec<serde_json::Value> =
        serde_json::from_str(&c.ok(&["snapshots", "--json"])).expect("json");
    assert_eq!(snaps.len(), 1);
    assert_eq!(snaps[0]["source"], "share");
    assert_eq!(snaps[0]["files"], 1, "excludes applied: only keep.txt");
}

#[test]
fn prune_dry_run_lists_and_prune_forgets() {
    use integration_tests::compare;
    let c = Collector::start();
    c.ok(&["site", "add", "paris"]);
    let tmp = tempfile::tempdir().expect("tmp");
    let state = enrolled(&c, "paris", tmp.path());
    let id = c.agents()[0]["id"].as_str().expect("id").to_string();
    let src = tmp.path().join("src");
    std::fs::create_dir_all(src.join("sub")).expect("mkdir");
    std::fs::write(src.join("sub").join("fixed.txt"), b"unchanged").expect("w");
    c.ok(&[
        "source",
        "add",
        "--agent",
        &id,
        "--name",
        "docs",
        "--path",
        src.to_str().expect("utf8"),
    ]);
    // Three snapshots of the source, each with a different version of a file.
    for v in 1..=3 {
        std::fs::write(src.join("notes.txt"), format!("version {v}\n").repeat(1000)).expect("w");
        let o = agent_backup(&state, &src);
        assert!(
            o.status.success(),
            "backup {v}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let all = c.snapshot_ids();
    assert_eq!(all.len(), 3);
    let newest = all[2].clone();

    // Without a policy every snapshot is kept.
    let keep_all: serde_json::Value =
        serde_json::from_str(&c.ok(&["prune", "--dry-run", "--json"])).expect("json");
    let d = keep_all["decisions"].as_array().expect("decisions");
    assert_eq!(d.len(), 3);
    assert!(
        d.iter()
            .all(|d| d["keep"] == true && d["reason"] == "no retention policy")
    );

    c.ok(&[
        "policy",
        "set",
        "--agent",
        &id,
        "--source",
        "docs",
        "--keep-last",
        "1",
    ]);
    let dry: serde_json::Value =
        serde_json::from_str(&c.ok(&["prune", "--dry-run", "--json"])).expect("json");
    let d = dry["decisions"].as_array().expect("decisions");
    assert_eq!(d.len(), 3, "{dry}");
    let kept: Vec<&serde_json::Value> = d.iter().filter(|d| d["keep"] == true).collect();
    assert_eq!(kept.len(), 1, "{dry}");
    assert_eq!(kept[0]["id"], newest.as_str());
    assert_eq!(kept[0]["reason"], "last 1");
    assert_eq!(d.iter().filter(|d| d["action"] == "forget").count(), 2);
    assert_eq!(dry["forgotten"], 0);
    assert_eq!(c.snapshot_ids().len(), 3, "a dry run changes nothing");

    let packs = c.pack_count();
    let o = c.hubvault(&["prune"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        text.lines().filter(|l| l.starts_with("forget ")).count(),
        2,
        "{text}"
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("forgot 2 of 3"));
    assert_eq!(c.snapshot_ids(), vec![newest.clone()]);
    assert_eq!(c.pack_count(), packs, "forgetting never deletes packs");
    let repo = c.dir.path().join("data").join("repo");
    assert_eq!(
        std::fs::read_dir(repo.join("snapshots"))
            .expect("snapshots dir")
            .count(),
        1,
        "the forgotten snapshot files are gone"
    );
    // Pruning again finds nothing more to forget.
    let again: serde_json::Value = serde_json::from_str(&c.ok(&["prune", "--json"])).expect("json");
    assert_eq!(again["forgotten"], 0);

    // The status lists the source's recovery point with its last snapshot.
    let status: serde_json::Value =
        serde_json::from_str(&c.ok(&["status", "--json"])).expect("json");
    let rpo = status["sites"][0]["rpo"].as_array().expect("rpo");
    assert!(
        rpo.iter().any(|r| r["agent"] == id.as_str()
            && r["source"] == "docs"
            && r["last_snapshot_ns"] != 0),
        "{status:?}"
    );

    // The kept snapshot still restores byte-exact.
    let _agent = KillOnDrop(spawn_agent(&state));
    wait_for("agent online", || {
        c.agents().first().is_some_and(|a| a["online"] == true)
    });
    let target = tmp.path().join("restored");
    c.restore_job(&newest, &id, &target);
    compare::assert_same_tree(&src, &target.join("src"));

    // The repository checks clean: no catalogued snapshot lost its file.
    c.check_repo();
}

#[test]
fn policy_set_refuses_bad_values_with_clear_messages() {
    let c = Collector::start();
    c.ok(&["site", "add", "paris"]);
    let tmp = tempfile::tempdir().expect("tmp");
    enrolled(&c, "paris", tmp.path());
    let id = c.agents()[0]["id"].as_str().expect("id").to_string();
    c.ok(&[
        "source",
        "add",
        "--agent",
        &id,
        "--name",
        "docs",
        "--path",
        "/srv/docs",
    ]);
    let refused = |args: &[&str], needle: &str| {
        let o = c.hubvault(args);
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(!o.status.success(), "{args:?} was accepted");
        assert!(err.contains(needle), "{args:?}: {err}");
    };
    refused(
        &[
            "policy",
            "set",
            "--agent",
            &id,
            "--source",
            "docs",
            "--schedule",
            "every day",
        ],
        "format: sec min hour day month weekday",
    );
    refused(
        &[
            "policy",
            "set",
            "--site",
            "paris",
            "--timezone",
            "Mars/Olympus",
        ],
        "not an IANA time zone",
    );
    refused(
        &[
            "policy",
            "set",
            "--agent",
            &id,
            "--source",
            "docs",
            "--quiet",
            "10s",
            "--max-delay",
            "5s",
        ],
        "longer than the maximum delay",
    );
    refused(
        &[
            "policy",
            "set",
            "--agent",
            &id,
            "--source",
            "nope",
            "--priority",
            "2",
        ],
        "add it with `hubvault source add`",
    );
    refused(
        &["policy", "set", "--site", "lyon", "--keep-daily", "7"],
        "site lyon",
    );
    refused(
        &["policy", "set", "--site", "paris", "--bandwidth", "2MB/s"],
        "source settings",
    );
    // Good values are taken.
    c.ok(&[
        "policy",
        "set",
        "--site",
        "paris",
        "--timezone",
        "Europe/Paris",
        "--agent-bandwidth",
        "2MB/s",
        "--window",
        "08:00-18:00",
        "--keep-daily",
        "30",
    ]);
    c.ok(&[
        "policy",
        "set",
        "--agent",
        &id,
        "--source",
        "docs",
        "--realtime",
        "--priority",
        "5",
        "--quiet",
        "1s",
        "--max-delay",
        "5s",
        "--bandwidth",
        "500KiB/s",
    ]);
}
