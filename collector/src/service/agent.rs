//! What agents call. The control stream is live; the data path (missing,
//! upload, commit, read) is the next step of issue 3 and answers
//! UNIMPLEMENTED until then, rather than pretending.

use std::pin::Pin;
use std::sync::Arc;

use proto::convert;
use proto::pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::Ctx;
use crate::error::ServiceError;
use crate::pki::Role;
use crate::service::caller;

/// The agent service.
pub struct AgentSvc {
    /// Shared state.
    pub ctx: Arc<Ctx>,
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

fn not_yet(what: &str) -> Status {
    Status::unimplemented(format!(
        "{what} is not implemented yet (issue 3: data path)"
    ))
}

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
        let _ = tx
            .send(Ok(pb::CollectorCommand {
                command: Some(pb::collector_command::Command::Sources(
                    pb::Sources::default(),
                )),
            }))
            .await;
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
                if let Some(pb::agent_event::Event::Heartbeat(_)) = ev.event {
                    let id = agent_id.clone();
                    if let Err(e) = ctx.blocking(move |c| c.state.seen(&id)).await {
                        tracing::warn!("recording heartbeat of {agent_id}: {e}");
                    }
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
        _req: Request<pb::MissingBlobsRequest>,
    ) -> Result<Response<pb::MissingBlobsResponse>, Status> {
        Err(not_yet("MissingBlobs"))
    }

    type UploadStream = BoxStream<pb::UploadAck>;

    async fn upload(
        &self,
        _req: Request<Streaming<pb::UploadRequest>>,
    ) -> Result<Response<Self::UploadStream>, Status> {
        Err(not_yet("Upload"))
    }

    async fn commit_snapshot(
        &self,
        _req: Request<pb::CommitSnapshotRequest>,
    ) -> Result<Response<pb::CommitSnapshotResponse>, Status> {
        Err(not_yet("CommitSnapshot"))
    }

    type ReadBlobsStream = BoxStream<pb::BlobData>;

    async fn read_blobs(
        &self,
        _req: Request<pb::ReadBlobsRequest>,
    ) -> Result<Response<Self::ReadBlobsStream>, Status> {
        Err(not_yet("ReadBlobs"))
    }
}
