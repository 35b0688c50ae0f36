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
        let (sites, agents, snaps) = self
            .ctx
            .blocking(|c| Ok((c.state.sites()?, c.state.agents()?, c.repo.snapshots()?)))
            .await?;
        let mut last: std::collections::HashMap<String, i64> = Default::default();
        for (_, s) in snaps {
            if let Some(site) = s.site {
                let e = last.entry(site).or_default();
                *e = (*e).max(s.time_ns);
            }
        }
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
                    last_snapshot_ns: last.get(&site).copied().unwrap_or(0),
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

    async fn list_snapshots(
        &self,
        req: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<pb::ListSnapshotsResponse>, Status> {
        let r = req.into_inner();
        check(r.protocol)?;
        let all = self.ctx.blocking(|c| Ok(c.repo.snapshots()?)).await?;
        let snapshots = all
            .into_iter()
            .filter(|(_, s)| r.site.is_empty() || s.site.as_deref() == Some(r.site.as_str()))
            .filter(|(_, s)| {
                r.agent_id.is_empty() || s.agent.as_deref() == Some(r.agent_id.as_str())
            })
            .map(|(id, s)| pb::SnapshotInfo {
                id: id.0.to_vec(),
                partial: s.is_partial(),
                site: s.site.unwrap_or_default(),
                agent_id: s.agent.unwrap_or_default(),
                source: s.source.unwrap_or_default(),
                time_ns: s.time_ns,
                files: s.stats.files,
                bytes: s.stats.bytes,
                new_bytes: s.stats.new_bytes,
                paths: s.paths,
                hostname: s.hostname,
            })
            .collect();
        Ok(Response::new(pb::ListSnapshotsResponse { snapshots }))
    }

    async fn restore(
        &self,
        req: Request<pb::RestoreRequest>,
    ) -> Result<Response<pb::RestoreResponse>, Status> {
        let r = req.into_inner();
        check(r.protocol)?;
        if !r.target.starts_with('/') {
            return Err(Status::invalid_argument(
                "target must be an absolute directory on the agent",
            ));
        }
        let job = self
            .ctx
            .blocking(move |c| {
                let (snap_id, snap) = c.repo.find_snapshot(&r.snapshot)?;
                let site = require_agent(c, &r.to_agent)?;
                // The target site receives the snapshot's blobs: it may read them
                // (and later reference them), as if it had uploaded them.
                grant_snapshot(c, &site, &snap.tree)?;
                let job_id =
                    c.state
                        .add_job("restore", &r.to_agent, &snap_id.0, &r.target, &r.path)?;
                let job = c
                    .state
                    .jobs(Some(job_id))?
                    .pop()
                    .ok_or_else(|| ServiceError::Internal("job vanished".into()))?;
                Ok(job)
            })
            .await?;
        let cmd = restore_command(&self.ctx, &job)?;
        let pushed = self.ctx.push(&job.agent_id, cmd).await;
        tracing::info!(job = job.job_id, agent = %job.agent_id, pushed, "restore job created");
        Ok(Response::new(pb::RestoreResponse { job_id: job.job_id }))
    }

    async fn list_jobs(
        &self,
        req: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        let r = req.into_inner();
        check(r.protocol)?;
        let id = (r.job_id != 0).then_some(r.job_id);
        let rows = self.ctx.blocking(move |c| c.state.jobs(id)).await?;
        let jobs = rows
            .into_iter()
            .map(|j| pb::JobInfo {
                job_id: j.job_id,
                kind: j.kind,
                agent_id: j.agent_id,
                state: j.state,
                message: j.message,
                files: j.files,
                bytes: j.bytes,
                created_ns: j.created_ns,
                snapshot_id: j.snapshot,
            })
            .collect();
        Ok(Response::new(pb::ListJobsResponse { jobs }))
    }

    async fn add_source(
        &self,
        req: Request<pb::AddSourceRequest>,
    ) -> Result<Response<pb::AddSourceResponse>, Status> {
        let r = req.into_inner();
        check(r.protocol)?;
        convert::site_name(&r.name).map_err(|_| {
            Status::invalid_argument("source name: 1-64 characters of a-z, 0-9 and '-'")
        })?;
        if r.paths.is_empty()
            || r.paths.len() > 100
            || r.paths
                .iter()
                .any(|p| !p.starts_with('/') || p.len() > 4096)
        {
            return Err(Status::invalid_argument(
                "a source needs 1-100 absolute paths",
            ));
        }
        if r.excludes.len() > 100 || r.excludes.iter().any(|e| e.len() > 1024) {
            return Err(Status::invalid_argument(
                "at most 100 excludes of at most 1024 bytes",
            ));
        }
        if !r.schedule.is_empty() {
            use std::str::FromStr;
            cron::Schedule::from_str(&r.schedule).map_err(|e| {
                Status::invalid_argument(format!(
                    "schedule {:?}: {e} (format: sec min hour day month weekday)",
                    r.schedule
                ))
            })?;
        }
        let agent_id = r.agent_id.clone();
        let source = pb::Source {
            name: r.name,
            paths: r.paths,
            excludes: r.excludes,
            schedule: r.schedule,
            realtime: r.realtime,
        };
        self.ctx
            .blocking(move |c| {
                require_agent(c, &agent_id)?;
                c.state.put_source(&agent_id, &source)
            })
            .await?;
        self.push_sources(&r.agent_id).await?;
        Ok(Response::new(pb::AddSourceResponse {}))
    }

    async fn backup_now(
        &self,
        req: Request<pb::BackupNowRequest>,
    ) -> Result<Response<pb::BackupNowResponse>, Status> {
        let r = req.into_inner();
        check(r.protocol)?;
        let (agent_id, source) = (r.agent_id.clone(), r.source.clone());
        let job_id = self
            .ctx
            .blocking(move |c| {
                require_agent(c, &agent_id)?;
                let sources = c.state.sources(&agent_id)?;
                if sources.is_empty()
                    || (!source.is_empty() && !sources.iter().any(|s| s.name == source))
                {
                    return Err(ServiceError::NotFound(format!(
                        "source {source:?} of agent {agent_id} (add one with `hubvault source add`)"
                    )));
                }
                c.state.add_job("backup", &agent_id, &[], "", &source)
            })
            .await?;
        let pushed = self
            .ctx
            .push(
                &r.agent_id,
                pb::collector_command::Command::BackupNow(pb::BackupNow {
                    source: r.source,
                    job_id,
                }),
            )
            .await;
        if !pushed {
            tracing::info!(job = job_id, "agent offline: backup job waits for it");
        }
        Ok(Response::new(pb::BackupNowResponse { job_id }))
    }
}

impl AdminSvc {
    /// Push the current sources of `agent_id` if it is online.
    async fn push_sources(&self, agent_id: &str) -> Result<(), Status> {
        let id = agent_id.to_string();
        let sources = self.ctx.blocking(move |c| c.state.sources(&id)).await?;
        self.ctx
            .push(
                agent_id,
                pb::collector_command::Command::Sources(pb::Sources { sources }),
            )
            .await;
        Ok(())
    }
}

/// The site of `agent_id`, or NOT_FOUND if it is unknown or revoked.
fn require_agent(c: &Ctx, agent_id: &str) -> Result<String, ServiceError> {
    c.state
        .agent_site(agent_id)?
        .ok_or_else(|| ServiceError::NotFound(format!("agent {agent_id} (or it is revoked)")))
}

/// Record every blob below `root` as held by `site` (in batches; memory
/// bounded by one directory's listing and one batch).
fn grant_snapshot(c: &Ctx, site: &str, root: &repo_format::Id) -> Result<(), ServiceError> {
    let mut stack = vec![*root];
    let mut seen = std::collections::HashSet::new();
    let mut batch = Vec::new();
    while let Some(t) = stack.pop() {
        if !seen.insert(t) {
            continue;
        }
        batch.push(t.0.to_vec());
        for e in c.repo.read_tree(&t)? {
            if let Some(s) = e.subtree {
                stack.push(s);
            }
            batch.extend(e.chunks.iter().map(|c| c.0.to_vec()));
        }
        if batch.len() >= 4096 {
            c.state.add_site_blobs(site, &std::mem::take(&mut batch))?;
        }
    }
    c.state.add_site_blobs(site, &batch)
}

/// The command that hands `job` to its agent.
pub fn restore_command(
    c: &Ctx,
    job: &crate::state::JobRow,
) -> Result<pb::collector_command::Command, ServiceError> {
    let id = repo_format::Id::from_slice(&job.snapshot)
        .ok_or_else(|| ServiceError::Internal("job snapshot id".into()))?;
    let (_, snap) = c.repo.find_snapshot(&id.to_hex())?;
    Ok(pb::collector_command::Command::Restore(pb::RestoreJob {
        job_id: job.job_id,
        snapshot_id: job.snapshot.clone(),
        tree: snap.tree.0.to_vec(),
        target: job.target.clone(),
        path: job.path.clone(),
    }))
}
