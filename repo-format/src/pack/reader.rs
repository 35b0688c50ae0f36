//! Reads pack trailers and verifies whole packs.

use crate::consts::{MAX_TRAILER, PACK_END_MAGIC, PACK_MAGIC};
use crate::crypto::KeySet;
use crate::error::{Error, Result};
use crate::id::Id;
use crate::pack::{FOOTER_LEN, PackEntry, TRAILER_AAD, decode_entries};
use crate::store::PackStore;

/// Read, authenticate and validate the trailer of pack `name`.
pub fn read_trailer(store: &dyn PackStore, name: &Id, meta: &KeySet) -> Result<Vec<PackEntry>> {
    let what = || format!("pack {name}");
    let size = store.size(name)?;
    let min = (PACK_MAGIC.len() + FOOTER_LEN) as u64;
    if size < min {
        return Err(Error::corrupt(
            what(),
            format!("only {size} bytes (truncated?)"),
        ));
    }
    let mut head = [0u8; 8];
    store.read_at(name, 0, &mut head)?;
    if &head != PACK_MAGIC {
        return Err(Error::corrupt(what(), "bad magic at start"));
    }
    let mut footer = [0u8; FOOTER_LEN];
    store.read_at(name, size - FOOTER_LEN as u64, &mut footer)?;
    if &footer[4..] != PACK_END_MAGIC {
        return Err(Error::corrupt(what(), "bad end magic (truncated?)"));
    }
    let tlen = u32::from_le_bytes([footer[0], footer[1], footer[2], footer[3]]) as u64;
    if tlen as usize > MAX_TRAILER || tlen > size - min {
        return Err(Error::corrupt(
            what(),
            format!("trailer length {tlen} impossible"),
        ));
    }
    let tstart = size - FOOTER_LEN as u64 - tlen;
    let mut sealed = vec![0u8; tlen as usize];
    store.read_at(name, tstart, &mut sealed)?;
    let plain = meta.open_random(&format!("trailer of pack {name}"), TRAILER_AAD, &sealed)?;
    let entries = decode_entries(&plain)
        .ok_or_else(|| Error::corrupt(what(), "trailer entries malformed"))?;
    for e in &entries {
        let end = e.offset.checked_add(e.length as u64);
        if e.offset < PACK_MAGIC.len() as u64 || end.is_none_or(|end| end > tstart) {
            return Err(Error::corrupt(
                what(),
                format!(
                    "blob {} at {}+{} lies outside the blob area",
                    e.id, e.offset, e.length
                ),
            ));
        }
    }
    Ok(entries)
}

/// Hash every byte of pack `name` and compare with its name.
pub fn verify_checksum(store: &dyn PackStore, name: &Id) -> Result<()> {
    let size = store.size(name)?;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    while off < size {
        let n = ((size - off) as usize).min(buf.len());
        store.read_at(name, off, &mut buf[..n])?;
        h.update(&buf[..n]);
        off += n as u64;
    }
    let actual = Id(*h.finalize().as_bytes());
    if actual != *name {
        return Err(Error::corrupt(
            format!("pack {name}"),
            format!("content hashes to {actual}"),
        ));
    }
    Ok(())
}
