//! The long-lived control stream: connect with the agent's certificate,
//! send heartbeats, receive commands; on any failure reconnect with
//! exponential backoff and jitter (1 s doubling to 60 s). A revocation ends
//! the agent with an error instead of retrying forever.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use proto::limits::PROTOCOL;
use proto::pb;
use proto::pb::agent_service_client::AgentServiceClient;
use tokio_stream::StreamExt;
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use crate::SERVER_NAME;
use crate::state::StateDir;

/// Options of the control loop.
#[derive(Debug, Clone)]
pub struct ControlOptions {
    /// Seconds between heartbeats.
    pub heartbeat: Duration,
}

impl Default for ControlOptions {
    fn default() -> Self {
        ControlOptions {
            heartbeat: Duration::from_secs(10),
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

async fn connect(st: &StateDir, collector: &str) -> Result<AgentServiceClient<Channel>> {
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
        .connect()
        .await
        .with_context(|| format!("connecting to {collector}"))?;
    Ok(AgentServiceClient::new(ch))
}

async fn session(st: &StateDir, collector: &str, opts: &ControlOptions) -> End {
    let mut client = match connect(st, collector).await {
        Ok(c) => c,
        Err(e) => return End::Retry(e),
    };
    let hb = opts.heartbeat;
    let beats = async_stream_heartbeats(hb);
    let resp = match client.control(beats).await {
        Ok(r) => r,
        Err(s) => return classify(s),
    };
    tracing::info!("control stream open");
    let mut inbound = resp.into_inner();
    loop {
        match inbound.next().await {
            Some(Ok(cmd)) => match cmd.command {
                Some(pb::collector_command::Command::Revoked(r)) => return End::Revoked(r.reason),
                Some(pb::collector_command::Command::Sources(s)) => {
                    tracing::info!("collector assigned {} sources", s.sources.len());
                }
                Some(other) => tracing::warn!("command not supported yet: {other:?}"),
                None => {}
            },
            Some(Err(s)) => return classify(s),
            None => return End::Retry(anyhow::anyhow!("collector closed the control stream")),
        }
    }
}

fn classify(s: tonic::Status) -> End {
    match s.code() {
        Code::PermissionDenied if s.message().contains("revoked") => {
            End::Revoked(s.message().to_string())
        }
        // TLS 1.3 reports a rejected client certificate late, as a cancelled call.
        Code::Unavailable | Code::Cancelled | Code::Unknown => End::Retry(anyhow::anyhow!(
            "{} (if this persists, the certificate may be rejected or revoked)",
            s.message()
        )),
        _ => End::Retry(anyhow::anyhow!("{}: {}", s.code(), s.message())),
    }
}

fn async_stream_heartbeats(
    every: Duration,
) -> impl tokio_stream::Stream<Item = pb::AgentEvent> + Send + 'static {
    let ticks = tokio_stream::wrappers::IntervalStream::new(tokio::time::interval(every));
    ticks.map(|_| pb::AgentEvent {
        protocol: PROTOCOL,
        event: Some(pb::agent_event::Event::Heartbeat(pb::Heartbeat {
            version: env!("CARGO_PKG_VERSION").to_string(),
            lag: Vec::new(),
        })),
    })
}

/// Run until revoked: keep the control stream up, reconnecting with backoff.
pub async fn run(st: &StateDir, opts: &ControlOptions) -> Result<()> {
    let cfg = st.config()?;
    tracing::info!(agent = %cfg.agent_id, site = %cfg.site, collector = %cfg.collector, "agent starting");
    let mut backoff = Duration::from_secs(1);
    loop {
        match session(st, &cfg.collector, opts).await {
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
                backoff = (backoff * 2).min(Duration::from_secs(60));
            }
        }
    }
}

fn jitter_ms(max: u64) -> u64 {
    let mut b = [0u8; 8];
    let _ = repo_format::crypto::fill_random(&mut b);
    u64::from_le_bytes(b) % max.max(1)
}
