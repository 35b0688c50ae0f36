//! # repo-format: hubvault's bytes at rest
//!
//! Everything about a repository on disk, with blocking I/O and no network:
//! keys ([`crypto`], [`keyring`]), content-defined chunking ([`chunker`]),
//! sealed blobs ([`blob`]), packs ([`pack`]) in a pack store ([`store`]),
//! directory trees ([`tree`]), snapshots ([`snapshot`]), the SQLite catalog
//! ([`catalog`]), and the operations built on them: [`backup`], [`restore`],
//! [`check`] and [`rebuild`]. The agent, the collector and the admin CLI all
//! use it; it alone can read a repository offline. The byte-level
//! specification is `docs/repo-format.md`.
//!
//! Invariants this crate keeps (DESIGN.md):
//! 1. A snapshot is committed only after every blob it references is in a
//!    durable (fsynced, renamed, directory-fsynced) pack *and* catalogued.
//! 2. A blob is only ever read back through [`blob::open`], which
//!    authenticates it and re-derives its id from the plaintext.
//! 3. A restore never writes outside its target: tree names are validated on
//!    decode and the restorer refuses to descend through symlinks.
//! 4. Bad bytes give [`Error`]s that say what and where; nothing read from
//!    disk can make this crate panic.

pub mod backup;
pub mod blob;
pub mod catalog;
pub mod check;
pub mod chunker;
pub mod config;
pub mod consts;
pub mod crypto;
pub mod direct;
pub mod error;
pub mod fsutil;
pub mod glob;
pub mod id;
pub mod keyring;
pub mod meta;
pub mod pack;
pub mod rebuild;
pub mod repo;
pub mod restore;
pub mod snapshot;
mod span_cache;
pub mod store;
pub mod tree;

pub use error::{Error, Result};
pub use id::Id;
pub use repo::{LockMode, Repository};
