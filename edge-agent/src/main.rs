//! `hubvault-agent`: `enroll` with a token, then `run`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use edge_agent::control::ControlOptions;
use edge_agent::state::StateDir;
use repo_format::keyring::KdfParams;

/// The hubvault edge agent.
#[derive(Parser)]
#[command(name = "hubvault-agent", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Enroll with a collector using a one-time token from `hubvault enroll-token`.
    Enroll {
        /// Collector address, e.g. https://collector.example:7443.
        #[arg(long)]
        collector: String,
        /// The token.
        #[arg(long, env = "HUBVAULT_TOKEN")]
        token: String,
        /// State directory (created).
        #[arg(long)]
        state: PathBuf,
        /// Argon2id memory in KiB for the local keyring (default: the least,
        /// its passphrase being a generated random secret).
        #[arg(long, hide = true)]
        kdf_memory_kib: Option<u32>,
    },
    /// Back up PATHs now and upload the snapshot to the collector.
    Backup {
        /// State directory written by `enroll`.
        #[arg(long)]
        state: PathBuf,
        /// Name of the source (a named set of paths).
        #[arg(long, default_value = "default")]
        source: String,
        /// Leave out entries matching this glob (repeatable).
        #[arg(long = "exclude")]
        excludes: Vec<String>,
        /// Files and directories to back up.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Renew the agent's certificate now (normally automatic at half-life).
    Renew {
        /// State directory written by `enroll`.
        #[arg(long)]
        state: PathBuf,
    },
    /// Run: keep the control stream to the collector up.
    Run {
        /// State directory written by `enroll`.
        #[arg(long)]
        state: PathBuf,
        /// Seconds between heartbeats.
        #[arg(long, default_value_t = 10, hide = true)]
        heartbeat_secs: u64,
        /// Hold at most this many inotify watches (default: until the
        /// kernel's fs.inotify.max_user_watches refuses more). Beyond it,
        /// directories are scanned every minute instead of watched.
        #[arg(long)]
        max_watches: Option<usize>,
        /// Seconds between scans of directories left unwatched by the limit.
        #[arg(long, default_value_t = 60, hide = true)]
        unwatched_scan_secs: u64,
    },
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HUBVAULT_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    match Cli::parse().command {
        Command::Enroll {
            collector,
            token,
            state,
            kdf_memory_kib,
        } => {
            // The spool's passphrase is a random secret made at enrollment:
            // no stretching (see `KdfParams::for_random_secret`).
            let kdf = match kdf_memory_kib {
                None => KdfParams::for_random_secret(),
                m => KdfParams::with_memory_kib(m),
            };
            let cfg = rt.block_on(edge_agent::enroll::enroll(&collector, &token, &state, kdf))?;
            println!("enrolled as {} at site {}", cfg.agent_id, cfg.site);
            Ok(())
        }
        Command::Backup {
            state,
            source,
            excludes,
            paths,
        } => rt.block_on(backup(&state, &source, paths, excludes)),
        Command::Renew { state } => {
            let st = StateDir::new(&state);
            let cfg = st.config()?;
            rt.block_on(edge_agent::control::renew_if_due(&st, &cfg.collector, true))?;
            println!("certificate renewed");
            Ok(())
        }
        Command::Run {
            state,
            heartbeat_secs,
            max_watches,
            unwatched_scan_secs,
        } => {
            let st = StateDir::new(&state);
            let opts = ControlOptions {
                heartbeat: Duration::from_secs(heartbeat_secs.clamp(1, 86_400)),
                sources: edge_agent::sources::SourcesOptions {
                    watch_limit: max_watches,
                    unwatched_scan: Some(Duration::from_secs(unwatched_scan_secs.max(1))),
                },
            };
            rt.block_on(edge_agent::control::run(&st, &opts))
        }
    }
}

/// Back up into the spool, then upload and commit at the collector.
async fn backup(
    state: &std::path::Path,
    source: &str,
    paths: Vec<PathBuf>,
    excludes: Vec<String>,
) -> Result<()> {
    let st = StateDir::new(state);
    let run = edge_agent::backup::run(&st, source, paths, excludes).await?;
    for i in &run.local.issues {
        eprintln!("warning: {}: {}", i.path, i.reason);
    }
    let r = &run.upload;
    eprintln!(
        "{} files, {} blobs new to this agent, {} sent ({} bytes) in {:.2} s, backup and upload ({:.1} MB/s sent)",
        run.local.stats.files,
        r.candidates,
        r.sent,
        r.bytes_sent,
        run.secs,
        r.bytes_sent as f64 / run.secs.max(1e-6) / 1e6
    );
    if let Some(id) = run.snapshot() {
        println!("{id}");
    }
    if run.local.is_partial() {
        std::process::exit(3);
    }
    Ok(())
}
