//! `hubvault`: the command central IT types.
//!
//! For now it holds the offline repository commands (`hubvault repo …`),
//! which work on a repository directory directly through `repo-format`.
//! The collector-facing commands arrive with the network (issue 3).

mod commands;
mod output;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// hubvault: deduplicated, encrypted, versioned backups for many offices.
#[derive(Parser)]
#[command(name = "hubvault", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Work on a repository directory directly (offline).
    #[command(subcommand)]
    Repo(commands::repo::RepoCommand),
    /// Back up PATHs into a local repository with embedded defaults (created on first use).
    Quickstart {
        /// Where the repository and its generated passphrase live.
        #[arg(long, default_value = "hubvault-data")]
        data: PathBuf,
        /// Files and directories to back up.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
}

/// Where the passphrase comes from.
#[derive(clap::Args, Clone)]
pub(crate) struct RepoArgs {
    /// Repository directory.
    #[arg(long, env = "HUBVAULT_REPO")]
    repo: PathBuf,
    /// File whose first line is the passphrase (else $HUBVAULT_PASSPHRASE).
    #[arg(long, env = "HUBVAULT_PASSPHRASE_FILE")]
    passphrase_file: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let res = match cli.command {
        Command::Repo(c) => commands::repo::run(c),
        Command::Quickstart { data, paths } => commands::quickstart::run(&data, &paths),
    };
    match res {
        Ok(code) => code,
        Err(e) => {
            eprintln!("hubvault: error: {e:#}");
            ExitCode::from(1)
        }
    }
}
