//! Rebuild the catalog from the truth: pack trailers and snapshot files.
//!
//! Takes the repository's exclusive lock; moves an existing catalog aside
//! (never deletes it); reads every pack's trailer (authenticated with the
//! metadata key) and every snapshot file. A pack whose trailer cannot be read
//! is reported and skipped: its blobs stay missing, and `check` names the
//! snapshots that need them.

use std::path::Path;
use std::sync::Arc;

use crate::catalog::Catalog;
use crate::error::{Error, Result};
use crate::id::Id;
use crate::pack::reader::read_trailer;
use crate::repo::{LockMode, Repository, catalog_path};
use crate::snapshot;
use crate::store::PackStore;
use crate::store::dir::DirStore;

/// File left in the repository by a rebuild: while it exists, a backup does
/// not trust that a parent snapshot's chunks all still exist and checks each
/// one it would reuse. A `check` that finds nothing missing removes it.
pub const DEGRADED_MARKER: &str = "catalog.degraded";

/// What a rebuild found.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct RebuildReport {
    /// Packs indexed.
    pub packs: u64,
    /// Blobs indexed.
    pub blobs: u64,
    /// Snapshots indexed.
    pub snapshots: u64,
    /// Packs or snapshot files skipped, with why.
    pub skipped: Vec<String>,
    /// Where the previous catalog was moved, if there was one.
    pub old_catalog: Option<String>,
}

/// Rebuild the catalog of the repository at `root`; returns the reopened repository and a report.
pub fn rebuild_catalog(root: &Path, passphrase: &[u8]) -> Result<(Repository, RebuildReport)> {
    let store: Arc<dyn PackStore> = Arc::new(DirStore::new(root.join("packs"), root.join("tmp")));
    let (config, keys, lock) = Repository::open_parts(root, passphrase, LockMode::Exclusive)?;
    let mut report = RebuildReport::default();
    let db = catalog_path(root);
    if db.exists() {
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let aside = root.join(format!("catalog.db.old-{stamp}"));
        std::fs::rename(&db, &aside).map_err(|e| Error::io("moving aside", &db, e))?;
        for ext in ["-wal", "-shm"] {
            let side = root.join(format!("catalog.db{ext}"));
            if side.exists() {
                let _ = std::fs::rename(&side, root.join(format!("catalog.db.old-{stamp}{ext}")));
            }
        }
        report.old_catalog = Some(aside.to_string_lossy().into_owned());
    }
    let mut cat = Catalog::create(&db)?;
    for name in store.list()? {
        match read_trailer(store.as_ref(), &name, &keys.metadata) {
            Ok(entries) => {
                let size = store.size(&name)?;
                cat.insert_pack(&name, size, &entries)?;
                report.packs += 1;
                report.blobs += entries.len() as u64;
            }
            Err(e) => report.skipped.push(format!("pack {name}: {e}")),
        }
    }
    let dir = root.join("snapshots");
    let rd = std::fs::read_dir(&dir).map_err(|e| Error::io("listing", &dir, e))?;
    for f in rd {
        let f = f.map_err(|e| Error::io("listing", &dir, e))?;
        let Some(id) = f.file_name().to_str().and_then(Id::from_hex) else {
            continue;
        };
        match snapshot::read(&dir, &keys.metadata, &id) {
            Ok(s) => {
                cat.insert_snapshot(&id, &s)?;
                report.snapshots += 1;
            }
            Err(e) => report.skipped.push(format!("snapshot {id}: {e}")),
        }
    }
    // Blobs may have been lost with the old catalog: until a clean `check`
    // says otherwise, backups verify that parent chunks still exist.
    crate::fsutil::write_atomic(
        &root.join(DEGRADED_MARKER),
        serde_json::to_string_pretty(&report)
            .unwrap_or_default()
            .as_bytes(),
    )?;
    let repo = Repository::from_parts(root, config, keys, store, cat, lock);
    Ok((repo, report))
}
