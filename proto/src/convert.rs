//! Validated conversions from wire messages to `repo-format` types: the one
//! place where bytes from the network become ids, kinds and names.

use repo_format::Id;
use repo_format::blob::BlobKind;

use crate::limits::{MAX_IDS_PER_REQUEST, PROTOCOL};

/// A wire message that does not follow the protocol.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConvertError {
    /// The request's protocol version is not ours.
    #[error("protocol version {0} is not supported (this side speaks {PROTOCOL})")]
    Protocol(u32),
    /// An id is not 32 bytes.
    #[error("{field}: id must be 32 bytes, got {len}")]
    IdLength {
        /// Which field.
        field: &'static str,
        /// Its length.
        len: usize,
    },
    /// Too many ids in one request.
    #[error("{field}: {count} ids, at most {MAX_IDS_PER_REQUEST} per request")]
    TooMany {
        /// Which field.
        field: &'static str,
        /// How many were sent.
        count: usize,
    },
    /// A blob kind outside 0..=1.
    #[error("unknown blob kind {0}")]
    Kind(u32),
    /// A name that does not match its rules.
    #[error("{field}: {reason}")]
    Name {
        /// Which field.
        field: &'static str,
        /// What is wrong.
        reason: &'static str,
    },
}

/// Check the protocol version of a request.
pub fn protocol(v: u32) -> Result<(), ConvertError> {
    if v == PROTOCOL {
        Ok(())
    } else {
        Err(ConvertError::Protocol(v))
    }
}

/// One 32-byte id.
pub fn id(field: &'static str, b: &[u8]) -> Result<Id, ConvertError> {
    Id::from_slice(b).ok_or(ConvertError::IdLength {
        field,
        len: b.len(),
    })
}

/// A bounded list of ids.
pub fn ids(field: &'static str, list: &[Vec<u8>]) -> Result<Vec<Id>, ConvertError> {
    if list.len() > MAX_IDS_PER_REQUEST {
        return Err(ConvertError::TooMany {
            field,
            count: list.len(),
        });
    }
    list.iter().map(|b| id(field, b)).collect()
}

/// A blob kind.
pub fn kind(k: u32) -> Result<BlobKind, ConvertError> {
    u8::try_from(k)
        .ok()
        .and_then(BlobKind::from_u8)
        .ok_or(ConvertError::Kind(k))
}

/// A site name: 1-64 characters of `[a-z0-9-]`, not starting with `-`.
pub fn site_name(s: &str) -> Result<String, ConvertError> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && !s.starts_with('-')
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(s.to_string())
    } else {
        Err(ConvertError::Name {
            field: "site",
            reason: "1-64 characters of a-z, 0-9 and '-', not starting with '-'",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation() {
        assert!(protocol(PROTOCOL).is_ok());
        assert_eq!(protocol(1), Err(ConvertError::Protocol(1)));
        assert_eq!(
            protocol(PROTOCOL + 1),
            Err(ConvertError::Protocol(PROTOCOL + 1))
        );
        assert!(id("x", &[0; 32]).is_ok());
        assert!(id("x", &[0; 31]).is_err());
        assert!(ids("x", &vec![vec![0; 32]; MAX_IDS_PER_REQUEST + 1]).is_err());
        assert_eq!(kind(1), Ok(BlobKind::Tree));
        assert!(kind(2).is_err());
        assert!(site_name("paris-1").is_ok());
        for bad in ["", "-a", "Paris", "a/b", &"a".repeat(65)] {
            assert!(site_name(bad).is_err(), "{bad}");
        }
    }
}
