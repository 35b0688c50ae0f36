//! Keys and authenticated encryption.
//!
//! A repository has two key sets (DESIGN.md "Two keys, one content-blind
//! collector"): the *content* set seals data blobs; the *metadata* set seals
//! trees, pack trailers and snapshot files, and is the only one a collector
//! holds. Each set is an id key (keyed BLAKE3 of plaintext → blob id) and a
//! cipher key (XChaCha20-Poly1305). The nonce of a blob is derived from its
//! kind and id under a third key derived from the cipher key, so sealing is
//! deterministic and two different blobs never share a nonce.
//!
//! XChaCha20-Poly1305 is computed as its definition reads: HChaCha20 of the
//! key and the nonce's first 16 bytes gives a subkey, used with the IETF
//! ChaCha20-Poly1305 AEAD and the nonce's last 8 bytes. HChaCha20 comes from
//! RustCrypto's `chacha20`, the AEAD from `ring` (assembly, 2.2× RustCrypto's
//! speed here: sealing and the read-back check were a sixth of a backup's
//! CPU). The bytes are the same; repo-format/tests/format_vectors.rs checks
//! them against RustCrypto's XChaCha20-Poly1305.

use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};
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

    /// The deterministic nonce of a blob of `kind` with `id`.
    fn blob_nonce(&self, kind: u8, id: &Id) -> [u8; 24] {
        let mut h = blake3::Hasher::new_keyed(&self.nonce_key);
        h.update(&[kind]);
        h.update(&id.0);
        let out = h.finalize();
        let mut n = [0u8; 24];
        n.copy_from_slice(&out.as_bytes()[..24]);
        n
    }

    /// Seal `plaintext` as a blob of `kind`/`id` (deterministic nonce, kind and id authenticated).
    pub fn seal_blob(&self, kind: u8, id: &Id, plaintext: &[u8]) -> Result<Vec<u8>> {
        let mut buf = Vec::with_capacity(plaintext.len() + TAG_LEN);
        buf.extend_from_slice(plaintext);
        self.seal_blob_in_place(kind, id, &mut buf)?;
        Ok(buf)
    }

    /// Open a sealed blob of `kind`/`id`; fails if anything was altered.
    pub fn open_blob(&self, kind: u8, id: &Id, sealed: &[u8]) -> Result<Vec<u8>> {
        let mut buf = sealed.to_vec();
        self.open_blob_in_place(kind, id, &mut buf)?;
        Ok(buf)
    }

    /// Seal `buf` in place as a blob of `kind`/`id` (the tag is appended).
    pub fn seal_blob_in_place(&self, kind: u8, id: &Id, buf: &mut Vec<u8>) -> Result<()> {
        xseal_in_place(
            &self.cipher_key,
            &self.blob_nonce(kind, id),
            &blob_aad(kind, id),
            buf,
        )
        .map_err(|_| Error::Pipeline(format!("sealing blob {id} failed")))
    }

    /// Open `buf` in place (the tag is removed); fails if anything was altered.
    pub fn open_blob_in_place(&self, kind: u8, id: &Id, buf: &mut Vec<u8>) -> Result<()> {
        xopen_in_place(
            &self.cipher_key,
            &self.blob_nonce(kind, id),
            &blob_aad(kind, id),
            buf,
        )
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

/// Length of the Poly1305 tag.
const TAG_LEN: usize = 16;

/// The IETF ChaCha20-Poly1305 key and nonce that XChaCha20-Poly1305 under
/// `key` with `nonce` amounts to (draft-irtf-cfrg-xchacha §2.3).
fn xchacha_parts(
    key: &[u8; 32],
    nonce: &[u8; 24],
) -> std::result::Result<(LessSafeKey, Nonce), ()> {
    let mut sub: [u8; 32] =
        chacha20::hchacha::<chacha20::cipher::consts::U10>(key.into(), (&nonce[..16]).into())
            .into();
    let unbound = UnboundKey::new(&CHACHA20_POLY1305, &sub).map_err(|_| ());
    sub.zeroize();
    let mut short = [0u8; 12];
    short[4..].copy_from_slice(&nonce[16..]);
    Ok((
        LessSafeKey::new(unbound?),
        Nonce::assume_unique_for_key(short),
    ))
}

/// XChaCha20-Poly1305 seal of `buf` in place (tag appended).
fn xseal_in_place(
    key: &[u8; 32],
    nonce: &[u8; 24],
    aad: &[u8],
    buf: &mut Vec<u8>,
) -> std::result::Result<(), ()> {
    let (k, n) = xchacha_parts(key, nonce)?;
    k.seal_in_place_append_tag(n, Aad::from(aad), buf)
        .map_err(|_| ())
}

/// XChaCha20-Poly1305 open of `buf` in place (tag removed); `Err` when
/// anything was altered.
fn xopen_in_place(
    key: &[u8; 32],
    nonce: &[u8; 24],
    aad: &[u8],
    buf: &mut Vec<u8>,
) -> std::result::Result<(), ()> {
    let (k, n) = xchacha_parts(key, nonce)?;
    let len = k
        .open_in_place(n, Aad::from(aad), buf.as_mut_slice())
        .map_err(|_| ())?
        .len();
    buf.truncate(len);
    Ok(())
}

/// XChaCha20-Poly1305 with a random 24-byte nonce: output is nonce || ciphertext || tag.
pub(crate) fn seal_random_with(key: &[u8; 32], aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>> {
    let mut nonce = [0u8; 24];
    fill_random(&mut nonce)?;
    let mut out = Vec::with_capacity(24 + plaintext.len() + TAG_LEN);
    out.extend_from_slice(&nonce);
    let mut body = plaintext.to_vec();
    xseal_in_place(key, &nonce, aad, &mut body)
        .map_err(|_| Error::Pipeline("sealing failed".into()))?;
    out.extend_from_slice(&body);
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
    let mut nonce = [0u8; 24];
    nonce.copy_from_slice(&sealed[..24]);
    let mut body = sealed[24..].to_vec();
    xopen_in_place(key, &nonce, aad, &mut body)
        .map_err(|_| Error::Decrypt { what: what.into() })?;
    Ok(body)
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
