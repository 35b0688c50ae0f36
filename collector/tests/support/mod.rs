//! Shared by the end-to-end test files: start the real `hubvault-collector`
//! on loopback with a temp data directory, enroll and run real agents, and
//! drive the real `hubvault` admin CLI.

#![allow(dead_code, unreachable_pub)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

/// Path of a workspace binary, building it if this test run did not or if
/// it is older than the sources it is built from (`cargo test -p collector`
/// builds only the collector's own binary: without this, a stale agent from
/// an earlier build would be tested).
pub fn bin(name: &str) -> PathBuf {
    static BUILT: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let dir = Path::new(env!("CARGO_BIN_EXE_hubvault-collector"))
        .parent()
        .expect("target dir")
        .to_path_buf();
    let p = dir.join(name);
    if name == "hubvault-collector" {
        return p;
    }
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if built.iter().any(|b| b == name) {
        return p;
    }
    let pkg = if name == "hubvault" {
        "admin-cli"
    } else {
        "edge-agent"
    };
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace");
    let sources = [pkg, "repo-format", "proto"].map(|d| workspace.join(d));
    let stale = match std::fs::metadata(&p).and_then(|m| m.modified()) {
        Ok(t) => sources.iter().any(|d| newest_mtime(d) > Some(t)),
        Err(_) => true,
    };
    if stale {
        let mut cmd = Command::new(env!("CARGO"));
        cmd.args(["build", "-p", pkg, "--bin", name]);
        if dir.ends_with("release") {
            cmd.arg("--release");
        }
        let st = cmd.status().expect("running cargo build");
        assert!(st.success(), "building {name}");
    }
    built.push(name.to_string());
    p
}

/// The newest modification time of the files below `dir` (sources only: `target` is not below it).
fn newest_mtime(dir: &Path) -> Option<std::time::SystemTime> {
    let mut newest = None;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(m) = e.metadata() else { continue };
            if m.is_dir() {
                stack.push(e.path());
            } else if let Ok(t) = m.modified() {
                newest = newest.max(Some(t));
            }
        }
    }
    newest
}

/// A running collector with its data dir; killed on drop.
pub struct Collector {
    /// The running process.
    pub child: Child,
    /// https://127.0.0.1:PORT
    pub url: String,
    /// Holds data/ (repository, CA, admin identity).
    pub dir: tempfile::TempDir,
}

impl Drop for Collector {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Spawn `hubvault-collector run` on `data`, listening on `listen`; returns
/// the child and the address it printed.
pub fn run_collector(data: &Path, listen: &str) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_hubvault-collector"))
        .args(["run", "--listen", listen, "--data"])
        .arg(data)
        .env("HUBVAULT_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("collector run");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("reading the listening line");
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .expect("listening line")
        .to_string();
    (child, addr)
}

/// The number printed `back` words before `word` in an agent's report line
/// ("N files, M blobs new to this agent, K sent (B bytes) in S s, ...").
pub fn number_before<T: std::str::FromStr>(text: &str, word: &str, back: usize) -> T {
    let words: Vec<&str> = text.split_whitespace().collect();
    let at = words
        .iter()
        .position(|w| *w == word)
        .unwrap_or_else(|| panic!("no {word:?} in {text}"));
    words[at - back]
        .trim_start_matches('(')
        .parse()
        .unwrap_or_else(|_| panic!("no number before {word:?} in {text}"))
}

impl Collector {
    pub fn start() -> Collector {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        let out = Command::new(env!("CARGO_BIN_EXE_hubvault-collector"))
            .args(["init", "--kdf-memory-kib", "1024", "--data"])
            .arg(&data)
            .output()
            .expect("collector init");
        assert!(
            out.status.success(),
            "init: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let (child, addr) = run_collector(&data, "127.0.0.1:0");
        Collector {
            child,
            url: format!("https://{addr}"),
            dir,
        }
    }

    /// Start the collector again on the same data directory and port (after
    /// it was killed or stopped).
    pub fn restart(&mut self) {
        let port = self.url.rsplit(':').next().expect("port").to_string();
        let (child, _) = run_collector(&self.dir.path().join("data"), &format!("127.0.0.1:{port}"));
        self.child = child;
    }

    pub fn admin_dir(&self) -> PathBuf {
        self.dir.path().join("data").join("admin")
    }

    pub fn hubvault(&self, args: &[&str]) -> Output {
        Command::new(bin("hubvault"))
            .args(args)
            .env("HUBVAULT_ADMIN", self.admin_dir())
            .env("HUBVAULT_COLLECTOR", &self.url)
            .env_remove("RUST_BACKTRACE")
            .output()
            .expect("running hubvault")
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.hubvault(args);
        assert!(
            o.status.success(),
            "hubvault {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    pub fn token(&self, site: &str) -> String {
        self.ok(&["enroll-token", "--site", site, "--ttl", "1h"])
            .trim()
            .to_string()
    }

    pub fn enroll(&self, token: &str, state: &Path) -> Output {
        Command::new(bin("hubvault-agent"))
            .args([
                "enroll",
                "--kdf-memory-kib",
                "1024",
                "--collector",
                &self.url,
                "--token",
                token,
                "--state",
            ])
            .arg(state)
            .env_remove("RUST_BACKTRACE")
            .output()
            .expect("running hubvault-agent enroll")
    }

    /// Packs in the collector's repository so far.
    pub fn pack_count(&self) -> usize {
        let packs = self.dir.path().join("data").join("repo").join("packs");
        std::fs::read_dir(&packs)
            .map(|rd| {
                rd.flatten()
                    .map(|d| std::fs::read_dir(d.path()).map(|r| r.count()).unwrap_or(0))
                    .sum()
            })
            .unwrap_or(0)
    }

    /// Restore snapshot `snap` onto agent `agent` into `target` through a
    /// restore job, and wait for the job to succeed; returns the job listing
    /// (its message says how many blobs were pulled and taken locally).
    pub fn restore_job(&self, snap: &str, agent: &str, target: &Path) -> String {
        self.restore_job_path(snap, agent, target, None)
    }

    /// [`Collector::restore_job`] of only `path` in the snapshot, if given.
    pub fn restore_job_path(
        &self,
        snap: &str,
        agent: &str,
        target: &Path,
        path: Option<&str>,
    ) -> String {
        let mut args = vec![
            "restore",
            snap,
            "--to-agent",
            agent,
            "--target",
            target.to_str().expect("utf8"),
        ];
        if let Some(p) = path {
            args.extend(["--path", p]);
        }
        let job = self.ok(&args);
        let o = self.hubvault(&["jobs", "--wait", job.trim(), "--timeout", "120"]);
        assert!(
            o.status.success(),
            "restore job failed: {}",
            String::from_utf8_lossy(&o.stdout)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// `hubvault repo check` of the collector's repository, with the
    /// collector's (metadata-only) keyring: it must be structurally sound.
    pub fn check_repo(&self) {
        let data = self.dir.path().join("data");
        let check = Command::new(bin("hubvault"))
            .args(["repo", "check", "--repo"])
            .arg(data.join("repo"))
            .arg("--passphrase-file")
            .arg(data.join("repo.pass"))
            .output()
            .expect("check");
        assert!(
            check.status.success(),
            "{}",
            String::from_utf8_lossy(&check.stdout)
        );
    }

    /// Ids of the collector's snapshots, in `hubvault snapshots` order.
    pub fn snapshot_ids(&self) -> Vec<String> {
        let snaps: Vec<serde_json::Value> =
            serde_json::from_str(&self.ok(&["snapshots", "--json"])).expect("snapshots json");
        snaps
            .iter()
            .map(|s| s["id"].as_str().expect("id").to_string())
            .collect()
    }

    pub fn agents(&self) -> Vec<serde_json::Value> {
        serde_json::from_str(&self.ok(&["agents", "--json"])).expect("agents json")
    }

    /// The id of `site`'s agent, once the collector shows it online.
    pub fn online_agent(&self, site: &str) -> String {
        wait_for(&format!("{site} online"), || {
            self.agents()
                .iter()
                .any(|a| a["site"] == site && a["online"] == true)
        });
        self.agents()
            .into_iter()
            .find(|a| a["site"] == site)
            .and_then(|a| a["id"].as_str().map(String::from))
            .unwrap_or_else(|| panic!("no agent of site {site}"))
    }

    /// A TLS channel with an optional client identity from `dir` (`<name>.pem`/`.key`).
    pub async fn channel(
        &self,
        identity: Option<(&Path, &str)>,
    ) -> Result<Channel, tonic::transport::Error> {
        self.channel_from(identity, None).await
    }

    /// A TLS channel without a client certificate, from source address
    /// `from` (any of 127.0.0.0/8: the collector counts anonymous
    /// connections per address).
    pub async fn anonymous_channel_from(
        &self,
        from: std::net::IpAddr,
    ) -> Result<Channel, tonic::transport::Error> {
        self.channel_from(None, Some(from)).await
    }

    async fn channel_from(
        &self,
        identity: Option<(&Path, &str)>,
        from: Option<std::net::IpAddr>,
    ) -> Result<Channel, tonic::transport::Error> {
        let ca = std::fs::read(self.admin_dir().join("ca.pem")).expect("ca");
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(ca))
            .domain_name("hubvault-collector");
        if let Some((dir, name)) = identity {
            let c = std::fs::read(dir.join(format!("{name}.pem"))).expect("cert");
            let k = std::fs::read(dir.join(format!("{name}.key"))).expect("key");
            tls = tls.identity(Identity::from_pem(c, k));
        }
        Channel::from_shared(self.url.clone())
            .expect("url")
            .tls_config(tls)
            .expect("tls")
            .local_address(from)
            .connect()
            .await
    }
}

pub fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// An enrolled agent's state directory.
pub fn enrolled(c: &Collector, site: &str, dir: &Path) -> PathBuf {
    let state = dir.join(format!("agent-{site}"));
    let o = c.enroll(&c.token(site), &state);
    assert!(
        o.status.success(),
        "enroll: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    state
}

/// An enrolled agent's spool repository, opened with the agent's passphrase.
pub fn open_spool(state: &Path) -> repo_format::Repository {
    let pass = std::fs::read_to_string(state.join("passphrase")).expect("agent passphrase");
    repo_format::Repository::open(
        &state.join("spool"),
        pass.trim().as_bytes(),
        repo_format::LockMode::Shared,
    )
    .expect("opening the agent's spool")
}

pub fn agent_backup(state: &Path, src: &Path) -> Output {
    Command::new(bin("hubvault-agent"))
        .args(["backup", "--source", "docs", "--state"])
        .arg(state)
        .arg(src)
        .env_remove("RUST_BACKTRACE")
        .env("HUBVAULT_LOG", "warn")
        .output()
        .expect("running hubvault-agent backup")
}

pub fn spawn_agent(state: &Path) -> Child {
    Command::new(bin("hubvault-agent"))
        .args(["run", "--heartbeat-secs", "1", "--state"])
        .arg(state)
        .env_remove("RUST_BACKTRACE")
        .env("HUBVAULT_LOG", "warn")
        .stderr(Stdio::null())
        .spawn()
        .expect("agent run")
}

pub struct KillOnDrop(pub Child);
impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A collector with sites paris and lyon, one enrolled agent each (state
/// directories under the returned temporary directory).
pub fn paris_and_lyon() -> (Collector, tempfile::TempDir, PathBuf, PathBuf) {
    let c = Collector::start();
    c.ok(&["site", "add", "paris"]);
    c.ok(&["site", "add", "lyon"]);
    let tmp = tempfile::tempdir().expect("tmp");
    let paris = enrolled(&c, "paris", tmp.path());
    let lyon = enrolled(&c, "lyon", tmp.path());
    (c, tmp, paris, lyon)
}

/// A tree blob an agent crafts: `entries` encoded and sealed under the
/// spool's metadata key, ready to upload; and its id.
pub fn crafted_tree(
    spool: &repo_format::Repository,
    entries: &[repo_format::tree::Entry],
) -> (repo_format::Id, proto::pb::UploadBlob) {
    let keys = spool.keys();
    let mut sealer = repo_format::blob::Sealer::new(spool.config().zstd_level).expect("sealer");
    let body = repo_format::tree::encode(entries).expect("encode");
    let id = keys.metadata.id_of(&body);
    let sealed = sealer
        .seal(
            &keys.metadata,
            repo_format::blob::BlobKind::Tree,
            &id,
            &body,
        )
        .expect("seal tree");
    let blob = proto::pb::UploadBlob {
        kind: 1,
        id: id.0.to_vec(),
        sealed,
        raw_length: body.len() as u32,
    };
    (id, blob)
}

/// Commit `root` as source "x" through agent client `l`, with an
/// idempotency key of 16 bytes `key`: for tests that craft their own trees.
pub async fn commit_root(
    l: &proto::pb::agent_service_client::AgentServiceClient<Channel>,
    root: repo_format::Id,
    key: u8,
) -> Result<tonic::Response<proto::pb::CommitSnapshotResponse>, tonic::Status> {
    l.clone()
        .commit_snapshot(proto::pb::CommitSnapshotRequest {
            protocol: proto::limits::PROTOCOL,
            idempotency_key: vec![key; 16],
            source: "x".into(),
            root_tree: root.0.to_vec(),
            ..Default::default()
        })
        .await
}

/// `hubvault scrub --json [--dry-run]`: its exit code and report.
pub fn scrub(c: &Collector, dry_run: bool) -> (i32, serde_json::Value) {
    let mut args = vec!["scrub", "--json"];
    if dry_run {
        args.push("--dry-run");
    }
    let o = c.hubvault(&args);
    let v = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "scrub json ({e}): {} {}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    });
    (o.status.code().expect("exit code"), v)
}
