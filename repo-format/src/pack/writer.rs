//! Appends sealed blobs to a temporary pack file and finishes it durably.
//!
//! Bytes are gathered in a 1 MiB window aligned to 4 KiB and written with
//! positional writes of whole windows. When the store opened the temporary
//! file with `O_DIRECT` ([`TempPack::direct`]), those writes go from the
//! window straight to the device: no copy into the page cache, whose fresh
//! pages cost a fault each on a virtual machine (11 % of a backup's CPU time
//! was that copy). The last window is padded to the alignment and the file
//! cut back to its length. A file system that refuses `O_DIRECT` writes gets
//! the same bytes through the page cache instead.

use std::path::PathBuf;

use crate::blob::BlobKind;
use crate::consts::{PACK_END_MAGIC, PACK_MAGIC};
use crate::crypto::KeySet;
use crate::direct::{ALIGN, AlignedBuf};
use crate::error::{Error, Result};
use crate::id::Id;
use crate::pack::{PackEntry, TRAILER_AAD, encode_entries};
use crate::store::{PackStore, TempPack};

/// Bytes gathered before they are hashed and written: BLAKE3 hashes a large
/// piece on all its SIMD lanes, but a small blob's few hundred bytes one
/// block at a time; and one write per megabyte keeps system calls few.
const WRITE_BUF: usize = 1 << 20;

/// Added to the window's start: tests misalign it to see a refused direct
/// write fall back to the page cache.
#[cfg(not(test))]
const MISALIGN: usize = 0;
#[cfg(test)]
const MISALIGN: usize = 1;

/// A pack under construction.
pub struct PackWriter {
    file: std::fs::File,
    /// Whether `file` was opened with `O_DIRECT` (cleared if a write refuses it).
    direct: bool,
    /// The window: `WRITE_BUF` bytes, aligned.
    window: AlignedBuf,
    /// Bytes of the window filled, not yet hashed nor written.
    fill: usize,
    /// Bytes written to the file so far (its write position).
    written: u64,
    path: PathBuf,
    hasher: blake3::Hasher,
    offset: u64,
    entries: Vec<PackEntry>,
    /// Deletes the temporary file if the writer is dropped unfinished.
    _unfinished: Unfinished,
}

/// Removes an unfinished pack's temporary file when dropped, unless
/// disarmed by a successful [`PackWriter::finish`]: a writer abandoned on
/// an error (a collector refusing a batch part way) must not leave up to a
/// pack's worth of disk behind until the day-old sweep.
struct Unfinished {
    path: Option<PathBuf>,
}

impl Drop for Unfinished {
    fn drop(&mut self) {
        if let Some(p) = self.path.take() {
            let _ = std::fs::remove_file(p);
        }
    }
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
        let TempPack { file, path, direct } = store.create_temp()?;
        let window = AlignedBuf::new(WRITE_BUF, MISALIGN);
        let mut w = PackWriter {
            file,
            // An unaligned window (only in tests) is left for the write to refuse.
            direct: direct && (window.is_aligned() || cfg!(test)),
            window,
            fill: 0,
            written: 0,
            _unfinished: Unfinished {
                path: Some(path.clone()),
            },
            path,
            hasher: blake3::Hasher::new(),
            offset: 0,
            entries: Vec::new(),
        };
        w.write(PACK_MAGIC)?;
        Ok(w)
    }

    fn write(&mut self, mut b: &[u8]) -> Result<()> {
        self.offset += b.len() as u64;
        while !b.is_empty() {
            let n = (WRITE_BUF - self.fill).min(b.len());
            let at = self.fill;
            self.window.as_mut_slice()[at..at + n].copy_from_slice(&b[..n]);
            self.fill += n;
            b = &b[n..];
            if self.fill == WRITE_BUF {
                self.flush()?;
            }
        }
        Ok(())
    }

    /// Hash and write what the window holds (a whole window, except at the
    /// end of the pack, where a direct write is padded to [`ALIGN`]).
    fn flush(&mut self) -> Result<()> {
        if self.fill == 0 {
            return Ok(());
        }
        let mem = self.window.as_mut_slice();
        self.hasher.update(&mem[..self.fill]);
        let len = if self.direct {
            self.fill.next_multiple_of(ALIGN)
        } else {
            self.fill
        };
        mem[self.fill..len].fill(0);
        crate::direct::write_all_at(&self.file, &mut self.direct, &mem[..len], self.written)
            .map_err(|e| Error::io("writing pack", &self.path, e))?;
        self.written += len as u64;
        self.fill = 0;
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
        if self.written != self.offset {
            // The padding of the last direct write.
            self.file
                .set_len(self.offset)
                .map_err(|e| Error::io("cutting pack to its length", &self.path, e))?;
        }
        let file = self.file;
        let name = Id(*self.hasher.finalize().as_bytes());
        store.put(
            TempPack {
                file,
                path: self.path,
                direct: self.direct,
            },
            &name,
        )?;
        self._unfinished.path = None;
        Ok(FinishedPack {
            name,
            size: self.offset,
            entries: self.entries,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::Keys;
    use crate::pack::reader::{read_trailer, verify_checksum};
    use crate::store::dir::DirStore;

    /// Deterministic bytes, different per blob.
    fn blob(i: usize, len: usize) -> Vec<u8> {
        (0..len).map(|j| (j * 31 + i * 7 + j / 251) as u8).collect()
    }

    /// Packs whose blobs cross window boundaries, fill one exactly, or are
    /// larger than a window, with direct writes on and off: every byte,
    /// the name (BLAKE3 of the file), the length and the trailer are right.
    #[test]
    fn packs_are_exact_whatever_the_sizes_and_the_write_mode() {
        let keys = Keys::generate().expect("keys");
        let magic = PACK_MAGIC.len();
        let layouts: Vec<Vec<usize>> = vec![
            vec![],
            vec![1],
            vec![WRITE_BUF - magic],
            vec![WRITE_BUF - magic - 1, 1, 1],
            vec![3 * WRITE_BUF + 17],
            vec![ALIGN - magic, ALIGN, 5, WRITE_BUF, 2 * WRITE_BUF - 3],
        ];
        for direct in [true, false] {
            for sizes in &layouts {
                let tmp = tempfile::tempdir().expect("tmp");
                DirStore::create_layout(&tmp.path().join("packs")).expect("layout");
                std::fs::create_dir(tmp.path().join("tmp")).expect("tmp dir");
                let store = DirStore::new(tmp.path().join("packs"), tmp.path().join("tmp"))
                    .with_direct_writes(direct);
                let mut w = PackWriter::new(&store).expect("writer");
                let blobs: Vec<Vec<u8>> =
                    sizes.iter().enumerate().map(|(i, &n)| blob(i, n)).collect();
                for (i, b) in blobs.iter().enumerate() {
                    let id = Id(*blake3::hash(&[i as u8]).as_bytes());
                    w.add(BlobKind::Data, id, b, b.len() as u32).expect("add");
                }
                if direct && w.written > 0 {
                    // The misaligned window made the direct write fail: the
                    // writer went on through the page cache.
                    assert!(
                        !w.direct,
                        "direct write of a misaligned window was not refused"
                    );
                }
                let fin = w.finish(&store, &keys.metadata).expect("finish");
                let bytes = std::fs::read(store.path_of(&fin.name)).expect("read pack");
                assert_eq!(bytes.len() as u64, fin.size, "{sizes:?} direct={direct}");
                assert_eq!(*blake3::hash(&bytes).as_bytes(), fin.name.0);
                verify_checksum(&store, &fin.name).expect("checksum");
                let entries = read_trailer(&store, &fin.name, &keys.metadata).expect("trailer");
                assert_eq!(entries.len(), blobs.len());
                for (e, b) in entries.iter().zip(&blobs) {
                    let at = e.offset as usize;
                    assert_eq!(&bytes[at..at + e.length as usize], &b[..]);
                }
                // Nothing is left in the temporary directory.
                assert_eq!(
                    std::fs::read_dir(tmp.path().join("tmp"))
                        .expect("ls")
                        .count(),
                    0
                );
            }
        }
    }
}
