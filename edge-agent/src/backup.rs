//! One backup run: local backup into the spool, uploading each pack as it is
//! made durable, then the rest (trees) and the commit.
//! Used by `hubvault-agent backup`, backup-now jobs, schedules and the
//! real-time loop (incremental, with a dirty set).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use proto::pb::agent_service_client::AgentServiceClient;
use repo_format::backup::{BackupOptions, DirtySet, ParentChoice};
use repo_format::snapshot::Snapshot;
use repo_format::{Id, Repository};
use tonic::transport::Channel;

use crate::acked::Acked;
use crate::gate::PriorityGate;
use crate::state::StateDir;
use crate::upload::{EarlyUpload, UploadControl, UploadReport};

/// What a run did.
#[derive(Debug)]
pub struct BackupRun {
    /// The local snapshot's id in the spool.
    pub local_id: Id,
    /// The local snapshot.
    pub local: Snapshot,
    /// The upload.
    pub upload: UploadReport,
    /// Wall time of the local backup and the upload (they overlap), in seconds.
    pub secs: f64,
}

impl BackupRun {
    /// The collector's snapshot id.
    pub fn snapshot(&self) -> Option<Id> {
        self.upload.snapshot
    }
}

/// What to back up and how.
pub struct RunSpec {
    /// Source name (the collector groups snapshots by it).
    pub source: String,
    /// Paths of the source.
    pub paths: Vec<PathBuf>,
    /// Exclude globs.
    pub excludes: Vec<String>,
    /// Incremental: only these directories changed since `parent`.
    pub dirty: Option<DirtySet>,
    /// Parent snapshot in the spool.
    pub parent: ParentChoice,
    /// Upload priority (see [`crate::gate`]; the gate is taken per upload window).
    pub priority: i32,
    /// Bandwidth limits and progress.
    pub upload: UploadControl,
}

impl RunSpec {
    /// A one-off run of `paths` as `source`, no limits.
    pub fn once(source: &str, paths: Vec<PathBuf>, excludes: Vec<String>) -> RunSpec {
        RunSpec {
            source: source.to_string(),
            paths,
            excludes,
            dirty: None,
            parent: ParentChoice::Auto,
            priority: 0,
            upload: UploadControl::default(),
        }
    }
}

/// Back `paths` up as `source` (leaving out `excludes`), upload, commit.
pub async fn run(
    st: &StateDir,
    source: &str,
    paths: Vec<PathBuf>,
    excludes: Vec<String>,
) -> Result<BackupRun> {
    let cfg = st.config()?;
    let st2 = StateDir::new(st.root());
    let (repo, acked) = tokio::task::spawn_blocking(move || st2.spool()).await??;
    let mut client = crate::control::connect(st, &cfg.collector).await?;
    let spec = RunSpec::once(source, paths, excludes);
    run_with(
        Arc::new(repo),
        Arc::new(acked),
        &mut client,
        &PriorityGate::new(),
        spec,
    )
    .await
}

/// Back up per `spec` into `repo`, then (taking the upload gate per window) upload and
/// commit through `client`.
pub async fn run_with(
    repo: Arc<Repository>,
    acked: Arc<Acked>,
    client: &mut AgentServiceClient<Channel>,
    gate: &PriorityGate,
    spec: RunSpec,
) -> Result<BackupRun> {
    let r = repo.clone();
    let (paths, excludes, dirty, parent) = (spec.paths, spec.excludes, spec.dirty, spec.parent);
    let mut upload = spec.upload;
    upload.gate = Some((gate.clone(), spec.priority));
    let started = std::time::Instant::now();
    // Blobs the collector lost are forgotten first, so this backup stores
    // (and uploads) them again; it verifies its parent's chunks once after.
    // Not fatal: an unreachable collector must not stop the local backup
    // (the upload will wait for it); the next run reads the list again.
    if let Err(e) = crate::lost::reconcile(client, &repo, &acked).await {
        tracing::warn!("reading the collector's lost blobs failed: {e:#}");
    }
    let (a, source) = (acked.clone(), spec.source.clone());
    let (verify_parent, generation) =
        tokio::task::spawn_blocking(move || a.needs_verify(&source)).await??;
    // Upload each pack as the backup makes it durable (see EarlyUpload).
    let early = EarlyUpload::start(client.clone(), repo.clone(), acked.clone(), upload.clone());
    let on_pack = early.sink();
    // Chunks whose spool packs were dropped after upload are not stored
    // again: the catalog keeps their rows (see crate::trim).
    let out = tokio::task::spawn_blocking(move || {
        let opts = BackupOptions {
            excludes,
            dirty,
            parent,
            on_pack,
            verify_parent,
            ..Default::default()
        };
        repo_format::backup::backup(&r, &paths, &opts)
    })
    .await?
    .context("local backup failed")?;
    if verify_parent {
        let (a, source) = (acked.clone(), spec.source.clone());
        tokio::task::spawn_blocking(move || a.verified(&source, generation)).await??;
    }
    upload.planned.store(
        out.snapshot.stats.new_bytes_stored,
        std::sync::atomic::Ordering::Relaxed,
    );
    let backed_up = started.elapsed();
    let early = early.finish().await;
    tracing::debug!(
        backup_s = backed_up.as_secs_f64(),
        early_done_s = started.elapsed().as_secs_f64(),
        early_sent = early.sent,
        "local backup done"
    );
    // Once the collector holds every blob (acknowledged: durable there), the
    // spool need not keep their data packs: trimmed while the collector
    // checks the commit, which does not read the spool. A failed commit is
    // retried from the same acknowledged set, so it needs none of them.
    let (r, a) = (repo.clone(), acked.clone());
    let (mut report, trimmed) = crate::upload::upload_snapshot(
        client,
        repo.clone(),
        acked.clone(),
        out.id,
        &spec.source,
        &upload,
        move || crate::trim::trim(&r, &a),
    )
    .await
    .context("upload to the collector failed; it resumes where it stopped")?;
    report.candidates += early.candidates;
    report.sent += early.sent;
    report.bytes_sent += early.bytes_sent;
    let upload = report;
    tracing::debug!(secs = started.elapsed().as_secs_f64(), "committed");
    match trimmed {
        Ok(t) => tracing::debug!(packs = t.packs, bytes = t.bytes, "spool trimmed"),
        // Not fatal: the snapshot is committed; the next run trims again.
        Err(e) => tracing::warn!("trimming the spool failed: {e:#}"),
    }
    Ok(BackupRun {
        local_id: out.id,
        local: out.snapshot,
        upload,
        secs: started.elapsed().as_secs_f64(),
    })
}
