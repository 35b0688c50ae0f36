//! Appends sealed blobs to a temporary pack file and finishes it durably.

use std::io::Write;
use std::path::PathBuf;

use crate::blob::BlobKind;
use crate::consts::{PACK_END_MAGIC, PACK_MAGIC};
use crate::crypto::KeySet;
use crate::error::{Error, Result};
use crate::id::Id;
use crate::pack::{PackEntry, TRAILER_AAD, encode_entries};
use crate::store::{PackStore, TempPack};

/// Bytes gathered before they are hashed and written: BLAKE3 hashes a large
/// piece on all its SIMD lanes, but a small blob's few hundred bytes one
/// block at a time.
const WRITE_BUF: usize = 1 << 20;

/// A pack under construction.
pub struct PackWriter {
    file: std::fs::File,
    /// Bytes not yet hashed nor written (blobs smaller than [`WRITE_BUF`]).
    buf: Vec<u8>,
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
            file,
            buf: Vec::with_capacity(WRITE_BUF),
            path,
            hasher: blake3::Hasher::new(),
            offset: 0,
            entries: Vec::new(),
        };
        w.write(PACK_MAGIC)?;
        Ok(w)
    }

    fn write(&mut self, b: &[u8]) -> Result<()> {
        if self.buf.len() + b.len() > WRITE_BUF {
            self.flush()?;
        }
        if b.len() >= WRITE_BUF {
            // Large blobs go straight out, without a copy into the buffer.
            self.hasher.update(b);
            self.file
                .write_all(b)
                .map_err(|e| Error::io("writing pack", &self.path, e))?;
        } else {
            self.buf.extend_from_slice(b);
        }
        self.offset += b.len() as u64;
        Ok(())
    }

    /// Hash and write what the buffer holds.
    fn flush(&mut self) -> Result<()> {
        if !self.buf.is_empty() {
            self.hasher.update(&self.buf);
            self.file
                .write_all(&self.buf)
                .map_err(|e| Error::io("writing pack", &self.path, e))?;
            self.buf.clear();
        }
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
        self.flush()?;
        let file = self.file;
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
