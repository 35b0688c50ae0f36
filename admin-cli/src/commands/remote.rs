//! Commands that talk to the collector (role "admin" over mTLS): sites,
//! enrollment tokens, agents, status, revocation.
//!
//! The admin identity is the directory `hubvault-collector init` wrote
//! (`--admin DIR` or `$HUBVAULT_ADMIN`): `ca.pem`, `admin.pem`, `admin.key`,
//! and `keyring` + `passphrase` holding the repository keys, which enrollment
//! tokens carry sealed so that the collector never reads them.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use base64::Engine;
use clap::{Args, Subcommand};
use proto::limits::PROTOCOL;
use proto::pb;
use proto::pb::admin_service_client::AdminServiceClient;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use crate::output::time;

/// Name the collector's certificate is verified against, whatever address is dialled.
pub(crate) const SERVER_NAME: &str = "hubvault-collector";
/// Prefix of enrollment tokens (format version 1).
pub(crate) const TOKEN_PREFIX: &str = "hv1.";

/// How to reach the collector as an admin.
#[derive(Args, Clone)]
pub(crate) struct Remote {
    /// Admin identity directory written by `hubvault-collector init`.
    #[arg(long, env = "HUBVAULT_ADMIN", global = true)]
    admin: Option<PathBuf>,
    /// Collector address.
    #[arg(
        long,
        env = "HUBVAULT_COLLECTOR",
        default_value = "https://127.0.0.1:7443",
        global = true
    )]
    collector: String,
}

#[derive(Subcommand)]
pub(crate) enum SiteCommand {
    /// Add a site (an office).
    Add {
        /// 1-64 characters of a-z, 0-9 and '-'.
        name: String,
    },
}

#[derive(Subcommand)]
pub(crate) enum SourceCommand {
    /// Define (or replace) a source of an agent; the agent picks it up at once.
    Add {
        /// The agent.
        #[arg(long)]
        agent: String,
        /// Name of the source.
        #[arg(long, default_value = "default")]
        name: String,
        /// Absolute path on the agent (repeatable).
        #[arg(long = "path", required = true)]
        paths: Vec<String>,
        /// Glob to leave out (repeatable).
        #[arg(long = "exclude")]
        excludes: Vec<String>,
        /// Cron schedule with seconds, e.g. "0 0 2 * * *" (run by agents in a later release).
        #[arg(long, conflicts_with = "realtime")]
        schedule: Option<String>,
        /// Continuous snapshots on change (run by agents in a later release).
        #[arg(long)]
        realtime: bool,
    },
}

#[derive(Subcommand)]
pub(crate) enum AgentCommand {
    /// Revoke an agent's certificate: refused from its next call, its live streams closed.
    Revoke {
        /// Agent id (see `hubvault agents`).
        id: String,
    },
}

impl Remote {
    fn admin_dir(&self) -> Result<&Path> {
        self.admin
            .as_deref()
            .context("no admin identity: pass --admin DIR or set HUBVAULT_ADMIN (the admin/ directory written by `hubvault-collector init`)")
    }

    async fn client(&self) -> Result<AdminServiceClient<Channel>> {
        let dir = self.admin_dir()?;
        let read = |n: &str| {
            std::fs::read(dir.join(n)).with_context(|| format!("reading {}", dir.join(n).display()))
        };
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read("ca.pem")?))
            .identity(Identity::from_pem(read("admin.pem")?, read("admin.key")?))
            .domain_name(SERVER_NAME);
        let channel = Channel::from_shared(self.collector.clone())
            .with_context(|| format!("bad collector address {}", self.collector))?
            .tls_config(tls)
            .context("TLS configuration")?
            .connect_timeout(Duration::from_secs(10))
            .connect()
            .await
            .with_context(|| format!("connecting to the collector at {}", self.collector))?;
        Ok(AdminServiceClient::new(channel))
    }
}

fn rt() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// `hubvault site add NAME`.
pub(crate) fn site(remote: &Remote, cmd: SiteCommand) -> Result<ExitCode> {
    let SiteCommand::Add { name } = cmd;
    rt()?.block_on(async {
        remote
            .client()
            .await?
            .add_site(pb::AddSiteRequest {
                protocol: PROTOCOL,
                name: name.clone(),
            })
            .await
            .with_context(|| format!("adding site {name}"))?;
        println!("site {name} added");
        Ok(ExitCode::SUCCESS)
    })
}

/// Parse "30m", "24h", "7d" or plain seconds.
fn parse_ttl(s: &str) -> Result<u64> {
    let (num, mult) = match s.chars().last() {
        Some('s') => (&s[..s.len() - 1], 1),
        Some('m') => (&s[..s.len() - 1], 60),
        Some('h') => (&s[..s.len() - 1], 3600),
        Some('d') => (&s[..s.len() - 1], 86400),
        _ => (s, 1),
    };
    let n: u64 = num
        .parse()
        .with_context(|| format!("bad duration {s:?} (e.g. 30m, 24h, 7d)"))?;
    Ok(n.saturating_mul(mult))
}

/// `hubvault enroll-token --site S [--ttl 24h]`: prints a one-time token.
pub(crate) fn enroll_token(remote: &Remote, site: &str, ttl: &str, json: bool) -> Result<ExitCode> {
    let ttl_secs = parse_ttl(ttl)?;
    let dir = remote.admin_dir()?.to_path_buf();
    let pass = std::fs::read_to_string(dir.join("passphrase"))
        .with_context(|| format!("reading {}", dir.join("passphrase").display()))?;
    let keys = repo_format::keyring::read_keyring(&dir.join("keyring"), pass.trim().as_bytes())
        .context("opening the admin keyring")?;
    let mut token_id = [0u8; 16];
    let mut secret = [0u8; 32];
    repo_format::crypto::fill_random(&mut token_id)?;
    repo_format::crypto::fill_random(&mut secret)?;
    let wrapped = repo_format::keyring::wrap_for_enrollment(&keys, &secret)?;
    let ca_pem = std::fs::read_to_string(dir.join("ca.pem")).context("reading ca.pem")?;
    let ca_der = pem_body(&ca_pem)?;
    let resp = rt()?.block_on(async {
        remote
            .client()
            .await?
            .create_enroll_token(pb::CreateEnrollTokenRequest {
                protocol: PROTOCOL,
                site: site.to_string(),
                token_id: token_id.to_vec(),
                ttl_secs,
                wrapped_keys: wrapped,
            })
            .await
            .with_context(|| format!("creating a token for site {site}"))
    })?;
    let r = resp.into_inner();
    if r.ca_sha256 != blake3::hash(&ca_der).as_bytes() {
        bail!(
            "the collector's CA differs from the one in {}: refusing to issue a token",
            dir.display()
        );
    }
    // The token carries the CA itself: it pins it for the agent's first connection.
    let mut raw = Vec::with_capacity(48 + ca_der.len());
    raw.extend_from_slice(&token_id);
    raw.extend_from_slice(&secret);
    raw.extend_from_slice(&ca_der);
    let token = format!(
        "{TOKEN_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
    );
    if json {
        println!(
            "{}",
            serde_json::json!({"token": token, "site": site, "expires_ns": r.expires_ns})
        );
    } else {
        println!("{token}");
        eprintln!(
            "one-time token for site {site}, valid until {} UTC",
            time(r.expires_ns)
        );
        eprintln!(
            "on the agent: hubvault-agent enroll --collector {} --token <token> --state DIR",
            remote.collector
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn pem_body(pem: &str) -> Result<Vec<u8>> {
    let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .context("ca.pem is not a PEM certificate")
}

/// `hubvault agents [--json]`.
pub(crate) fn agents(remote: &Remote, json: bool) -> Result<ExitCode> {
    let resp = rt()?.block_on(async {
        remote
            .client()
            .await?
            .list_agents(pb::ListAgentsRequest { protocol: PROTOCOL })
            .await
            .context("listing agents")
    })?;
    let agents = resp.into_inner().agents;
    if json {
        let v: Vec<_> = agents
            .iter()
            .map(|a| {
                serde_json::json!({"id": a.agent_id, "site": a.site, "hostname": a.hostname,
                    "online": a.online, "last_seen_ns": a.last_seen_ns, "revoked": a.revoked, "serial": a.serial})
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "{:<20} {:<12} {:<16} {:<8} {:<19}",
            "id", "site", "host", "online", "last seen (UTC)"
        );
        for a in &agents {
            println!(
                "{:<20} {:<12} {:<16} {:<8} {:<19}{}",
                a.agent_id,
                a.site,
                a.hostname,
                if a.online { "yes" } else { "no" },
                if a.last_seen_ns == 0 {
                    "never".into()
                } else {
                    time(a.last_seen_ns)
                },
                if a.revoked { "  REVOKED" } else { "" }
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `hubvault status [--json]`: a row per site.
pub(crate) fn status(remote: &Remote, json: bool) -> Result<ExitCode> {
    let resp = rt()?.block_on(async {
        remote
            .client()
            .await?
            .status(pb::StatusRequest { protocol: PROTOCOL })
            .await
            .context("reading status")
    })?;
    let sites = resp.into_inner().sites;
    if json {
        let v: Vec<_> = sites
            .iter()
            .map(|s| serde_json::json!({"site": s.site, "agents": s.agents, "agents_online": s.agents_online, "last_snapshot_ns": s.last_snapshot_ns}))
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "{:<16} {:>6} {:>7}  last snapshot",
            "site", "agents", "online"
        );
        for s in &sites {
            println!(
                "{:<16} {:>6} {:>7}  {}",
                s.site,
                s.agents,
                s.agents_online,
                if s.last_snapshot_ns == 0 {
                    "none".into()
                } else {
                    time(s.last_snapshot_ns)
                }
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `hubvault agent revoke ID`.
pub(crate) fn agent(remote: &Remote, cmd: AgentCommand) -> Result<ExitCode> {
    let AgentCommand::Revoke { id } = cmd;
    let resp = rt()?.block_on(async {
        remote
            .client()
            .await?
            .revoke_agent(pb::RevokeAgentRequest {
                protocol: PROTOCOL,
                agent_id: id.clone(),
            })
            .await
            .with_context(|| format!("revoking agent {id}"))
    })?;
    println!(
        "agent {id} revoked (certificate serial {})",
        resp.into_inner().serial
    );
    Ok(ExitCode::SUCCESS)
}

/// `hubvault source add ...`.
pub(crate) fn source(remote: &Remote, cmd: SourceCommand) -> Result<ExitCode> {
    let SourceCommand::Add {
        agent,
        name,
        paths,
        excludes,
        schedule,
        realtime,
    } = cmd;
    rt()?.block_on(async {
        remote
            .client()
            .await?
            .add_source(pb::AddSourceRequest {
                protocol: PROTOCOL,
                agent_id: agent.clone(),
                name: name.clone(),
                paths,
                excludes,
                schedule: schedule.unwrap_or_default(),
                realtime,
            })
            .await
            .with_context(|| format!("adding source {name} to agent {agent}"))
    })?;
    println!("source {name} set on agent {agent}");
    Ok(ExitCode::SUCCESS)
}

/// `hubvault backup-now --agent ID [--source NAME]`: prints the job id.
pub(crate) fn backup_now(remote: &Remote, agent: &str, source: Option<String>) -> Result<ExitCode> {
    let resp = rt()?.block_on(async {
        remote
            .client()
            .await?
            .backup_now(pb::BackupNowRequest {
                protocol: PROTOCOL,
                agent_id: agent.to_string(),
                source: source.unwrap_or_default(),
            })
            .await
            .with_context(|| format!("asking agent {agent} to back up"))
    })?;
    println!("{}", resp.into_inner().job_id);
    Ok(ExitCode::SUCCESS)
}

/// `hubvault snapshots [--site S] [--agent ID] [--json]`.
pub(crate) fn snapshots(
    remote: &Remote,
    site: Option<String>,
    agent: Option<String>,
    json: bool,
) -> Result<ExitCode> {
    let resp = rt()?.block_on(async {
        remote
            .client()
            .await?
            .list_snapshots(pb::ListSnapshotsRequest {
                protocol: PROTOCOL,
                site: site.unwrap_or_default(),
                agent_id: agent.unwrap_or_default(),
            })
            .await
            .context("listing snapshots")
    })?;
    let snaps = resp.into_inner().snapshots;
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    if json {
        let v: Vec<_> = snaps
            .iter()
            .map(|s| {
                serde_json::json!({"id": hex(&s.id), "site": s.site, "agent": s.agent_id, "source": s.source,
                    "time_ns": s.time_ns, "files": s.files, "bytes": s.bytes, "new_bytes": s.new_bytes,
                    "paths": s.paths, "hostname": s.hostname, "partial": s.partial})
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "{:<10} {:<19}  {:<10} {:<16} {:<10} {:>8} {:>10} {:>10}",
            "id", "time (UTC)", "site", "agent", "source", "files", "size", "new"
        );
        for s in &snaps {
            println!(
                "{:<10} {:<19}  {:<10} {:<16} {:<10} {:>8} {:>10} {:>10}{}",
                &hex(&s.id)[..8],
                time(s.time_ns),
                s.site,
                s.agent_id,
                s.source,
                s.files,
                crate::output::size(s.bytes),
                crate::output::size(s.new_bytes),
                if s.partial { "  (partial)" } else { "" }
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `hubvault restore SNAPSHOT --to-agent ID --target DIR [--path P]`: prints the job id.
pub(crate) fn restore(
    remote: &Remote,
    snapshot: &str,
    to_agent: &str,
    target: &str,
    path: Option<String>,
) -> Result<ExitCode> {
    let resp = rt()?.block_on(async {
        remote
            .client()
            .await?
            .restore(pb::RestoreRequest {
                protocol: PROTOCOL,
                snapshot: snapshot.to_string(),
                to_agent: to_agent.to_string(),
                target: target.to_string(),
                path: path.unwrap_or_default(),
            })
            .await
            .context("creating the restore job")
    })?;
    println!("{}", resp.into_inner().job_id);
    Ok(ExitCode::SUCCESS)
}

fn state_name(s: i32) -> &'static str {
    match pb::JobState::try_from(s).unwrap_or(pb::JobState::Unspecified) {
        pb::JobState::Queued => "queued",
        pb::JobState::Running => "running",
        pb::JobState::Done => "done",
        pb::JobState::Failed => "failed",
        pb::JobState::Unspecified => "unknown",
    }
}

/// `hubvault jobs [--wait ID] [--json]`: list jobs, or wait for one to finish
/// (exit 0 done, 1 failed).
pub(crate) fn jobs(
    remote: &Remote,
    wait: Option<u64>,
    timeout_secs: u64,
    json: bool,
) -> Result<ExitCode> {
    let rt = rt()?;
    let start = std::time::Instant::now();
    loop {
        let list = rt.block_on(async {
            remote
                .client()
                .await?
                .list_jobs(pb::ListJobsRequest {
                    protocol: PROTOCOL,
                    job_id: wait.unwrap_or(0),
                })
                .await
                .context("listing jobs")
        })?;
        let jobs = list.into_inner().jobs;
        let finished = jobs.iter().all(|j| j.state >= pb::JobState::Done as i32);
        if wait.is_none() || finished || start.elapsed().as_secs() >= timeout_secs {
            if json {
                let v: Vec<_> = jobs
                    .iter()
                    .map(|j| serde_json::json!({"id": j.job_id, "kind": j.kind, "agent": j.agent_id, "state": state_name(j.state), "message": j.message, "files": j.files, "bytes": j.bytes}))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!(
                    "{:>6} {:<8} {:<16} {:<8} {:>8} {:>10}  message",
                    "id", "kind", "agent", "state", "files", "bytes"
                );
                for j in &jobs {
                    println!(
                        "{:>6} {:<8} {:<16} {:<8} {:>8} {:>10}  {}",
                        j.job_id,
                        j.kind,
                        j.agent_id,
                        state_name(j.state),
                        j.files,
                        j.bytes,
                        j.message
                    );
                }
            }
            if let Some(id) = wait {
                if !finished {
                    bail!("job {id} still running after {timeout_secs} s");
                }
                if jobs.iter().any(|j| j.state == pb::JobState::Failed as i32) || jobs.is_empty() {
                    return Ok(ExitCode::from(1));
                }
            }
            return Ok(ExitCode::SUCCESS);
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn ttl() {
        assert_eq!(super::parse_ttl("24h").unwrap(), 86400);
        assert_eq!(super::parse_ttl("30m").unwrap(), 1800);
        assert_eq!(super::parse_ttl("90").unwrap(), 90);
        assert!(super::parse_ttl("x").is_err());
    }
}
