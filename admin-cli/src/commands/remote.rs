//! Commands that talk to the collector (role "admin" over mTLS): sites,
//! enrollment tokens, agents, status (with each source's recovery point),
//! revocation, sources and policies, snapshots, restores, jobs, prune.
//!
//! The admin identity is the directory `hubvault-collector init` wrote
//! (`--admin DIR` or `$HUBVAULT_ADMIN`): `ca.pem`, `admin.pem`, `admin.key`,
//! and `keyring` + `passphrase` holding the repository keys, which enrollment
//! tokens carry sealed so that the collector never reads them.

use std::io::IsTerminal;
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

use crate::output::{age, size, time};

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
        /// Cron schedule with seconds, e.g. "0 0 2 * * *", in the site's time zone.
        #[arg(long, conflicts_with = "realtime")]
        schedule: Option<String>,
        /// Continuous snapshots on change.
        #[arg(long)]
        realtime: bool,
        #[command(flatten)]
        policy: SourcePolicyArgs,
    },
}

/// The policy flags of a source (all optional).
#[derive(Args, Clone, Default)]
pub(crate) struct SourcePolicyArgs {
    /// Sources with a higher priority send first when several have work.
    #[arg(long, allow_hyphen_values = true)]
    priority: Option<i32>,
    /// Upload limit of the source: RATE like 2MB/s, 500KiB/s; 0 = unlimited.
    #[arg(long, value_name = "RATE")]
    bandwidth: Option<String>,
    /// Apply the bandwidth limit only from HH:MM to HH:MM (site time; may wrap midnight).
    #[arg(long, value_name = "HH:MM-HH:MM")]
    window: Option<String>,
    /// Real-time: commit after this long without a new change (e.g. 1s, 500ms).
    #[arg(long, value_name = "DUR")]
    quiet: Option<String>,
    /// Real-time: commit at the latest this long after the first change (e.g. 5s).
    #[arg(long, value_name = "DUR")]
    max_delay: Option<String>,
    /// Real-time: full reconcile scan every DUR (e.g. 24h).
    #[arg(long, value_name = "DUR")]
    reconcile: Option<String>,
    /// Schedule: random delay of up to DUR per run (e.g. 10m).
    #[arg(long, value_name = "DUR")]
    jitter: Option<String>,
    #[command(flatten)]
    keep: RetentionArgs,
}

/// Retention flags: giving any of them sets the whole retention (the others 0).
#[derive(Args, Clone, Default)]
pub(crate) struct RetentionArgs {
    /// Keep the newest N snapshots.
    #[arg(long, value_name = "N")]
    keep_last: Option<u32>,
    /// Keep every snapshot younger than DUR (e.g. 2h, 30d).
    #[arg(long, value_name = "DUR")]
    keep_within: Option<String>,
    /// Keep the newest snapshot of each of the last N hours that have one.
    #[arg(long, value_name = "N")]
    keep_hourly: Option<u32>,
    /// ... of each of the last N days.
    #[arg(long, value_name = "N")]
    keep_daily: Option<u32>,
    /// ... of each of the last N (ISO) weeks.
    #[arg(long, value_name = "N")]
    keep_weekly: Option<u32>,
    /// ... of each of the last N months.
    #[arg(long, value_name = "N")]
    keep_monthly: Option<u32>,
    /// ... of each of the last N years.
    #[arg(long, value_name = "N")]
    keep_yearly: Option<u32>,
}

#[derive(Subcommand)]
pub(crate) enum PolicyCommand {
    /// Change a site's policy (--site) or a source's (--agent --source); unset flags keep their value.
    ///
    /// Site: --timezone, --agent-bandwidth [--window], --keep-* (the default
    /// retention of its sources). Source: --schedule | --realtime |
    /// --no-realtime, --priority, --bandwidth [--window], --quiet,
    /// --max-delay, --reconcile, --jitter, --keep-* (all --keep-* 0 = use the
    /// site's). Online agents get the change at once.
    Set(PolicySetArgs),
}

/// `hubvault policy set` flags.
#[derive(Args)]
pub(crate) struct PolicySetArgs {
    /// The site (site form).
    #[arg(long)]
    site: Option<String>,
    /// The agent (source form, with --source).
    #[arg(long, requires = "source")]
    agent: Option<String>,
    /// The source of that agent.
    #[arg(long, requires = "agent")]
    source: Option<String>,
    /// Site: IANA time zone of schedules, windows and retention periods (e.g. Europe/Paris).
    #[arg(long, value_name = "TZ")]
    timezone: Option<String>,
    /// Site: upload limit of each agent: RATE like 2MB/s; 0 = unlimited.
    #[arg(long, value_name = "RATE")]
    agent_bandwidth: Option<String>,
    /// Source: cron schedule with seconds ("0 0 2 * * *"); turns real-time off.
    #[arg(long, conflicts_with_all = ["realtime", "no_realtime"])]
    schedule: Option<String>,
    /// Source: continuous snapshots on change; clears the schedule.
    #[arg(long, conflicts_with = "no_realtime")]
    realtime: bool,
    /// Source: stop continuous snapshots.
    #[arg(long)]
    no_realtime: bool,
    #[command(flatten)]
    policy: SourcePolicyArgs,
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
    let resp = resp.into_inner();
    let sites = resp.sites;
    if json {
        let v: Vec<_> = sites
            .iter()
            .map(|s| {
                let rpo: Vec<_> = s
                    .rpo
                    .iter()
                    .map(|r| serde_json::json!({"agent": r.agent_id, "source": r.source,
                        "oldest_change_age_secs": r.oldest_change_age_secs, "pending_bytes": r.pending_bytes,
                        "note": r.note, "reported_ns": r.reported_ns, "last_snapshot_ns": r.last_snapshot_ns}))
                    .collect();
                serde_json::json!({"site": s.site, "agents": s.agents, "agents_online": s.agents_online,
                    "last_snapshot_ns": s.last_snapshot_ns, "rpo": rpo})
            })
            .collect();
        let scrub = resp.scrub.as_ref().map(scrub_json);
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({"sites": v, "scrub": scrub}))?
        );
    } else {
        let now = now_ns();
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
            if !s.rpo.is_empty() {
                println!(
                    "  {:<18} {:<12} {:>11} {:>10} {:>14}  note",
                    "agent", "source", "change age", "pending", "last snapshot"
                );
            }
            for r in &s.rpo {
                let since = |ns: i64| {
                    let secs = now.saturating_sub(ns).max(0) / 1_000_000_000;
                    format!("{} ago", age(secs as u64))
                };
                println!(
                    "  {:<18} {:<12} {:>11} {:>10} {:>14}  {}",
                    r.agent_id,
                    r.source,
                    if r.reported_ns == 0 {
                        "-".into()
                    } else {
                        age(r.oldest_change_age_secs)
                    },
                    if r.reported_ns == 0 {
                        "-".into()
                    } else {
                        size(r.pending_bytes)
                    },
                    if r.last_snapshot_ns == 0 {
                        "none".into()
                    } else {
                        since(r.last_snapshot_ns)
                    },
                    if r.reported_ns == 0 {
                        "not reported yet".into()
                    } else {
                        r.note.clone()
                    }
                );
            }
        }
        if let Some(info) = &resp.scrub {
            println!("{}", scrub_line(info));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The scrub schedule and last run as `scrub-schedule --json` and
/// `status --json` print them.
fn scrub_json(info: &pb::ScrubScheduleInfo) -> serde_json::Value {
    let last = info.last.as_ref().map(|r| {
        serde_json::json!({"started_ns": r.started_ns, "finished_ns": r.finished_ns,
            "dry_run": r.dry_run, "trigger": r.trigger, "packs_checked": r.packs_checked,
            "bytes_checked": r.bytes_checked, "damaged": r.damaged, "error": r.error})
    });
    serde_json::json!({"schedule": info.schedule, "bytes_per_sec": info.bytes_per_sec,
        "next_ns": info.next_ns, "running": info.running, "last": last})
}

/// One line on the scrubs: the last one, and the schedule.
fn scrub_line(info: &pb::ScrubScheduleInfo) -> String {
    let last = match &info.last {
        None => "never run".to_string(),
        Some(r) => {
            let secs = now_ns().saturating_sub(r.finished_ns).max(0) / 1_000_000_000;
            let found = if !r.error.is_empty() {
                format!("stopped: {}", r.error)
            } else if r.damaged > 0 {
                format!("{} damaged packs", r.damaged)
            } else {
                "clean".into()
            };
            format!(
                "last {} ago ({}{}, {} packs, {}): {found}",
                age(secs as u64),
                r.trigger,
                if r.dry_run { ", dry run" } else { "" },
                r.packs_checked,
                size(r.bytes_checked),
            )
        }
    };
    let next = if info.schedule.is_empty() {
        "not scheduled (`hubvault scrub-schedule CRON`)".to_string()
    } else {
        format!(
            "schedule {:?} UTC{}, next {}",
            info.schedule,
            if info.bytes_per_sec > 0 {
                format!(" at {}/s", size(info.bytes_per_sec))
            } else {
                String::new()
            },
            time(info.next_ns)
        )
    };
    format!(
        "scrub: {last}; {next}{}",
        if info.running { "; running now" } else { "" }
    )
}

/// The ScrubSchedule call (read, change or cancel); `what` for the error.
fn scrub_schedule_call(
    remote: &Remote,
    req: pb::ScrubScheduleRequest,
    what: &'static str,
) -> Result<pb::ScrubScheduleInfo> {
    Ok(rt()?
        .block_on(async {
            remote
                .client()
                .await?
                .scrub_schedule(req)
                .await
                .context(what)
        })?
        .into_inner())
}

/// `hubvault scrub --cancel`: stop the running scrub before its next pack.
pub(crate) fn scrub_cancel(remote: &Remote) -> Result<ExitCode> {
    let req = pb::ScrubScheduleRequest {
        protocol: PROTOCOL,
        cancel: true,
        ..Default::default()
    };
    let info = scrub_schedule_call(remote, req, "cancelling the scrub")?;
    if info.running {
        println!("the running scrub stops before its next pack");
    } else {
        println!("no scrub is running");
    }
    Ok(ExitCode::SUCCESS)
}

/// `hubvault scrub-schedule [CRON|off] [--limit RATE] [--json]`: show, or
/// change and show, the collector's scrub schedule.
pub(crate) fn scrub_schedule(
    remote: &Remote,
    schedule: Option<String>,
    limit: Option<String>,
    json: bool,
) -> Result<ExitCode> {
    let bytes_per_sec = limit.as_deref().map(parse_rate).transpose()?;
    let schedule = schedule.map(|s| if s == "off" { String::new() } else { s });
    let req = pb::ScrubScheduleRequest {
        protocol: PROTOCOL,
        schedule,
        bytes_per_sec,
        cancel: false,
    };
    let info = scrub_schedule_call(remote, req, "reading or setting the scrub schedule")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&scrub_json(&info))?);
    } else {
        println!("{}", scrub_line(&info));
    }
    Ok(ExitCode::SUCCESS)
}

fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
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
        policy,
    } = cmd;
    let p = ParsedPolicy::of(&policy, "--bandwidth")?;
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
                priority: p.priority.unwrap_or(0),
                bandwidth: p.bandwidth,
                quiet_ms: p.quiet_ms.unwrap_or(0),
                max_delay_ms: p.max_delay_ms.unwrap_or(0),
                reconcile_secs: p.reconcile_secs.unwrap_or(0),
                jitter_secs: p.jitter_secs.unwrap_or(0),
                retention: p.retention,
            })
            .await
            .with_context(|| format!("adding source {name} to agent {agent}"))
    })?;
    println!("source {name} set on agent {agent}");
    Ok(ExitCode::SUCCESS)
}

/// Source policy flags, parsed.
struct ParsedPolicy {
    priority: Option<i32>,
    bandwidth: Option<pb::BandwidthLimit>,
    quiet_ms: Option<u32>,
    max_delay_ms: Option<u32>,
    reconcile_secs: Option<u64>,
    jitter_secs: Option<u32>,
    retention: Option<pb::Retention>,
}

impl ParsedPolicy {
    /// Parse; `rate_flag` names the flag `--window` belongs to.
    fn of(a: &SourcePolicyArgs, rate_flag: &str) -> Result<Self> {
        let ms = |flag: &str, v: &Option<String>| -> Result<Option<u32>> {
            v.as_deref()
                .map(|d| {
                    let ms = parse_duration_ms(d).with_context(|| format!("--{flag}"))?;
                    u32::try_from(ms).with_context(|| format!("--{flag} {d}: too long"))
                })
                .transpose()
        };
        let secs = |flag: &str, v: &Option<String>| -> Result<Option<u64>> {
            v.as_deref()
                .map(|d| parse_duration_secs(d).with_context(|| format!("--{flag}")))
                .transpose()
        };
        Ok(ParsedPolicy {
            priority: a.priority,
            bandwidth: bandwidth(a.bandwidth.as_deref(), a.window.as_deref(), rate_flag)?,
            quiet_ms: ms("quiet", &a.quiet)?,
            max_delay_ms: ms("max-delay", &a.max_delay)?,
            reconcile_secs: secs("reconcile", &a.reconcile)?,
            jitter_secs: secs("jitter", &a.jitter)?
                .map(|s| u32::try_from(s).context("--jitter: too long"))
                .transpose()?,
            retention: retention(&a.keep)?,
        })
    }

    fn source_flags_given(a: &SourcePolicyArgs) -> bool {
        a.priority.is_some()
            || a.bandwidth.is_some()
            || a.quiet.is_some()
            || a.max_delay.is_some()
            || a.reconcile.is_some()
            || a.jitter.is_some()
    }
}

/// `--RATE [--window W]` as a limit; None when neither is given.
fn bandwidth(
    rate: Option<&str>,
    window: Option<&str>,
    rate_flag: &str,
) -> Result<Option<pb::BandwidthLimit>> {
    let Some(rate) = rate else {
        if window.is_some() {
            bail!("--window limits a rate: give {rate_flag} RATE too");
        }
        return Ok(None);
    };
    let bytes_per_sec = parse_rate(rate).with_context(|| rate_flag.to_string())?;
    let (window_start_min, window_end_min) = match window {
        Some(w) => parse_window(w)?,
        None => (0, 0),
    };
    if bytes_per_sec == 0 && window_start_min != window_end_min {
        bail!("--window with an unlimited rate (0) has no effect");
    }
    Ok(Some(pb::BandwidthLimit {
        bytes_per_sec,
        window_start_min,
        window_end_min,
    }))
}

/// The retention flags as a whole retention, or None when none is given.
fn retention(k: &RetentionArgs) -> Result<Option<pb::Retention>> {
    let any = k.keep_last.is_some()
        || k.keep_within.is_some()
        || k.keep_hourly.is_some()
        || k.keep_daily.is_some()
        || k.keep_weekly.is_some()
        || k.keep_monthly.is_some()
        || k.keep_yearly.is_some();
    if !any {
        return Ok(None);
    }
    Ok(Some(pb::Retention {
        keep_last: k.keep_last.unwrap_or(0),
        keep_within_secs: k
            .keep_within
            .as_deref()
            .map(|d| parse_duration_secs(d).context("--keep-within"))
            .transpose()?
            .unwrap_or(0),
        hourly: k.keep_hourly.unwrap_or(0),
        daily: k.keep_daily.unwrap_or(0),
        weekly: k.keep_weekly.unwrap_or(0),
        monthly: k.keep_monthly.unwrap_or(0),
        yearly: k.keep_yearly.unwrap_or(0),
    }))
}

/// Parse a rate: "2MB/s", "500KiB/s", "1.5M", "4096", "0" (= unlimited).
/// Decimal units (kB, MB, GB) are powers of 1000, binary ones (KiB, MiB,
/// GiB) of 1024; "/s" is optional.
fn parse_rate(s: &str) -> Result<u64> {
    let t = s.trim();
    let t = t.strip_suffix("/s").unwrap_or(t).trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let num: f64 = num
        .parse()
        .ok()
        .filter(|n: &f64| n.is_finite() && *n >= 0.0)
        .with_context(|| format!("bad rate {s:?} (e.g. 2MB/s, 500KiB/s, 0 = unlimited)"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "ki" | "kib" => 1024.0,
        "mi" | "mib" => 1024.0 * 1024.0,
        "gi" | "gib" => 1024.0 * 1024.0 * 1024.0,
        _ => bail!("bad rate unit in {s:?} (B, kB, MB, GB, KiB, MiB, GiB, optionally /s)"),
    };
    let v = (num * mult).round();
    if v > u64::MAX as f64 {
        bail!("rate {s:?} is too large");
    }
    Ok(v as u64)
}

/// Parse "HH:MM-HH:MM" into minutes after midnight (an end of 24:00 is midnight).
fn parse_window(s: &str) -> Result<(u32, u32)> {
    let bad = || format!("bad window {s:?} (e.g. 08:00-18:00, 22:00-06:00)");
    let (a, b) = s.split_once('-').with_context(bad)?;
    let hm = |x: &str, end: bool| -> Result<u32> {
        let (h, m) = x.trim().split_once(':').with_context(bad)?;
        let h: u32 = h.parse().ok().with_context(bad)?;
        let m: u32 = m.parse().ok().with_context(bad)?;
        match (h, m) {
            (24, 0) if end => Ok(0),
            (0..=23, 0..=59) => Ok(h * 60 + m),
            _ => bail!(bad()),
        }
    };
    Ok((hm(a, false)?, hm(b, true)?))
}

/// Parse a duration into milliseconds: "500ms", "90s", "15m", "2h", "30d",
/// "2w", or plain seconds.
fn parse_duration_ms(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .with_context(|| format!("bad duration {s:?} (e.g. 500ms, 90s, 15m, 2h, 30d)"))?;
    let mult: u64 = match unit {
        "ms" => 1,
        "" | "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        "w" => 7 * 86_400_000,
        _ => bail!("bad duration unit in {s:?} (ms, s, m, h, d, w)"),
    };
    n.checked_mul(mult)
        .with_context(|| format!("duration {s:?} is too long"))
}

/// Parse a duration in whole seconds (see [`parse_duration_ms`]).
fn parse_duration_secs(s: &str) -> Result<u64> {
    let ms = parse_duration_ms(s)?;
    if ms % 1000 != 0 {
        bail!("{s:?}: give whole seconds here");
    }
    Ok(ms / 1000)
}

/// `hubvault policy set ...`.
pub(crate) fn policy(remote: &Remote, cmd: PolicyCommand) -> Result<ExitCode> {
    let PolicyCommand::Set(a) = cmd;
    let mut req = pb::SetPolicyRequest {
        protocol: PROTOCOL,
        ..Default::default()
    };
    let what = match (&a.site, &a.agent, &a.source) {
        (_, Some(agent), Some(source)) => {
            if a.timezone.is_some() || a.agent_bandwidth.is_some() {
                bail!(
                    "--timezone and --agent-bandwidth are site settings: use them with --site alone"
                );
            }
            let p = ParsedPolicy::of(&a.policy, "--bandwidth")?;
            req.site = a.site.clone().unwrap_or_default();
            req.agent_id = agent.clone();
            req.source = source.clone();
            req.schedule = a.schedule.clone();
            if a.schedule.is_some() {
                req.realtime = Some(false);
            }
            if a.realtime {
                req.realtime = Some(true);
                req.schedule = Some(String::new());
            }
            if a.no_realtime {
                req.realtime = Some(false);
            }
            req.priority = p.priority;
            req.bandwidth = p.bandwidth;
            req.quiet_ms = p.quiet_ms;
            req.max_delay_ms = p.max_delay_ms;
            req.reconcile_secs = p.reconcile_secs;
            req.jitter_secs = p.jitter_secs;
            req.retention = p.retention;
            format!("source {source} of agent {agent}")
        }
        (Some(site), None, None) => {
            if ParsedPolicy::source_flags_given(&a.policy)
                || a.schedule.is_some()
                || a.realtime
                || a.no_realtime
            {
                bail!(
                    "schedule, real-time, priority, bandwidth, quiet, max-delay, reconcile and jitter \
                     are source settings: use them with --agent ID --source NAME"
                );
            }
            req.site = site.clone();
            req.timezone = a.timezone.clone();
            req.agent_bandwidth = bandwidth(
                a.agent_bandwidth.as_deref(),
                a.policy.window.as_deref(),
                "--agent-bandwidth",
            )?;
            req.retention = retention(&a.policy.keep)?;
            format!("site {site}")
        }
        _ => bail!("give --site S, or --agent ID --source NAME"),
    };
    rt()?.block_on(async {
        remote
            .client()
            .await?
            .set_policy(req)
            .await
            .with_context(|| format!("setting the policy of {what}"))
    })?;
    println!("policy of {what} updated");
    Ok(ExitCode::SUCCESS)
}

/// `hubvault prune [--site S] [--agent ID] [--source NAME] [--dry-run] [--json]`:
/// a line per snapshot, keep or forget and why.
pub(crate) fn prune(
    remote: &Remote,
    site: Option<String>,
    agent: Option<String>,
    source: Option<String>,
    dry_run: bool,
    json: bool,
) -> Result<ExitCode> {
    let resp = rt()?.block_on(async {
        remote
            .client()
            .await?
            .prune(pb::PruneRequest {
                protocol: PROTOCOL,
                site: site.unwrap_or_default(),
                agent_id: agent.unwrap_or_default(),
                source: source.unwrap_or_default(),
                dry_run,
            })
            .await
            .context("pruning")
    })?;
    let r = resp.into_inner();
    let forget = r.decisions.iter().filter(|d| !d.keep).count();
    if json {
        let v: Vec<_> = r
            .decisions
            .iter()
            .map(|d| {
                let s = d.snapshot.clone().unwrap_or_default();
                serde_json::json!({"id": hex(&s.id), "site": s.site, "agent": s.agent_id,
                    "source": s.source, "time_ns": s.time_ns, "keep": d.keep,
                    "action": if d.keep { "keep" } else { "forget" }, "reason": d.reason})
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "dry_run": dry_run, "forgotten": r.forgotten, "decisions": v}))?
        );
    } else {
        println!(
            "{:<7} {:<10} {:<19}  {:<10} {:<16} {:<10} reason",
            "action", "id", "time (UTC)", "site", "agent", "source"
        );
        for d in &r.decisions {
            let s = d.snapshot.clone().unwrap_or_default();
            let id = hex(&s.id);
            println!(
                "{:<7} {:<10} {:<19}  {:<10} {:<16} {:<10} {}",
                if d.keep { "keep" } else { "forget" },
                id.get(..8).unwrap_or(&id),
                time(s.time_ns),
                s.site,
                s.agent_id,
                s.source,
                d.reason
            );
        }
    }
    if dry_run {
        eprintln!(
            "dry run: {forget} of {} snapshots would be forgotten",
            r.decisions.len()
        );
    } else {
        eprintln!(
            "forgot {} of {} snapshots (their data stays in the packs until a garbage collection frees it)",
            r.forgotten,
            r.decisions.len()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `hubvault scrub [--dry-run] [--json]`: every pack read back; damaged
/// packs, then the snapshots that name a lost blob. Exit 3 on damage.
pub(crate) fn scrub(
    remote: &Remote,
    dry_run: bool,
    limit: Option<String>,
    json: bool,
) -> Result<ExitCode> {
    let bytes_per_sec = limit.as_deref().map(parse_rate).transpose()?.unwrap_or(0);
    let bar = std::io::stderr()
        .is_terminal()
        .then(indicatif::ProgressBar::new_spinner);
    let r = rt()?.block_on(async {
        let mut stream = remote
            .client()
            .await?
            .scrub(pb::ScrubRequest {
                protocol: PROTOCOL,
                dry_run,
                bytes_per_sec,
            })
            .await
            .context("scrubbing the collector's packs")?
            .into_inner();
        loop {
            let p = stream
                .message()
                .await
                .context("scrubbing the collector's packs")?
                .context("the collector ended the scrub without a report")?;
            if let Some(report) = p.report {
                return anyhow::Ok(report);
            }
            if let Some(bar) = &bar {
                bar.set_message(format!(
                    "scrub: {}/{} packs, {} of {}, {} damaged",
                    p.packs_checked,
                    p.packs_total,
                    size(p.bytes_checked),
                    size(p.bytes_total),
                    p.damaged
                ));
                bar.tick();
            }
        }
    });
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let r = r?;
    if json {
        let damaged: Vec<_> = r
            .damaged
            .iter()
            .map(|d| {
                serde_json::json!({"pack": hex(&d.name), "reason": d.reason,
                "blobs": d.blobs, "sites": d.sites})
            })
            .collect();
        let affected: Vec<_> = r
            .affected
            .iter()
            .map(|a| {
                serde_json::json!({"snapshot": hex(&a.id), "site": a.site,
                "source": a.source, "entries": a.entries, "paths": a.paths})
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "dry_run": dry_run, "cancelled": r.cancelled, "packs_checked": r.packs_checked,
                "bytes_checked": r.bytes_checked, "secs": r.secs,
                "damaged": damaged, "affected": affected}))?
        );
    } else {
        for d in &r.damaged {
            println!(
                "damaged pack {}: {} ({} blobs, held by {})",
                hex(&d.name),
                d.reason,
                d.blobs,
                if d.sites.is_empty() {
                    "no site".into()
                } else {
                    d.sites.join(", ")
                }
            );
        }
        for a in &r.affected {
            let id = hex(&a.id);
            println!(
                "snapshot {} ({} {}): {} entries lost, e.g. {}",
                id.get(..8).unwrap_or(&id),
                a.site,
                a.source,
                a.entries,
                a.paths.join(", ")
            );
        }
    }
    eprintln!(
        "{} {} packs ({}) in {:.1} s: {} damaged{}",
        if r.cancelled {
            "cancelled after checking"
        } else {
            "checked"
        },
        r.packs_checked,
        size(r.bytes_checked),
        r.secs,
        r.damaged.len(),
        match (r.damaged.is_empty(), dry_run) {
            (true, _) => "",
            (false, true) => " (dry run: nothing changed)",
            (false, false) => {
                "; set aside in repo/damaged/. Agents that still have the data upload it with their next backup"
            }
        }
    );
    Ok(if r.damaged.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(3)
    })
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
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
                hex(&s.id).get(..8).unwrap_or("?"),
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

    #[test]
    fn rates() {
        assert_eq!(super::parse_rate("2MB/s").unwrap(), 2_000_000);
        assert_eq!(super::parse_rate("500KiB/s").unwrap(), 512_000);
        assert_eq!(super::parse_rate("1.5M").unwrap(), 1_500_000);
        assert_eq!(super::parse_rate("4096").unwrap(), 4096);
        assert_eq!(super::parse_rate("0").unwrap(), 0);
        assert!(super::parse_rate("fast").is_err());
        assert!(super::parse_rate("2XB/s").is_err());
        assert!(super::parse_rate("-1").is_err());
    }

    #[test]
    fn windows_and_durations() {
        assert_eq!(super::parse_window("08:00-18:00").unwrap(), (480, 1080));
        assert_eq!(super::parse_window("22:30-06:00").unwrap(), (1350, 360));
        assert_eq!(super::parse_window("08:00-24:00").unwrap(), (480, 0));
        assert!(super::parse_window("24:00-08:00").is_err());
        assert!(super::parse_window("8-18").is_err());
        assert_eq!(super::parse_duration_ms("500ms").unwrap(), 500);
        assert_eq!(super::parse_duration_ms("90s").unwrap(), 90_000);
        assert_eq!(super::parse_duration_secs("2h").unwrap(), 7200);
        assert_eq!(super::parse_duration_secs("30d").unwrap(), 30 * 86_400);
        assert_eq!(super::parse_duration_secs("45").unwrap(), 45);
        assert!(super::parse_duration_secs("1500ms").is_err());
        assert!(super::parse_duration_ms("2 hours").is_err());
    }

    #[test]
    fn window_needs_a_rate() {
        assert!(super::bandwidth(None, Some("08:00-18:00"), "--bandwidth").is_err());
        assert!(super::bandwidth(Some("0"), Some("08:00-18:00"), "--bandwidth").is_err());
        let b = super::bandwidth(Some("2MB/s"), Some("08:00-18:00"), "--bandwidth")
            .unwrap()
            .unwrap();
        assert_eq!(
            (b.bytes_per_sec, b.window_start_min, b.window_end_min),
            (2_000_000, 480, 1080)
        );
        assert!(
            super::bandwidth(None, None, "--bandwidth")
                .unwrap()
                .is_none()
        );
    }
}
