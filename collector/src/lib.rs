//! # collector: `hubvault-collector`
//!
//! The central server: one TLS port serving three gRPC services.
//! - [`service::enroll`]: token + CSR → client certificate (no certificate needed);
//! - [`service::agent`]: what edge agents call (control stream, uploads, commits, reads);
//! - [`service::admin`]: what central IT calls through `hubvault`.
//!
//! Layout: [`pki`] (embedded CA), [`tls`] (rustls config with a swappable
//! CRL-checking verifier), [`conn`] (buffered reads under TLS), [`auth`]
//! (caller identity and revocation on every call), [`state`] (SQLite:
//! sites, agents, tokens, revocations), [`server`] (accept loop, TLS
//! handshakes, tonic), [`error`] (one mapping to `Status`),
//! [`policy`] (source and site policies: storage form, validation) and
//! [`retention`] (which snapshots `prune` keeps, pure).
//!
//! Data directory:
//! ```text
//! <data>/pki/        ca.pem ca.key server.pem server.key
//! <data>/state.db    collector state
//! <data>/repo/       the repository (its keyring holds the metadata key only)
//! <data>/repo.pass   passphrase of that keyring (0600)
//! <data>/admin/      the admin identity written by init: move it to central IT's machine
//! ```

pub mod admission;
pub mod auth;
pub mod budget;
pub mod commit;
pub mod conn;
pub mod error;
pub mod ingest;
pub mod init;
pub mod pki;
pub mod policy;
pub mod reads;
pub mod retention;
pub mod scrub;
pub mod scrub_schedule;
pub mod server;
pub mod service;
pub mod state;
pub mod tls;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use crate::auth::Revoked;
use crate::error::ServiceError;
use crate::pki::Pki;
use crate::state::State;
use crate::tls::SwappableVerifier;
use proto::pb;

/// Commands pushed to a connected agent.
pub type CommandSender = mpsc::Sender<Result<pb::CollectorCommand, tonic::Status>>;

/// Everything the services share.
pub struct Ctx {
    /// The data directory.
    pub data: PathBuf,
    /// The CA.
    pub pki: Pki,
    /// Sites, agents, tokens, revocations.
    pub state: State,
    /// The TLS client verifier (swapped on each CRL).
    pub verifier: Arc<SwappableVerifier>,
    /// Serials refused on every call.
    pub revoked: Arc<Revoked>,
    /// Open control streams by agent id.
    pub sessions: Mutex<HashMap<String, CommandSender>>,
    /// Per-agent limits on uploads in flight.
    pub uploads: Arc<budget::Budgets>,
    /// Per-agent limits on blob reads in flight.
    pub reads: Arc<reads::ReadSlots>,
    /// One scrub at a time; the scheduler's wake-up.
    pub scrub: scrub::Control,
    /// Commits hold it shared from their check to recording the trees
    /// they verified; setting a damaged pack aside holds it exclusively.
    /// Otherwise a commit checked just before a loss would record its trees
    /// as verified just after it (state.db and the catalog are two
    /// databases), and later commits would skip them.
    pub commit_gate: std::sync::RwLock<()>,
    /// Repository parameters agents need.
    pub repo_params: pb::RepoParams,
    /// The repository (metadata keys only: trees readable, content not).
    pub repo: repo_format::Repository,
}

impl Ctx {
    /// Run blocking work (SQLite, signing) off the async runtime.
    pub async fn blocking<T, F>(self: &Arc<Self>, f: F) -> Result<T, ServiceError>
    where
        T: Send + 'static,
        F: FnOnce(&Ctx) -> Result<T, ServiceError> + Send + 'static,
    {
        let ctx = self.clone();
        tokio::task::spawn_blocking(move || f(&ctx))
            .await
            .map_err(|e| ServiceError::Internal(format!("blocking task failed: {e}")))?
    }

    /// Push a command to an agent if its control stream is open.
    pub async fn push(&self, agent_id: &str, cmd: pb::collector_command::Command) -> bool {
        let tx = self
            .sessions
            .lock()
            .ok()
            .and_then(|s| s.get(agent_id).cloned());
        match tx {
            Some(tx) => tx
                .send(Ok(pb::CollectorCommand { command: Some(cmd) }))
                .await
                .is_ok(),
            None => false,
        }
    }

    /// Publish a CRL of every revoked serial to the TLS verifier.
    pub fn publish_crl(&self) -> Result<(), ServiceError> {
        let (serials, number) = self.state.revoked()?;
        let crl = self.pki.crl(&serials, number.max(1))?;
        self.verifier.publish(&self.pki.ca_der()?, &crl)
    }
}
