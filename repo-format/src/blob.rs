//! Blobs: the one place that turns plaintext into sealed bytes and back.
//!
//! Sealed blob = XChaCha20-Poly1305( flag || payload ), where flag 0 means
//! the payload is the plaintext and flag 1 means it is a zstd frame (kept
//! only when smaller). Nonce and associated data come from kind and id
//! ([`crate::crypto::KeySet::seal_blob`]). Opening re-derives the id from
//! the plaintext and rejects a mismatch.

use crate::consts::MAX_BLOB_PLAINTEXT;
use crate::crypto::KeySet;
use crate::error::{Error, Result};
use crate::id::Id;

/// What a blob holds; selects the key set that seals it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum BlobKind {
    /// File content, sealed with the content keys.
    Data = 0,
    /// A directory listing, sealed with the metadata keys.
    Tree = 1,
}

impl BlobKind {
    /// Decode the kind byte stored in pack trailers and the catalog.
    pub fn from_u8(b: u8) -> Option<Self> {
        match b {
            0 => Some(BlobKind::Data),
            1 => Some(BlobKind::Tree),
            _ => None,
        }
    }
}

const FLAG_STORED: u8 = 0;
const FLAG_ZSTD: u8 = 1;

/// Seals blobs with reusable zstd contexts (creating one per blob costs more
/// than compressing a small file).
pub struct Sealer {
    zstd: zstd::bulk::Compressor<'static>,
    unzstd: zstd::bulk::Decompressor<'static>,
}

impl Sealer {
    /// A sealer compressing at `level`.
    pub fn new(level: i32) -> Result<Self> {
        let zstd = zstd::bulk::Compressor::new(level)
            .map_err(|e| Error::Pipeline(format!("zstd init at level {level}: {e}")))?;
        let unzstd = zstd::bulk::Decompressor::new()
            .map_err(|e| Error::Pipeline(format!("zstd decompressor init: {e}")))?;
        Ok(Sealer { zstd, unzstd })
    }

    /// Compress (where it helps) and encrypt `plain`, whose id is `id`.
    pub fn seal(
        &mut self,
        keys: &KeySet,
        kind: BlobKind,
        id: &Id,
        plain: &[u8],
    ) -> Result<Vec<u8>> {
        let compressed = self
            .zstd
            .compress(plain)
            .map_err(|e| Error::Pipeline(format!("zstd compress of blob {id}: {e}")))?;
        let mut framed = Vec::with_capacity(plain.len().min(compressed.len()) + 1 + 16);
        if compressed.len() < plain.len() {
            framed.push(FLAG_ZSTD);
            framed.extend_from_slice(&compressed);
        } else {
            framed.push(FLAG_STORED);
            framed.extend_from_slice(plain);
        }
        keys.seal_blob_in_place(kind as u8, id, &mut framed)?;
        Ok(framed)
    }

    /// Seal, then open what was sealed and compare it with `plain` before
    /// anything is stored (restic shipped codec corruption twice without this).
    pub fn seal_verified(
        &mut self,
        keys: &KeySet,
        kind: BlobKind,
        id: &Id,
        plain: &[u8],
    ) -> Result<Vec<u8>> {
        let sealed = self.seal(keys, kind, id, plain)?;
        let back = open_unverified(keys, kind, id, &sealed, Some(&mut self.unzstd))?;
        if back != plain {
            return Err(Error::Pipeline(format!(
                "blob {id} did not open to its plaintext after sealing (codec fault); not stored"
            )));
        }
        Ok(sealed)
    }
}

/// Opens blobs with a reusable zstd context (restore and check open many).
pub struct Opener {
    unzstd: zstd::bulk::Decompressor<'static>,
}

impl Opener {
    /// A new opener.
    pub fn new() -> Result<Self> {
        let unzstd = zstd::bulk::Decompressor::new()
            .map_err(|e| Error::Pipeline(format!("zstd decompressor init: {e}")))?;
        Ok(Opener { unzstd })
    }

    /// [`open`] with this opener's context.
    pub fn open(
        &mut self,
        keys: &KeySet,
        kind: BlobKind,
        id: &Id,
        sealed: &[u8],
    ) -> Result<Vec<u8>> {
        let plain = open_unverified(keys, kind, id, sealed, Some(&mut self.unzstd))?;
        check_id(keys, id, plain)
    }
}

/// Decrypt and decompress without checking the id (the caller compares).
fn open_unverified(
    keys: &KeySet,
    kind: BlobKind,
    id: &Id,
    sealed: &[u8],
    dctx: Option<&mut zstd::bulk::Decompressor<'static>>,
) -> Result<Vec<u8>> {
    let mut buf = sealed.to_vec();
    keys.open_blob_in_place(kind as u8, id, &mut buf)?;
    let Some((&flag, payload)) = buf.split_first() else {
        return Err(Error::corrupt(
            format!("blob {id}"),
            "empty after decryption",
        ));
    };
    match flag {
        FLAG_STORED => {
            buf.remove(0);
            Ok(buf)
        }
        FLAG_ZSTD => {
            let size = zstd::zstd_safe::get_frame_content_size(payload)
                .ok()
                .flatten()
                .ok_or_else(|| {
                    Error::corrupt(format!("blob {id}"), "zstd frame without content size")
                })?;
            if size > MAX_BLOB_PLAINTEXT as u64 {
                return Err(Error::corrupt(
                    format!("blob {id}"),
                    format!("declares {size} bytes, over the {MAX_BLOB_PLAINTEXT}-byte limit"),
                ));
            }
            let out = match dctx {
                Some(d) => d.decompress(payload, size as usize),
                None => zstd::bulk::decompress(payload, size as usize),
            };
            out.map_err(|e| Error::corrupt(format!("blob {id}"), format!("zstd: {e}")))
        }
        f => Err(Error::corrupt(
            format!("blob {id}"),
            format!("unknown flag {f}"),
        )),
    }
}

/// Open a sealed blob and check that its plaintext hashes to `id`.
pub fn open(keys: &KeySet, kind: BlobKind, id: &Id, sealed: &[u8]) -> Result<Vec<u8>> {
    let plain = open_unverified(keys, kind, id, sealed, None)?;
    check_id(keys, id, plain)
}

fn check_id(keys: &KeySet, id: &Id, plain: Vec<u8>) -> Result<Vec<u8>> {
    let actual = keys.id_of(&plain);
    if actual != *id {
        return Err(Error::IdMismatch { id: *id, actual });
    }
    Ok(plain)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_compressible_and_not() {
        let k = KeySet::from_keys([4; 32], [5; 32]);
        let mut s = Sealer::new(3).unwrap();
        for plain in [vec![b'a'; 100_000], (0..=255u8).collect::<Vec<_>>(), vec![]] {
            let id = k.id_of(&plain);
            let sealed = s.seal_verified(&k, BlobKind::Data, &id, &plain).unwrap();
            assert!(sealed.len() <= plain.len() + 17);
            assert_eq!(open(&k, BlobKind::Data, &id, &sealed).unwrap(), plain);
        }
    }

    #[test]
    fn every_flipped_bit_is_rejected() {
        let k = KeySet::from_keys([4; 32], [5; 32]);
        let mut s = Sealer::new(3).unwrap();
        let plain = b"some data that is sealed".repeat(10);
        let id = k.id_of(&plain);
        let sealed = s.seal(&k, BlobKind::Data, &id, &plain).unwrap();
        for i in 0..sealed.len() * 8 {
            let mut c = sealed.clone();
            c[i / 8] ^= 1 << (i % 8);
            assert!(open(&k, BlobKind::Data, &id, &c).is_err(), "bit {i}");
        }
    }

    #[test]
    fn mismatched_id_is_rejected() {
        let k = KeySet::from_keys([4; 32], [5; 32]);
        let mut s = Sealer::new(3).unwrap();
        let wrong = Id([7; 32]);
        // Sealed under a wrong id: decrypts (id is the AAD it was sealed with) but hashes differently.
        let sealed = s.seal(&k, BlobKind::Data, &wrong, b"abc").unwrap();
        assert!(matches!(
            open(&k, BlobKind::Data, &wrong, &sealed),
            Err(Error::IdMismatch { .. })
        ));
    }
}
