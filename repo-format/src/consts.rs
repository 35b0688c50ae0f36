//! Magic numbers, format versions and hard limits. docs/repo-format.md quotes
//! these values; a test there keeps the two in step.

/// Version of the repository layout written in `config`.
pub const REPO_VERSION: u32 = 1;
/// First bytes of every pack file.
pub const PACK_MAGIC: &[u8; 8] = b"HVPACK01";
/// Last bytes of every pack file (after the trailer length).
pub const PACK_END_MAGIC: &[u8; 8] = b"HVPKEND1";
/// First bytes of a sealed snapshot file.
pub const SNAPSHOT_MAGIC: &[u8; 8] = b"HVSNAP01";
/// Version byte at the start of every encoded tree.
pub const TREE_VERSION: u8 = 1;

/// Default FastCDC minimum chunk size.
pub const DEFAULT_MIN_CHUNK: u32 = 256 * 1024;
/// Default FastCDC average chunk size.
pub const DEFAULT_AVG_CHUNK: u32 = 1024 * 1024;
/// Default FastCDC maximum chunk size.
pub const DEFAULT_MAX_CHUNK: u32 = 4 * 1024 * 1024;
/// FastCDC normalisation level of new repositories: 2, FastCDC's own
/// recommendation ("NC-2"). Chunk sizes cluster closer to the average, so
/// an edit re-stores a smaller chunk: over 150 simulated 24 MiB files with
/// the default sizes, an insertion re-stored 1400 KiB against 1649 KiB at
/// level 1 and an append 635 KiB against 777 KiB.
pub const DEFAULT_NORMALIZATION: u8 = 2;
/// Normalisation level of a repository whose config does not name one
/// (made before the level was configurable).
pub const LEGACY_NORMALIZATION: u8 = 1;
/// Default zstd level.
pub const DEFAULT_ZSTD_LEVEL: i32 = 3;
/// Default pack size target in bytes.
pub const DEFAULT_PACK_TARGET: u64 = 32 * 1024 * 1024;

/// Largest plaintext blob accepted anywhere (data chunk or tree), in bytes.
/// Bounds every allocation made while opening a blob.
pub const MAX_BLOB_PLAINTEXT: usize = 64 * 1024 * 1024;
/// Sealing overhead: one flag byte plus the 16-byte Poly1305 tag.
pub const SEAL_OVERHEAD: usize = 1 + 16;
/// Largest sealed blob: plaintext limit plus overhead (zstd output is only kept when smaller).
pub const MAX_BLOB_SEALED: usize = MAX_BLOB_PLAINTEXT + SEAL_OVERHEAD;
/// Largest pack trailer accepted when reading (sealed bytes).
pub const MAX_TRAILER: usize = 64 * 1024 * 1024;
/// Largest entry name in a tree (bytes).
pub const MAX_NAME: usize = 4096;
/// Largest symlink target in a tree (bytes).
pub const MAX_LINK_TARGET: usize = 64 * 1024;
/// Largest xattr value in a tree (bytes).
pub const MAX_XATTR_VALUE: usize = 1024 * 1024;
/// Largest snapshot file accepted (sealed bytes).
pub const MAX_SNAPSHOT_FILE: usize = 16 * 1024 * 1024;
