//! The keyring file: the repository's keys wrapped under a passphrase.
//!
//! The passphrase is stretched with Argon2id (parameters stored in the file)
//! into a key-encryption key, which seals the keys with XChaCha20-Poly1305.
//! A wrong passphrase fails authentication and is reported as such.

use std::path::Path;

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::crypto::{KeySet, Keys, fill_random, open_random_with, seal_random_with};
use crate::error::{Error, Result};
use crate::fsutil;
use crate::id::{hex_decode, hex_encode};

/// Associated data of the wrapped keys.
pub const KEYRING_AAD: &[u8] = b"hubvault keyring v1";

/// Argon2id cost parameters.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct KdfParams {
    /// Memory in KiB.
    pub m_cost_kib: u32,
    /// Iterations.
    pub t_cost: u32,
    /// Lanes.
    pub p_cost: u32,
}

impl Default for KdfParams {
    /// 64 MiB, 3 passes, 1 lane: about a quarter second here, OWASP's
    /// recommended floor is 19 MiB / 2 passes.
    fn default() -> Self {
        KdfParams {
            m_cost_kib: 64 * 1024,
            t_cost: 3,
            p_cost: 1,
        }
    }
}

impl KdfParams {
    /// The defaults, or (for tests and benches only) `memory_kib` of memory
    /// with a single pass: the binaries' hidden `--kdf-memory-kib` flag.
    pub fn with_memory_kib(memory_kib: Option<u32>) -> Self {
        match memory_kib {
            None => KdfParams::default(),
            Some(m) => KdfParams {
                m_cost_kib: m,
                t_cost: 1,
                p_cost: 1,
            },
        }
    }

    /// For a passphrase that is itself a random secret of at least 128 bits
    /// (an agent's spool, whose passphrase is generated at enrollment and
    /// kept beside it): no guess can succeed, so stretching protects
    /// nothing. Argon2id's smallest cost (8 KiB, one pass) instead of the
    /// defaults' 0.15-0.25 s, which every backup paid before anything else
    /// could start.
    pub fn for_random_secret() -> Self {
        KdfParams {
            m_cost_kib: 8,
            t_cost: 1,
            p_cost: 1,
        }
    }
}

#[derive(Serialize, Deserialize)]
struct KeyringFile {
    version: u32,
    kdf: String,
    params: KdfParams,
    salt: String,
    /// nonce || ciphertext || tag, hex.
    wrapped: String,
}

/// Largest Argon2 memory a keyring may ask for: 4 GiB.
pub const MAX_KDF_MEMORY_KIB: u32 = 4 * 1024 * 1024;
/// Most Argon2 passes a keyring may ask for.
pub const MAX_KDF_PASSES: u32 = 64;
/// Most Argon2 lanes a keyring may ask for.
pub const MAX_KDF_LANES: u32 = 64;

impl KdfParams {
    /// Refuse parameters above the limits above. The keyring's parameters
    /// are not authenticated (they are needed before anything can be): one
    /// who can edit the file could otherwise make every open allocate
    /// terabytes or run for days.
    pub fn check(&self) -> Result<()> {
        if self.m_cost_kib > MAX_KDF_MEMORY_KIB
            || self.t_cost > MAX_KDF_PASSES
            || self.p_cost > MAX_KDF_LANES
        {
            return Err(Error::Refused(format!(
                "keyring asks for Argon2 memory {} KiB, {} passes, {} lanes; the limits are \
                 {MAX_KDF_MEMORY_KIB} KiB, {MAX_KDF_PASSES} passes, {MAX_KDF_LANES} lanes \
                 (was the keyring file edited? restore it from a copy)",
                self.m_cost_kib, self.t_cost, self.p_cost
            )));
        }
        Ok(())
    }
}

fn derive_kek(passphrase: &[u8], salt: &[u8], p: KdfParams) -> Result<Zeroizing<[u8; 32]>> {
    p.check()?;
    let params = argon2::Params::new(p.m_cost_kib, p.t_cost, p.p_cost, Some(32))
        .map_err(|e| Error::Refused(format!("bad Argon2 parameters: {e}")))?;
    let a = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut out = Zeroizing::new([0u8; 32]);
    a.hash_password_into(passphrase, salt, out.as_mut())
        .map_err(|e| Error::Refused(format!("Argon2 failed: {e}")))?;
    Ok(out)
}

/// Write `keys` to `path`, wrapped under `passphrase` (atomically, fsynced).
pub fn write_keyring(path: &Path, keys: &Keys, passphrase: &[u8], params: KdfParams) -> Result<()> {
    if passphrase.is_empty() {
        return Err(Error::Refused("an empty passphrase is not allowed".into()));
    }
    let mut salt = [0u8; 16];
    fill_random(&mut salt)?;
    let kek = derive_kek(passphrase, &salt, params)?;
    let plain = keys_to_bytes(keys);
    let wrapped = seal_random_with(&kek, KEYRING_AAD, &plain)?;
    let file = KeyringFile {
        version: 1,
        kdf: "argon2id".into(),
        params,
        salt: hex_encode(&salt),
        wrapped: hex_encode(&wrapped),
    };
    let json =
        serde_json::to_vec_pretty(&file).map_err(|e| Error::corrupt("keyring", e.to_string()))?;
    fsutil::write_atomic(path, &json)
}

/// Read and unwrap the keyring at `path`.
pub fn read_keyring(path: &Path, passphrase: &[u8]) -> Result<Keys> {
    let bytes = std::fs::read(path).map_err(|e| Error::io("reading keyring", path, e))?;
    let file: KeyringFile = serde_json::from_slice(&bytes)
        .map_err(|e| Error::corrupt(format!("keyring {}", path.display()), e.to_string()))?;
    if file.version != 1 || file.kdf != "argon2id" {
        return Err(Error::corrupt(
            format!("keyring {}", path.display()),
            format!("unsupported version {} / kdf {}", file.version, file.kdf),
        ));
    }
    let bad = |what: &str| Error::corrupt(format!("keyring {}", path.display()), what.to_string());
    let salt = hex_decode(&file.salt).ok_or_else(|| bad("salt is not hex"))?;
    let wrapped = hex_decode(&file.wrapped).ok_or_else(|| bad("wrapped keys are not hex"))?;
    let kek = derive_kek(passphrase, &salt, file.params)?;
    let plain = Zeroizing::new(
        open_random_with(&kek, "keyring", KEYRING_AAD, &wrapped)
            .map_err(|_| Error::WrongPassphrase(path.to_path_buf()))?,
    );
    keys_from_bytes(&plain).ok_or_else(|| bad("unwrapped key material has a wrong length"))
}

/// Serialize keys: metadata (id key, cipher key) then, if held, content (id key, cipher key).
fn keys_to_bytes(keys: &Keys) -> Zeroizing<Vec<u8>> {
    let mut plain = Zeroizing::new(Vec::with_capacity(128));
    let (i, c) = keys.metadata.stored();
    plain.extend_from_slice(i);
    plain.extend_from_slice(c);
    if let Some(content) = &keys.content {
        let (i, c) = content.stored();
        plain.extend_from_slice(i);
        plain.extend_from_slice(c);
    }
    plain
}

fn keys_from_bytes(plain: &[u8]) -> Option<Keys> {
    let set = |b: &[u8]| -> KeySet {
        let mut a = [0u8; 32];
        let mut c = [0u8; 32];
        a.copy_from_slice(&b[..32]);
        c.copy_from_slice(&b[32..64]);
        KeySet::from_keys(a, c)
    };
    match plain.len() {
        64 => Some(Keys {
            metadata: set(&plain[..64]),
            content: None,
        }),
        128 => Some(Keys {
            metadata: set(&plain[..64]),
            content: Some(set(&plain[64..])),
        }),
        _ => None,
    }
}

/// Context deriving the key that wraps repository keys for an enrollment token.
pub const ENROLL_WRAP_CONTEXT: &str = "hubvault 2026-11 enrollment key wrap v1";
/// Associated data of keys wrapped for enrollment.
pub const ENROLL_AAD: &[u8] = b"hubvault enrollment v1";

/// Seal `keys` under a token's 32-byte secret, so that only the holder of the
/// token (never the collector relaying the bytes) can read them.
pub fn wrap_for_enrollment(keys: &Keys, secret: &[u8; 32]) -> Result<Vec<u8>> {
    let kek = Zeroizing::new(blake3::derive_key(ENROLL_WRAP_CONTEXT, secret));
    seal_random_with(&kek, ENROLL_AAD, &keys_to_bytes(keys))
}

/// Open what [`wrap_for_enrollment`] produced.
pub fn unwrap_enrollment(wrapped: &[u8], secret: &[u8; 32]) -> Result<Keys> {
    let kek = Zeroizing::new(blake3::derive_key(ENROLL_WRAP_CONTEXT, secret));
    let plain = Zeroizing::new(open_random_with(
        &kek,
        "enrollment keys",
        ENROLL_AAD,
        wrapped,
    )?);
    keys_from_bytes(&plain).ok_or_else(|| Error::corrupt("enrollment keys", "wrong length"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fast() -> KdfParams {
        KdfParams {
            m_cost_kib: 64,
            t_cost: 1,
            p_cost: 1,
        }
    }

    #[test]
    fn wrong_passphrase_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("keyring");
        let keys = Keys::generate().unwrap();
        write_keyring(&p, &keys, b"right", fast()).unwrap();
        let back = read_keyring(&p, b"right").unwrap();
        assert_eq!(back.metadata.id_of(b"x"), keys.metadata.id_of(b"x"));
        assert!(matches!(
            read_keyring(&p, b"wrong"),
            Err(Error::WrongPassphrase(_))
        ));
    }

    /// Argon2 accepts the least cost, and it still tells a wrong secret.
    #[test]
    fn the_random_secret_parameters_work() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("keyring");
        let keys = Keys::generate().unwrap();
        write_keyring(&p, &keys, b"0123abcd", KdfParams::for_random_secret()).unwrap();
        assert!(read_keyring(&p, b"0123abcd").is_ok());
        assert!(matches!(
            read_keyring(&p, b"0123abce"),
            Err(Error::WrongPassphrase(_))
        ));
    }

    #[test]
    fn argon2_parameters_over_the_limits_are_refused_before_any_work() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("keyring");
        let keys = Keys::generate().unwrap();
        write_keyring(&p, &keys, b"pw", KdfParams::with_memory_kib(Some(64))).unwrap();
        let good = std::fs::read_to_string(&p).unwrap();
        for (field, value) in [
            ("m_cost_kib", 1u64 << 31),
            ("t_cost", 1 << 20),
            ("p_cost", 1 << 16),
        ] {
            let mut v: serde_json::Value = serde_json::from_str(&good).unwrap();
            v["params"][field] = value.into();
            std::fs::write(&p, serde_json::to_vec(&v).unwrap()).unwrap();
            let started = std::time::Instant::now();
            let err = read_keyring(&p, b"pw").err().expect("refused");
            assert!(matches!(err, Error::Refused(_)), "{field}: {err}");
            assert!(err.to_string().contains("limits"), "{field}: {err}");
            // Refused up front, not after allocating or hashing.
            assert!(
                started.elapsed() < std::time::Duration::from_secs(5),
                "{field}"
            );
        }
        // Over the limits at creation too.
        let huge = KdfParams {
            m_cost_kib: MAX_KDF_MEMORY_KIB + 1,
            t_cost: 1,
            p_cost: 1,
        };
        assert!(write_keyring(&dir.path().join("k2"), &keys, b"pw", huge).is_err());
    }

    #[test]
    fn enrollment_wrap_round_trip() {
        let keys = Keys::generate().unwrap();
        let w = wrap_for_enrollment(&keys, &[7; 32]).unwrap();
        let back = unwrap_enrollment(&w, &[7; 32]).unwrap();
        assert_eq!(
            back.content().unwrap().id_of(b"x"),
            keys.content().unwrap().id_of(b"x")
        );
        assert!(unwrap_enrollment(&w, &[8; 32]).is_err());
    }
}
