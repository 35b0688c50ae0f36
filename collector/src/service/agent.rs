//! What agents call: the control stream (heartbeats, job reports; commands
//! pushed down), and the data path: which blobs the site lacks, uploads
//! acknowledged when durable, verified snapshot commits, and reads of blobs
//! the site holds (its own, or received through a restore job).

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::Arc;

use proto::convert;
use proto::limits::MAX_IDS_PER_REQUEST;
use proto::pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use repo_format::Id;

use crate::error::ServiceError;
use crate::pki::Role;
use crate::service::caller;
use crate::{Ctx, commit, ingest, reads};

/// The agent service.
pub struct AgentSvc {
    /// Shared state.
    pub ctx: Arc<Ctx>,
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl pb::agent_service_server::AgentService for AgentSvc {
    type ControlStream = BoxStream<pb::CollectorCommand>;

    async fn control(
        &self,
        req: Request<Streaming<pb::AgentEvent>>,
    ) -> Result<Response<Self::ControlStream>, Status> {
        let who = caller(&req)?;
        let Role::Agent { agent_id, .. } = who.role else {
            return Err(Status::permission_denied("agents only"));
        };
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(16);
        // A newer stream of the same agent replaces the old one.
        if let Ok(mut s) = self.ctx.sessions.lock() {
            s.insert(agent_id.clone(), tx.clone());
        }
        // Policies live at the collector: the agent gets its sources (with
        // their effective retention) and its site's agent policy on connect.
        let id = agent_id.clone();
        let sources = self
            .ctx
            .blocking(move |c| c.state.agent_sources(&id))
            .await?;
        let _ = tx
            .send(Ok(pb::CollectorCommand {
                command: Some(pb::collector_command::Command::Sources(sources)),
            }))
            .await;
        // Jobs it has not finished (it may have restarted) are pushed again.
        let id = agent_id.clone();
        for j in self.ctx.blocking(move |c| c.state.open_jobs(&id)).await? {
            let _ = tx
                .send(Ok(pb::CollectorCommand {
                    command: Some(crate::service::admin::restore_command(&self.ctx, &j)?),
                }))
                .await;
        }
        let ctx = self.ctx.clone();
        let serial = who.serial;
        tokio::spawn(async move {
            loop {
                let ev = match inbound.next().await {
                    Some(Ok(ev)) => ev,
                    Some(Err(_)) | None => break,
                };
                if ctx.revoked.contains(serial) {
                    let _ = tx
                        .send(Err(Status::permission_denied("certificate revoked")))
                        .await;
                    break;
                }
                if let Err(e) = convert::protocol(ev.protocol) {
                    let _ = tx.send(Err(ServiceError::from(e).into())).await;
                    break;
                }
                match ev.event {
                    Some(pb::agent_event::Event::Heartbeat(mut hb)) => {
                        let id = agent_id.clone();
                        // Untrusted input: record_lag also cuts names and notes.
                        hb.lag.truncate(crate::state::MAX_LAG_ENTRIES);
                        let recorded = ctx
                            .blocking(move |c| {
                                c.state.seen(&id)?;
                                c.state.record_lag(&id, &hb.lag)
                            })
                            .await;
                        if let Err(e) = recorded {
                            tracing::warn!("recording heartbeat of {agent_id}: {e}");
                        }
                    }
                    Some(pb::agent_event::Event::JobReport(r)) => {
                        let id = agent_id.clone();
                        if let Err(e) = ctx.blocking(move |c| c.state.report_job(&id, &r)).await {
                            tracing::warn!("job report of {agent_id}: {e}");
                        }
                    }
                    None => {}
                }
            }
            if let Ok(mut s) = ctx.sessions.lock()
                && s.get(&agent_id).is_some_and(|t| t.same_channel(&tx))
            {
                s.remove(&agent_id);
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn missing_blobs(
        &self,
        req: Request<pb::MissingBlobsRequest>,
    ) -> Result<Response<pb::MissingBlobsResponse>, Status> {
        let (site, _) = agent_of(&req)?;
        let r = req.into_inner();
        convert::protocol(r.protocol).map_err(ServiceError::from)?;
        let ids = convert::ids("ids", &r.ids).map_err(ServiceError::from)?;
        let missing = self
            .ctx
            .blocking(move |c| {
                let raw: Vec<Vec<u8>> = ids.iter().map(|i| i.0.to_vec()).collect();
                let held = c.state.site_has(&site, &raw)?;
                // Answered from the site's own holdings only: a blob stored
                // by another site is "missing" exactly like one stored nowhere.
                // Held ones are checked against the catalog in one batch (a
                // pack dropped by a prune makes a held blob missing again).
                let held_ids: Vec<Id> = ids
                    .iter()
                    .zip(&held)
                    .filter_map(|(id, h)| h.then_some(*id))
                    .collect();
                let gone: HashSet<Id> = c.repo.catalog()?.missing(&held_ids)?.into_iter().collect();
                Ok(ids
                    .iter()
                    .zip(held)
                    .filter(|(id, h)| !h || gone.contains(id))
                    .map(|(id, _)| id.0.to_vec())
                    .collect())
            })
            .await?;
        Ok(Response::new(pb::MissingBlobsResponse { missing }))
    }

    type UploadStream = BoxStream<pb::UploadAck>;

    async fn upload(
        &self,
        req: Request<Streaming<pb::UploadRequest>>,
    ) -> Result<Response<Self::UploadStream>, Status> {
        let (site, serial) = agent_of(&req)?;
        let Role::Agent { agent_id, .. } = caller(&req)?.role else {
            return Err(Status::permission_denied("agents only"));
        };
        let budget = self.ctx.uploads.open_stream(&agent_id)?;
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(4);
        let ctx = self.ctx.clone();
        tokio::spawn(async move {
            // Locals drop in reverse order: the stream's slot is given back
            // before `tx` ends the response, so a client that saw the end
            // can open a new stream in its place at once.
            let tx = tx;
            let budget = budget;
            // Room taken in the budgets for `batch` (see `budget`).
            let mut room: Option<crate::budget::Room> = None;
            // Double-buffered: one batch is made durable (off the runtime)
            // while the next is received, so the link does not idle during
            // each pack's fsync. At most two batches per stream are alive;
            // batches are ingested one after the other, in stream order, so
            // acknowledgements keep the order the agent sent in.
            let mut batch = Vec::new();
            let mut bytes = 0usize;
            let mut ingesting: Option<tokio::task::JoinHandle<Result<Vec<Vec<u8>>, ServiceError>>> =
                None;
            loop {
                let next = tokio::time::timeout(FLUSH_AFTER, inbound.next()).await;
                let quiet = next.is_err();
                let done = match next {
                    Ok(Some(Ok(m))) => {
                        if ctx.revoked.contains(serial) {
                            let _ = tx
                                .send(Err(Status::permission_denied("certificate revoked")))
                                .await;
                            return;
                        }
                        match ingest::validate(m) {
                            Ok(blobs) => {
                                let n = blobs.iter().map(|b| b.sealed.len()).sum();
                                let permit = match budget.try_take(n) {
                                    Some(p) => p,
                                    None => {
                                        // Over the agent's budget or the total:
                                        // make what this stream holds durable,
                                        // then wait for room.
                                        if let Some(prev) = ingesting.take()
                                            && !send_ack(&tx, prev).await
                                        {
                                            return;
                                        }
                                        if !batch.is_empty() {
                                            let b = std::mem::take(&mut batch);
                                            bytes = 0;
                                            ingesting =
                                                Some(spawn_ingest(&ctx, &site, b, room.take()));
                                        }
                                        match budget.take(n).await {
                                            Ok(p) => p,
                                            Err(e) => {
                                                let _ = tx.send(Err(e.into())).await;
                                                return;
                                            }
                                        }
                                    }
                                };
                                match room.as_mut() {
                                    Some(r) => r.merge(permit),
                                    None => room = Some(permit),
                                }
                                bytes += n;
                                batch.extend(blobs);
                            }
                            Err(e) => {
                                let _ = tx.send(Err(e.into())).await;
                                return;
                            }
                        }
                        false
                    }
                    Ok(Some(Err(status))) => {
                        // A message that could not be decoded (e.g. over the size
                        // limit): say so, do not end the stream as if all was well.
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                    Ok(None) => true,
                    Err(_) => false, // quiet: flush what we have
                };
                let flush = !batch.is_empty() && (done || bytes >= BATCH_BYTES || quiet);
                // A batch made durable is acknowledged at once (at the latest
                // one quiet period later), not only when the next one is due.
                let ready = ingesting.as_ref().is_some_and(|h| h.is_finished());
                if (flush || done || ready)
                    && let Some(prev) = ingesting.take()
                    && !send_ack(&tx, prev).await
                {
                    return;
                }
                if flush {
                    let b = std::mem::take(&mut batch);
                    bytes = 0;
                    ingesting = Some(spawn_ingest(&ctx, &site, b, room.take()));
                }
                if done {
                    if let Some(last) = ingesting.take() {
                        send_ack(&tx, last).await;
                    }
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn commit_snapshot(
        &self,
        req: Request<pb::CommitSnapshotRequest>,
    ) -> Result<Response<pb::CommitSnapshotResponse>, Status> {
        let who = caller(&req)?;
        let Role::Agent { site, agent_id } = who.role else {
            return Err(Status::permission_denied("agents only"));
        };
        let r = req.into_inner();
        convert::protocol(r.protocol).map_err(ServiceError::from)?;
        if r.idempotency_key.len() != 16 {
            return Err(Status::invalid_argument("idempotency_key must be 16 bytes"));
        }
        let root = convert::id("root_tree", &r.root_tree).map_err(ServiceError::from)?;
        let stats = serde_json::from_str(&r.stats_json).unwrap_or_default();
        let mut issues: Vec<repo_format::snapshot::BackupIssue> =
            serde_json::from_str(&r.issues_json).unwrap_or_default();
        issues.truncate(1000);
        let req = commit::CommitRequest {
            site,
            agent_id,
            key: r.idempotency_key,
            source: r.source.chars().take(128).collect(),
            root,
            paths: r.paths.into_iter().take(1000).collect(),
            hostname: r.hostname.chars().take(255).collect(),
            stats,
            issues,
        };
        let (id, time_ns) = self.ctx.blocking(move |c| commit::commit(c, req)).await?;
        Ok(Response::new(pb::CommitSnapshotResponse {
            snapshot_id: id.0.to_vec(),
            time_ns,
        }))
    }

    type ReadBlobsStream = BoxStream<pb::BlobData>;

    async fn read_blobs(
        &self,
        req: Request<pb::ReadBlobsRequest>,
    ) -> Result<Response<Self::ReadBlobsStream>, Status> {
        let who = caller(&req)?;
        let Role::Agent { site, agent_id } = who.role else {
            return Err(Status::permission_denied("agents only"));
        };
        let r = req.into_inner();
        convert::protocol(r.protocol).map_err(ServiceError::from)?;
        let ids = convert::ids("ids", &r.ids).map_err(ServiceError::from)?;
        // Bounded per agent, per stream and in total (see `reads`).
        let slot = self.ctx.reads.open(&agent_id)?;
        let rx = reads::serve(self.ctx.clone(), slot, site, ids);
        // A batch's room goes when the transport has taken its last blob.
        let out =
            ReceiverStream::new(rx).map(|r| r.map(|(blob, _room)| blob).map_err(Status::from));
        Ok(Response::new(Box::pin(out)))
    }

    async fn lost_blobs(
        &self,
        req: Request<pb::LostBlobsRequest>,
    ) -> Result<Response<pb::LostBlobsResponse>, Status> {
        let (site, _) = agent_of(&req)?;
        let r = req.into_inner();
        convert::protocol(r.protocol).map_err(ServiceError::from)?;
        let rows = self
            .ctx
            .blocking(move |c| c.state.lost_after(&site, r.after, MAX_IDS_PER_REQUEST + 1))
            .await?;
        let more = rows.len() > MAX_IDS_PER_REQUEST;
        let rows = &rows[..rows.len().min(MAX_IDS_PER_REQUEST)];
        Ok(Response::new(pb::LostBlobsResponse {
            next: rows.last().map_or(r.after, |(seq, _)| *seq),
            ids: rows.iter().map(|(_, id)| id.clone()).collect(),
            more,
        }))
    }

    async fn renew(
        &self,
        req: Request<pb::RenewRequest>,
    ) -> Result<Response<pb::RenewResponse>, Status> {
        let who = caller(&req)?;
        let Role::Agent { site, agent_id } = who.role.clone() else {
            return Err(Status::permission_denied("agents only"));
        };
        let r = req.into_inner();
        convert::protocol(r.protocol).map_err(ServiceError::from)?;
        if r.csr_der.len() > 16 * 1024 {
            return Err(Status::invalid_argument("CSR too large"));
        }
        let old = who.serial;
        let cert = self
            .ctx
            .blocking(move |c| {
                let key = crate::pki::Pki::csr_public_key(&r.csr_der)?;
                let serial = c.state.renew_serial(&agent_id, old)?;
                let role = Role::Agent { site, agent_id };
                let cert = c
                    .pki
                    .issue_client(&role, serial, crate::pki::AGENT_CERT_TTL, &key)?;
                // The old serial is revoked: refuse it on calls and handshakes.
                c.revoked.insert(old);
                c.publish_crl()?;
                Ok(cert)
            })
            .await?;
        Ok(Response::new(pb::RenewResponse {
            certificate_pem: cert,
            certificate_ttl_secs: crate::pki::AGENT_CERT_TTL.whole_seconds().max(0) as u64,
        }))
    }
}

/// Make `batch` durable off the runtime; its `room` in the budgets is
/// given back once it is.
fn spawn_ingest(
    ctx: &Arc<Ctx>,
    site: &str,
    batch: Vec<ingest::Incoming>,
    room: Option<crate::budget::Room>,
) -> tokio::task::JoinHandle<Result<Vec<Vec<u8>>, ServiceError>> {
    let (site, ctx) = (site.to_string(), ctx.clone());
    tokio::spawn(async move {
        let r = ctx.blocking(move |c| ingest::ingest(c, &site, batch)).await;
        drop(room);
        r
    })
}

/// Wait for one batch's ingestion and send its acknowledgement (or its
/// error). Returns false when the stream is over (error sent, or agent gone).
async fn send_ack(
    tx: &mpsc::Sender<Result<pb::UploadAck, Status>>,
    ingesting: tokio::task::JoinHandle<Result<Vec<Vec<u8>>, ServiceError>>,
) -> bool {
    let result = match ingesting.await {
        Ok(r) => r,
        Err(e) => Err(ServiceError::Internal(format!("ingest task failed: {e}"))),
    };
    match result {
        Ok(ids) => tx.send(Ok(pb::UploadAck { ids })).await.is_ok(),
        Err(e) => {
            let _ = tx.send(Err(e.into())).await;
            false
        }
    }
}

/// Flush an upload batch when the agent pauses this long.
const FLUSH_AFTER: std::time::Duration = std::time::Duration::from_millis(300);
/// Flush an upload batch at this many sealed bytes (about one pack's worth of acks).
const BATCH_BYTES: usize = 16 * 1024 * 1024;

/// The caller's site and serial; agents only.
fn agent_of<T>(req: &Request<T>) -> Result<(String, u64), Status> {
    let who = caller(req)?;
    match who.role {
        Role::Agent { site, .. } => Ok((site, who.serial)),
        Role::Admin { .. } => Err(Status::permission_denied("agents only")),
    }
}
