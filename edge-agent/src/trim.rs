//! Keeping the spool small: once the collector holds a data pack's every
//! blob (the upload marked the pack uploaded, or its blobs are all in the
//! acknowledged set), the pack's file is deleted from the spool; its
//! catalog rows stay, marked dropped ([`repo_format::catalog::PackState`]).
//! Tree packs stay (the packer keeps trees and data in separate packs): the
//! next backup reads its parent's trees, and the upload walks them.
//!
//! What a dropped chunk costs later:
//! - backup: nothing. The catalog still lists it, so it is recorded without
//!   being sealed or stored again, and the upload knows the collector holds
//!   it. (Spools trimmed before schema 3 lost such rows: a chunk of theirs
//!   that reappears is stored once more and the collector, asked, says it
//!   holds it; nothing is sent);
//! - restore jobs: it is re-read from the agent's own files where they
//!   still hold it ([`crate::local`]), else pulled from the collector. What
//!   a job brings into the spool is recorded as acknowledged (the job
//!   granted the site its snapshot), so the next trim drops it. Jobs hold [`restore_guard`] (a file lock) while they pull and
//!   restore, and a trim skips its turn while any job holds it, so a job
//!   never loses a chunk it counted on;
//! - uploads of other sources running meanwhile: a blob they were about to
//!   send may be dropped under them; they skip it, as it is acknowledged
//!   (see `upload::BlobStream::send`).
//!
//! So the spool holds trees, and data only until it is uploaded: the
//! office's disk pays for the backup once, not twice.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use repo_format::Repository;
use repo_format::blob::BlobKind;
use repo_format::catalog::PackState;
use repo_format::pack::reader::read_trailer;

use crate::acked::Acked;

/// The lock file beside the spool (`<state>/spool-use.lock`): restore jobs
/// hold it shared, a trim takes it exclusive without waiting. A file lock,
/// so it also holds between the daemon and a `hubvault-agent backup` run.
pub fn lock_path(spool_root: &Path) -> PathBuf {
    spool_root.with_file_name("spool-use.lock")
}

fn open_lock(spool_root: &Path) -> Result<File> {
    let p = lock_path(spool_root);
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&p)
        .with_context(|| format!("opening {}", p.display()))
}

/// Held by a restore job from its pull until its last file is written
/// (released when dropped). Waits while a trim runs.
pub async fn restore_guard(spool_root: &Path) -> Result<File> {
    let root = spool_root.to_path_buf();
    tokio::task::spawn_blocking(move || -> Result<File> {
        let f = open_lock(&root)?;
        f.lock_shared()
            .with_context(|| format!("locking {}", lock_path(&root).display()))?;
        Ok(f)
    })
    .await?
}

/// What a trim did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TrimReport {
    /// Data packs dropped.
    pub packs: u64,
    /// Their bytes.
    pub bytes: u64,
    /// True when a restore job was running and nothing was tried.
    pub skipped: bool,
}

/// Drop every data pack of `repo` the collector holds whole: those marked
/// uploaded, and those whose blobs are all acknowledged.
/// Blocking (SQLite, file removal): call from a blocking thread.
///
/// For a pack not marked uploaded, what it holds is read from its trailer
/// (the catalog has no index by pack); a pack whose trailer lists a tree
/// blob is kept. When the trailer cannot be read, the catalog's rows of the
/// pack (a full scan, rare) stand in for it, so a damaged data pack the
/// collector holds still goes.
pub fn trim(repo: &Repository, acked: &Acked) -> Result<TrimReport> {
    let lock = open_lock(repo.root())?;
    if lock.try_lock().is_err() {
        return Ok(TrimReport {
            skipped: true,
            ..TrimReport::default()
        });
    }
    let mut report = TrimReport::default();
    let packs = repo.catalog()?.packs_only_of(BlobKind::Data)?;
    for (name, state) in packs {
        if state == PackState::Uploaded {
            report.add(retire(repo, &name)?);
            continue;
        }
        let entries = match read_trailer(repo.store().as_ref(), &name, &repo.keys().metadata) {
            Ok(entries) => entries,
            Err(e) => {
                tracing::warn!(
                    "spool pack {name}: trailer unreadable ({e}); deciding from its catalog rows"
                );
                repo.catalog()?
                    .blobs_in_pack(&name)
                    .with_context(|| format!("listing the catalogued blobs of spool pack {name}"))?
            }
        };
        if entries.iter().any(|e| e.kind != BlobKind::Data) {
            tracing::debug!("spool pack {name} holds tree blobs: kept");
            continue;
        }
        // In key order: the lookups then walk the B-tree's pages in order.
        let mut ids: Vec<repo_format::Id> = entries.iter().map(|b| b.id).collect();
        ids.sort_unstable();
        if !acked.contains_each(&ids)?.into_iter().all(|a| a) {
            continue;
        }
        report.add(retire(repo, &name)?);
    }
    Ok(report)
}

/// Delete spool pack `name`'s file, keeping its rows (marked dropped);
/// returns its size.
fn retire(repo: &Repository, name: &repo_format::Id) -> Result<u64> {
    let size = repo.store().size(name).unwrap_or(0);
    repo.retire_pack(name)
        .with_context(|| format!("dropping spool pack {name}"))?;
    Ok(size)
}

impl TrimReport {
    fn add(&mut self, bytes: u64) {
        self.packs += 1;
        self.bytes += bytes;
    }
}
