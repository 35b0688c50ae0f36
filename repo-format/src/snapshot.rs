//! Snapshots: immutable records of one backup, stored as a sealed file
//! `snapshots/<id>` (the truth) and a catalog row (the index).
//!
//! ```text
//! file = SNAPSHOT_MAGIC(8) || nonce(24) || XChaCha20-Poly1305_metadata(json, aad = "hubvault snapshot v1" || id)
//! id   = keyed BLAKE3 (metadata id key) of json
//! ```

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::consts::{MAX_SNAPSHOT_FILE, SNAPSHOT_MAGIC};
use crate::crypto::KeySet;
use crate::error::{Error, Result};
use crate::fsutil;
use crate::id::Id;

/// Associated-data prefix of snapshot files.
pub const SNAPSHOT_AAD: &[u8] = b"hubvault snapshot v1";

/// Counters of one backup.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SnapshotStats {
    /// Regular files in the snapshot.
    pub files: u64,
    /// Directories in the snapshot.
    pub dirs: u64,
    /// Other entries (symlinks, fifos, devices, sockets).
    pub others: u64,
    /// Bytes of file content in the snapshot.
    pub bytes: u64,
    /// Files taken unchanged from the parent without reading them.
    pub files_unchanged: u64,
    /// Bytes actually read from disk.
    pub bytes_read: u64,
    /// Blobs this backup added to the repository.
    pub new_blobs: u64,
    /// Plaintext bytes of the added blobs.
    pub new_bytes: u64,
    /// Sealed (stored) bytes of the added blobs.
    pub new_bytes_stored: u64,
    /// Wall time of the backup in milliseconds.
    pub duration_ms: u64,
}

/// A path that could not be backed up, and why.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BackupIssue {
    /// The path on the backed-up machine.
    pub path: String,
    /// What went wrong.
    pub reason: String,
}

/// One backup.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Snapshot {
    /// When the backup started, ns since the epoch.
    pub time_ns: i64,
    /// Host that made it.
    pub hostname: String,
    /// The absolute paths backed up; each is an entry of the root tree named by its last component.
    pub paths: Vec<String>,
    /// The root tree.
    pub tree: Id,
    /// The snapshot used to skip unchanged files, if any.
    pub parent: Option<Id>,
    /// Counters.
    pub stats: SnapshotStats,
    /// Paths that could not be read or changed while read (the backup is then partial).
    pub issues: Vec<BackupIssue>,
    /// More issues than recorded in `issues`.
    pub issues_dropped: u64,
    /// Site that made it (snapshots committed through a collector).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
    /// Agent that made it (snapshots committed through a collector).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    /// Source (named set of paths) it protects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

impl Snapshot {
    /// True when some paths could not be backed up as they were.
    pub fn is_partial(&self) -> bool {
        !self.issues.is_empty() || self.issues_dropped > 0
    }
}

fn aad(id: &Id) -> Vec<u8> {
    let mut a = SNAPSHOT_AAD.to_vec();
    a.extend_from_slice(&id.0);
    a
}

/// The id `snap` gets when written: the keyed hash of its serialised
/// form, so a caller can record it before the file exists (the collector's
/// commit does, to make a retry after a crash converge on one snapshot).
pub fn id(meta: &KeySet, snap: &Snapshot) -> Result<Id> {
    Ok(meta.id_of(&to_json(snap)?))
}

fn to_json(snap: &Snapshot) -> Result<Vec<u8>> {
    serde_json::to_vec(snap).map_err(|e| Error::corrupt("snapshot", e.to_string()))
}

/// Seal `snap` and write it durably under `dir`; returns its id.
pub fn write(dir: &Path, meta: &KeySet, snap: &Snapshot) -> Result<Id> {
    let json = to_json(snap)?;
    let id = meta.id_of(&json);
    let mut file = SNAPSHOT_MAGIC.to_vec();
    file.extend_from_slice(&meta.seal_random(&aad(&id), &json)?);
    fsutil::write_atomic(&dir.join(id.to_hex()), &file)?;
    Ok(id)
}

/// Read, authenticate and parse snapshot file `id` under `dir`.
pub fn read(dir: &Path, meta: &KeySet, id: &Id) -> Result<Snapshot> {
    let path = dir.join(id.to_hex());
    let what = format!("snapshot file {}", path.display());
    let meta_len = std::fs::metadata(&path)
        .map_err(|e| Error::io("stat of", &path, e))?
        .len();
    if meta_len as usize > MAX_SNAPSHOT_FILE {
        return Err(Error::corrupt(what, "larger than the snapshot file limit"));
    }
    let bytes = std::fs::read(&path).map_err(|e| Error::io("reading", &path, e))?;
    if bytes.len() < 8 || &bytes[..8] != SNAPSHOT_MAGIC {
        return Err(Error::corrupt(what, "bad magic"));
    }
    let json = meta.open_random(&what, &aad(id), &bytes[8..])?;
    if meta.id_of(&json) != *id {
        return Err(Error::corrupt(what, "content does not match its id"));
    }
    serde_json::from_slice(&json).map_err(|e| Error::corrupt(what, e.to_string()))
}
