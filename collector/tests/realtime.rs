//! Real-time and policy behaviour end to end, with the real collector,
//! agent and admin binaries on 127.0.0.1 (issue 4): a saved file reaches a
//! committed snapshot within seconds; a burst is coalesced and the last
//! snapshot is exact; an inotify queue overflow (made real by stopping the
//! agent while events pile up) forces a rescan that stays exact; renames,
//! deleted trees and moves between directories; an agent killed mid-burst
//! loses nothing; the watch limit falls back to scans and says so; a
//! bandwidth limit holds; a cron schedule fires, and slots missed while the
//! agent was down run once. "Exact" is checked by restoring the newest
//! snapshot through a restore job and comparing with the source, metadata
//! included.
//!
//! Latencies are printed, not asserted (the bench measures them); the only
//! time limits are generous timeouts.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use integration_tests::compare;
use support::*;

/// A collector with one enrolled agent whose source `live` is real-time.
struct Live {
    c: Collector,
    tmp: tempfile::TempDir,
    state: PathBuf,
    id: String,
    src: PathBuf,
    agent: Option<KillOnDrop>,
    agent_args: Vec<String>,
    restores: usize,
}

impl Live {
    /// Enroll, define the real-time source over `src` (filled by `fill`
    /// first) with `policy` flags, and start the agent with `agent_args`.
    fn start(fill: impl FnOnce(&Path), policy: &[&str], agent_args: &[&str]) -> Live {
        let c = Collector::start();
        c.ok(&["site", "add", "paris"]);
        let tmp = tempfile::tempdir().expect("tmp");
        let state = enrolled(&c, "paris", tmp.path());
        let id = c.agents()[0]["id"].as_str().expect("agent id").to_string();
        let src = tmp.path().join("src");
        std::fs::create_dir_all(&src).expect("mkdir");
        fill(&src);
        let mut args = vec![
            "source",
            "add",
            "--agent",
            &id,
            "--name",
            "live",
            "--path",
            src.to_str().expect("utf8"),
            "--realtime",
        ];
        args.extend_from_slice(policy);
        c.ok(&args);
        let mut live = Live {
            c,
            tmp,
            state,
            id,
            src,
            agent: None,
            agent_args: agent_args.iter().map(|s| s.to_string()).collect(),
            restores: 0,
        };
        live.spawn();
        live
    }

    fn spawn(&mut self) {
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(self.tmp.path().join("agent.log"))
            .expect("log");
        let child = Command::new(bin("hubvault-agent"))
            .args(["run", "--heartbeat-secs", "1", "--state"])
            .arg(&self.state)
            .args(&self.agent_args)
            .env_remove("RUST_BACKTRACE")
            .env("HUBVAULT_LOG", "info")
            .stderr(Stdio::from(log))
            .spawn()
            .expect("agent run");
        self.agent = Some(KillOnDrop(child));
    }

    fn child(&mut self) -> &mut Child {
        &mut self.agent.as_mut().expect("agent running").0
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.tmp.path().join("agent.log")).unwrap_or_default()
    }

    /// Snapshots of the source at the collector, oldest first.
    fn snapshots(&self) -> Vec<serde_json::Value> {
        let all: Vec<serde_json::Value> =
            serde_json::from_str(&self.c.ok(&["snapshots", "--json"])).expect("json");
        let mut v: Vec<_> = all.into_iter().filter(|s| s["source"] == "live").collect();
        v.sort_by_key(|s| s["time_ns"].as_i64());
        v
    }

    /// Restore snapshot `id` through a restore job; returns the restored source.
    fn restore(&mut self, id: &str) -> PathBuf {
        self.restores += 1;
        let target = self.tmp.path().join(format!("restore-{}", self.restores));
        self.c.restore_job(id, &self.id, &target);
        target.join("src")
    }

    /// Wait until the newest committed snapshot equals the source as it is
    /// now (restored and compared); returns the time it took.
    fn wait_exact(&mut self, timeout: Duration) -> Duration {
        let start = Instant::now();
        let mut checked = String::new();
        let mut last_diff = Vec::new();
        loop {
            assert!(
                start.elapsed() < timeout,
                "no exact snapshot within {timeout:?}; last difference: {last_diff:?}\nagent log:\n{}",
                self.log()
            );
            let newest = self.snapshots().last().cloned();
            let Some(id) = newest.and_then(|s| s["id"].as_str().map(str::to_string)) else {
                std::thread::sleep(Duration::from_millis(100));
                continue;
            };
            if id == checked {
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
            let restored = self.restore(&id);
            last_diff = compare::diff_trees(&self.src, &restored);
            if last_diff.is_empty() {
                return start.elapsed();
            }
            checked = id;
        }
    }
}

fn write_files(dir: &Path, n: usize, tag: &str) {
    std::fs::create_dir_all(dir).expect("mkdir");
    for i in 0..n {
        std::fs::write(dir.join(format!("{tag}-{i:05}")), format!("{tag} {i}\n")).expect("write");
    }
}

#[test]
fn a_saved_file_is_committed_within_seconds() {
    let mut l = Live::start(|src| write_files(&src.join("docs"), 50, "old"), &[], &[]);
    let first = l.wait_exact(Duration::from_secs(60));
    eprintln!("initial snapshot exact after {first:?}");
    for round in 0..3 {
        let t0 = Instant::now();
        std::fs::write(
            l.src.join("docs").join(format!("saved-{round}.txt")),
            b"new work\n",
        )
        .expect("write");
        let took = l.wait_exact(Duration::from_secs(60));
        eprintln!(
            "round {round}: saved file committed and verified {took:?} after the save ({:?} incl. restore checks)",
            t0.elapsed()
        );
    }
}

#[test]
fn a_burst_of_10000_creations_is_coalesced_and_exact() {
    let mut l = Live::start(|src| write_files(src, 10, "seed"), &[], &[]);
    l.wait_exact(Duration::from_secs(60));
    let before = l.snapshots().len();
    let t = Instant::now();
    for d in 0..10 {
        write_files(&l.src.join(format!("burst-{d}")), 1000, "f");
    }
    let burst = t.elapsed();
    l.wait_exact(Duration::from_secs(120));
    let after = l.snapshots().len();
    eprintln!(
        "10 000 creations in {burst:?} → {} snapshots",
        after - before
    );
    // A burst still going after the 5 s maximum delay is cut into a snapshot
    // per 5 s (a slow, shared machine can stretch it): the bound allows for
    // that and stays far below one snapshot per file or directory.
    let bound = 8.max(burst.as_secs() as usize / 5 + 6);
    assert!(
        after - before <= bound,
        "coalesced into a few snapshots, got {} (bound {bound})",
        after - before
    );
}

#[test]
fn a_queue_overflow_forces_a_rescan_and_stays_exact() {
    let mut l = Live::start(
        // The flood lands in a directory watched from the start.
        |src| write_files(&src.join("flood"), 10, "seed"),
        &[],
        &[],
    );
    l.wait_exact(Duration::from_secs(60));
    // A stopped agent cannot drain its inotify queue: more events than
    // fs.inotify.max_queued_events overflow it for real.
    let max: usize = std::fs::read_to_string("/proc/sys/fs/inotify/max_queued_events")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(16384);
    use nix::sys::signal::{Signal, kill};
    let pid = nix::unistd::Pid::from_raw(l.child().id() as i32);
    kill(pid, Signal::SIGSTOP).expect("SIGSTOP");
    // Each new file raises at least create, modify and close-write.
    write_files(&l.src.join("flood"), max / 2 + 100, "x");
    kill(pid, Signal::SIGCONT).expect("SIGCONT");
    l.wait_exact(Duration::from_secs(120));
    assert!(l.log().contains("inotify queue overflowed"), "{}", l.log());
}

#[test]
fn renames_deleted_trees_and_moves_between_directories_stay_exact() {
    let mut l = Live::start(
        |src| {
            write_files(&src.join("big/inner"), 1000, "b");
            write_files(&src.join("doomed/a/b"), 200, "d");
            write_files(&src.join("left"), 20, "l");
            std::fs::create_dir_all(src.join("right")).expect("mkdir");
        },
        &[],
        &[],
    );
    l.wait_exact(Duration::from_secs(60));
    std::fs::rename(l.src.join("big"), l.src.join("big-renamed")).expect("rename");
    l.wait_exact(Duration::from_secs(60));
    // Events inside the renamed directory are seen at its new name.
    std::fs::write(l.src.join("big-renamed/inner/after-rename"), b"x").expect("write");
    std::fs::remove_dir_all(l.src.join("doomed")).expect("rm -r");
    for i in 0..10 {
        let name = format!("l-{i:05}");
        std::fs::rename(
            l.src.join("left").join(&name),
            l.src.join("right").join(&name),
        )
        .expect("move");
    }
    l.wait_exact(Duration::from_secs(60));
}

#[test]
fn an_agent_killed_mid_burst_loses_nothing() {
    let mut l = Live::start(|src| write_files(src, 10, "seed"), &[], &[]);
    l.wait_exact(Duration::from_secs(60));
    write_files(&l.src.join("part1"), 2000, "p");
    // Killed while the burst is being debounced or backed up.
    std::thread::sleep(Duration::from_millis(300));
    let child = l.child();
    child.kill().expect("kill");
    let _ = child.wait();
    write_files(&l.src.join("part2"), 2000, "q");
    l.spawn();
    l.wait_exact(Duration::from_secs(120));
}

#[test]
fn beyond_the_watch_limit_directories_are_scanned_and_status_says_so() {
    let mut l = Live::start(
        |src| {
            for d in 0..6 {
                write_files(&src.join(format!("d{d}/sub")), 3, "f");
            }
        },
        &[],
        &["--max-watches", "4", "--unwatched-scan-secs", "2"],
    );
    l.wait_exact(Duration::from_secs(60));
    // Somewhere deep in the unwatched part: only the periodic scan sees it.
    for d in 0..6 {
        std::fs::write(l.src.join(format!("d{d}/sub/late")), b"late\n").expect("write");
    }
    l.wait_exact(Duration::from_secs(60));
    let start = Instant::now();
    loop {
        let st = l.c.ok(&["status", "--json"]);
        if st.contains("max_user_watches") {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "status never named the watch limit: {st}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn an_upload_bandwidth_limit_holds() {
    let limit = 1_000_000u64;
    let mut l = Live::start(|_| {}, &[], &[]);
    l.wait_exact(Duration::from_secs(60));
    l.c.ok(&[
        "policy",
        "set",
        "--agent",
        &l.id,
        "--source",
        "live",
        "--bandwidth",
        "1MB/s",
    ]);
    // The agent restarts the source under its new policy.
    let start = Instant::now();
    while l.log().matches("source policy applied").count() < 2 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "policy never applied: {}",
            l.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    l.wait_exact(Duration::from_secs(60));
    // 10 MB that neither compresses nor dedups: a 10 s transfer at the limit.
    let mut x = 0x9e3779b97f4a7c15u64;
    let data: Vec<u8> = (0..10_000_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let t0 = Instant::now();
    std::fs::write(l.src.join("random.bin"), &data).expect("write");
    l.wait_exact(Duration::from_secs(120));
    let secs = t0.elapsed().as_secs_f64();
    let rate = data.len() as f64 / secs;
    eprintln!(
        "10 MB under a 1 MB/s limit: {secs:.1} s ({:.2} MB/s)",
        rate / 1e6
    );
    // Slower is the machine's doing; faster would break the limit.
    assert!(
        rate <= limit as f64 * 1.1,
        "{:.2} MB/s over a 1 MB/s limit",
        rate / 1e6
    );
}

/// A collector with one enrolled agent and a scheduled source `nightly`.
fn scheduled(schedule: &str) -> (Collector, tempfile::TempDir, PathBuf, String) {
    let c = Collector::start();
    c.ok(&["site", "add", "lyon"]);
    let tmp = tempfile::tempdir().expect("tmp");
    let state = enrolled(&c, "lyon", tmp.path());
    let id = c.agents()[0]["id"].as_str().expect("id").to_string();
    let src = tmp.path().join("src");
    write_files(&src, 5, "s");
    c.ok(&[
        "source",
        "add",
        "--agent",
        &id,
        "--name",
        "nightly",
        "--path",
        src.to_str().expect("utf8"),
        "--schedule",
        schedule,
    ]);
    (c, tmp, state, id)
}

fn snapshot_count(c: &Collector) -> usize {
    c.snapshot_ids().len()
}

#[test]
fn a_cron_schedule_fires() {
    // Every 2 seconds: the real loop, the real clock, a few slots.
    let (c, _tmp, state, _id) = scheduled("*/2 * * * * *");
    let _agent = KillOnDrop(spawn_agent(&state));
    let start = Instant::now();
    while snapshot_count(&c) < 2 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the schedule never fired twice"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Downtime is simulated by moving the recorded last run three hours back
/// (the agent's clock input), not by waiting: an hourly schedule then has
/// three missed slots, and the agent must run once, not three times.
///
/// The hourly slot is put half an hour away from now: at "0 0 * * * *" a
/// run near the top of the hour also met a real slot and counted two.
#[test]
fn runs_missed_while_down_run_once_on_start() {
    let minute = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
        / 60
        % 60;
    let (c, _tmp, state, _id) = scheduled(&format!("0 {} * * * *", (minute + 30) % 60));
    let mut agent = KillOnDrop(spawn_agent(&state));
    let history = state.join("history.db");
    let start = Instant::now();
    while !history.exists()
        || rusqlite::Connection::open(&history)
            .and_then(|db| db.query_row("SELECT count(*) FROM sources", [], |r| r.get::<_, i64>(0)))
            .unwrap_or(0)
            == 0
    {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "source never recorded"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = agent.0.kill();
    let _ = agent.0.wait();
    assert_eq!(
        snapshot_count(&c),
        0,
        "nothing is due before the first slot"
    );
    let three_hours_ago = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_nanos() as i64
        - 3 * 3600 * 1_000_000_000;
    rusqlite::Connection::open(&history)
        .and_then(|db| {
            db.execute(
                "UPDATE sources SET assigned_ns = ?1, last_run_ns = ?1",
                [three_hours_ago],
            )
        })
        .expect("moving the last run back");
    let _agent = KillOnDrop(spawn_agent(&state));
    let start = Instant::now();
    while snapshot_count(&c) < 1 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the missed run never ran"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Give catch-up runs (the bug this guards against) time to show.
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(snapshot_count(&c), 1, "three missed slots run once");
}
