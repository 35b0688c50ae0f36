//! `hubvault repo …`: offline commands on a repository directory.
//!
//! Exit status: 0 success; 1 error; 3 backup committed but partial (some
//! paths unreadable or changed while read, as restic does).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use repo_format::backup::{BackupOptions, ParentChoice, Progress};
use repo_format::config::RepoConfig;
use repo_format::keyring::KdfParams;
use repo_format::restore::RestoreOptions;
use repo_format::tree::EntryKind;
use repo_format::{Id, LockMode, Repository};

use crate::RepoArgs;
use crate::output::{ProgressBar, size, time};

#[derive(Subcommand)]
pub(crate) enum RepoCommand {
    /// Create a new repository.
    Init {
        #[command(flatten)]
        repo: RepoArgs,
        /// zstd level for every blob (fixed for the repository's life).
        #[arg(long, default_value_t = 3)]
        zstd_level: i32,
        /// Argon2id memory in KiB for the keyring (tests use a small value).
        #[arg(long, hide = true)]
        kdf_memory_kib: Option<u32>,
        /// Chunker sizes as MIN,AVG,MAX bytes (fixed for the repository's life).
        #[arg(long, hide = true, value_delimiter = ',')]
        chunk_sizes: Option<Vec<u32>>,
    },
    /// Back up paths and print the new snapshot's id.
    Backup {
        #[command(flatten)]
        repo: RepoArgs,
        /// Read every file, ignoring previous snapshots.
        #[arg(long)]
        no_parent: bool,
        /// Compare against this snapshot instead of the latest of the same paths.
        #[arg(long, conflicts_with = "no_parent")]
        parent: Option<String>,
        /// Threads per pipeline stage (default: the number of cores).
        #[arg(long)]
        threads: Option<usize>,
        /// Print the snapshot as JSON.
        #[arg(long)]
        json: bool,
        /// Leave out entries matching this glob (repeatable; `*.tmp`, `build/*`, `**/cache`).
        #[arg(long = "exclude")]
        excludes: Vec<String>,
        /// Files and directories to back up.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// List snapshots.
    Snapshots {
        #[command(flatten)]
        repo: RepoArgs,
        #[arg(long)]
        json: bool,
    },
    /// List the entries of a snapshot (below PATH if given).
    Ls {
        #[command(flatten)]
        repo: RepoArgs,
        /// Snapshot id, unique prefix, or "latest".
        snapshot: String,
        /// Directory or file inside the snapshot.
        path: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Restore a snapshot (or one path of it) into a directory.
    Restore {
        #[command(flatten)]
        repo: RepoArgs,
        /// Snapshot id, unique prefix, or "latest".
        snapshot: String,
        /// Directory to restore into (created if missing).
        #[arg(long)]
        target: PathBuf,
        /// Only this path inside the snapshot, restored as TARGET/<its last component>.
        #[arg(long)]
        path: Option<String>,
        /// Writer threads (default: twice the number of cores).
        #[arg(long)]
        threads: Option<usize>,
        /// Flush the target's file system before exiting, so the restored
        /// files survive a power loss once the command has succeeded.
        #[arg(long)]
        sync: bool,
    },
    /// Check the repository's structure (and with --read-data, every blob).
    Check {
        #[command(flatten)]
        repo: RepoArgs,
        #[arg(long)]
        read_data: bool,
        #[arg(long)]
        json: bool,
    },
    /// Recreate the catalog from the packs and snapshot files.
    RebuildCatalog {
        #[command(flatten)]
        repo: RepoArgs,
        #[arg(long)]
        json: bool,
    },
}

fn passphrase(a: &RepoArgs) -> Result<Vec<u8>> {
    let raw = match &a.passphrase_file {
        Some(f) => {
            std::fs::read(f).with_context(|| format!("reading passphrase file {}", f.display()))?
        }
        None => match std::env::var_os("HUBVAULT_PASSPHRASE") {
            Some(p) => std::os::unix::ffi::OsStringExt::into_vec(p),
            None => bail!("no passphrase: pass --passphrase-file FILE or set HUBVAULT_PASSPHRASE"),
        },
    };
    let line = raw.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.is_empty() {
        bail!("the passphrase is empty");
    }
    Ok(line.to_vec())
}

fn open(a: &RepoArgs, lock: LockMode) -> Result<Repository> {
    Repository::open(&a.repo, &passphrase(a)?, lock)
        .with_context(|| format!("opening repository {}", a.repo.display()))
}

pub(crate) fn run(cmd: RepoCommand) -> Result<ExitCode> {
    match cmd {
        RepoCommand::Init {
            repo,
            zstd_level,
            kdf_memory_kib,
            chunk_sizes,
        } => {
            let mut cfg = RepoConfig::new()?;
            cfg.zstd_level = zstd_level;
            if let Some(s) = chunk_sizes {
                let [min, avg, max] = s[..] else {
                    bail!("--chunk-sizes needs MIN,AVG,MAX");
                };
                cfg.chunker = repo_format::config::ChunkerParams {
                    min,
                    avg,
                    max,
                    ..Default::default()
                };
            }
            let kdf = KdfParams::with_memory_kib(kdf_memory_kib);
            Repository::init(&repo.repo, &passphrase(&repo)?, kdf, cfg)
                .with_context(|| format!("creating repository {}", repo.repo.display()))?;
            println!("created repository {}", repo.repo.display());
            Ok(ExitCode::SUCCESS)
        }
        RepoCommand::Backup {
            repo,
            no_parent,
            parent,
            threads,
            json,
            excludes,
            paths,
        } => backup(&repo, no_parent, parent, threads, json, excludes, &paths),
        RepoCommand::Snapshots { repo, json } => snapshots(&repo, json),
        RepoCommand::Ls {
            repo,
            snapshot,
            path,
            json,
        } => ls(&repo, &snapshot, path.as_deref(), json),
        RepoCommand::Restore {
            repo,
            snapshot,
            target,
            path,
            threads,
            sync,
        } => restore(&repo, &snapshot, target, path, threads, sync),
        RepoCommand::Check {
            repo,
            read_data,
            json,
        } => check(&repo, read_data, json),
        RepoCommand::RebuildCatalog { repo, json } => {
            let (_, report) =
                repo_format::rebuild::rebuild_catalog(&repo.repo, &passphrase(&repo)?)
                    .with_context(|| format!("rebuilding catalog of {}", repo.repo.display()))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!(
                    "rebuilt catalog: {} packs, {} blobs, {} snapshots",
                    report.packs, report.blobs, report.snapshots
                );
                if let Some(o) = &report.old_catalog {
                    println!("previous catalog kept at {o}");
                }
                for s in &report.skipped {
                    println!("skipped {s}");
                }
            }
            Ok(if report.skipped.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
    }
}

fn backup(
    a: &RepoArgs,
    no_parent: bool,
    parent: Option<String>,
    threads: Option<usize>,
    json: bool,
    excludes: Vec<String>,
    paths: &[PathBuf],
) -> Result<ExitCode> {
    let repo = open(a, LockMode::Shared)?;
    let mut opts = BackupOptions {
        excludes,
        ..Default::default()
    };
    if no_parent {
        opts.parent = ParentChoice::None;
    } else if let Some(p) = parent {
        opts.parent = ParentChoice::Snapshot(repo.find_snapshot(&p)?.0);
    }
    if let Some(t) = threads {
        opts.threads = t.max(1);
    }
    let progress = Arc::new(Progress::default());
    opts.progress = Some(progress.clone());
    let bar = ProgressBar::start(progress);
    let out = repo_format::backup::backup(&repo, paths, &opts)
        .context("backup failed; no snapshot was written")?;
    drop(bar);
    let s = &out.snapshot;
    if json {
        let mut v = serde_json::to_value(s)?;
        v["id"] = serde_json::Value::String(out.id.to_hex());
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        eprintln!(
            "{} files ({} unchanged), {} dirs, {} in {:.2}s; added {} blobs, {} ({} stored)",
            s.stats.files,
            s.stats.files_unchanged,
            s.stats.dirs,
            size(s.stats.bytes),
            s.stats.duration_ms as f64 / 1000.0,
            s.stats.new_blobs,
            size(s.stats.new_bytes),
            size(s.stats.new_bytes_stored),
        );
        for i in &s.issues {
            eprintln!("warning: {}: {}", i.path, i.reason);
        }
        if s.issues_dropped > 0 {
            eprintln!("warning: {} more issues not listed", s.issues_dropped);
        }
        println!("{}", out.id);
    }
    Ok(if s.is_partial() {
        eprintln!(
            "snapshot {} is partial: some paths were not backed up as they were",
            out.id.short()
        );
        ExitCode::from(3)
    } else {
        ExitCode::SUCCESS
    })
}

fn snapshots(a: &RepoArgs, json: bool) -> Result<ExitCode> {
    let repo = open(a, LockMode::Shared)?;
    let all = repo.snapshots()?;
    if json {
        let v: Vec<serde_json::Value> = all
            .iter()
            .map(|(id, s)| {
                let mut v = serde_json::to_value(s).unwrap_or_default();
                v["id"] = serde_json::Value::String(id.to_hex());
                v
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<10} {:<19}  {:<12} {:>8} {:>10}  paths",
        "id", "time (UTC)", "host", "files", "size"
    );
    for (id, s) in &all {
        println!(
            "{:<10} {:<19}  {:<12} {:>8} {:>10}  {}{}",
            id.short(),
            time(s.time_ns),
            s.hostname,
            s.stats.files,
            size(s.stats.bytes),
            s.paths.join(" "),
            if s.is_partial() { "  (partial)" } else { "" }
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn ls(a: &RepoArgs, spec: &str, path: Option<&str>, json: bool) -> Result<ExitCode> {
    let repo = open(a, LockMode::Shared)?;
    let (sid, snap) = repo.find_snapshot(spec)?;
    let (prefix, entries) = match path.filter(|p| !p.trim_matches('/').is_empty()) {
        None => (String::new(), repo.read_tree(&snap.tree)?),
        Some(p) => {
            let e = repo_format::restore::find_entry(&repo, &sid, &snap.tree, p)?;
            let prefix = format!("/{}", p.trim_matches('/'));
            match e.subtree {
                Some(t) => (prefix, repo.read_tree(&t)?),
                None => (
                    prefix
                        .rsplit_once('/')
                        .map(|x| x.0.to_string())
                        .unwrap_or_default(),
                    vec![e],
                ),
            }
        }
    };
    let mut rows = Vec::new();
    for e in entries {
        let name = String::from_utf8_lossy(&e.name).into_owned();
        if json {
            rows.push(serde_json::json!({
                "path": format!("{prefix}/{name}"),
                "type": e.kind,
                "mode": format!("{:o}", e.mode),
                "uid": e.uid, "gid": e.gid, "user": e.user, "group": e.group,
                "size": e.size,
                "mtime_ns": e.mtime_ns,
                "target": String::from_utf8_lossy(&e.target),
                "chunks": e.chunks.len(),
            }));
        } else {
            let t = match e.kind {
                EntryKind::Dir => 'd',
                EntryKind::Symlink => 'l',
                EntryKind::Fifo => 'p',
                EntryKind::CharDev => 'c',
                EntryKind::BlockDev => 'b',
                EntryKind::Socket => 's',
                EntryKind::File => '-',
            };
            let link = if e.kind == EntryKind::Symlink {
                format!(" -> {}", String::from_utf8_lossy(&e.target))
            } else {
                String::new()
            };
            println!(
                "{t}{:04o} {:>8} {:>8} {:>10} {}  {prefix}/{name}{link}",
                e.mode,
                if e.user.is_empty() {
                    e.uid.to_string()
                } else {
                    e.user.clone()
                },
                if e.group.is_empty() {
                    e.gid.to_string()
                } else {
                    e.group.clone()
                },
                e.size,
                time(e.mtime_ns)
            );
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    }
    Ok(ExitCode::SUCCESS)
}

fn restore(
    a: &RepoArgs,
    spec: &str,
    target: PathBuf,
    path: Option<String>,
    threads: Option<usize>,
    sync: bool,
) -> Result<ExitCode> {
    let repo = open(a, LockMode::Shared)?;
    let mut opts = RestoreOptions {
        path,
        sync,
        ..Default::default()
    };
    if let Some(t) = threads {
        opts.threads = t.max(1);
    }
    let out = repo_format::restore::restore(&repo, spec, &target, &opts)
        .with_context(|| format!("restoring {spec} into {}", target.display()))?;
    for w in &out.warnings {
        eprintln!("warning: {w}");
    }
    for e in &out.errors {
        eprintln!("error: {e}");
    }
    if out.leftovers > 0 {
        eprintln!(
            "removed {} temporary entries left by an interrupted restore",
            out.leftovers
        );
    }
    eprintln!(
        "restored {} files, {} dirs, {} into {}",
        out.files,
        out.dirs,
        size(out.bytes),
        target.display()
    );
    if out.errors.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("restore incomplete: {} entries failed", out.errors.len());
        Ok(ExitCode::from(1))
    }
}

fn check(a: &RepoArgs, read_data: bool, json: bool) -> Result<ExitCode> {
    let repo = open(a, LockMode::Shared)?;
    let r = repo_format::check::check(&repo, read_data)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!(
            "checked {} packs, {} snapshots, {} trees{}",
            r.packs,
            r.snapshots,
            r.trees,
            if read_data {
                format!(", read {} blobs", r.blobs_read)
            } else {
                String::new()
            }
        );
        if !r.unreferenced_packs.is_empty() {
            println!(
                "{} packs not in the catalog (harmless; leftovers of interrupted backups)",
                r.unreferenced_packs.len()
            );
        }
        for p in &r.problems {
            let id = p.id.map(|i: Id| i.to_hex()).unwrap_or_default();
            println!("DAMAGED {} {id}: {}", p.what, p.detail);
            for (s, path) in &p.used_by {
                println!("    used by snapshot {} at {path}", s.short());
            }
        }
        println!(
            "{}",
            if r.is_ok() {
                "no problems found"
            } else {
                "problems found"
            }
        );
    }
    Ok(if r.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
