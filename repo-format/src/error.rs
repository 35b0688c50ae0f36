//! The one error type of `repo-format`.
//!
//! Policy:
//! - Every variant says *what* failed and *where* (path, blob id, pack name),
//!   so the binaries can print it as-is and the operator knows what to do.
//! - "The bytes are wrong" ([`Error::Corrupt`], [`Error::IdMismatch`],
//!   [`Error::Decrypt`]) is kept apart from "the system failed"
//!   ([`Error::Io`], [`Error::Catalog`]): the first means damage or tampering
//!   and must never be retried into success; the second may be transient.
//! - Sources are kept with `#[source]`, never flattened into the message.
//! - Nothing read from disk may panic: decoders return [`Error::Corrupt`].

use std::path::PathBuf;

use crate::id::Id;

/// Everything that can go wrong reading or writing a repository.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file-system operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done ("reading", "fsync of", ...).
        op: &'static str,
        /// The file or directory concerned.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// The catalog database failed.
    #[error("catalog {what}: {source}")]
    Catalog {
        /// What the catalog was doing.
        what: String,
        /// SQLite's error.
        #[source]
        source: rusqlite::Error,
    },
    /// The keyring could not be unlocked with the given passphrase.
    #[error("wrong passphrase for keyring {0} (or the keyring file is damaged)")]
    WrongPassphrase(PathBuf),
    /// Authenticated decryption failed: the bytes were altered, or a wrong key was used.
    #[error("{what}: authentication failed (data altered or wrong key)")]
    Decrypt {
        /// Which object could not be opened.
        what: String,
    },
    /// A blob opened, but its plaintext does not hash to its id.
    #[error("blob {id}: content hashes to {actual}, not to its id")]
    IdMismatch {
        /// The id the blob was stored under.
        id: Id,
        /// The id its content hashes to.
        actual: Id,
    },
    /// Bytes at rest do not follow the format.
    #[error("{what} is corrupt: {detail}")]
    Corrupt {
        /// Which object (pack, tree, snapshot file...).
        what: String,
        /// What exactly is wrong.
        detail: String,
    },
    /// A blob the caller asked for is not in the catalog.
    #[error("blob {0} is not in the catalog (missing data: run `check`)")]
    MissingBlob(Id),
    /// A snapshot id or prefix matches nothing.
    #[error("no snapshot matches {0:?}")]
    NoSuchSnapshot(String),
    /// A snapshot prefix matches more than one snapshot.
    #[error("snapshot prefix {0:?} is ambiguous; give more characters")]
    AmbiguousSnapshot(String),
    /// A path inside a snapshot does not exist.
    #[error("no entry {path:?} in snapshot {snapshot}")]
    NoSuchPath {
        /// The snapshot searched.
        snapshot: Id,
        /// The path asked for.
        path: String,
    },
    /// A repository operation was refused because it would be unsafe.
    #[error("refused: {0}")]
    Refused(String),
    /// The repository directory is not a hubvault repository, or a newer version.
    #[error("{path}: {detail}")]
    BadRepository {
        /// The repository directory.
        path: PathBuf,
        /// What is wrong with it.
        detail: String,
    },
    /// A worker thread of the pipeline died.
    #[error("internal pipeline failure: {0}")]
    Pipeline(String),
}

/// Shorthand for results carrying [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Build an [`Error::Io`] for `op` on `path`.
    pub fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            op,
            path: path.into(),
            source,
        }
    }

    /// Build an [`Error::Corrupt`].
    pub fn corrupt(what: impl Into<String>, detail: impl Into<String>) -> Self {
        Error::Corrupt {
            what: what.into(),
            detail: detail.into(),
        }
    }

    /// Build an [`Error::Catalog`].
    pub fn catalog(what: impl Into<String>, source: rusqlite::Error) -> Self {
        Error::Catalog {
            what: what.into(),
            source,
        }
    }

    /// True when the error means damaged or tampered bytes rather than a system failure.
    pub fn is_integrity(&self) -> bool {
        matches!(
            self,
            Error::Decrypt { .. } | Error::IdMismatch { .. } | Error::Corrupt { .. }
        )
    }
}
