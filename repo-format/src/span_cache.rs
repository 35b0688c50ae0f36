//! A few recently read spans of packs, for tree reads.
//!
//! Walks read trees one by one, root first, while the tree builder wrote
//! them children first: a walk meets a pack's trees back to front, so the
//! kernel's readahead (forward) never helps, and packs written with direct
//! I/O are not in the page cache at all. Reading each tree alone then costs
//! a disk read per directory (an agent's upload walk and the collector's
//! commit check each spent a third of a second on 2 000 directories). Trees
//! are small and packed together, so one aligned span read serves hundreds.
//!
//! Bounded: [`SPANS`] spans of [`SPAN`] bytes (up to twice that where a
//! tree crosses a span's end), least recently used dropped.
//! Packs never change once written (a name is bound to its content), so a
//! cached span is never stale; which blobs are live is the catalog's answer,
//! asked before the cache is.

use std::collections::VecDeque;
use std::sync::Mutex;

use crate::direct::AlignedBuf;
use crate::error::Result;
use crate::id::Id;
use crate::store::PackStore;

/// Bytes read per span (aligned to this size in the pack).
pub(crate) const SPAN: u64 = 1 << 20;
/// Spans kept.
const SPANS: usize = 4;

/// One cached span: bytes `start..start + bytes.len()` of `pack`.
struct Span {
    pack: Id,
    start: u64,
    bytes: Vec<u8>,
}

impl Span {
    fn holds(&self, pack: &Id, offset: u64, len: usize) -> bool {
        // Checked: an offset from a damaged catalog row may be near u64::MAX.
        self.pack == *pack
            && offset >= self.start
            && offset
                .checked_add(len as u64)
                .is_some_and(|end| end <= self.start + self.bytes.len() as u64)
    }
}

/// Recently read pack spans, shared by a repository's readers.
#[derive(Default)]
pub(crate) struct SpanCache {
    spans: Mutex<VecDeque<Span>>,
}

impl SpanCache {
    /// Copy bytes `offset..offset + out.len()` of pack `pack` into `out`,
    /// from a cached span or a new one read from `store`.
    pub(crate) fn read(
        &self,
        store: &dyn PackStore,
        pack: &Id,
        offset: u64,
        out: &mut [u8],
    ) -> Result<()> {
        // A tree larger than a span (a directory of many thousands of
        // entries) is read alone: the cache holds at most SPANS spans of
        // up to twice SPAN bytes.
        if out.len() as u64 > SPAN {
            return store.read_at(pack, offset, out);
        }
        if self.copy_cached(pack, offset, out) {
            return Ok(());
        }
        let start = offset - offset % SPAN;
        // A range past what any pack can hold (a damaged catalog row) is
        // the store's to refuse, without a span.
        let Some(need) = offset.checked_add(out.len() as u64) else {
            return store.read_at(pack, offset, out);
        };
        // To the span's end, or the blob's if it crosses it, but not past
        // the pack's end (a short read is an error to read_span).
        let size = store.size(pack)?;
        let end = (start + SPAN).min(size).max(need);
        let mut buf = AlignedBuf::new(0, 0);
        let bytes = store.read_span(pack, start, (end - start) as usize, &mut buf)?;
        let span = Span {
            pack: *pack,
            start,
            bytes: bytes.to_vec(),
        };
        copy_out(start, &span.bytes, offset, out);
        if let Ok(mut spans) = self.spans.lock() {
            if spans.len() >= SPANS {
                spans.pop_back();
            }
            spans.push_front(span);
        }
        Ok(())
    }

    /// Copy the range from a cached span (moved to the front), if one holds
    /// it. Under the lock: a tree is at most a span, a short memcpy.
    fn copy_cached(&self, pack: &Id, offset: u64, out: &mut [u8]) -> bool {
        let Ok(mut spans) = self.spans.lock() else {
            return false;
        };
        let Some(i) = spans.iter().position(|s| s.holds(pack, offset, out.len())) else {
            return false;
        };
        let Some(s) = spans.remove(i) else {
            return false;
        };
        copy_out(s.start, &s.bytes, offset, out);
        spans.push_front(s);
        true
    }
}

/// Copy the range at `offset` of a span starting at `start` into `out`.
fn copy_out(start: u64, bytes: &[u8], offset: u64, out: &mut [u8]) {
    let from = (offset - start) as usize;
    out.copy_from_slice(&bytes[from..from + out.len()]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::dir::DirStore;

    /// A pack of `len` bytes whose byte `i` is a function of `i`.
    fn pack(store: &DirStore, name: u8, len: usize) -> (Id, Vec<u8>) {
        let bytes: Vec<u8> = (0..len).map(|i| (i * 7 + i / 4099) as u8).collect();
        let tmp = store.create_temp().expect("temp");
        std::fs::write(&tmp.path, &bytes).expect("write");
        let id = Id([name; 32]);
        store.put(tmp, &id).expect("put");
        (id, bytes)
    }

    #[test]
    fn ranges_read_through_the_cache_match_the_pack() {
        let dir = tempfile::tempdir().expect("tempdir");
        let packs = dir.path().join("packs");
        let tmp = dir.path().join("tmp");
        std::fs::create_dir_all(&tmp).expect("tmp");
        DirStore::create_layout(&packs).expect("layout");
        let store = DirStore::new(packs, tmp);
        let size = 2 * SPAN as usize + 12_345;
        let (a, a_bytes) = pack(&store, 1, size);
        let (b, b_bytes) = pack(&store, 2, 5000);
        let cache = SpanCache::default();
        let s = SPAN as usize;
        // Back to front as a walk reads, one crossing a span boundary, the
        // pack's last bytes, a second pack, and more packs than spans kept.
        let reads = [
            (a, size - 100, 100),
            (a, s + 10, 1000),
            (a, s - 50, 100),
            (a, 0, 1),
            (b, 4000, 1000),
            (a, 2 * s - 1, 2),
        ];
        for round in 0..2 {
            for &(p, off, len) in &reads {
                let mut out = vec![0u8; len];
                cache.read(&store, &p, off as u64, &mut out).expect("read");
                let want = if p == a { &a_bytes } else { &b_bytes };
                assert_eq!(out, want[off..off + len], "round {round} pack {p} at {off}");
            }
        }
        assert!(cache.spans.lock().expect("lock").len() <= SPANS);
        // A range longer than a span is read alone, not cached.
        let mut big = vec![0u8; s + 10];
        cache.read(&store, &a, 5, &mut big).expect("long read");
        assert_eq!(big, a_bytes[5..s + 15]);
        assert!(
            cache
                .spans
                .lock()
                .expect("lock")
                .iter()
                .all(|sp| sp.bytes.len() <= 2 * s)
        );
        // A range past the pack's end is an error, not a short copy.
        let mut out = vec![0u8; 10];
        assert!(cache.read(&store, &b, 4995, &mut out).is_err());
        // Offsets near u64::MAX (a damaged catalog row) are errors too, with
        // spans of that pack cached or not: no overflow, no panic.
        for off in [u64::MAX - 5, u64::MAX - SPAN, (i64::MAX as u64) + 1] {
            assert!(cache.read(&store, &b, off, &mut out).is_err(), "{off}");
            assert!(cache.read(&store, &a, off, &mut out).is_err(), "{off}");
        }
    }
}
