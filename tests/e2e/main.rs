//! End-to-end tests of the repository engine (`repo-format`), driven through
//! its library API on temporary directories:
//!
//! - [`roundtrip`]: backup → restore is bit-exact with metadata (random trees
//!   by proptest, a fixed tree with every kind of entry, long names).
//! - [`hostile`]: hand-crafted trees with hostile names and symlinks planted
//!   in the target never make a restore write outside its target.
//! - [`changing`]: a file changing while read is reported; the rest is kept.
//! - [`concurrent`]: two backups at once into one repository.
//! - [`dedup`]: a chunk met many times in one backup is stored once.
//! - [`faults`]: a pack store that fails mid-backup leaves no snapshot, no
//!   damage, and the next backup works.
//! - [`rebuild`]: a lost catalog is rebuilt from packs and snapshot files.
//! - [`incremental`]: listing only dirty directories gives exactly the
//!   snapshot a full walk gives.
//! - [`parent`]: a damaged parent snapshot neither leaks lost data into new
//!   snapshots nor stops backups.
//! - [`spool`]: separate tree and data packs, dropped data packs, chunks
//!   stored elsewhere (what an agent's spool relies on).

mod changing;
mod concurrent;
mod dedup;
mod faults;
mod hostile;
mod incremental;
mod parent;
mod rebuild;
mod roundtrip;
mod spool;
