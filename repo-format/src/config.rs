//! The repository's `config` file: format version and the parameters fixed
//! at init (dedup depends on them never changing).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::consts::*;
use crate::error::{Error, Result};
use crate::fsutil;

/// FastCDC parameters, fixed per repository.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct ChunkerParams {
    /// Minimum chunk size in bytes (a smaller file is one chunk).
    pub min: u32,
    /// Average (target) chunk size in bytes.
    pub avg: u32,
    /// Maximum chunk size in bytes.
    pub max: u32,
    /// FastCDC normalisation level (0..=3): how strongly cut points are
    /// pushed towards `avg`. Absent from configs written before it was a
    /// parameter, which were cut at level 1.
    #[serde(default = "legacy_normalization")]
    pub normalization: u8,
}

/// The normalisation level of a config that names none (serde default,
/// also for other files that record the chunking, such as an agent's).
pub fn legacy_normalization() -> u8 {
    LEGACY_NORMALIZATION
}

impl Default for ChunkerParams {
    fn default() -> Self {
        ChunkerParams {
            min: DEFAULT_MIN_CHUNK,
            avg: DEFAULT_AVG_CHUNK,
            max: DEFAULT_MAX_CHUNK,
            normalization: DEFAULT_NORMALIZATION,
        }
    }
}

impl ChunkerParams {
    /// Check the parameters against fastcdc's and our own limits.
    pub fn validate(&self) -> Result<()> {
        use fastcdc::v2020 as f;
        let ok = (f::MINIMUM_MIN..=f::MINIMUM_MAX).contains(&self.min)
            && (f::AVERAGE_MIN..=f::AVERAGE_MAX).contains(&self.avg)
            && (f::MAXIMUM_MIN..=f::MAXIMUM_MAX).contains(&self.max)
            && self.min <= self.avg
            && self.avg <= self.max
            && (self.max as usize) <= MAX_BLOB_PLAINTEXT
            && self.normalization <= 3;
        if ok {
            Ok(())
        } else {
            Err(Error::Refused(format!(
                "chunker sizes {self:?} out of range (min 64 B..1 MiB, avg 256 B..4 MiB, max 1 KiB..16 MiB, min <= avg <= max, normalization 0..=3)"
            )))
        }
    }
}

/// Contents of `config`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RepoConfig {
    /// Layout version ([`REPO_VERSION`]).
    pub version: u32,
    /// Random id of this repository (hex).
    pub repo_id: String,
    /// Chunking parameters.
    pub chunker: ChunkerParams,
    /// zstd level applied to every blob (kept only where it shrinks it).
    pub zstd_level: i32,
    /// Pack size at which the writer seals a pack, in bytes.
    pub pack_target: u64,
}

impl RepoConfig {
    /// A config with defaults and a fresh random id.
    pub fn new() -> Result<Self> {
        let mut id = [0u8; 16];
        crate::crypto::fill_random(&mut id)?;
        Ok(RepoConfig {
            version: REPO_VERSION,
            repo_id: crate::id::hex_encode(&id),
            chunker: ChunkerParams::default(),
            zstd_level: DEFAULT_ZSTD_LEVEL,
            pack_target: DEFAULT_PACK_TARGET,
        })
    }

    /// Read and validate `config` at `path`.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io("reading config", path, e))?;
        let c: RepoConfig = serde_json::from_slice(&bytes)
            .map_err(|e| Error::corrupt(format!("config {}", path.display()), e.to_string()))?;
        if c.version != REPO_VERSION {
            return Err(Error::BadRepository {
                path: path.to_path_buf(),
                detail: format!(
                    "repository version {} is not supported (this build reads {REPO_VERSION})",
                    c.version
                ),
            });
        }
        c.validate()?;
        Ok(c)
    }

    /// Check every parameter.
    pub fn validate(&self) -> Result<()> {
        self.chunker.validate()?;
        if !(1..=19).contains(&self.zstd_level) {
            return Err(Error::Refused(format!(
                "zstd level {} out of range 1..=19",
                self.zstd_level
            )));
        }
        if !(1024 * 1024..=1024 * 1024 * 1024).contains(&self.pack_target) {
            return Err(Error::Refused(format!(
                "pack target {} out of range 1 MiB..1 GiB",
                self.pack_target
            )));
        }
        Ok(())
    }

    /// Write durably to `path`.
    pub fn save(&self, path: &Path) -> Result<()> {
        let json =
            serde_json::to_vec_pretty(self).map_err(|e| Error::corrupt("config", e.to_string()))?;
        fsutil::write_atomic(path, &json)
    }
}
