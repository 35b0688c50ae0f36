//! What central IT calls (role "admin").

use std::sync::Arc;

use proto::convert;
use proto::limits::MAX_TOKEN_TTL_SECS;
use proto::pb;
use tonic::{Request, Response, Status};

use crate::Ctx;
use crate::error::ServiceError;
use crate::state::now_ns;

/// The admin service.
pub struct AdminSvc {
    /// Shared state.
    pub ctx: Arc<Ctx>,
}

fn check(v: u32) -> Result<(), Status> {
    convert::protocol(v).map_err(|e| ServiceError::from(e).into())
}

#[tonic::async_trait]
impl pb::admin_service_server::AdminService for AdminSvc {
    async fn add_site(
        &self,
        req: Request<pb::AddSiteRequest>,
    ) -> Result<Response<pb::AddSiteResponse>, Status> {
        let r = req.into_inner();
        check(r.protocol)?;
        let name = convert::site_name(&r.name).map_err(ServiceError::from)?;
        self.ctx.blocking(move |c| c.state.add_site(&name)).await?;
        Ok(Response::new(pb::AddSiteResponse {}))
    }

    async fn create_enroll_token(
        &self,
        req: Request<pb::CreateEnrollTokenRequest>,
    ) -> Result<Response<pb::CreateEnrollTokenResponse>, Status> {
        let r = req.into_inner();
        check(r.protocol)?;
        if r.token_id.len() != 16 {
            return Err(Status::invalid_argument("token_id must be 16 bytes"));
        }
        if r.ttl_secs == 0 || r.ttl_secs > MAX_TOKEN_TTL_SECS {
            return Err(Status::invalid_argument(format!(
                "ttl must be 1..={MAX_TOKEN_TTL_SECS} seconds"
            )));
        }
        if r.wrapped_keys.len() > 1024 {
            return Err(Status::invalid_argument("wrapped keys too long"));
        }
        let site = convert::site_name(&r.site).map_err(ServiceError::from)?;
        let expires = now_ns().saturating_add((r.ttl_secs as i64).saturating_mul(1_000_000_000));
        let ca = self
            .ctx
            .blocking(move |c| {
                if !c.state.site_exists(&site)? {
                    return Err(ServiceError::NotFound(format!(
                        "site {site} (add it with `hubvault site add`)"
                    )));
                }
                c.state
                    .add_token(&r.token_id, &site, expires, &r.wrapped_keys)?;
                c.pki.ca_der()
            })
            .await?;
        Ok(Response::new(pb::CreateEnrollTokenResponse {
            expires_ns: expires,
            ca_sha256: blake3::hash(&ca).as_bytes().to_vec(),
        }))
    }

    async fn list_agents(
        &self,
        req: Request<pb::ListAgentsRequest>,
    ) -> Result<Response<pb::ListAgentsResponse>, Status> {
        check(req.get_ref().protocol)?;
        let rows = self.ctx.blocking(|c| c.state.agents()).await?;
        let online = self
            .ctx
            .sessions
            .lock()
            .map(|s| s.keys().cloned().collect::<Vec<_>>())
            .unwrap_or_default();
        let agents = rows
            .into_iter()
            .map(|a| pb::AgentInfo {
                online: online.contains(&a.agent_id),
                agent_id: a.agent_id,
                site: a.site,
                hostname: a.hostname,
                last_seen_ns: a.last_seen_ns,
                revoked: a.revoked_ns.is_some(),
                serial: format!("{:x}", a.serial),
            })
            .collect();
        Ok(Response::new(pb::ListAgentsResponse { agents }))
    }

    async fn status(
        &self,
        req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        check(req.get_ref().protocol)?;
        let (sites, agents) = self
            .ctx
            .blocking(|c| Ok((c.state.sites()?, c.state.agents()?)))
            .await?;
        let online = self
            .ctx
            .sessions
            .lock()
            .map(|s| s.keys().cloned().collect::<Vec<_>>())
            .unwrap_or_default();
        let sites = sites
            .into_iter()
            .map(|site| {
                let mine: Vec<_> = agents
                    .iter()
                    .filter(|a| a.site == site && a.revoked_ns.is_none())
                    .collect();
                pb::SiteStatus {
                    agents: mine.len() as u32,
                    agents_online: mine.iter().filter(|a| online.contains(&a.agent_id)).count()
                        as u32,
                    // Snapshots arrive with the data path (issue 3).
                    last_snapshot_ns: 0,
                    site,
                }
            })
            .collect();
        Ok(Response::new(pb::StatusResponse { sites }))
    }

    async fn revoke_agent(
        &self,
        req: Request<pb::RevokeAgentRequest>,
    ) -> Result<Response<pb::RevokeAgentResponse>, Status> {
        let r = req.into_inner();
        check(r.protocol)?;
        let id = r.agent_id.clone();
        let serial = self
            .ctx
            .blocking(move |c| {
                let (serial, _) = c.state.revoke(&id)?;
                c.revoked.insert(serial);
                c.publish_crl()?;
                Ok(serial)
            })
            .await?;
        // Close its live control stream now, not at its next call.
        let tx = self
            .ctx
            .sessions
            .lock()
            .ok()
            .and_then(|mut s| s.remove(&r.agent_id));
        if let Some(tx) = tx {
            let _ = tx
                .send(Ok(pb::CollectorCommand {
                    command: Some(pb::collector_command::Command::Revoked(pb::Revoked {
                        reason: "revoked by an administrator".into(),
                    })),
                }))
                .await;
            let _ = tx
                .send(Err(Status::permission_denied("certificate revoked")))
                .await;
        }
        tracing::info!(agent = %r.agent_id, serial, "agent revoked");
        Ok(Response::new(pb::RevokeAgentResponse {
            serial: format!("{serial:x}"),
        }))
    }
}
