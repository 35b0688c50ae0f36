//! `ServiceError`: what a collector operation can fail with, and its one
//! mapping to a gRPC status. Messages say what failed and what to do; nothing
//! about another site's data ever appears in one.

use std::path::PathBuf;

use tonic::Status;

/// A failed collector operation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServiceError {
    /// The request is malformed or breaks a rule.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The caller has no certificate, or it does not identify a known party.
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// The caller is known but may not do this.
    #[error("permission denied: {0}")]
    Denied(String),
    /// The named thing does not exist (or is not visible to the caller).
    #[error("not found: {0}")]
    NotFound(String),
    /// It exists already.
    #[error("already exists: {0}")]
    Exists(String),
    /// The request's protocol version is not ours.
    #[error(transparent)]
    Protocol(#[from] proto::convert::ConvertError),
    /// The repository failed.
    #[error("repository: {0}")]
    Repo(#[from] repo_format::Error),
    /// The collector's state database failed.
    #[error("state database: {0}")]
    State(#[from] rusqlite::Error),
    /// A file operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// On which path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Data a caller may read is gone from the repository (a scrub set its
    /// pack aside): DATA_LOSS, distinct from a bug or a missing right.
    #[error("data lost: {0}")]
    Lost(String),
    /// A per-caller limit is reached (see `budget`): retry later.
    #[error("resource exhausted: {0}")]
    Exhausted(String),
    /// Anything else internal (a bug or a dead task).
    #[error("internal error: {0}")]
    Internal(String),
}

impl ServiceError {
    /// Build an [`ServiceError::Io`].
    pub fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ServiceError::Io {
            op,
            path: path.into(),
            source,
        }
    }
}

impl From<ServiceError> for Status {
    fn from(e: ServiceError) -> Status {
        let msg = e.to_string();
        match e {
            ServiceError::Invalid(_) => Status::invalid_argument(msg),
            // Another protocol version: the caller must upgrade. Any other
            // field that breaks the protocol is a malformed request.
            ServiceError::Protocol(proto::convert::ConvertError::Protocol(_)) => {
                Status::failed_precondition(msg)
            }
            ServiceError::Protocol(_) => Status::invalid_argument(msg),
            ServiceError::Unauthenticated(_) => Status::unauthenticated(msg),
            ServiceError::Denied(_) => Status::permission_denied(msg),
            ServiceError::NotFound(_) => Status::not_found(msg),
            ServiceError::Exists(_) => Status::already_exists(msg),
            ServiceError::Exhausted(_) => Status::resource_exhausted(msg),
            ServiceError::Lost(_) => Status::data_loss(msg),
            ServiceError::Repo(ref r) if r.is_integrity() => Status::data_loss(msg),
            ServiceError::Repo(_)
            | ServiceError::State(_)
            | ServiceError::Io { .. }
            | ServiceError::Internal(_) => {
                tracing::error!("{msg}");
                Status::internal(msg)
            }
        }
    }
}
