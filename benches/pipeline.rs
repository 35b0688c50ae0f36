//! The whole repository engine end to end, on a generated tree of about
//! 256 MiB (see [`make_mixed_tree`]: large text and random files, medium
//! files, and ~8 000 small files):
//!
//! - `pipeline/backup_full/threads2`: walk, read, chunk, id, zstd-3, seal,
//!   verify, pack, fsync, catalog, into a fresh repository per iteration;
//!   `threads1` alongside shows how the stages scale;
//! - `pipeline/backup_unchanged`: the same tree again, every file taken
//!   from the parent snapshot (walk + metadata compare + trees);
//! - `pipeline/restore_full`: the whole snapshot into an empty directory.
//!
//! The source tree is in the page cache (it was just written) and restored
//! files are not fsynced, so these measure CPU and the pack fsyncs, not the
//! disk's read speed. Few samples: one iteration takes about a second.
//!
//! Scratch directories (source, repositories, restore targets) are made in
//! `$TMPDIR`. On an ext4 file system *without a journal* every file created
//! soon after many were deleted pays a scan of the recently deleted inodes
//! (`recently_deleted` in the kernel), and this bench deletes ~8 000 files
//! per restore iteration: there, run with `TMPDIR=/dev/shm` to measure
//! hubvault rather than the file system.

use std::path::{Path, PathBuf};
use std::time::Duration;

use benches::{MIB, make_mixed_tree, quick_mode};
use criterion::{BatchSize, Criterion, Throughput};
use repo_format::Repository;
use repo_format::backup::{self, BackupOptions, ParentChoice};
use repo_format::config::RepoConfig;
use repo_format::keyring::KdfParams;
use repo_format::repo::LockMode;
use repo_format::restore::{self, RestoreOptions};
use tempfile::TempDir;

const PASSPHRASE: &[u8] = b"bench passphrase";

/// Argon2 at its cheapest: opening a repository must not weigh on the numbers.
const FAST_KDF: KdfParams = KdfParams {
    m_cost_kib: 1024,
    t_cost: 1,
    p_cost: 1,
};

/// A fresh repository with default config in a new temporary directory.
fn fresh_repo() -> (Repository, TempDir) {
    let dir = tempfile::Builder::new()
        .prefix("hubvault-bench-repo")
        .tempdir()
        .expect("temp dir");
    let root = dir.path().join("repo");
    let config = RepoConfig::new().expect("config");
    Repository::init(&root, PASSPHRASE, FAST_KDF, config).expect("init repository");
    let repo = Repository::open(&root, PASSPHRASE, LockMode::Shared).expect("open repository");
    (repo, dir)
}

fn backup_opts(threads: usize) -> BackupOptions {
    BackupOptions {
        parent: ParentChoice::Auto,
        threads,
        hostname: "bench".into(),
        progress: None,
        excludes: Vec::new(),
        dirty: None,
        on_pack: None,
        verify_parent: false,
    }
}

/// Back up `src` and insist that nothing was skipped.
fn backup_ok(repo: &Repository, src: &Path, threads: usize) -> backup::BackupOutcome {
    let out = backup::backup(repo, &[src.to_path_buf()], &backup_opts(threads)).expect("backup");
    assert!(
        !out.snapshot.is_partial(),
        "backup had issues: {:?}",
        out.snapshot.issues
    );
    out
}

fn pipeline(c: &mut Criterion) {
    let total = if quick_mode() { 8 * MIB } else { 256 * MIB };
    let src_dir = tempfile::Builder::new()
        .prefix("hubvault-bench-src")
        .tempdir()
        .expect("temp dir");
    let src: PathBuf = src_dir.path().join("home");
    let tree = make_mixed_tree(&src, total, 42).expect("writing the source tree");
    eprintln!(
        "pipeline: source tree of {} files, {:.1} MiB",
        tree.files,
        tree.bytes as f64 / MIB as f64
    );

    let mut g = c.benchmark_group("pipeline");
    g.throughput(Throughput::Bytes(tree.bytes));
    for threads in [2, 1] {
        g.bench_function(format!("backup_full/threads{threads}"), |b| {
            b.iter_batched(
                fresh_repo,
                // Return the repository so that deleting it is not timed.
                |(repo, dir)| (backup_ok(&repo, &src, threads), repo, dir),
                BatchSize::PerIteration,
            )
        });
    }

    let (repo, _repo_dir) = fresh_repo();
    // Files changed within a clock tick of a backup's start are read again
    // by the next one (racily clean): leave more than that.
    std::thread::sleep(std::time::Duration::from_millis(50));
    let first = backup_ok(&repo, &src, 2);
    let s = &first.snapshot.stats;
    eprintln!(
        "pipeline: full backup stored {} blobs, {:.1} MiB plaintext as {:.1} MiB sealed ({:.2}x)",
        s.new_blobs,
        s.new_bytes as f64 / MIB as f64,
        s.new_bytes_stored as f64 / MIB as f64,
        s.new_bytes as f64 / s.new_bytes_stored.max(1) as f64
    );
    g.bench_function("backup_unchanged/threads2", |b| {
        b.iter(|| {
            let out = backup_ok(&repo, &src, 2);
            assert_eq!(out.snapshot.stats.files_unchanged, tree.files);
            out
        })
    });

    let snap = first.id.to_hex();
    let opts = RestoreOptions {
        path: None,
        threads: 2,
        set_owner: false,
        sync: false,
    };
    g.bench_function("restore_full/threads2", |b| {
        b.iter_batched(
            || {
                tempfile::Builder::new()
                    .prefix("hubvault-bench-restore")
                    .tempdir()
                    .expect("temp dir")
            },
            |target| {
                let out = restore::restore(&repo, &snap, target.path(), &opts).expect("restore");
                assert!(out.errors.is_empty(), "restore errors: {:?}", out.errors);
                assert_eq!(out.bytes, tree.bytes);
                target
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

fn main() {
    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(15))
        .configure_from_args();
    pipeline(&mut c);
    c.final_summary();
}
