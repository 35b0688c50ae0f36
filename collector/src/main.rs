//! `hubvault-collector`: `init` a data directory, or `run` the server.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use repo_format::keyring::KdfParams;

/// The hubvault collector.
#[derive(Parser)]
#[command(name = "hubvault-collector", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a data directory: CA, server certificate, repository, admin identity.
    Init {
        /// Data directory (created).
        #[arg(long)]
        data: PathBuf,
        /// Extra DNS names for the server certificate (besides hubvault-collector, localhost, 127.0.0.1).
        #[arg(long = "name")]
        names: Vec<String>,
        /// Argon2id memory in KiB for the keyrings (tests use a small value).
        #[arg(long, hide = true)]
        kdf_memory_kib: Option<u32>,
    },
    /// Serve agents and admins.
    Run {
        /// Data directory made by `init`.
        #[arg(long)]
        data: PathBuf,
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:7443")]
        listen: String,
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
    match Cli::parse().command {
        Command::Init {
            data,
            names,
            kdf_memory_kib,
        } => {
            let kdf = KdfParams::with_memory_kib(kdf_memory_kib);
            let r = collector::init::init(&data, &names, kdf)
                .with_context(|| format!("initialising {}", data.display()))?;
            println!("collector data in {}", data.display());
            println!(
                "admin identity in {} (move it to central IT's machine; use it with `hubvault --admin DIR`)",
                r.admin_dir.display()
            );
            Ok(())
        }
        Command::Run { data, listen } => {
            let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            rt.block_on(async move {
                let ctx = collector::server::load(&data)
                    .with_context(|| format!("loading {}", data.display()))?;
                let listener = tokio::net::TcpListener::bind(&listen)
                    .await
                    .with_context(|| format!("listening on {listen}"))?;
                let addr = listener.local_addr()?;
                // Tests and scripts read this line to learn the port when listening on :0.
                println!("listening on {addr}");
                tracing::info!("collector serving on {addr}");
                collector::server::run(ctx, listener, shutdown_signal()).await?;
                tracing::info!("collector stopped");
                Ok(())
            })
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
