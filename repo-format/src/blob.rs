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

/// Seals blobs with reusable zstd contexts and buffers: creating a context
/// per blob costs more than compressing a small file, and a fresh
/// megabyte-sized buffer per chunk costs page faults on every use.
pub struct Sealer {
    zstd: zstd::bulk::Compressor<'static>,
    unzstd: zstd::bulk::Decompressor<'static>,
    /// Compressor output, reused.
    packed: Vec<u8>,
    /// The read-back check's decrypted copy and decompressed output, reused.
    check: Scratch,
}

/// Buffers [`open_into`] works in, kept between blobs.
#[derive(Default)]
struct Scratch {
    framed: Vec<u8>,
    plain: Vec<u8>,
}

impl Sealer {
    /// A sealer compressing at `level`.
    pub fn new(level: i32) -> Result<Self> {
        let zstd = zstd::bulk::Compressor::new(level)
            .map_err(|e| Error::Pipeline(format!("zstd init at level {level}: {e}")))?;
        let unzstd = new_dctx()?;
        Ok(Sealer {
            zstd,
            unzstd,
            packed: Vec::new(),
            check: Scratch::default(),
        })
    }

    /// Compress (where it helps) and encrypt `plain`, whose id is `id`.
    pub fn seal(
        &mut self,
        keys: &KeySet,
        kind: BlobKind,
        id: &Id,
        plain: &[u8],
    ) -> Result<Vec<u8>> {
        self.packed.clear();
        let n = if looks_incompressible(plain) {
            plain.len()
        } else {
            self.packed
                .reserve(zstd::zstd_safe::compress_bound(plain.len()));
            self.zstd
                .compress_to_buffer(plain, &mut self.packed)
                .map_err(|e| Error::Pipeline(format!("zstd compress of blob {id}: {e}")))?
        };
        let (flag, payload) = if n < plain.len() {
            (FLAG_ZSTD, &self.packed[..n])
        } else {
            (FLAG_STORED, plain)
        };
        let mut framed = Vec::with_capacity(payload.len() + crate::consts::SEAL_OVERHEAD);
        framed.push(flag);
        framed.extend_from_slice(payload);
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
        self.check.framed.clear();
        self.check.framed.extend_from_slice(&sealed);
        let back = open_into(keys, kind, id, &mut self.unzstd, &mut self.check)?;
        if back != plain {
            return Err(Error::Pipeline(format!(
                "blob {id} did not open to its plaintext after sealing (codec fault); not stored"
            )));
        }
        Ok(sealed)
    }
}

/// Bytes sampled by [`looks_incompressible`], and the smallest chunk it judges.
const SAMPLE: usize = 16 * 1024;
/// Sampled in this many evenly spread pieces.
const SAMPLE_PIECES: usize = 32;
/// Order-0 entropy (bits per byte) of a sample at or above which a chunk is
/// stored without trying zstd. Uniformly random bytes give 7.989 on 16 KiB;
/// text 4–5, executables ~6, base64 6, a half-random chunk ~7.
const INCOMPRESSIBLE_BITS: f64 = 7.95;

/// True when a sample of `plain` looks like compressed or encrypted data
/// (media, archives, ciphertext), which zstd cannot shrink: trying costs a
/// quarter of the backup's CPU on such data for nothing. Chunks below
/// [`SAMPLE`] are always tried. What this misses: a random block repeated
/// within one chunk (zstd would find the repeat); deduplication still
/// catches repeats of whole chunks.
fn looks_incompressible(plain: &[u8]) -> bool {
    if plain.len() < SAMPLE {
        return false;
    }
    let piece = SAMPLE / SAMPLE_PIECES;
    let stride = plain.len() / SAMPLE_PIECES;
    let mut counts = [0u32; 256];
    for i in 0..SAMPLE_PIECES {
        for &b in &plain[i * stride..i * stride + piece] {
            counts[b as usize] += 1;
        }
    }
    let total = SAMPLE as f64;
    let bits: f64 = counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / total;
            -p * p.log2()
        })
        .sum();
    bits >= INCOMPRESSIBLE_BITS
}

/// Opens blobs with a reusable zstd context and buffers (restore and check
/// open many).
pub struct Opener {
    unzstd: zstd::bulk::Decompressor<'static>,
    scratch: Scratch,
}

impl Opener {
    /// A new opener.
    pub fn new() -> Result<Self> {
        let unzstd = new_dctx()?;
        Ok(Opener {
            unzstd,
            scratch: Scratch::default(),
        })
    }

    /// A buffer to read the next sealed blob into: give it back to
    /// [`Opener::open_buffer`], which decrypts it where it lies.
    pub fn buffer(&mut self, len: usize) -> &mut [u8] {
        self.scratch.framed.clear();
        self.scratch.framed.resize(len, 0);
        &mut self.scratch.framed
    }

    /// Open the sealed blob last read into [`Opener::buffer`] and check its
    /// id; the plaintext is borrowed until the next call.
    pub fn open_buffer(&mut self, keys: &KeySet, kind: BlobKind, id: &Id) -> Result<&[u8]> {
        let plain = open_into(keys, kind, id, &mut self.unzstd, &mut self.scratch)?;
        let actual = keys.id_of(plain);
        if actual != *id {
            return Err(Error::IdMismatch { id: *id, actual });
        }
        Ok(plain)
    }

    /// [`open`] with this opener's context.
    pub fn open(
        &mut self,
        keys: &KeySet,
        kind: BlobKind,
        id: &Id,
        sealed: &[u8],
    ) -> Result<Vec<u8>> {
        self.buffer(sealed.len()).copy_from_slice(sealed);
        self.open_buffer(keys, kind, id).map(<[u8]>::to_vec)
    }
}

/// Decrypt `s.framed` in place and decompress if needed, without checking
/// the id (the caller compares); the plaintext lies in `s`.
fn open_into<'s>(
    keys: &KeySet,
    kind: BlobKind,
    id: &Id,
    dctx: &mut zstd::bulk::Decompressor<'static>,
    s: &'s mut Scratch,
) -> Result<&'s [u8]> {
    keys.open_blob_in_place(kind as u8, id, &mut s.framed)?;
    let Some((&flag, payload)) = s.framed.split_first() else {
        return Err(Error::corrupt(
            format!("blob {id}"),
            "empty after decryption",
        ));
    };
    match flag {
        FLAG_STORED => Ok(payload),
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
            s.plain.clear();
            s.plain.reserve(size as usize);
            let n = dctx
                .decompress_to_buffer(payload, &mut s.plain)
                .map_err(|e| Error::corrupt(format!("blob {id}"), format!("zstd: {e}")))?;
            if n as u64 != size {
                return Err(Error::corrupt(
                    format!("blob {id}"),
                    format!("zstd frame declares {size} bytes but holds {n}"),
                ));
            }
            Ok(&s.plain)
        }
        f => Err(Error::corrupt(
            format!("blob {id}"),
            format!("unknown flag {f}"),
        )),
    }
}

thread_local! {
    /// [`open`]'s decompression context, one per thread: creating one per
    /// blob was 3 % of the collector's CPU time (it opens every tree it is
    /// sent, then again at the commit). Only the context is kept, not
    /// [`Opener`]'s megabyte-sized buffers, so an idle thread holds little.
    /// Taken out while in use: a nested call would simply make its own.
    static UNZSTD: std::cell::Cell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::Cell::new(None) };
}

/// Open a sealed blob and check that its plaintext hashes to `id`.
pub fn open(keys: &KeySet, kind: BlobKind, id: &Id, sealed: &[u8]) -> Result<Vec<u8>> {
    let mut dctx = match UNZSTD.with(std::cell::Cell::take) {
        Some(d) => d,
        None => new_dctx()?,
    };
    let mut s = Scratch {
        framed: sealed.to_vec(),
        plain: Vec::new(),
    };
    let opened = open_into(keys, kind, id, &mut dctx, &mut s).and_then(|plain| {
        let actual = keys.id_of(plain);
        match actual == *id {
            true => Ok(plain.to_vec()),
            false => Err(Error::IdMismatch { id: *id, actual }),
        }
    });
    UNZSTD.with(|c| c.set(Some(dctx)));
    opened
}

fn new_dctx() -> Result<zstd::bulk::Decompressor<'static>> {
    zstd::bulk::Decompressor::new()
        .map_err(|e| Error::Pipeline(format!("zstd decompressor init: {e}")))
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

    /// xorshift bytes: incompressible.
    fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn random_chunks_skip_zstd_and_compressible_ones_do_not() {
        assert!(looks_incompressible(&noise(1 << 20, 1)));
        assert!(looks_incompressible(&noise(SAMPLE, 2)));
        // Too small to judge: always tried.
        assert!(!looks_incompressible(&noise(SAMPLE - 1, 3)));
        let text = b"the quick brown fox jumps over the lazy dog 0123456789\n".repeat(20_000);
        assert!(!looks_incompressible(&text));
        // Half random, half zeros: zstd halves it, so it must be tried.
        let mut half = noise(512 * 1024, 4);
        half.extend(std::iter::repeat_n(0u8, 512 * 1024));
        assert!(!looks_incompressible(&half));
        // Base64 of random bytes (6 bits per byte) is still worth compressing.
        let b64: Vec<u8> = noise(1 << 20, 5)
            .iter()
            .map(|b| {
                b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
                    [(b & 63) as usize]
            })
            .collect();
        assert!(!looks_incompressible(&b64));

        // Sealing: random is stored as is (flag 0, size + overhead), the
        // half-zero chunk compressed; both open.
        let k = KeySet::from_keys([4; 32], [5; 32]);
        let mut s = Sealer::new(3).unwrap();
        for (plain, compressed) in [(noise(1 << 20, 6), false), (half, true)] {
            let id = k.id_of(&plain);
            let sealed = s.seal_verified(&k, BlobKind::Data, &id, &plain).unwrap();
            assert_eq!(sealed.len() < plain.len(), compressed);
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
