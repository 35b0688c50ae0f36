//! One backup run: local backup into the spool, then upload and commit.
//! Used by `hubvault-agent backup` and by backup-now jobs.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use repo_format::Id;
use repo_format::snapshot::Snapshot;

use crate::state::StateDir;
use crate::upload::UploadReport;

/// What a run did.
#[derive(Debug)]
pub struct BackupRun {
    /// The local snapshot.
    pub local: Snapshot,
    /// The upload.
    pub upload: UploadReport,
    /// Upload wall time in seconds.
    pub upload_secs: f64,
}

impl BackupRun {
    /// The collector's snapshot id.
    pub fn snapshot(&self) -> Option<Id> {
        self.upload.snapshot
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
    let (repo, acked) = (Arc::new(repo), Arc::new(acked));
    let r = repo.clone();
    let out = tokio::task::spawn_blocking(move || {
        let opts = repo_format::backup::BackupOptions {
            excludes,
            ..Default::default()
        };
        repo_format::backup::backup(&r, &paths, &opts)
    })
    .await?
    .context("local backup failed")?;
    let started = std::time::Instant::now();
    let mut client = crate::control::connect(st, &cfg.collector).await?;
    let upload = crate::upload::upload_snapshot(&mut client, repo, acked, out.id, source)
        .await
        .context("upload to the collector failed; run the backup again to resume")?;
    Ok(BackupRun {
        local: out.snapshot,
        upload,
        upload_secs: started.elapsed().as_secs_f64(),
    })
}
