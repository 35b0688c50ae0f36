//! The long-lived control stream: connect with the agent's certificate,
//! send heartbeats, receive commands; on any failure reconnect with
//! exponential backoff and jitter (1 s doubling to 60 s). A revocation ends
//! the agent with an error instead of retrying forever.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use proto::limits::PROTOCOL;
use proto::pb;
use proto::pb::agent_service_client::AgentServiceClient;
use tokio_stream::StreamExt as _;
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use std::sync::Arc;

use crate::SERVER_NAME;
use crate::sources::Sources;
use crate::state::StateDir;

/// Options of the control loop.
#[derive(Debug, Clone)]
pub struct ControlOptions {
    /// Seconds between heartbeats.
    pub heartbeat: Duration,
    /// Options of the sources' tasks.
    pub sources: crate::sources::SourcesOptions,
}

impl Default for ControlOptions {
    fn default() -> Self {
        ControlOptions {
            heartbeat: Duration::from_secs(10),
            sources: Default::default(),
        }
    }
}

/// Why one session ended.
enum End {
    /// The collector revoked us.
    Revoked(String),
    /// Anything else: retry.
    Retry(anyhow::Error),
}

/// A TLS channel to the collector with the agent's identity.
pub async fn connect(st: &StateDir, collector: &str) -> Result<AgentServiceClient<Channel>> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(st.read("ca.pem")?))
        .identity(Identity::from_pem(
            st.read("agent.pem")?,
            st.read("agent.key")?,
        ))
        .domain_name(SERVER_NAME);
    let ch = Channel::from_shared(collector.to_string())
        .with_context(|| format!("bad collector address {collector}"))?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(10))
        // Large windows keep a high-latency link full (see the collector's server.rs).
        .initial_stream_window_size(Some(8 * 1024 * 1024))
        .initial_connection_window_size(Some(16 * 1024 * 1024))
        .tcp_nodelay(true)
        .connect()
        .await
        .with_context(|| format!("connecting to {collector}"))?;
    Ok(AgentServiceClient::new(ch)
        .max_decoding_message_size(proto::limits::MAX_MESSAGE)
        .max_encoding_message_size(proto::limits::MAX_MESSAGE))
}

async fn session(
    st: &StateDir,
    collector: &str,
    opts: &ControlOptions,
    sources: &Arc<Sources>,
    backoff: &mut Duration,
) -> End {
    let mut client = match connect(st, collector).await {
        Ok(c) => c,
        Err(e) => return End::Retry(e),
    };
    let (out_tx, out_rx) = tokio::sync::mpsc::channel::<pb::AgentEvent>(16);
    let beats = out_tx.clone();
    let every = opts.heartbeat;
    let lag_of = sources.clone();
    let heart = tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            let hb = pb::AgentEvent {
                protocol: PROTOCOL,
                event: Some(pb::agent_event::Event::Heartbeat(pb::Heartbeat {
                    version: env!("CARGO_PKG_VERSION").to_string(),
                    lag: lag_of.lag(),
                })),
            };
            if beats.send(hb).await.is_err() {
                break;
            }
        }
    });
    let _stop_heart = AbortOnDrop(heart);
    let resp = match client
        .control(tokio_stream::wrappers::ReceiverStream::new(out_rx))
        .await
    {
        Ok(r) => r,
        Err(s) => return classify(s),
    };
    tracing::info!("control stream open");
    // A session that got this far starts the backoff over: sessions end
    // routinely (the collector caps connection age), and an agent whose
    // delay had grown to its cap would otherwise be offline a minute each time.
    *backoff = FIRST_BACKOFF;
    let mut inbound = resp.into_inner();
    loop {
        match inbound.next().await {
            Some(Ok(cmd)) => match cmd.command {
                Some(pb::collector_command::Command::Revoked(r)) => return End::Revoked(r.reason),
                Some(pb::collector_command::Command::Sources(s)) => {
                    tracing::info!("collector assigned {} sources", s.sources.len());
                    // Remembered across restarts; policies live at the collector.
                    sources.apply(s, true);
                }
                Some(pb::collector_command::Command::BackupNow(b)) => {
                    let tx = out_tx.clone();
                    tokio::spawn(sources.clone().backup_now(b, tx));
                }
                Some(pb::collector_command::Command::Restore(job)) => {
                    let st = StateDir::new(st.root());
                    let collector = collector.to_string();
                    let tx = out_tx.clone();
                    tokio::spawn(async move {
                        crate::control::run_restore(st, collector, job, tx).await
                    });
                }
                None => {}
            },
            Some(Err(s)) => return classify(s),
            None => return End::Retry(anyhow::anyhow!("collector closed the control stream")),
        }
    }
}

/// Whether a call failed because its connection went away (the code a
/// transport error maps to depends on when the close lands), rather than
/// because the collector answered with an error.
pub(crate) fn connection_cut(code: Code) -> bool {
    matches!(code, Code::Unavailable | Code::Cancelled | Code::Unknown)
}

fn classify(s: tonic::Status) -> End {
    match s.code() {
        Code::PermissionDenied if s.message().contains("revoked") => {
            End::Revoked(s.message().to_string())
        }
        // TLS 1.3 reports a rejected client certificate late, as a cancelled call.
        c if connection_cut(c) => End::Retry(anyhow::anyhow!(
            "{} (if this persists, the certificate may be rejected or revoked)",
            s.message()
        )),
        _ => End::Retry(anyhow::anyhow!("{}: {}", s.code(), s.message())),
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A job report event.
pub(crate) fn report(
    job_id: u64,
    state: pb::JobState,
    message: String,
    files: u64,
    bytes: u64,
) -> pb::AgentEvent {
    pb::AgentEvent {
        protocol: PROTOCOL,
        event: Some(pb::agent_event::Event::JobReport(pb::JobReport {
            job_id,
            state: state as i32,
            message,
            files,
            bytes,
        })),
    }
}

/// Run one restore job: pull what is missing into the spool, restore, report.
pub async fn run_restore(
    st: StateDir,
    collector: String,
    job: pb::RestoreJob,
    tx: tokio::sync::mpsc::Sender<pb::AgentEvent>,
) {
    let id = job.job_id;
    let _ = tx
        .send(report(id, pb::JobState::Running, "pulling".into(), 0, 0))
        .await;
    let ev = match restore_job(&st, &collector, &job).await {
        Ok((out, got)) if out.errors.is_empty() => report(
            id,
            pb::JobState::Done,
            format!(
                "{} warnings; {} blobs pulled, {} chunks ({} bytes) taken from local files{}",
                out.warnings.len(),
                got.pulled,
                got.local.chunks,
                got.local.bytes,
                match out.leftovers {
                    0 => String::new(),
                    n => format!("; {n} leftovers of an interrupted restore removed"),
                }
            ),
            out.files,
            out.bytes,
        ),
        Ok((out, _)) => report(
            id,
            pb::JobState::Failed,
            out.errors.join("; ").chars().take(4000).collect(),
            out.files,
            out.bytes,
        ),
        Err(e) => report(id, pb::JobState::Failed, format!("{e:#}"), 0, 0),
    };
    tracing::info!(job = id, "restore job finished");
    let _ = tx.send(ev).await;
}

async fn restore_job(
    st: &StateDir,
    collector: &str,
    job: &pb::RestoreJob,
) -> Result<(repo_format::restore::RestoreOutcome, crate::pull::Pulled)> {
    let target = std::path::PathBuf::from(&job.target);
    if !target.is_absolute() {
        bail!("restore target {} is not absolute", job.target);
    }
    // Never restore into or over the agent's own identity, keys and spool.
    let own = std::fs::canonicalize(st.root()).unwrap_or_else(|_| st.root().to_path_buf());
    let tgt = std::fs::canonicalize(&target).unwrap_or_else(|_| target.clone());
    if tgt.starts_with(&own) || own.starts_with(&tgt) {
        bail!(
            "refusing to restore into or over the agent's state directory {}",
            own.display()
        );
    }
    let root = repo_format::Id::from_slice(&job.tree).context("job has a malformed tree id")?;
    let snap =
        repo_format::Id::from_slice(&job.snapshot_id).context("job has a malformed snapshot id")?;
    let st2 = StateDir::new(st.root());
    let (repo, acked) = tokio::task::spawn_blocking(move || st2.spool()).await??;
    let repo = std::sync::Arc::new(repo);
    let mut client = connect(st, collector).await?;
    // No spool trim while this job counts on what the spool holds.
    let _in_use = crate::trim::restore_guard(repo.root()).await?;
    let path = (!job.path.is_empty()).then(|| job.path.clone());
    let got = crate::pull::pull_tree(
        &mut client,
        repo.clone(),
        std::sync::Arc::new(acked),
        job.job_id,
        root,
        path.as_deref(),
    )
    .await?;
    tracing::info!(
        job = job.job_id,
        pulled = got.pulled,
        local_chunks = got.local.chunks,
        local_bytes = got.local.bytes,
        "blobs present for restore"
    );
    let out = tokio::task::spawn_blocking(move || {
        // The job is reported done to central IT: flushed to disk first.
        let opts = repo_format::restore::RestoreOptions {
            path,
            sync: true,
            ..Default::default()
        };
        repo_format::restore::restore_tree(&repo, &snap, &root, &target, &opts)
    })
    .await??;
    Ok((out, got))
}

/// Seconds left and total lifetime of our certificate.
fn cert_life(st: &StateDir) -> Result<(i64, i64)> {
    let pem = st.read("agent.pem")?;
    let (_, p) = x509_parser::pem::parse_x509_pem(&pem).context("agent.pem is not PEM")?;
    let cert = p.parse_x509().context("agent.pem is not a certificate")?;
    let v = cert.validity();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    Ok((
        v.not_after.timestamp() - now,
        v.not_after.timestamp() - v.not_before.timestamp(),
    ))
}

/// Renew the certificate when less than half of its life is left.
pub async fn renew_if_due(st: &StateDir, collector: &str, force: bool) -> Result<bool> {
    st.recover_identity()?;
    let (left, total) = cert_life(st)?;
    if !force && left > total / 2 {
        return Ok(false);
    }
    if left <= 0 {
        bail!("the agent certificate expired; enroll again with a new token");
    }
    let key = rcgen::KeyPair::generate().context("generating a new key")?;
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())
        .and_then(|p| p.serialize_request(&key))
        .context("building the CSR")?;
    let resp = connect(st, collector)
        .await?
        .renew(pb::RenewRequest {
            protocol: PROTOCOL,
            csr_der: csr.der().to_vec(),
        })
        .await
        .context("renewing the certificate")?
        .into_inner();
    st.replace_identity(&key.serialize_pem(), &resp.certificate_pem)?;
    tracing::info!(
        "certificate renewed (valid {} s)",
        resp.certificate_ttl_secs
    );
    Ok(true)
}

/// Delay before the first reconnection attempt after a session ends.
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// Longest delay between reconnection attempts (before jitter).
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// Run until revoked: keep the control stream up, reconnecting with backoff,
/// and keep every source backed up per its policy.
pub async fn run(st: &StateDir, opts: &ControlOptions) -> Result<()> {
    let cfg = st.config()?;
    tracing::info!(agent = %cfg.agent_id, site = %cfg.site, collector = %cfg.collector, "agent starting");
    let sources = Sources::new(st, opts.sources.clone())?;
    // Policies from the last run apply at once, before the collector answers.
    sources.apply_saved();
    let mut backoff = FIRST_BACKOFF;
    loop {
        // Sessions end at least every few minutes (the collector caps
        // connection age), so this runs often enough for 7-day certificates.
        match renew_if_due(st, &cfg.collector, false).await {
            Ok(true) => sources.reset_connection().await,
            Ok(false) => {}
            Err(e) => tracing::warn!("certificate renewal: {e:#}"),
        }
        match session(st, &cfg.collector, opts, &sources, &mut backoff).await {
            End::Revoked(why) => bail!(
                "this agent was revoked by the collector ({why}); enroll again with a new token"
            ),
            End::Retry(e) => {
                let jitter = Duration::from_millis(jitter_ms(backoff.as_millis() as u64 / 2));
                tracing::warn!(
                    "control stream lost: {e:#}; retrying in {:?}",
                    backoff + jitter
                );
                tokio::time::sleep(backoff + jitter).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// A random delay below `max` milliseconds.
pub(crate) fn jitter_ms(max: u64) -> u64 {
    let mut b = [0u8; 8];
    let _ = repo_format::crypto::fill_random(&mut b);
    u64::from_le_bytes(b) % max.max(1)
}
