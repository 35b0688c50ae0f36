//! Serving: accept TCP, run TLS handshakes (bounded in time and number),
//! hand authenticated streams to tonic, stop on the shutdown future.

use std::future::Future;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proto::limits::MAX_MESSAGE;
use proto::pb;
use repo_format::config::RepoConfig;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Server;

use crate::Ctx;
use crate::admission::{Admission, Holder};
use crate::auth::{Revoked, Want, interceptor};
use crate::conn::BufferedTcp;
use crate::error::ServiceError;
use crate::pki::Pki;
use crate::service::{admin::AdminSvc, agent::AgentSvc, enroll::EnrollSvc};
use crate::state::State;
use crate::tls::{SwappableVerifier, server_config};

/// A TLS handshake must finish within this (slowloris).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once.
const MAX_HANDSHAKES: usize = 256;
/// Connections are closed after this age, bounding how long any connection
/// outlives a revocation (calls are refused at once; this ends idle ones).
pub const MAX_CONNECTION_AGE: Duration = Duration::from_secs(300);
/// HTTP/2 flow-control window (bytes): covers ~1 Gbit/s x 60 ms, or 100 Mbit/s x 600 ms.
pub const WINDOW: u32 = 8 * 1024 * 1024;
/// Largest HTTP/2 frame an agent may send. The protocol's default, 16 KiB,
/// cut each 1 MiB upload message into 64 DATA frames, each with its own
/// flow-control and framing work at both ends.
pub const MAX_FRAME: u32 = 1 << 20;
/// How often the CRL is re-signed (it is valid for `pki::CRL_TTL`).
const CRL_REFRESH: Duration = Duration::from_secs(24 * 3600);

/// Load everything from `data` into a shared context.
pub fn load(data: &Path) -> Result<Arc<Ctx>, ServiceError> {
    let pki = Pki::load(&data.join("pki"))?;
    let state = State::open(&data.join("state.db"))?;
    let (serials, number) = state.revoked()?;
    let crl = pki.crl(&serials, number.max(1))?;
    let verifier = Arc::new(SwappableVerifier::new(&pki.ca_der()?, &crl)?);
    let cfg = RepoConfig::load(&data.join("repo").join("config"))?;
    let pass_path = data.join("repo.pass");
    let pass = std::fs::read_to_string(&pass_path)
        .map_err(|e| ServiceError::io("reading", &pass_path, e))?;
    let repo = repo_format::Repository::open(
        &data.join("repo"),
        pass.trim().as_bytes(),
        repo_format::LockMode::Shared,
    )?;
    Ok(Arc::new(Ctx {
        data: data.to_path_buf(),
        pki,
        state,
        verifier,
        revoked: Arc::new(Revoked::new(serials)),
        sessions: Mutex::new(Default::default()),
        uploads: Default::default(),
        reads: Default::default(),
        scrub: Default::default(),
        commit_gate: Default::default(),
        repo_params: pb::RepoParams {
            chunk_min: cfg.chunker.min,
            chunk_avg: cfg.chunker.avg,
            chunk_max: cfg.chunker.max,
            zstd_level: cfg.zstd_level,
            chunk_normalization: Some(cfg.chunker.normalization.into()),
        },
        repo,
    }))
}

/// Serve on `listener` until `shutdown` completes.
pub async fn run(
    ctx: Arc<Ctx>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServiceError> {
    let (cert_path, key_path) = ctx.pki.server_files();
    let read = |p: &Path| std::fs::read_to_string(p).map_err(|e| ServiceError::io("reading", p, e));
    let cfg = server_config(&read(&cert_path)?, &read(&key_path)?, ctx.verifier.clone())?;
    let acceptor = TlsAcceptor::from(Arc::new(cfg));

    let (conn_tx, conn_rx) = mpsc::channel(64);
    let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    let admission = Arc::new(Admission::default());
    let accept = tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(permit) = handshakes.clone().acquire_owned().await else {
                break;
            };
            let acceptor = acceptor.clone();
            let tx = conn_tx.clone();
            let admission = admission.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let _ = tcp.set_nodelay(true);
                match tokio::time::timeout(
                    HANDSHAKE_TIMEOUT,
                    acceptor.accept(BufferedTcp::new(tcp)),
                )
                .await
                {
                    Ok(Ok(mut tls)) => {
                        let der = tls.get_ref().1.peer_certificates().and_then(|c| c.first());
                        let holder = Holder::of(der.map(|c| c.as_ref()));
                        match admission.admit(&holder, peer.ip()) {
                            Some(ticket) => {
                                if let Some(age) = ticket.max_age() {
                                    tls.get_mut().0.close_after(age);
                                }
                                tls.get_mut().0.hold(ticket);
                                let _ = tx.send(Ok::<_, std::io::Error>(tls)).await;
                            }
                            // Dropped here: closed at once (see admission.rs).
                            None => tracing::warn!(
                                %peer,
                                ?holder,
                                "connection refused: this client (or, without a certificate, its address) already holds its cap of connections"
                            ),
                        }
                    }
                    Ok(Err(e)) => tracing::info!(%peer, "TLS handshake rejected: {e}"),
                    Err(_) => tracing::info!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });

    let refresh_ctx = ctx.clone();
    let refresh = tokio::spawn(async move {
        loop {
            tokio::time::sleep(CRL_REFRESH).await;
            // Temporary packs an ingest left when a collector was killed.
            let _ = refresh_ctx
                .blocking(|c| Ok(c.repo.sweep_temporary_packs()))
                .await;
            let c = refresh_ctx.clone();
            if let Err(e) = refresh_ctx.blocking(move |_| c.publish_crl()).await {
                tracing::error!("re-signing the CRL failed: {e}");
            }
        }
    });

    let scrubs = tokio::spawn(crate::scrub_schedule::run(ctx.clone()));

    let agent = pb::agent_service_server::AgentServiceServer::new(AgentSvc { ctx: ctx.clone() })
        .max_decoding_message_size(MAX_MESSAGE);
    let admin = pb::admin_service_server::AdminServiceServer::new(AdminSvc { ctx: ctx.clone() })
        .max_decoding_message_size(MAX_MESSAGE);
    let enroll =
        pb::enroll_service_server::EnrollServiceServer::new(EnrollSvc { ctx: ctx.clone() })
            .max_decoding_message_size(64 * 1024);
    let result = Server::builder()
        .max_connection_age(MAX_CONNECTION_AGE)
        .max_concurrent_streams(Some(128))
        // Large HTTP/2 windows: the default 64 KiB stream window would cap a
        // 150 ms RTT link at ~430 KB/s (PBS's round trip per chunk, by another name).
        .initial_stream_window_size(Some(WINDOW))
        .initial_connection_window_size(Some(2 * WINDOW))
        .max_frame_size(Some(MAX_FRAME))
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .add_service(tonic::service::interceptor::InterceptedService::new(
            agent,
            interceptor(ctx.revoked.clone(), Want::Agent),
        ))
        .add_service(tonic::service::interceptor::InterceptedService::new(
            admin,
            interceptor(ctx.revoked.clone(), Want::Admin),
        ))
        .add_service(enroll)
        .serve_with_incoming_shutdown(ReceiverStream::new(conn_rx), shutdown)
        .await
        .map_err(|e| ServiceError::Internal(format!("server: {e}")));
    accept.abort();
    refresh.abort();
    scrubs.abort();
    result
}
