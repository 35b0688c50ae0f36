//! Keys and authenticated encryption.
//!
//! A repository has two key sets (DESIGN.md "Two keys, one content-blind
//! collector"): the *content* set seals data blobs; the *metadata* set seals
//! trees, pack trailers and snapshot files, and is the only one a collector
//! holds. Each set is an id key (keyed BLAKE3 of plaintext → blob id) and a
//! cipher key (XChaCha20-Poly1305). The nonce of a blob is derived from its
//! kind and id under a third key derived from the cipher key, so sealing is
//! deterministic and two different blobs never share a nonce.

use chacha20poly1305::aead::{Aead, AeadInPlace, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::error::{Error, Result};
use crate::id::Id;

/// Context string for deriving a key set's nonce key from its cipher key.
pub const NONCE_KEY_CONTEXT: &str = "hubvault 2026-11 blob nonce key v1";
/// Context string for deriving the chunker's gear seed from the content id key.
pub const GEAR_SEED_CONTEXT: &str = "hubvault 2026-11 chunker gear seed v1";
/// Prefix of the associated data of every sealed blob.
pub const BLOB_AAD_PREFIX: &[u8] = b"hubvault blob v1";

/// One id key and one cipher key (plus the derived nonce key).
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct KeySet {
    id_key: [u8; 32],
    cipher_key: [u8; 32],
    nonce_key: [u8; 32],
}

impl KeySet {
    /// Build a key set from its two stored keys.
    pub fn from_keys(id_key: [u8; 32], cipher_key: [u8; 32]) -> Self {
        let nonce_key = blake3::derive_key(NONCE_KEY_CONTEXT, &cipher_key);
        KeySet {
            id_key,
            cipher_key,
            nonce_key,
        }
    }

    /// Fresh random keys from the operating system.
    pub fn random() -> Result<Self> {
        let mut a = [0u8; 32];
        let mut b = [0u8; 32];
        fill_random(&mut a)?;
        fill_random(&mut b)?;
        Ok(Self::from_keys(a, b))
    }

    /// The stored keys, for the keyring: (id key, cipher key).
    pub(crate) fn stored(&self) -> (&[u8; 32], &[u8; 32]) {
        (&self.id_key, &self.cipher_key)
    }

    /// Keyed BLAKE3 of `data`: the blob id.
    pub fn id_of(&self, data: &[u8]) -> Id {
        Id(*blake3::keyed_hash(&self.id_key, data).as_bytes())
    }

    /// A keyed hasher for computing an id over several pieces.
    pub fn id_hasher(&self) -> blake3::Hasher {
        blake3::Hasher::new_keyed(&self.id_key)
    }

    /// The gear seed of the chunker, derived from the id key so that chunk
    /// boundaries do not reveal content to anyone without the key.
    pub fn gear_seed(&self) -> u64 {
        let k = blake3::derive_key(GEAR_SEED_CONTEXT, &self.id_key);
        u64::from_le_bytes([k[0], k[1], k[2], k[3], k[4], k[5], k[6], k[7]])
    }

    fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new((&self.cipher_key).into())
    }

    /// The deterministic nonce of a blob of `kind` with `id`.
    fn blob_nonce(&self, kind: u8, id: &Id) -> XNonce {
        let mut h = blake3::Hasher::new_keyed(&self.nonce_key);
        h.update(&[kind]);
        h.update(&id.0);
        let out = h.finalize();
        *XNonce::from_slice(&out.as_bytes()[..24])
    }

    /// Seal `plaintext` as a blob of `kind`/`id` (deterministic nonce, kind and id authenticated).
    pub fn seal_blob(&self, kind: u8, id: &Id, plaintext: &[u8]) -> Result<Vec<u8>> {
        let aad = blob_aad(kind, id);
        self.cipher()
            .encrypt(
                &self.blob_nonce(kind, id),
                Payload {
                    msg: plaintext,
                    aad: &aad,
                },
            )
            .map_err(|_| Error::Pipeline(format!("sealing blob {id} failed")))
    }

    /// Open a sealed blob of `kind`/`id`; fails if anything was altered.
    pub fn open_blob(&self, kind: u8, id: &Id, sealed: &[u8]) -> Result<Vec<u8>> {
        let aad = blob_aad(kind, id);
        self.cipher()
            .decrypt(
                &self.blob_nonce(kind, id),
                Payload {
                    msg: sealed,
                    aad: &aad,
                },
            )
            .map_err(|_| Error::Decrypt {
                what: format!("blob {id}"),
            })
    }

    /// Seal `buf` in place as a blob of `kind`/`id` (the tag is appended).
    pub fn seal_blob_in_place(&self, kind: u8, id: &Id, buf: &mut Vec<u8>) -> Result<()> {
        self.cipher()
            .encrypt_in_place(&self.blob_nonce(kind, id), &blob_aad(kind, id), buf)
            .map_err(|_| Error::Pipeline(format!("sealing blob {id} failed")))
    }

    /// Open `buf` in place (the tag is removed); fails if anything was altered.
    pub fn open_blob_in_place(&self, kind: u8, id: &Id, buf: &mut Vec<u8>) -> Result<()> {
        self.cipher()
            .decrypt_in_place(&self.blob_nonce(kind, id), &blob_aad(kind, id), buf)
            .map_err(|_| Error::Decrypt {
                what: format!("blob {id}"),
            })
    }

    /// Seal with a random nonce (prepended): pack trailers, snapshot files, the keyring.
    pub fn seal_random(&self, aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>> {
        seal_random_with(&self.cipher_key, aad, plaintext)
    }

    /// Open what [`KeySet::seal_random`] produced.
    pub fn open_random(&self, what: &str, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>> {
        open_random_with(&self.cipher_key, what, aad, sealed)
    }
}

fn blob_aad(kind: u8, id: &Id) -> Vec<u8> {
    let mut aad = Vec::with_capacity(BLOB_AAD_PREFIX.len() + 33);
    aad.extend_from_slice(BLOB_AAD_PREFIX);
    aad.push(kind);
    aad.extend_from_slice(&id.0);
    aad
}

/// Fill `buf` from the operating system's random source.
pub fn fill_random(buf: &mut [u8]) -> Result<()> {
    getrandom::fill(buf).map_err(|e| {
        Error::io(
            "reading randomness for",
            "new keys",
            std::io::Error::other(e.to_string()),
        )
    })
}

/// XChaCha20-Poly1305 with a random 24-byte nonce: output is nonce || ciphertext || tag.
pub(crate) fn seal_random_with(key: &[u8; 32], aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>> {
    let mut nonce = [0u8; 24];
    fill_random(&mut nonce)?;
    let ct = XChaCha20Poly1305::new(key.into())
        .encrypt(
            XNonce::from_slice(&nonce),
            Payload {
                msg: plaintext,
                aad,
            },
        )
        .map_err(|_| Error::Pipeline("sealing failed".into()))?;
    let mut out = Vec::with_capacity(24 + ct.len());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&ct);
    Ok(out)
}

/// Open what [`seal_random_with`] produced.
pub(crate) fn open_random_with(
    key: &[u8; 32],
    what: &str,
    aad: &[u8],
    sealed: &[u8],
) -> Result<Vec<u8>> {
    if sealed.len() < 24 + 16 {
        return Err(Error::corrupt(
            what,
            "sealed object shorter than nonce and tag",
        ));
    }
    XChaCha20Poly1305::new(key.into())
        .decrypt(
            XNonce::from_slice(&sealed[..24]),
            Payload {
                msg: &sealed[24..],
                aad,
            },
        )
        .map_err(|_| Error::Decrypt { what: what.into() })
}

/// The two key sets of a repository as held by one party.
#[derive(Clone)]
pub struct Keys {
    /// Seals trees, pack trailers and snapshots. Held by everyone, the collector included.
    pub metadata: KeySet,
    /// Seals file content. Held by agents and admins only; `None` for a content-blind holder.
    pub content: Option<KeySet>,
}

impl Keys {
    /// Fresh random keys for a new repository.
    pub fn generate() -> Result<Self> {
        Ok(Keys {
            metadata: KeySet::random()?,
            content: Some(KeySet::random()?),
        })
    }

    /// The content keys, or a clear refusal for a content-blind holder.
    pub fn content(&self) -> Result<&KeySet> {
        self.content.as_ref().ok_or_else(|| {
            Error::Refused("this keyring holds no content key (content-blind)".into())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blob_seal_is_deterministic_and_authenticated() {
        let k = KeySet::from_keys([1; 32], [2; 32]);
        let id = k.id_of(b"hello");
        let a = k.seal_blob(0, &id, b"hello").unwrap();
        let b = k.seal_blob(0, &id, b"hello").unwrap();
        assert_eq!(a, b, "same chunk seals to the same bytes");
        assert_eq!(k.open_blob(0, &id, &a).unwrap(), b"hello");
        // Kind and id are authenticated.
        assert!(k.open_blob(1, &id, &a).is_err());
        assert!(k.open_blob(0, &Id([9; 32]), &a).is_err());
        let mut c = a.clone();
        c[3] ^= 1;
        assert!(k.open_blob(0, &id, &c).is_err());
    }

    #[test]
    fn ids_are_keyed() {
        let k1 = KeySet::from_keys([1; 32], [2; 32]);
        let k2 = KeySet::from_keys([3; 32], [2; 32]);
        assert_ne!(k1.id_of(b"x"), k2.id_of(b"x"));
        assert_ne!(k1.id_of(b"x").0, *blake3::hash(b"x").as_bytes());
    }
}
