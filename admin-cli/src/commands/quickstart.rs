//! `hubvault quickstart PATH`: the main job on embedded defaults.
//!
//! Until the collector and agents exist (issue 3) the main job is a local
//! backup: create a repository under `./hubvault-data/` (passphrase generated
//! into `./hubvault-data/passphrase`, mode 0600) on first use, back PATH up,
//! and print how to list, browse and restore it. Run it again to take an
//! incremental snapshot.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use repo_format::backup::BackupOptions;
use repo_format::config::RepoConfig;
use repo_format::keyring::KdfParams;
use repo_format::{LockMode, Repository};

use crate::output::size;

/// Run the quickstart for `paths` with data under `data`.
pub(crate) fn run(data: &Path, paths: &[PathBuf]) -> Result<ExitCode> {
    let repo_dir = data.join("repo");
    let pass_file = data.join("passphrase");
    if !repo_dir.join("config").exists() {
        std::fs::create_dir_all(data).with_context(|| format!("creating {}", data.display()))?;
        let mut raw = [0u8; 24];
        repo_format::crypto::fill_random(&mut raw)?;
        let pass = repo_format::id::hex_encode(&raw);
        let mut f = std::fs::File::options()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&pass_file)
            .with_context(|| {
                format!(
                    "creating {} (remove {} to start over)",
                    pass_file.display(),
                    data.display()
                )
            })?;
        writeln!(f, "{pass}")?;
        Repository::init(
            &repo_dir,
            pass.as_bytes(),
            KdfParams::default(),
            RepoConfig::new()?,
        )
        .with_context(|| format!("creating repository {}", repo_dir.display()))?;
        println!(
            "created repository {} (passphrase in {})",
            repo_dir.display(),
            pass_file.display()
        );
    }
    let pass = std::fs::read_to_string(&pass_file)
        .with_context(|| format!("reading {}", pass_file.display()))?;
    let repo = Repository::open(&repo_dir, pass.trim().as_bytes(), LockMode::Shared)?;
    let out = repo_format::backup::backup(&repo, paths, &BackupOptions::default())?;
    let s = &out.snapshot;
    println!(
        "snapshot {}: {} files ({} unchanged), {} in {:.2}s, {} new stored",
        out.id.short(),
        s.stats.files,
        s.stats.files_unchanged,
        size(s.stats.bytes),
        s.stats.duration_ms as f64 / 1000.0,
        size(s.stats.new_bytes_stored)
    );
    for i in &s.issues {
        println!("warning: {}: {}", i.path, i.reason);
    }
    let r = repo_dir.display();
    let p = pass_file.display();
    println!("\nnext:");
    println!("  hubvault repo snapshots --repo {r} --passphrase-file {p}");
    println!("  hubvault repo ls --repo {r} --passphrase-file {p} latest");
    println!(
        "  hubvault repo restore --repo {r} --passphrase-file {p} latest --target /tmp/restored"
    );
    println!("  hubvault repo check --repo {r} --passphrase-file {p} --read-data");
    Ok(if s.is_partial() {
        ExitCode::from(3)
    } else {
        ExitCode::SUCCESS
    })
}
