//! A repository on disk: layout, opening, locking, and reading blobs.
//!
//! ```text
//! <repo>/config          plain JSON (RepoConfig)
//! <repo>/keyring         keys wrapped under a passphrase (keyring.rs)
//! <repo>/catalog.db      SQLite index (catalog.rs); rebuildable
//! <repo>/packs/xx/<name> pack files (pack.rs), fan-out by first byte
//! <repo>/snapshots/<id>  sealed snapshot files (snapshot.rs)
//! <repo>/tmp/            temporary files; anything here is garbage (swept at
//!                        open once a day old)
//! <repo>/lock            advisory lock: shared for backup/restore, exclusive for rebuild
//! ```

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::blob::{self, BlobKind};
use crate::catalog::{BlobLocation, Catalog, PackState};
use crate::config::RepoConfig;
use crate::crypto::{KeySet, Keys};
use crate::error::{Error, Result};
use crate::id::Id;
use crate::keyring::{self, KdfParams};
use crate::pack::PackEntry;
use crate::snapshot::{self, Snapshot};
use crate::span_cache::SpanCache;
use crate::store::PackStore;
use crate::store::dir::DirStore;
use crate::tree::{self, Entry};

/// Directory under the repository root where damaged packs are set aside
/// (see [`Repository::quarantine_pack`]): not read, not rebuilt from.
pub const DAMAGED_DIR: &str = "damaged";

/// How a repository is locked while open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    /// Backups and restores: many at once.
    Shared,
    /// Catalog rebuild (and, later, pruning): alone.
    Exclusive,
}

/// An open repository.
pub struct Repository {
    root: PathBuf,
    config: RepoConfig,
    keys: Keys,
    store: Arc<dyn PackStore>,
    catalog: Mutex<Catalog>,
    /// Pack spans recently read for trees (see [`crate::span_cache`]).
    tree_spans: SpanCache,
    _lock: File,
}

/// Paths inside a repository.
pub(crate) fn catalog_path(root: &Path) -> PathBuf {
    root.join("catalog.db")
}

impl Repository {
    /// Create a new repository in `root` (which must not exist or be empty).
    pub fn init(root: &Path, passphrase: &[u8], kdf: KdfParams, config: RepoConfig) -> Result<()> {
        Self::init_with_keys(root, passphrase, kdf, config, &Keys::generate()?)
    }

    /// Create a new repository whose keyring holds `keys` (a collector's
    /// holds the metadata keys only: it can walk trees, never read content).
    pub fn init_with_keys(
        root: &Path,
        passphrase: &[u8],
        kdf: KdfParams,
        config: RepoConfig,
        keys: &Keys,
    ) -> Result<()> {
        config.validate()?;
        if root.exists()
            && std::fs::read_dir(root)
                .map_err(|e| Error::io("listing", root, e))?
                .next()
                .is_some()
        {
            return Err(Error::Refused(format!(
                "{} exists and is not empty",
                root.display()
            )));
        }
        for d in ["", "packs", "snapshots", "tmp"] {
            let p = root.join(d);
            std::fs::create_dir_all(&p).map_err(|e| Error::io("creating", &p, e))?;
        }
        DirStore::create_layout(&root.join("packs"))?;
        keyring::write_keyring(&root.join("keyring"), keys, passphrase, kdf)?;
        Catalog::create(&catalog_path(root))?;
        // config last: its presence marks a complete repository.
        config.save(&root.join("config"))
    }

    /// Open the repository at `root` with `passphrase`.
    pub fn open(root: &Path, passphrase: &[u8], lock: LockMode) -> Result<Self> {
        let store = Arc::new(DirStore::new(root.join("packs"), root.join("tmp")));
        Self::open_with_store(root, passphrase, lock, store)
    }

    /// Open with a custom pack store (tests inject faults through this).
    pub fn open_with_store(
        root: &Path,
        passphrase: &[u8],
        lock: LockMode,
        store: Arc<dyn PackStore>,
    ) -> Result<Self> {
        let (config, keys, lock) = Self::open_parts(root, passphrase, lock)?;
        let catalog = Catalog::open(&catalog_path(root))?;
        let repo = Repository {
            root: root.to_path_buf(),
            config,
            keys,
            store,
            catalog: Mutex::new(catalog),
            tree_spans: SpanCache::default(),
            _lock: lock,
        };
        // Snapshot temporaries (small) at open only; packs also later.
        crate::fsutil::sweep_stale(&root.join("snapshots"), crate::fsutil::STALE_TMP, true);
        repo.sweep_temporary_packs();
        repo.adopt_snapshot_files()?;
        Ok(repo)
    }

    /// Delete the temporary packs (up to 32 MiB each) a crash left in
    /// `tmp/` between create and rename that no live writer owns (see
    /// `fsutil::sweep_stale`); returns how many went. Done at open and at
    /// the start of every backup, so a process that keeps the repository
    /// open (an agent, the collector) does not wait for a restart. One
    /// directory listing of what is normally an empty directory.
    pub fn sweep_temporary_packs(&self) -> usize {
        crate::fsutil::sweep_stale(&self.root.join("tmp"), crate::fsutil::STALE_TMP, false)
    }

    /// Catalogue every snapshot file that has no catalog row: what a crash
    /// between a commit's two steps (file, then row) leaves. The file is
    /// the commit point (a writer writes it only once every blob it needs
    /// is durable and catalogued), so the snapshot was committed and is
    /// listed from now on, as a rebuild would. A file that does not verify
    /// stays out, for `check` to report. Costs a directory listing and one
    /// query per open; returns the number adopted.
    fn adopt_snapshot_files(&self) -> Result<usize> {
        let dir = self.snapshots_dir();
        let rd = match std::fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(Error::io("listing", &dir, e)),
        };
        let files: Vec<Id> = rd
            .flatten()
            .filter_map(|f| f.file_name().to_str().and_then(Id::from_hex))
            .collect();
        if files.is_empty() {
            return Ok(0);
        }
        let cat = self.catalog()?;
        let known: std::collections::HashSet<Id> = cat.snapshot_ids()?.into_iter().collect();
        let mut adopted = 0;
        for id in files.iter().filter(|id| !known.contains(id)) {
            if let Ok(snap) = snapshot::read(&dir, &self.keys.metadata, id) {
                cat.insert_snapshot(id, &snap)?;
                adopted += 1;
            }
        }
        Ok(adopted)
    }

    /// Config, keys and lock, without the catalog (rebuild needs these when the catalog is gone).
    pub(crate) fn open_parts(
        root: &Path,
        passphrase: &[u8],
        mode: LockMode,
    ) -> Result<(RepoConfig, Keys, File)> {
        let cfg_path = root.join("config");
        if !cfg_path.exists() {
            return Err(Error::BadRepository {
                path: root.to_path_buf(),
                detail: "not a hubvault repository (no config file); create one with `hubvault repo init`".into(),
            });
        }
        let config = RepoConfig::load(&cfg_path)?;
        let lock_path = root.join("lock");
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| Error::io("opening", &lock_path, e))?;
        let locked = match mode {
            LockMode::Shared => lock.try_lock_shared(),
            LockMode::Exclusive => lock.try_lock(),
        };
        if let Err(e) = locked {
            return Err(Error::Refused(format!(
                "repository {} is locked by another process ({e}); retry when it finishes",
                root.display()
            )));
        }
        let keys = keyring::read_keyring(&root.join("keyring"), passphrase)?;
        Ok((config, keys, lock))
    }

    /// Assemble a repository from parts (used by rebuild once the catalog exists again).
    pub(crate) fn from_parts(
        root: &Path,
        config: RepoConfig,
        keys: Keys,
        store: Arc<dyn PackStore>,
        catalog: Catalog,
        lock: File,
    ) -> Self {
        Repository {
            root: root.to_path_buf(),
            config,
            keys,
            store,
            catalog: Mutex::new(catalog),
            tree_spans: SpanCache::default(),
            _lock: lock,
        }
    }

    /// The repository directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Its config.
    pub fn config(&self) -> &RepoConfig {
        &self.config
    }

    /// Its keys.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// Its pack store.
    pub fn store(&self) -> &Arc<dyn PackStore> {
        &self.store
    }

    /// Path of the catalog database (for opening reader connections).
    pub fn catalog_path(&self) -> PathBuf {
        catalog_path(&self.root)
    }

    /// The snapshots directory.
    pub fn snapshots_dir(&self) -> PathBuf {
        self.root.join("snapshots")
    }

    /// The shared read-write catalog connection.
    pub fn catalog(&self) -> Result<MutexGuard<'_, Catalog>> {
        self.catalog
            .lock()
            .map_err(|_| Error::Pipeline("catalog mutex poisoned".into()))
    }

    /// The key set sealing blobs of `kind`.
    pub fn keyset(&self, kind: BlobKind) -> Result<&KeySet> {
        match kind {
            BlobKind::Data => self.keys.content(),
            BlobKind::Tree => Ok(&self.keys.metadata),
        }
    }

    /// Read and verify the blob at `loc` (id re-derived from the plaintext).
    pub fn read_blob_at(&self, id: &Id, loc: &BlobLocation) -> Result<Vec<u8>> {
        let mut sealed = vec![0u8; loc.length as usize];
        match loc.kind {
            // Walks read trees one by one: see crate::span_cache.
            BlobKind::Tree => {
                self.tree_spans
                    .read(self.store.as_ref(), &loc.pack, loc.offset, &mut sealed)?
            }
            BlobKind::Data => self.store.read_at(&loc.pack, loc.offset, &mut sealed)?,
        }
        blob::open(self.keyset(loc.kind)?, loc.kind, id, &sealed)
    }

    /// Read and verify blob `id` through the shared catalog connection.
    pub fn read_blob(&self, id: &Id) -> Result<Vec<u8>> {
        let loc = self.catalog()?.lookup(id)?.ok_or(Error::MissingBlob(*id))?;
        self.read_blob_at(id, &loc)
    }

    /// Read and decode tree `id`.
    pub fn read_tree(&self, id: &Id) -> Result<Vec<Entry>> {
        let loc = self.catalog()?.lookup(id)?.ok_or(Error::MissingBlob(*id))?;
        if loc.kind != BlobKind::Tree {
            return Err(Error::corrupt(
                format!("tree {id}"),
                "catalogued as a data blob",
            ));
        }
        let plain = self.read_blob_at(id, &loc)?;
        tree::decode(&plain, &format!("tree {id}"))
    }

    /// All snapshots, oldest first.
    pub fn snapshots(&self) -> Result<Vec<(Id, Snapshot)>> {
        self.catalog()?.snapshots()
    }

    /// Resolve a full id or unique hex prefix (or "latest") to a snapshot.
    pub fn find_snapshot(&self, spec: &str) -> Result<(Id, Snapshot)> {
        if let Some(id) = Id::from_hex(spec)
            && let Some(s) = self.catalog()?.snapshot(&id)?
        {
            return Ok((id, s));
        }
        let all = self.snapshots()?;
        if spec == "latest" {
            return all
                .into_iter()
                .last()
                .ok_or_else(|| Error::NoSuchSnapshot(spec.into()));
        }
        let spec_l = spec.to_ascii_lowercase();
        let mut m = all
            .into_iter()
            .filter(|(id, _)| id.to_hex().starts_with(&spec_l));
        let first = m.next().ok_or_else(|| Error::NoSuchSnapshot(spec.into()))?;
        if spec_l.is_empty() || m.next().is_some() {
            return Err(Error::AmbiguousSnapshot(spec.into()));
        }
        Ok(first)
    }

    /// The id [`Repository::commit_snapshot`] will give `snap`.
    pub fn snapshot_id(&self, snap: &Snapshot) -> Result<Id> {
        snapshot::id(&self.keys.metadata, snap)
    }

    /// True when snapshot `id` is committed (its catalog row exists: the
    /// row is written after the file, so it implies the file).
    pub fn has_snapshot(&self, id: &Id) -> Result<bool> {
        Ok(self.catalog()?.snapshot(id)?.is_some())
    }

    /// Write a snapshot file durably, then record it in the catalog: the commit point.
    /// Idempotent: writing the same snapshot again replaces the file with
    /// an identical one and keeps the row.
    pub fn commit_snapshot(&self, snap: &Snapshot) -> Result<Id> {
        let id = snapshot::write(&self.snapshots_dir(), &self.keys.metadata, snap)?;
        self.catalog()?.insert_snapshot(&id, snap)?;
        Ok(id)
    }

    /// Forget snapshot `id` (retention): delete its snapshot file, fsync the
    /// snapshots directory, then delete its catalog row. Idempotent: a
    /// snapshot already gone, wholly or in part, is not an error.
    ///
    /// Only the snapshot goes: no pack and no blob is touched, so this needs
    /// no exclusive lock and a concurrent backup is unaffected; the space its
    /// blobs hold is freed by a later garbage collection. The file goes first
    /// because it is the truth: a crash in between leaves a catalog row
    /// without a file (`check` reports it; calling this again or
    /// `rebuild-catalog` completes the forget), never a file that a rebuild
    /// would bring back.
    pub fn forget_snapshot(&self, id: &Id) -> Result<()> {
        let dir = self.snapshots_dir();
        let path = dir.join(id.to_hex());
        match std::fs::remove_file(&path) {
            Ok(()) => crate::fsutil::sync_dir(&dir)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io("removing", &path, e)),
        }
        self.catalog()?.delete_snapshot(id)?;
        Ok(())
    }

    /// The blobs the catalog holds in pack `name`: from its trailer when that
    /// opens, else from a scan of the catalog (a damaged trailer).
    pub fn pack_entries(&self, name: &Id) -> Result<Vec<PackEntry>> {
        match crate::pack::reader::read_trailer(self.store.as_ref(), name, &self.keys.metadata) {
            Ok(entries) => Ok(entries),
            Err(_) => self.catalog()?.blobs_in_pack(name),
        }
    }

    /// Set damaged pack `name` aside, in `damaged/` under the repository
    /// root, and forget it and its blobs (`entries`, from
    /// [`Repository::pack_entries`]) in the catalog: its blobs are then
    /// unknown here, so whoever still has them stores them again. The file
    /// moves first: a crash in between leaves catalog rows for a missing
    /// pack, which the next scrub finds and forgets, never a damaged pack
    /// that a catalog rebuild would take back.
    pub fn quarantine_pack(&self, name: &Id, entries: &[PackEntry]) -> Result<()> {
        self.store.move_out(name, &self.root.join(DAMAGED_DIR))?;
        self.catalog()?.forget_pack(name, entries)
    }

    /// Delete the file of pack `name` but keep its catalog rows, marked
    /// [`PackState::Dropped`]: its blobs stay known as stored (a backup
    /// does not store them again) but are no longer read here. For an
    /// agent's spool, once the collector holds every blob of the pack. The
    /// state goes first, so the catalog never offers a missing file for
    /// reading; a crash in between leaves an unreferenced file.
    pub fn retire_pack(&self, name: &Id) -> Result<()> {
        self.catalog()?
            .set_pack_state(&[*name], PackState::Dropped)?;
        self.store().remove(name)
    }
}

/// A new repository at `root` with the cheapest key derivation, opened
/// shared (unit tests of this crate).
#[cfg(test)]
pub(crate) fn test_repository(root: &Path) -> Repository {
    let kdf = KdfParams {
        m_cost_kib: 64,
        t_cost: 1,
        p_cost: 1,
    };
    Repository::init(root, b"pw", kdf, RepoConfig::new().expect("config")).expect("init");
    Repository::open(root, b"pw", LockMode::Shared).expect("open")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(n: i64) -> Snapshot {
        Snapshot {
            time_ns: n,
            hostname: "h".into(),
            paths: vec!["/x".into()],
            tree: Id([n as u8; 32]),
            parent: None,
            stats: Default::default(),
            issues: vec![],
            issues_dropped: 0,
            site: None,
            agent: None,
            source: None,
        }
    }

    /// A crash between a commit's file and its row: the next open lists
    /// the snapshot; a file that does not verify stays out.
    #[test]
    fn open_catalogues_a_snapshot_file_left_without_its_row() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("repo");
        let repo = test_repository(&root);
        let a = repo.commit_snapshot(&snap(1)).expect("commit a");
        let b = repo.commit_snapshot(&snap(2)).expect("commit b");
        for id in [&a, &b] {
            assert!(
                repo.catalog()
                    .expect("cat")
                    .delete_snapshot(id)
                    .expect("row")
            );
        }
        let bad = repo.snapshots_dir().join(b.to_hex());
        let mut bytes = std::fs::read(&bad).expect("read");
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&bad, bytes).expect("damage b");
        drop(repo);
        let repo = Repository::open(&root, b"pw", LockMode::Shared).expect("reopen");
        let listed: Vec<Id> = repo
            .snapshots()
            .expect("list")
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        assert_eq!(listed, vec![a]);
        assert_eq!(repo.adopt_snapshot_files().expect("again"), 0);
    }

    #[test]
    fn forget_snapshot_removes_file_and_row_and_is_idempotent() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("repo");
        let repo = test_repository(&root);
        let a = repo.commit_snapshot(&snap(1)).expect("commit a");
        let b = repo.commit_snapshot(&snap(2)).expect("commit b");
        repo.forget_snapshot(&a).expect("forget");
        let left: Vec<Id> = repo
            .snapshots()
            .expect("list")
            .into_iter()
            .map(|(i, _)| i)
            .collect();
        assert_eq!(left, vec![b]);
        assert!(!repo.snapshots_dir().join(a.to_hex()).exists());
        assert!(repo.snapshots_dir().join(b.to_hex()).exists());
        // Again, and with a row whose file is already gone (a crash in between).
        repo.forget_snapshot(&a).expect("idempotent");
        std::fs::remove_file(repo.snapshots_dir().join(b.to_hex())).expect("rm");
        repo.forget_snapshot(&b).expect("row without file");
        assert!(repo.snapshots().expect("list").is_empty());
    }

    #[test]
    fn open_sweeps_temporaries_a_crash_left_once_a_day_old() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("repo");
        let repo = test_repository(&root);
        let s = snap(1);
        let kept = repo.commit_snapshot(&s).expect("commit");
        drop(repo);
        let old = std::time::SystemTime::now() - std::time::Duration::from_secs(25 * 3600);
        let make = |p: PathBuf, age: Option<std::time::SystemTime>| {
            let f = File::create(&p).expect("create");
            if let Some(t) = age {
                f.set_modified(t).expect("mtime");
            }
            p
        };
        let tmp = root.join("tmp");
        let stale_pack = make(tmp.join("pack.tmp-0011"), Some(old));
        let live_pack = make(tmp.join("pack.tmp-2233"), None);
        let snaps = root.join("snapshots");
        let stale_snap = make(snaps.join(".abc.tmp-4455"), Some(old));
        let live_snap = make(snaps.join(".abc.tmp-6677"), None);
        let old_other = make(snaps.join("not-a-temporary"), Some(old));

        let repo = Repository::open(&root, b"pw", LockMode::Shared).expect("reopen");
        assert!(
            !stale_pack.exists() && !stale_snap.exists(),
            "stale temporaries swept"
        );
        assert!(
            live_pack.exists() && live_snap.exists(),
            "a live writer's are kept"
        );
        assert!(
            old_other.exists(),
            "only temporary names are swept outside tmp/"
        );
        assert!(repo.snapshots_dir().join(kept.to_hex()).exists());
        assert_eq!(repo.snapshots().expect("list").len(), 1);
    }
}
