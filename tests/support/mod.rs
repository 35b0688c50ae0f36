//! Shared helpers of the end-to-end tests (`tests/e2e`).
//!
//! - [`repo`]: repositories with a fast key derivation and small chunks and
//!   packs, backup/restore options, and hand-made blobs and snapshots (for
//!   hostile trees).
//! - [`fixture`]: file trees described as data ([`fixture::Node`]), built on
//!   disk with exact metadata, generated deterministically or by proptest.
//! - [`compare`]: recursive comparison of two trees, content and metadata
//!   (type, mode, owner, mtime in ns, symlink targets, xattrs, hard links).
//!
//! Everything is written below temporary directories; nothing goes into the
//! working directory. The tests run as root (owners are set and compared only
//! then).

pub mod compare;
pub mod fixture;
pub mod repo;
pub mod wan;

pub use compare::{assert_same_tree, diff_trees};
pub use fixture::{Fill, Meta, Node, content};
pub use repo::{PASSPHRASE, TestRepo, backup_options, restore_options};
