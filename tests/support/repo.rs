//! Test repositories: fast to create, small chunks and packs, and a way to
//! put hand-made blobs and snapshots into them.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use repo_format::backup::{BackupOptions, BackupOutcome, ParentChoice};
use repo_format::blob::{BlobKind, Sealer};
use repo_format::config::{ChunkerParams, RepoConfig};
use repo_format::keyring::KdfParams;
use repo_format::pack::writer::PackWriter;
use repo_format::restore::{RestoreOptions, RestoreOutcome};
use repo_format::snapshot::{Snapshot, SnapshotStats};
use repo_format::store::PackStore;
use repo_format::store::dir::DirStore;
use repo_format::{Id, LockMode, Repository};
use tempfile::TempDir;

/// The passphrase of every test repository.
pub const PASSPHRASE: &[u8] = b"e2e test passphrase";

/// Host name recorded by test backups.
pub const HOSTNAME: &str = "e2e-host";

/// Argon2id at its cheapest: key derivation is not what these tests test.
pub fn fast_kdf() -> KdfParams {
    KdfParams {
        m_cost_kib: 64,
        t_cost: 1,
        p_cost: 1,
    }
}

/// Chunk sizes small enough that files of min, avg and max size stay small.
pub fn small_chunker() -> ChunkerParams {
    ChunkerParams {
        min: 1024,
        avg: 4096,
        max: 16384,
        ..Default::default()
    }
}

/// A config with [`small_chunker`] and the smallest pack target (1 MiB).
pub fn small_config() -> RepoConfig {
    let mut c = RepoConfig::new().expect("random repository id");
    c.chunker = small_chunker();
    c.pack_target = 1024 * 1024;
    c
}

/// A repository in its own temporary directory (removed on drop).
pub struct TestRepo {
    _dir: TempDir,
    root: PathBuf,
}

impl Default for TestRepo {
    fn default() -> Self {
        Self::new()
    }
}

impl TestRepo {
    /// A new repository with [`small_config`].
    pub fn new() -> Self {
        Self::with_config(small_config())
    }

    /// A new repository with `config`.
    pub fn with_config(config: RepoConfig) -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        let root = dir.path().join("repo");
        Repository::init(&root, PASSPHRASE, fast_kdf(), config).expect("repository init");
        TestRepo { _dir: dir, root }
    }

    /// The repository directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Open it (shared lock) with the normal directory store.
    pub fn open(&self) -> Repository {
        Repository::open(&self.root, PASSPHRASE, LockMode::Shared).expect("open repository")
    }

    /// Open it (shared lock) with `store` in place of the directory store.
    pub fn open_with_store(&self, store: Arc<dyn PackStore>) -> Repository {
        Repository::open_with_store(&self.root, PASSPHRASE, LockMode::Shared, store)
            .expect("open repository")
    }

    /// A directory store over its packs, as [`Repository::open`] makes.
    pub fn dir_store(&self) -> DirStore {
        DirStore::new(self.root.join("packs"), self.root.join("tmp"))
    }

    /// Paths of every pack file, sorted.
    pub fn pack_paths(&self) -> Vec<PathBuf> {
        let store = self.dir_store();
        let names = store.list().expect("list packs");
        names.iter().map(|n| store.path_of(n)).collect()
    }

    /// Names of the files in `snapshots/`, sorted.
    pub fn snapshot_files(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.root.join("snapshots"))
            .expect("list snapshots dir")
            .map(|e| {
                e.expect("snapshots dir entry")
                    .file_name()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        v.sort();
        v
    }

    /// Remove `catalog.db` and its `-wal`/`-shm` files.
    pub fn delete_catalog(&self) {
        for f in ["catalog.db", "catalog.db-wal", "catalog.db-shm"] {
            let p = self.root.join(f);
            if p.exists() {
                std::fs::remove_file(&p).expect("remove catalog file");
            }
        }
    }
}

/// Backup options for tests: no parent, two threads, a fixed host name.
pub fn backup_options() -> BackupOptions {
    BackupOptions {
        parent: ParentChoice::None,
        threads: 2,
        hostname: HOSTNAME.into(),
        progress: None,
        excludes: Vec::new(),
        dirty: None,
        on_pack: None,
        verify_parent: false,
    }
}

/// Restore options for tests: two threads, owners set when running as root.
pub fn restore_options() -> RestoreOptions {
    RestoreOptions {
        path: None,
        threads: 2,
        set_owner: repo_format::meta::is_root(),
        sync: false,
    }
}

/// Back up `paths` with [`backup_options`]; panics on error.
pub fn backup(repo: &Repository, paths: &[&Path]) -> BackupOutcome {
    let paths: Vec<PathBuf> = paths.iter().map(|p| p.to_path_buf()).collect();
    repo_format::backup::backup(repo, &paths, &backup_options()).expect("backup")
}

/// Restore snapshot `spec` into `target` with [`restore_options`] and assert
/// that it reported no errors.
pub fn restore_clean(repo: &Repository, spec: &str, target: &Path) -> RestoreOutcome {
    let out =
        repo_format::restore::restore(repo, spec, target, &restore_options()).expect("restore");
    assert!(out.errors.is_empty(), "restore errors: {:#?}", out.errors);
    out
}

/// Seal `blobs` (kind, plaintext) into one new pack, make it durable and
/// catalogue it, as the backup pipeline would; returns their ids in order.
/// Ids must be distinct.
pub fn store_blobs(repo: &Repository, blobs: &[(BlobKind, &[u8])]) -> repo_format::Result<Vec<Id>> {
    let mut sealer = Sealer::new(repo.config().zstd_level)?;
    let store = repo.store().as_ref();
    let mut w = PackWriter::new(store)?;
    let mut ids = Vec::new();
    for (kind, plain) in blobs {
        let keys = repo.keyset(*kind)?;
        let id = keys.id_of(plain);
        let sealed = sealer.seal(keys, *kind, &id, plain)?;
        w.add(*kind, id, &sealed, plain.len() as u32)?;
        ids.push(id);
    }
    let fp = w.finish(store, &repo.keys().metadata)?;
    repo.catalog()?
        .insert_pack(&fp.name, fp.size, &fp.entries)?;
    Ok(ids)
}

/// Commit a snapshot whose root tree is `tree` (which must be stored already).
pub fn commit_tree(repo: &Repository, tree: Id) -> repo_format::Result<Id> {
    let snap = Snapshot {
        time_ns: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as i64)
            .unwrap_or(0),
        hostname: HOSTNAME.into(),
        paths: Vec::new(),
        tree,
        parent: None,
        stats: SnapshotStats::default(),
        issues: Vec::new(),
        issues_dropped: 0,
        site: None,
        agent: None,
        source: None,
    };
    repo.commit_snapshot(&snap)
}
