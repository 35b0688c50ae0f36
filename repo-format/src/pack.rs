//! Packs: many sealed blobs in one file, with a sealed self-describing trailer.
//!
//! ```text
//! pack    = PACK_MAGIC(8) || blob* || trailer || trailer_len(u32 LE) || PACK_END_MAGIC(8)
//! trailer = nonce(24) || XChaCha20-Poly1305_metadata(entries, aad = "hubvault pack trailer v1")
//! entries = count(u32) || { kind(u8) id(32) offset(u64) length(u32) raw_length(u32) }*
//! name    = BLAKE3(whole pack file), unkeyed: a checksum of every byte
//! ```
//! The trailer is readable with the metadata key only, so a content-blind
//! collector can rebuild its catalog, and chunk boundaries are not visible
//! to anyone without it.

pub mod reader;
pub mod writer;

use crate::blob::BlobKind;
use crate::id::Id;

/// Associated data of pack trailers.
pub const TRAILER_AAD: &[u8] = b"hubvault pack trailer v1";
/// Bytes per trailer entry.
pub const ENTRY_LEN: usize = 1 + 32 + 8 + 4 + 4;
/// Bytes after the trailer: length and end magic.
pub const FOOTER_LEN: usize = 4 + 8;

/// Where one blob sits in a pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackEntry {
    /// Data or tree.
    pub kind: BlobKind,
    /// The blob's id.
    pub id: Id,
    /// Offset of its sealed bytes from the start of the pack file.
    pub offset: u64,
    /// Length of its sealed bytes.
    pub length: u32,
    /// Length of its plaintext.
    pub raw_length: u32,
}

pub(crate) fn encode_entries(entries: &[PackEntry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + entries.len() * ENTRY_LEN);
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for e in entries {
        out.push(e.kind as u8);
        out.extend_from_slice(&e.id.0);
        out.extend_from_slice(&e.offset.to_le_bytes());
        out.extend_from_slice(&e.length.to_le_bytes());
        out.extend_from_slice(&e.raw_length.to_le_bytes());
    }
    out
}

pub(crate) fn decode_entries(b: &[u8]) -> Option<Vec<PackEntry>> {
    let count = u32::from_le_bytes(b.get(..4)?.try_into().ok()?) as usize;
    if b.len() != 4 + count.checked_mul(ENTRY_LEN)? {
        return None;
    }
    let mut out = Vec::with_capacity(count);
    for e in b[4..].chunks_exact(ENTRY_LEN) {
        out.push(PackEntry {
            kind: BlobKind::from_u8(e[0])?,
            id: Id::from_slice(&e[1..33])?,
            offset: u64::from_le_bytes(e[33..41].try_into().ok()?),
            length: u32::from_le_bytes(e[41..45].try_into().ok()?),
            raw_length: u32::from_le_bytes(e[45..49].try_into().ok()?),
        });
    }
    Some(out)
}
