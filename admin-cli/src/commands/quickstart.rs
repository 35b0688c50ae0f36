//! `hubvault quickstart PATH...`: the main job on embedded defaults.
//!
//! Everything lives under `--data` (default `./hubvault-data`):
//! 1. on first use, `hubvault-collector init` (CA, content-blind repository,
//!    admin identity) and, once the collector runs, a site `local` and an
//!    agent enrolled with a one-time token;
//! 2. starts `hubvault-collector run` on 127.0.0.1 (port 7443 by default);
//! 3. backs PATHs up through the agent (local spool → upload → commit);
//! 4. starts `hubvault-agent run` and prints how to look at status and
//!    snapshots and how to restore, then keeps both running until Ctrl-C
//!    (`--once` stops right after the backup, for scripts).
//!
//! The collector and agent binaries are found next to this one (all three
//! are built by `cargo build --release`).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};

use anyhow::{Context, Result, bail};

/// Kills a child process when dropped.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn sibling(name: &str) -> Result<PathBuf> {
    let me = std::env::current_exe().context("locating this executable")?;
    let p = me.with_file_name(name);
    if !p.exists() {
        bail!(
            "{} not found next to {}: build everything with `cargo build --release`",
            name,
            me.display()
        );
    }
    Ok(p)
}

fn run_ok(cmd: &mut Command, what: &str) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Run the quickstart.
pub(crate) fn run(data: &Path, listen: &str, once: bool, paths: &[PathBuf]) -> Result<ExitCode> {
    let me = std::env::current_exe().context("locating this executable")?;
    let collector_bin = sibling("hubvault-collector")?;
    let agent_bin = sibling("hubvault-agent")?;
    std::fs::create_dir_all(data).with_context(|| format!("creating {}", data.display()))?;
    let data = data.canonicalize()?;
    let cdata = data.join("collector");
    let admin = cdata.join("admin");
    let agent = data.join("agent");
    let url = format!("https://{listen}");
    if !cdata.join("state.db").exists() {
        run_ok(
            Command::new(&collector_bin)
                .arg("init")
                .arg("--data")
                .arg(&cdata),
            "hubvault-collector init",
        )?;
        println!("created collector data in {}", cdata.display());
    }
    let mut child = Command::new(&collector_bin)
        .args(["run", "--listen", listen, "--data"])
        .arg(&cdata)
        .env("HUBVAULT_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .context("starting hubvault-collector")?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().context("collector stdout")?)
        .read_line(&mut line)
        .context("waiting for the collector")?;
    let _collector = Guard(child);
    if !line.starts_with("listening on") {
        bail!("the collector did not start (is {listen} in use? pass --listen)");
    }
    let hv = |args: &[&str]| -> Command {
        let mut c = Command::new(&me);
        c.args(args)
            .env("HUBVAULT_ADMIN", &admin)
            .env("HUBVAULT_COLLECTOR", &url);
        c
    };
    if !agent.join("agent.json").exists() {
        // The site may exist from an interrupted earlier run.
        let _ = hv(&["site", "add", "local"]).output();
        let token = run_ok(
            &mut hv(&["enroll-token", "--site", "local", "--ttl", "10m"]),
            "hubvault enroll-token",
        )?;
        run_ok(
            Command::new(&agent_bin)
                .args(["enroll", "--collector", &url, "--token", &token, "--state"])
                .arg(&agent),
            "hubvault-agent enroll",
        )?;
        println!("enrolled an agent for site local in {}", agent.display());
    }
    let status = Command::new(&agent_bin)
        .args(["backup", "--source", "quickstart", "--state"])
        .arg(&agent)
        .args(paths)
        .status()
        .context("running hubvault-agent backup")?;
    if !status.success() && status.code() != Some(3) {
        bail!("the backup failed (see above)");
    }
    let a = admin.display();
    println!("\nthe collector runs on {url}; try, in another terminal:");
    println!("  export HUBVAULT_ADMIN={a} HUBVAULT_COLLECTOR={url}");
    println!("  {} status", me.display());
    println!("  {} snapshots", me.display());
    println!("  {} agents", me.display());
    println!(
        "  {} restore <snapshot> --to-agent <agent id> --target /tmp/restored",
        me.display()
    );
    println!("  {} jobs --wait <job id>", me.display());
    if once {
        return Ok(ExitCode::SUCCESS);
    }
    let _agent = Guard(
        Command::new(&agent_bin)
            .args(["run", "--state"])
            .arg(&agent)
            .env("HUBVAULT_LOG", "warn")
            .spawn()
            .context("starting hubvault-agent run")?,
    );
    println!("\ncollector and agent running; Ctrl-C stops both");
    // Block until interrupted; the guards stop the children on the way out.
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        let mut s = String::new();
        // EOF on stdin (e.g. </dev/null) also ends the quickstart.
        while std::io::stdin()
            .read_line(&mut s)
            .map(|n| n > 0)
            .unwrap_or(false)
        {
            s.clear();
        }
        let _ = tx.send(());
    });
    let _ = rx.recv();
    Ok(ExitCode::SUCCESS)
}
