//! The agent's state directory:
//!
//! ```text
//! agent.json   collector address, site, agent id, repository parameters
//! agent.key    private key (0600), generated here, never sent
//! agent.pem    certificate issued by the collector
//! ca.pem       the collector's CA
//! passphrase   unlocks the spool's keyring (0600)
//! spool/       local repository (same keys and chunking as the collector's):
//!              backups land here first, restore jobs pull into it; data
//!              packs are dropped once uploaded (see `trim`)
//! acked.db     ids the collector acknowledged as durable
//! spool-use.lock  held shared by restore jobs, exclusive by a spool trim
//! history.db   per source: last scheduled run, last commit, last local snapshot
//! sources.pb   the sources and policies last pushed by the collector
//! ```

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// Contents of `agent.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentConfig {
    /// Collector address (https://host:port).
    pub collector: String,
    /// Site of this agent.
    pub site: String,
    /// This agent's id.
    pub agent_id: String,
    /// FastCDC min/avg/max and zstd level of the repository.
    pub chunk_min: u32,
    /// Average chunk size.
    pub chunk_avg: u32,
    /// Maximum chunk size.
    pub chunk_max: u32,
    /// FastCDC normalisation level (1 in an `agent.json` written before it was recorded).
    #[serde(default = "repo_format::config::legacy_normalization")]
    pub chunk_normalization: u8,
    /// zstd level.
    pub zstd_level: i32,
}

/// An agent state directory.
pub struct StateDir {
    dir: PathBuf,
}

impl StateDir {
    /// The state directory at `dir`.
    pub fn new(dir: &Path) -> Self {
        StateDir {
            dir: dir.to_path_buf(),
        }
    }

    /// The directory itself.
    pub fn root(&self) -> &Path {
        &self.dir
    }

    /// Path of a file in it.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// True when the agent has enrolled.
    pub fn is_enrolled(&self) -> bool {
        self.path("agent.json").exists()
    }

    /// Finish an interrupted certificate renewal. Renewal writes
    /// `agent.key.new`, then `agent.pem.new` (the commit marker), then renames
    /// the key, then the certificate: whatever the crash point, this leaves a
    /// matching pair.
    pub fn recover_identity(&self) -> Result<()> {
        let (kn, pn) = (self.path("agent.key.new"), self.path("agent.pem.new"));
        if pn.exists() {
            if kn.exists() {
                std::fs::rename(&kn, self.path("agent.key")).context("finishing key renewal")?;
            }
            std::fs::rename(&pn, self.path("agent.pem"))
                .context("finishing certificate renewal")?;
        } else if kn.exists() {
            std::fs::remove_file(&kn).context("removing an unfinished renewal key")?;
        }
        Ok(())
    }

    /// Replace the identity with a renewed key and certificate (crash-safe, see
    /// [`StateDir::recover_identity`]).
    pub fn replace_identity(&self, key_pem: &str, cert_pem: &str) -> Result<()> {
        self.write("agent.key.new", key_pem.as_bytes(), true)?;
        self.write("agent.pem.new", cert_pem.as_bytes(), false)?;
        self.recover_identity()
    }

    /// Read a file as bytes.
    pub fn read(&self, name: &str) -> Result<Vec<u8>> {
        std::fs::read(self.path(name))
            .with_context(|| format!("reading {} (enrolled?)", self.path(name).display()))
    }

    /// Write a file; `private` files are created 0600.
    pub fn write(&self, name: &str, data: &[u8], private: bool) -> Result<()> {
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("creating {}", self.dir.display()))?;
        let p = self.path(name);
        let tmp = self.path(&format!(".{name}.tmp"));
        let mut f = std::fs::File::options()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(if private { 0o600 } else { 0o644 })
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(data)
            .and_then(|_| f.sync_all())
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &p).with_context(|| format!("renaming into {}", p.display()))
    }

    /// Open the spool repository and the acknowledged set.
    pub fn spool(&self) -> Result<(repo_format::Repository, crate::acked::Acked)> {
        let pass =
            String::from_utf8(self.read("passphrase")?).context("passphrase file is not text")?;
        // Spool packs are written with direct I/O too, although the upload
        // reads each back at once: through the page cache, 256 MiB of
        // incompressible data cost the agent 0.59-0.66 s of system time,
        // direct 0.27-0.44 s, and the mixed set went end to end in
        // 4.57-4.97 s instead of 5.29-6.07 s.
        let repo = repo_format::Repository::open(
            &self.path("spool"),
            pass.trim().as_bytes(),
            repo_format::LockMode::Shared,
        )
        .context("opening the spool repository")?;
        let acked = crate::acked::Acked::open(&self.path("acked.db"))?;
        Ok((repo, acked))
    }

    /// The agent's configuration.
    pub fn config(&self) -> Result<AgentConfig> {
        serde_json::from_slice(&self.read("agent.json")?).context("agent.json is malformed")
    }
}
