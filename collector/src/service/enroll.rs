//! `Enroll`: a one-time token and a CSR become an agent certificate.
//!
//! The CSR is checked (its signature proves the agent holds the key) before
//! the token is consumed; then the token is consumed and the agent recorded
//! in one transaction; then the certificate is issued with fields chosen
//! entirely here. The repository keys travel sealed under the token's secret
//! half, which the collector never sees.

use std::sync::Arc;

use proto::convert;
use proto::pb;
use tonic::{Request, Response, Status};

use crate::Ctx;
use crate::error::ServiceError;
use crate::pki::{AGENT_CERT_TTL, Pki, Role};

/// Largest CSR accepted, in bytes.
const MAX_CSR: usize = 16 * 1024;

/// The enrollment service.
pub struct EnrollSvc {
    /// Shared state.
    pub ctx: Arc<Ctx>,
}

#[tonic::async_trait]
impl pb::enroll_service_server::EnrollService for EnrollSvc {
    async fn enroll(
        &self,
        req: Request<pb::EnrollRequest>,
    ) -> Result<Response<pb::EnrollResponse>, Status> {
        let r = req.into_inner();
        convert::protocol(r.protocol).map_err(ServiceError::from)?;
        if r.token_id.len() != 16 {
            return Err(Status::invalid_argument("token_id must be 16 bytes"));
        }
        if r.csr_der.len() > MAX_CSR {
            return Err(Status::invalid_argument(format!(
                "CSR over {MAX_CSR} bytes"
            )));
        }
        let hostname: String = r.hostname.chars().take(255).collect();
        let resp = self
            .ctx
            .blocking(move |ctx| {
                let public_key = Pki::csr_public_key(&r.csr_der)?;
                let (token, agent_id, serial) = ctx.state.enroll(&r.token_id, &hostname)?;
                let role = Role::Agent {
                    site: token.site.clone(),
                    agent_id: agent_id.clone(),
                };
                let cert = ctx
                    .pki
                    .issue_client(&role, serial, AGENT_CERT_TTL, &public_key)?;
                tracing::info!(agent = %agent_id, site = %token.site, serial, "agent enrolled");
                Ok(pb::EnrollResponse {
                    certificate_pem: cert,
                    ca_pem: ctx.pki.ca_pem().to_string(),
                    site: token.site,
                    agent_id,
                    wrapped_keys: token.wrapped_keys,
                    repo: Some(ctx.repo_params),
                    certificate_ttl_secs: AGENT_CERT_TTL.whole_seconds().max(0) as u64,
                })
            })
            .await?;
        Ok(Response::new(resp))
    }
}
