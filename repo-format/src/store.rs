//! The narrow interface through which packs reach storage.
//!
//! DESIGN.md "When one collector's disk is not enough": a local directory
//! today ([`dir::DirStore`]), an S3-compatible object store later. Everything
//! above this trait is oblivious to where packs live.

pub mod dir;

use std::fs::File;
use std::path::{Path, PathBuf};

use crate::direct::AlignedBuf;
use crate::error::{Error, Result};
use crate::id::Id;

/// A pack being written: a temporary local file that [`PackStore::put`] makes durable.
pub struct TempPack {
    /// The open file (written sequentially by the pack writer).
    pub file: File,
    /// Where it is.
    pub path: PathBuf,
    /// Opened for direct I/O (`O_DIRECT`): the writer must write aligned
    /// memory at aligned offsets in aligned lengths (see
    /// [`crate::pack::writer`]). False for anything else.
    pub direct: bool,
}

/// Where packs live.
///
/// Contract: when [`PackStore::put`] returns `Ok`, the pack is durable under
/// its name and survives a crash or power loss; when it returns `Err`, nothing
/// is visible under that name (a leftover temporary file is harmless). A
/// failed fsync is never retried into a success (PostgreSQL's fsyncgate).
pub trait PackStore: Send + Sync {
    /// A new temporary file to write a pack into.
    fn create_temp(&self) -> Result<TempPack>;
    /// Durably store the finished temporary pack under `name`.
    fn put(&self, tmp: TempPack, name: &Id) -> Result<()>;
    /// Read exactly `buf.len()` bytes of pack `name` at `offset`.
    fn read_at(&self, name: &Id, offset: u64, buf: &mut [u8]) -> Result<()>;
    /// Read bytes `offset..offset + len` of pack `name` in one piece, for a
    /// caller that reads a pack front to back in large spans (an agent's
    /// upload); returns them as a slice of `buf`, which is grown as needed
    /// and reused across calls. The default reads with
    /// [`PackStore::read_at`]; [`dir::DirStore`] reads the aligned span
    /// around them with direct I/O, which keeps a pack that was just written
    /// (and will be dropped once uploaded) out of the page cache.
    fn read_span<'b>(
        &self,
        name: &Id,
        offset: u64,
        len: usize,
        buf: &'b mut AlignedBuf,
    ) -> Result<&'b [u8]> {
        AlignedBuf::ensure(buf, len);
        let out = &mut buf.as_mut_slice()[..len];
        self.read_at(name, offset, out)?;
        Ok(out)
    }
    /// Size of pack `name` in bytes.
    fn size(&self, name: &Id) -> Result<u64>;
    /// Names of all stored packs.
    fn list(&self) -> Result<Vec<Id>>;
    /// Delete pack `name` durably (absent already: fine). Only for packs
    /// nothing references any more: see [`crate::Repository::retire_pack`].
    fn remove(&self, name: &Id) -> Result<()>;
    /// Move pack `name` durably out of the store into directory `dest` (a
    /// damaged pack kept as evidence: see
    /// [`crate::Repository::quarantine_pack`]); false when it was not there.
    /// A store that cannot keep it elsewhere refuses.
    fn move_out(&self, name: &Id, dest: &Path) -> Result<bool> {
        let _ = dest;
        Err(Error::Pipeline(format!(
            "this pack store cannot set pack {name} aside"
        )))
    }
}
