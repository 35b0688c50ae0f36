//! What central IT calls (role "admin"): sites, tokens, agents, status (with
//! the agents' recovery points), snapshots, restores, jobs, sources and their
//! policies, prune (retention: forget snapshots, never packs) and scrub
//! (read every pack back; set damaged ones aside).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use proto::convert;
use proto::limits::MAX_TOKEN_TTL_SECS;
use proto::pb;
use tonic::{Request, Response, Status};

use crate::Ctx;
use crate::error::ServiceError;
use crate::policy::{self, SitePolicy, SourcePolicy};
use crate::retention::{self, Candidate, Decision};
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
        let (sites, agents, snaps, lags, defined, scrub) = self
            .ctx
            .blocking(|c| {
                let agents = c.state.agents()?;
                let mut defined = Vec::new();
                for a in agents.iter().filter(|a| a.revoked_ns.is_none()) {
                    for s in c.state.sources(&a.agent_id)? {
                        defined.push((a.agent_id.clone(), s.name));
                    }
                }
                Ok((
                    c.state.sites()?,
                    agents,
                    c.repo.snapshots()?,
                    c.state.lags()?,
                    defined,
                    crate::scrub_schedule::info(c)?,
                ))
            })
            .await?;
        let mut last: HashMap<String, i64> = Default::default();
        // Newest snapshot per (agent, source).
        let mut last_of: HashMap<(String, String), i64> = Default::default();
        for (_, s) in snaps {
            if let Some(site) = s.site {
                let e = last.entry(site).or_default();
                *e = (*e).max(s.time_ns);
            }
            if let (Some(agent), Some(source)) = (s.agent, s.source) {
                let e = last_of.entry((agent, source)).or_default();
                *e = (*e).max(s.time_ns);
            }
        }
        // One RPO line per (agent, source) that is defined, reported or has a
        // snapshot, for agents not revoked.
        let mut rpo: BTreeMap<(String, String), pb::SourceRpo> = BTreeMap::new();
        let keys = defined
            .into_iter()
            .chain(last_of.keys().cloned())
            .chain(lags.iter().map(|l| (l.agent_id.clone(), l.source.clone())));
        for (agent_id, source) in keys {
            rpo.entry((agent_id.clone(), source.clone()))
                .or_insert_with(|| pb::SourceRpo {
                    last_snapshot_ns: last_of
                        .get(&(agent_id.clone(), source.clone()))
                        .copied()
                        .unwrap_or(0),
                    agent_id,
                    source,
                    ..Default::default()
                });
        }
        for l in lags {
            if let Some(r) = rpo.get_mut(&(l.agent_id, l.source)) {
                r.oldest_change_age_secs = l.oldest_change_age_secs;
                r.pending_bytes = l.pending_bytes;
                r.note = l.note;
                r.reported_ns = l.reported_ns;
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
                let rpo = rpo
                    .values()
                    .filter(|r| mine.iter().any(|a| a.agent_id == r.agent_id))
                    .cloned()
                    .collect();
                pb::SiteStatus {
                    rpo,
                    agents: mine.len() as u32,
                    agents_online: mine.iter().filter(|a| online.contains(&a.agent_id)).count()
                        as u32,
                    last_snapshot_ns: last.get(&site).copied().unwrap_or(0),
                    site,
                }
            })
            .collect();
        Ok(Response::new(pb::StatusResponse {
            sites,
            scrub: Some(scrub),
        }))
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
            .map(|(id, s)| snapshot_info(id, s))
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
        let agent_id = r.agent_id.clone();
        let source = pb::Source {
            name: r.name,
            paths: r.paths,
            excludes: r.excludes,
            schedule: r.schedule,
            realtime: r.realtime,
            priority: r.priority,
            bandwidth: r.bandwidth,
            quiet_ms: r.quiet_ms,
            max_delay_ms: r.max_delay_ms,
            reconcile_secs: r.reconcile_secs,
            jitter_secs: r.jitter_secs,
            retention: r.retention,
        };
        policy::validate_source(&source.schedule, &SourcePolicy::of(&source))?;
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

    async fn set_policy(
        &self,
        req: Request<pb::SetPolicyRequest>,
    ) -> Result<Response<pb::SetPolicyResponse>, Status> {
        let r = req.into_inner();
        check(r.protocol)?;
        let source_form = !r.agent_id.is_empty() || !r.source.is_empty();
        let agents = if source_form {
            if r.agent_id.is_empty() || r.source.is_empty() {
                return Err(Status::invalid_argument(
                    "a source's policy needs both agent_id and source",
                ));
            }
            if r.timezone.is_some() || r.agent_bandwidth.is_some() {
                return Err(Status::invalid_argument(
                    "time zone and agent bandwidth are site settings: give only the site",
                ));
            }
            let agent = r.agent_id.clone();
            self.ctx.blocking(move |c| set_source_policy(c, r)).await?;
            vec![agent]
        } else {
            if r.site.is_empty() {
                return Err(Status::invalid_argument(
                    "name a site, or an agent and one of its sources",
                ));
            }
            let source_only = r.schedule.is_some()
                || r.realtime.is_some()
                || r.priority.is_some()
                || r.bandwidth.is_some()
                || r.quiet_ms.is_some()
                || r.max_delay_ms.is_some()
                || r.reconcile_secs.is_some()
                || r.jitter_secs.is_some();
            if source_only {
                return Err(Status::invalid_argument(
                    "schedule, real-time, priority, bandwidth, quiet, max-delay, reconcile and \
                     jitter are source settings: give an agent and a source",
                ));
            }
            self.ctx.blocking(move |c| set_site_policy(c, r)).await?
        };
        // Agents pick the change up without a restart.
        for a in &agents {
            self.push_sources(a).await?;
        }
        Ok(Response::new(pb::SetPolicyResponse {}))
    }

    async fn prune(
        &self,
        req: Request<pb::PruneRequest>,
    ) -> Result<Response<pb::PruneResponse>, Status> {
        let r = req.into_inner();
        check(r.protocol)?;
        let (decisions, forgotten) = self.ctx.blocking(move |c| prune(c, &r)).await?;
        Ok(Response::new(pb::PruneResponse {
            decisions,
            forgotten,
        }))
    }

    type ScrubStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<pb::ScrubProgress, Status>> + Send + 'static>,
    >;

    /// The scrub runs on a blocking thread of its own to the end, whether
    /// or not the caller keeps listening: progress it cannot deliver at once
    /// is dropped (a slow client never holds the scrub back), the report is
    /// the stream's last message.
    async fn scrub(
        &self,
        req: Request<pb::ScrubRequest>,
    ) -> Result<Response<Self::ScrubStream>, Status> {
        let r = req.into_inner();
        check(r.protocol)?;
        crate::scrub::validate_rate(r.bytes_per_sec)?;
        if self.ctx.scrub.is_running() {
            return Err(crate::scrub::busy().into());
        }
        let opts = crate::scrub::Options {
            dry_run: r.dry_run,
            bytes_per_sec: r.bytes_per_sec,
            trigger: crate::scrub::Trigger::Admin,
        };
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        let ctx = self.ctx.clone();
        // Progress is dropped while the client is behind; the report is
        // sent by an async task, so a client that stopped reading holds no
        // blocking thread once the scrub is over.
        let progress_tx = tx.clone();
        let scrubbing = tokio::task::spawn_blocking(move || {
            let mut progress = |p: &pb::ScrubProgress| {
                let _ = progress_tx.try_send(Ok(p.clone()));
            };
            crate::scrub::scrub(&ctx, opts, &mut progress)
        });
        tokio::spawn(async move {
            let last = match scrubbing.await {
                Ok(res) => res
                    .map(|report| pb::ScrubProgress {
                        report: Some(report),
                        ..Default::default()
                    })
                    .map_err(Status::from),
                Err(e) => Err(Status::internal(format!("scrub task failed: {e}"))),
            };
            let _ = tx.send(last).await;
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn scrub_schedule(
        &self,
        req: Request<pb::ScrubScheduleRequest>,
    ) -> Result<Response<pb::ScrubScheduleInfo>, Status> {
        let r = req.into_inner();
        check(r.protocol)?;
        let info = self
            .ctx
            .blocking(move |c| crate::scrub_schedule::update(c, &r))
            .await?;
        Ok(Response::new(info))
    }
}

impl AdminSvc {
    /// Push the current sources and agent policy of `agent_id` if it is online.
    async fn push_sources(&self, agent_id: &str) -> Result<(), Status> {
        let online = self
            .ctx
            .sessions
            .lock()
            .is_ok_and(|s| s.contains_key(agent_id));
        if !online {
            return Ok(());
        }
        let id = agent_id.to_string();
        let sources = self
            .ctx
            .blocking(move |c| c.state.agent_sources(&id))
            .await?;
        self.ctx
            .push(agent_id, pb::collector_command::Command::Sources(sources))
            .await;
        Ok(())
    }
}

/// Apply a site-form SetPolicy request to `site`'s policy; returns the
/// agents of the site (to push the change to).
fn set_site_policy(c: &Ctx, r: pb::SetPolicyRequest) -> Result<Vec<String>, ServiceError> {
    let site = convert::site_name(&r.site).map_err(ServiceError::from)?;
    let mut p = c.state.site_policy(&site).map_err(|e| match e {
        ServiceError::NotFound(_) => {
            ServiceError::NotFound(format!("site {site} (add it with `hubvault site add`)"))
        }
        e => e,
    })?;
    if let Some(tz) = r.timezone {
        policy::parse_timezone(&tz)?;
        p.timezone = tz;
    }
    if let Some(b) = &r.agent_bandwidth {
        p.agent_bandwidth = b.into();
    }
    if let Some(ret) = &r.retention {
        p.retention = ret.into();
    }
    policy::validate_site(&p)?;
    c.state.set_site_policy(&site, &p)?;
    Ok(c.state
        .agents()?
        .into_iter()
        .filter(|a| a.site == site && a.revoked_ns.is_none())
        .map(|a| a.agent_id)
        .collect())
}

/// Apply a source-form SetPolicy request to that source.
fn set_source_policy(c: &Ctx, r: pb::SetPolicyRequest) -> Result<(), ServiceError> {
    let site = require_agent(c, &r.agent_id)?;
    if !r.site.is_empty() && r.site != site {
        return Err(ServiceError::Invalid(format!(
            "agent {} belongs to site {site}, not {}",
            r.agent_id, r.site
        )));
    }
    let mut s = c
        .state
        .sources(&r.agent_id)?
        .into_iter()
        .find(|s| s.name == r.source)
        .ok_or_else(|| {
            ServiceError::NotFound(format!(
                "source {:?} of agent {} (add it with `hubvault source add`)",
                r.source, r.agent_id
            ))
        })?;
    if let Some(v) = r.schedule {
        s.schedule = v;
    }
    if let Some(v) = r.realtime {
        s.realtime = v;
    }
    if let Some(v) = r.priority {
        s.priority = v;
    }
    if r.bandwidth.is_some() {
        s.bandwidth = r.bandwidth;
    }
    if let Some(v) = r.quiet_ms {
        s.quiet_ms = v;
    }
    if let Some(v) = r.max_delay_ms {
        s.max_delay_ms = v;
    }
    if let Some(v) = r.reconcile_secs {
        s.reconcile_secs = v;
    }
    if let Some(v) = r.jitter_secs {
        s.jitter_secs = v;
    }
    if r.retention.is_some() {
        s.retention = r.retention;
    }
    policy::validate_source(&s.schedule, &SourcePolicy::of(&s))?;
    c.state.put_source(&r.agent_id, &s)
}

/// What `prune` decides (and, unless `dry_run`, does): decisions sorted by
/// (site, agent, source, time), and how many snapshots were forgotten.
fn prune(c: &Ctx, r: &pb::PruneRequest) -> Result<(Vec<pb::PruneDecision>, u32), ServiceError> {
    let now = now_ns();
    // Snapshots a restore job still needs: never forgotten.
    let mut in_use: HashMap<Vec<u8>, u64> = HashMap::new();
    for j in c.state.jobs(None)? {
        let finished =
            j.state == pb::JobState::Done as i32 || j.state == pb::JobState::Failed as i32;
        if !finished && !j.snapshot.is_empty() {
            in_use.entry(j.snapshot).or_insert(j.job_id);
        }
    }
    type Group = Vec<(repo_format::Id, repo_format::snapshot::Snapshot)>;
    let mut groups: BTreeMap<(String, String, String), Group> = BTreeMap::new();
    for (id, s) in c.repo.snapshots()? {
        let key = (
            s.site.clone().unwrap_or_default(),
            s.agent.clone().unwrap_or_default(),
            s.source.clone().unwrap_or_default(),
        );
        let wanted = (r.site.is_empty() || r.site == key.0)
            && (r.agent_id.is_empty() || r.agent_id == key.1)
            && (r.source.is_empty() || r.source == key.2);
        if wanted {
            groups.entry(key).or_default().push((id, s));
        }
    }
    let mut sites: HashMap<String, SitePolicy> = HashMap::new();
    let mut sources: HashMap<String, Vec<pb::Source>> = HashMap::new();
    let mut out = Vec::new();
    let mut forget = Vec::new();
    for ((site, agent, source), mut snaps) in groups {
        if !sites.contains_key(&site) {
            let p = match c.state.site_policy(&site) {
                Ok(p) => p,
                Err(ServiceError::NotFound(_)) => SitePolicy::default(),
                Err(e) => return Err(e),
            };
            sites.insert(site.clone(), p);
        }
        let site_policy = sites.get(&site).cloned().unwrap_or_default();
        if !sources.contains_key(&agent) {
            sources.insert(agent.clone(), c.state.sources(&agent)?);
        }
        let own = sources
            .get(&agent)
            .and_then(|l| l.iter().find(|s| s.name == source))
            .map(|s| SourcePolicy::of(s).retention)
            .unwrap_or_default();
        let rules = if own.is_empty() {
            site_policy.retention
        } else {
            own
        };
        snaps.sort_by_key(|(id, s)| (s.time_ns, *id));
        let cands: Vec<Candidate> = snaps
            .iter()
            .map(|(id, s)| Candidate {
                id: *id,
                time_ns: s.time_ns,
            })
            .collect();
        let decisions = retention::decide(&cands, &rules, now, site_policy.tz());
        for ((id, s), mut d) in snaps.into_iter().zip(decisions) {
            if !d.keep
                && let Some(job) = in_use.get(id.0.as_slice())
            {
                d = Decision {
                    keep: true,
                    reason: format!("in use by job {job}"),
                };
            }
            if !d.keep {
                forget.push(id);
            }
            out.push(pb::PruneDecision {
                snapshot: Some(snapshot_info(id, s)),
                keep: d.keep,
                reason: d.reason,
            });
        }
    }
    if r.dry_run || forget.is_empty() {
        return Ok((out, 0));
    }
    let mut forgotten = 0u32;
    let mut failed = None;
    for id in &forget {
        // The commit record goes first: a record left pointing at a
        // forgotten snapshot would make a late retry of that commit bring
        // the snapshot back (see `commit::commit`).
        let res = c
            .state
            .forget_snapshot(&id.0)
            .and_then(|()| c.repo.forget_snapshot(id).map_err(ServiceError::from));
        match res {
            Ok(()) => forgotten += 1,
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }
    let filter = |name: &str, v: &str| {
        if v.is_empty() {
            String::new()
        } else {
            format!(" {name} {v}")
        }
    };
    c.state.admin_event(
        "prune",
        &format!(
            "forgot {forgotten} of {} snapshots{}{}{} (packs kept until a garbage collection): {}",
            out.len(),
            filter("site", &r.site),
            filter("agent", &r.agent_id),
            filter("source", &r.source),
            forget
                .iter()
                .take(forgotten as usize)
                .map(|i| i.short())
                .collect::<Vec<_>>()
                .join(" ")
        ),
    )?;
    match failed {
        Some(e) => Err(e),
        None => Ok((out, forgotten)),
    }
}

/// The wire form of a snapshot.
fn snapshot_info(id: repo_format::Id, s: repo_format::snapshot::Snapshot) -> pb::SnapshotInfo {
    pb::SnapshotInfo {
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
        let entries = c.repo.read_tree(&t).map_err(|e| match e {
            repo_format::Error::MissingBlob(id) => crate::scrub::lost_blob(&id),
            e => e.into(),
        })?;
        for e in entries {
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
