//! A file that changes while the backup reads it is reported in the
//! snapshot's issue list (path and reason) and the snapshot is partial;
//! everything else is backed up as usual.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use integration_tests::fixture::{self, Fill};
use integration_tests::repo::{self, TestRepo};

#[test]
fn a_file_appended_to_during_the_backup_is_reported_and_the_rest_is_kept() {
    let repo = TestRepo::new();
    let work = tempfile::tempdir().expect("tempdir");
    let src = work.path().join("src");
    std::fs::create_dir_all(&src).expect("mkdir");
    let steady = fixture::content(100_000, 1, Fill::Random);
    std::fs::write(src.join("steady"), &steady).expect("write");
    let log = src.join("growing.log");
    std::fs::write(&log, fixture::content(4 << 20, 2, Fill::Random)).expect("write");

    // Append a block every millisecond until the backup is over (at most
    // 64 MiB more). Paced by time, not by bytes: on a loaded machine a
    // writer that ran flat out could be done before the walk reached the
    // file, which would then be stable. The backup starts only once the
    // writer is appending.
    let stop = Arc::new(AtomicBool::new(false));
    let started = Arc::new(std::sync::Barrier::new(2));
    let writer = {
        let (stop, started) = (stop.clone(), started.clone());
        let log = log.clone();
        std::thread::spawn(move || {
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .open(&log)
                .expect("open log");
            let block = fixture::content(4096, 3, Fill::Random);
            f.write_all(&block).expect("append");
            started.wait();
            for _ in 0..16 * 1024 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                f.write_all(&block).expect("append");
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        })
    };
    started.wait();
    let r = repo.open();
    let out = repo::backup(&r, &[&src]);
    stop.store(true, Ordering::Relaxed);
    writer.join().expect("writer");

    let snap = &out.snapshot;
    assert!(
        snap.is_partial(),
        "a changing file must make the snapshot partial"
    );
    let issue = snap
        .issues
        .iter()
        .find(|i| i.path.ends_with("growing.log"))
        .unwrap_or_else(|| panic!("growing.log not reported: {:?}", snap.issues));
    assert!(issue.reason.contains("changed"), "reason: {}", issue.reason);
    assert_eq!(
        snap.issues.len(),
        1,
        "only the changing file: {:?}",
        snap.issues
    );

    let target = work.path().join("restore");
    repo::restore_clean(&r, &out.id.to_string(), &target);
    let back = std::fs::read(target.join("src/steady")).expect("steady restored");
    assert_eq!(back, steady);
    let grown = std::fs::metadata(target.join("src/growing.log")).expect("log restored");
    assert!(grown.len() >= 4 << 20, "the log's bytes as read are kept");
}
