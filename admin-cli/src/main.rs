//! `hubvault`: the command central IT types.
//!
//! Two families: the offline repository commands (`hubvault repo …`), which
//! work on a repository directory directly through `repo-format`, and the
//! collector-facing commands (`site`, `enroll-token`, `agents`, `status`,
//! `agent revoke`, `source add`, `policy set`, `prune`, `scrub`, `scrub-schedule`, `snapshots`,
//! `restore`, `jobs`), which speak gRPC over mTLS with the admin identity.

mod commands;
mod output;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// hubvault: deduplicated, encrypted, versioned backups for many offices.
#[derive(Parser)]
#[command(name = "hubvault", version, about)]
struct Cli {
    #[command(flatten)]
    remote: commands::remote::Remote,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Work on a repository directory directly (offline).
    #[command(subcommand)]
    Repo(commands::repo::RepoCommand),
    /// Manage sites (offices).
    #[command(subcommand)]
    Site(commands::remote::SiteCommand),
    /// Create a one-time enrollment token for a new agent of a site.
    EnrollToken {
        /// The site the agent will belong to.
        #[arg(long)]
        site: String,
        /// Validity (e.g. 30m, 24h, 7d; at most 30d).
        #[arg(long, default_value = "24h")]
        ttl: String,
        #[arg(long)]
        json: bool,
    },
    /// List agents.
    Agents {
        #[arg(long)]
        json: bool,
    },
    /// A row per site: agents, online, last snapshot; then per source its
    /// recovery point (oldest change not yet committed, bytes pending);
    /// then the last scrub and the next scheduled one. `--json` prints
    /// `{"sites": [...], "scrub": {...}}`.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Manage one agent.
    #[command(subcommand)]
    Agent(commands::remote::AgentCommand),
    /// Manage the sources (named sets of paths and their policy) of agents.
    #[command(subcommand)]
    Source(commands::remote::SourceCommand),
    /// Set the policy of a site or of a source.
    #[command(subcommand)]
    Policy(commands::remote::PolicyCommand),
    /// Apply retention: forget the snapshots no rule keeps (packs stay until a GC).
    Prune {
        /// Only this site's snapshots.
        #[arg(long)]
        site: Option<String>,
        /// Only this agent's.
        #[arg(long)]
        agent: Option<String>,
        /// Only this source's.
        #[arg(long)]
        source: Option<String>,
        /// List what would be forgotten; change nothing.
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        json: bool,
    },
    /// Read every pack of the collector back and check it against its
    /// name; set damaged ones aside so agents upload their blobs again.
    /// Exits 3 when damage was found.
    /// Progress is shown on a terminal; the scrub runs to its end at the
    /// collector even if this command is interrupted.
    Scrub {
        /// Report damage; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Read at most this fast ("200MB/s", "50MiB/s"; at least 1 MiB/s),
        /// to leave the disk to uploads and restores. Default: as fast as
        /// it goes.
        #[arg(long)]
        limit: Option<String>,
        /// Stop the scrub that is running (an admin's or a scheduled one)
        /// before its next pack; packs it set aside stay aside.
        #[arg(long, conflicts_with_all = ["dry_run", "limit"])]
        cancel: bool,
        #[arg(long)]
        json: bool,
    },
    /// Show, or set, when the collector scrubs on its own: a cron
    /// expression with seconds, in UTC ("0 0 3 * * Sun"), or "off". Also
    /// shows the last scrub and what it found.
    ScrubSchedule {
        /// The schedule, or "off"; omitted: unchanged.
        schedule: Option<String>,
        /// The scheduled scrubs' read rate ("100MB/s"; "0" = unlimited).
        #[arg(long)]
        limit: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Ask an agent to back up now; prints the job id.
    BackupNow {
        /// The agent.
        #[arg(long)]
        agent: String,
        /// Only this source (default: all of the agent's).
        #[arg(long)]
        source: Option<String>,
    },
    /// List snapshots at the collector.
    Snapshots {
        #[arg(long)]
        site: Option<String>,
        #[arg(long)]
        agent: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Restore a snapshot (of any site) onto an agent (of any site); prints the job id.
    Restore {
        /// Snapshot id or unique prefix.
        snapshot: String,
        /// Agent that writes the files.
        #[arg(long)]
        to_agent: String,
        /// Absolute directory on that agent.
        #[arg(long)]
        target: String,
        /// Only this path inside the snapshot.
        #[arg(long)]
        path: Option<String>,
    },
    /// List jobs, or wait for one.
    Jobs {
        /// Wait until this job finishes (exit 0 done, 1 failed).
        #[arg(long)]
        wait: Option<u64>,
        /// Give up waiting after this many seconds.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
        #[arg(long)]
        json: bool,
    },
    /// Start a collector and an agent on embedded defaults and back PATHs up through them.
    Quickstart {
        /// Where the collector's and the agent's data live (created on first use).
        #[arg(long, default_value = "hubvault-data")]
        data: PathBuf,
        /// Address of the collector.
        #[arg(long, default_value = "127.0.0.1:7443")]
        listen: String,
        /// Stop after the backup instead of keeping collector and agent running.
        #[arg(long)]
        once: bool,
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
        Command::Quickstart {
            data,
            listen,
            once,
            paths,
        } => commands::quickstart::run(&data, &listen, once, &paths),
        Command::Site(c) => commands::remote::site(&cli.remote, c),
        Command::EnrollToken { site, ttl, json } => {
            commands::remote::enroll_token(&cli.remote, &site, &ttl, json)
        }
        Command::Agents { json } => commands::remote::agents(&cli.remote, json),
        Command::Status { json } => commands::remote::status(&cli.remote, json),
        Command::Agent(c) => commands::remote::agent(&cli.remote, c),
        Command::Source(c) => commands::remote::source(&cli.remote, c),
        Command::Policy(c) => commands::remote::policy(&cli.remote, c),
        Command::Prune {
            site,
            agent,
            source,
            dry_run,
            json,
        } => commands::remote::prune(&cli.remote, site, agent, source, dry_run, json),
        Command::Scrub { cancel: true, .. } => commands::remote::scrub_cancel(&cli.remote),
        Command::Scrub {
            dry_run,
            limit,
            json,
            ..
        } => commands::remote::scrub(&cli.remote, dry_run, limit, json),
        Command::ScrubSchedule {
            schedule,
            limit,
            json,
        } => commands::remote::scrub_schedule(&cli.remote, schedule, limit, json),
        Command::BackupNow { agent, source } => {
            commands::remote::backup_now(&cli.remote, &agent, source)
        }
        Command::Snapshots { site, agent, json } => {
            commands::remote::snapshots(&cli.remote, site, agent, json)
        }
        Command::Restore {
            snapshot,
            to_agent,
            target,
            path,
        } => commands::remote::restore(&cli.remote, &snapshot, &to_agent, &target, path),
        Command::Jobs {
            wait,
            timeout,
            json,
        } => commands::remote::jobs(&cli.remote, wait, timeout, json),
    };
    match res {
        Ok(code) => code,
        Err(e) => {
            eprintln!("hubvault: error: {e:#}");
            ExitCode::from(1)
        }
    }
}
