//! `hubvault-agent enroll`: turn a one-time token into an identity.
//!
//! The token (`hv1.` + base64url of token id ‖ secret ‖ CA certificate) pins
//! the collector's CA for this first connection. The key pair is generated
//! here; only a CSR leaves the machine. The repository keys come back sealed
//! under the token's secret, which never leaves the machine either.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use base64::Engine;
use proto::limits::PROTOCOL;
use proto::pb;
use proto::pb::enroll_service_client::EnrollServiceClient;
use repo_format::config::{ChunkerParams, RepoConfig};
use repo_format::keyring::{KdfParams, unwrap_enrollment};
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

use crate::SERVER_NAME;
use crate::state::{AgentConfig, StateDir};

/// The parts of an enrollment token.
pub struct Token {
    /// Public half, sent to the collector.
    pub id: [u8; 16],
    /// Secret half: unwraps the keys.
    pub secret: [u8; 32],
    /// The collector's CA certificate (DER).
    pub ca_der: Vec<u8>,
}

/// Parse a token string.
pub fn parse_token(s: &str) -> Result<Token> {
    let body = s
        .trim()
        .strip_prefix("hv1.")
        .context("not a hubvault enrollment token (expected it to start with hv1.)")?;
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(body)
        .context("enrollment token is damaged (bad base64)")?;
    if raw.len() < 48 + 64 {
        bail!("enrollment token is too short (copied partly?)");
    }
    let mut id = [0u8; 16];
    let mut secret = [0u8; 32];
    id.copy_from_slice(&raw[..16]);
    secret.copy_from_slice(&raw[16..48]);
    Ok(Token {
        id,
        secret,
        ca_der: raw[48..].to_vec(),
    })
}

fn der_to_pem(der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        pem.push_str(&String::from_utf8_lossy(line));
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    pem
}

/// Longest wait before trying an enrollment again (1, 2, 4, 8 s: 15 s in all).
const MAX_ENROLL_DELAY: Duration = Duration::from_secs(8);

/// Enroll with the collector at `collector` using `token`, writing the identity into `state`.
pub async fn enroll(
    collector: &str,
    token: &str,
    state: &Path,
    kdf: KdfParams,
) -> Result<AgentConfig> {
    let st = StateDir::new(state);
    if st.is_enrolled() {
        bail!(
            "{} already holds an enrolled agent; use another --state directory",
            state.display()
        );
    }
    let token = parse_token(token)?;
    let ca_pem = der_to_pem(&token.ca_der);
    let key = rcgen::KeyPair::generate().context("generating the agent's key pair")?;
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())
        .and_then(|p| p.serialize_request(&key))
        .context("building the CSR")?;
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem.as_bytes()))
        .domain_name(SERVER_NAME);
    let endpoint = Channel::from_shared(collector.to_string())
        .with_context(|| format!("bad collector address {collector}"))?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(10));
    let request = pb::EnrollRequest {
        protocol: PROTOCOL,
        token_id: token.id.to_vec(),
        csr_der: csr.der().to_vec(),
        hostname: repo_format::backup::hostname(),
    };
    // A connection the collector closes before answering (its cap of
    // certificate-less connections from this address is full: many agents
    // enrolling at once behind one NAT) is tried again, a few times. The
    // token is spent only by an answered call; a lost answer makes the
    // retry fail with "token already used", as clearly as before.
    let mut delay = Duration::from_secs(1);
    let resp = loop {
        let channel = endpoint.connect().await.with_context(|| {
            format!("connecting to {collector} (is the token's CA this collector's?)")
        })?;
        match EnrollServiceClient::new(channel)
            .enroll(request.clone())
            .await
        {
            Ok(r) => break r.into_inner(),
            Err(s) if delay <= MAX_ENROLL_DELAY && crate::control::connection_cut(s.code()) => {
                tracing::warn!("enrollment call cut ({s}); trying again in {delay:?}");
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
            Err(s) => return Err(s).context("enrollment refused"),
        }
    };
    let keys = unwrap_enrollment(&resp.wrapped_keys, &token.secret)
        .context("the repository keys in the reply do not open with this token")?;
    let repo = resp.repo.unwrap_or_default();
    let cfg = AgentConfig {
        collector: collector.to_string(),
        site: resp.site,
        agent_id: resp.agent_id,
        chunk_min: repo.chunk_min,
        chunk_avg: repo.chunk_avg,
        chunk_max: repo.chunk_max,
        chunk_normalization: match repo.chunk_normalization {
            Some(n) => u8::try_from(n).context("chunk normalisation level out of range")?,
            None => repo_format::consts::LEGACY_NORMALIZATION,
        },
        zstd_level: repo.zstd_level,
    };
    let mut pass = [0u8; 24];
    repo_format::crypto::fill_random(&mut pass)?;
    let pass = repo_format::id::hex_encode(&pass);
    std::fs::create_dir_all(state).with_context(|| format!("creating {}", state.display()))?;
    st.write("agent.key", key.serialize_pem().as_bytes(), true)?;
    st.write("agent.pem", resp.certificate_pem.as_bytes(), false)?;
    st.write("ca.pem", resp.ca_pem.as_bytes(), false)?;
    st.write("passphrase", pass.as_bytes(), true)?;
    // The spool: a local repository with the organisation's keys and chunking,
    // so the agent's chunks and ids are exactly the collector's.
    let mut rc = RepoConfig::new()?;
    rc.chunker = ChunkerParams {
        min: cfg.chunk_min,
        avg: cfg.chunk_avg,
        max: cfg.chunk_max,
        normalization: cfg.chunk_normalization,
    };
    rc.zstd_level = cfg.zstd_level;
    repo_format::Repository::init_with_keys(&st.path("spool"), pass.as_bytes(), kdf, rc, &keys)
        .context("creating the local spool repository")?;
    // agent.json last: its presence means "enrolled".
    st.write("agent.json", &serde_json::to_vec_pretty(&cfg)?, false)?;
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    #[test]
    fn bad_tokens() {
        assert!(super::parse_token("nope").is_err());
        assert!(super::parse_token("hv1.!!!").is_err());
        assert!(super::parse_token("hv1.AAAA").is_err());
    }
}
