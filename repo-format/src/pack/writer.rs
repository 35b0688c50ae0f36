//! Appends sealed blobs to a temporary pack file and finishes it durably.

use std::io::{BufWriter, Write};
use std::path::PathBuf;

use crate::blob::BlobKind;
use crate::consts::{PACK_END_MAGIC, PACK_MAGIC};
use crate::crypto::KeySet;
use crate::error::{Error, Result};
use crate::id::Id;
use crate::pack::{PackEntry, TRAILER_AAD, encode_entries};
use crate::store::{PackStore, TempPack};

/// A pack under construction.
pub struct PackWriter {
    out: BufWriter<std::fs::File>,
    path: PathBuf,
    hasher: blake3::Hasher,
    offset: u64,
    entries: Vec<PackEntry>,
}

/// A pack made durable by [`PackWriter::finish`].
#[derive(Debug, Clone)]
pub struct FinishedPack {
    /// The pack's name (BLAKE3 of its bytes).
    pub name: Id,
    /// Its total size in bytes.
    pub size: u64,
    /// The blobs it holds.
    pub entries: Vec<PackEntry>,
}

impl PackWriter {
    /// Start a pack in a new temporary file of `store`.
    pub fn new(store: &dyn PackStore) -> Result<Self> {
        let TempPack { file, path } = store.create_temp()?;
        let mut w = PackWriter {
            out: BufWriter::with_capacity(1 << 20, file),
            path,
            hasher: blake3::Hasher::new(),
            offset: 0,
            entries: Vec::new(),
        };
        w.write(PACK_MAGIC)?;
        Ok(w)
    }

    fn write(&mut self, b: &[u8]) -> Result<()> {
        self.out
            .write_all(b)
            .map_err(|e| Error::io("writing pack", &self.path, e))?;
        self.hasher.update(b);
        self.offset += b.len() as u64;
        Ok(())
    }

    /// Append one sealed blob.
    pub fn add(&mut self, kind: BlobKind, id: Id, sealed: &[u8], raw_length: u32) -> Result<()> {
        let length = u32::try_from(sealed.len())
            .map_err(|_| Error::Pipeline(format!("blob {id} too large for a pack")))?;
        let offset = self.offset;
        self.write(sealed)?;
        self.entries.push(PackEntry {
            kind,
            id,
            offset,
            length,
            raw_length,
        });
        Ok(())
    }

    /// Bytes written so far.
    pub fn size(&self) -> u64 {
        self.offset
    }

    /// Number of blobs added.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when no blob was added.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Write the trailer, then make the pack durable under its name in `store`.
    pub fn finish(mut self, store: &dyn PackStore, meta: &KeySet) -> Result<FinishedPack> {
        let trailer = meta.seal_random(TRAILER_AAD, &encode_entries(&self.entries))?;
        let tlen = trailer.len() as u32;
        self.write(&trailer)?;
        self.write(&tlen.to_le_bytes())?;
        self.write(PACK_END_MAGIC)?;
        let file = self
            .out
            .into_inner()
            .map_err(|e| Error::io("flushing pack", &self.path, e.into_error()))?;
        let name = Id(*self.hasher.finalize().as_bytes());
        store.put(
            TempPack {
                file,
                path: self.path,
            },
            &name,
        )?;
        Ok(FinishedPack {
            name,
            size: self.offset,
            entries: self.entries,
        })
    }
}
