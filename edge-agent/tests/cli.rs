//! The agent binary's own checks that need no collector.

use std::process::Command;

#[test]
fn malformed_tokens_and_missing_state_give_clear_errors() {
    let tmp = tempfile::tempdir().expect("tmp");
    let o = Command::new(env!("CARGO_BIN_EXE_hubvault-agent"))
        .args([
            "enroll",
            "--collector",
            "https://127.0.0.1:1",
            "--token",
            "not-a-token",
            "--state",
        ])
        .arg(tmp.path().join("s"))
        .output()
        .expect("run");
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("not a hubvault enrollment token"));
    let o = Command::new(env!("CARGO_BIN_EXE_hubvault-agent"))
        .args(["run", "--state"])
        .arg(tmp.path().join("nothing"))
        .output()
        .expect("run");
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("enrolled?"));
}
