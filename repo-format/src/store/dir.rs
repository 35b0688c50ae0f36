//! Packs in a local directory: `packs/<first two hex digits>/<64 hex digits>`.
//!
//! `put` = fsync the temporary file, rename it into place, fsync the
//! directory. Read handles are cached (a restore reads many blobs of the
//! same pack); spans read front to back (an upload) go direct, uncached.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::direct::{ALIGN, AlignedBuf};
use crate::error::{Error, Result};
use crate::fsutil;
use crate::id::{Id, hex_encode};
use crate::store::{PackStore, TempPack};

/// How many open read handles are kept.
const HANDLE_CACHE: usize = 128;

/// A pack store in a local directory.
pub struct DirStore {
    packs: PathBuf,
    tmp: PathBuf,
    handles: Mutex<HashMap<Id, Arc<File>>>,
    direct_writes: bool,
}

impl DirStore {
    /// A store over `packs_dir`, writing temporaries in `tmp_dir` (same file system).
    pub fn new(packs_dir: PathBuf, tmp_dir: PathBuf) -> Self {
        DirStore {
            packs: packs_dir,
            tmp: tmp_dir,
            handles: Mutex::new(HashMap::new()),
            direct_writes: true,
        }
    }

    /// Whether new packs are written with direct I/O (the default), which
    /// spares the copy into the page cache (tests turn it off to cover the
    /// buffered path). Even the agent's spool, whose packs are read back at
    /// once for the upload, was faster with it (see `edge-agent/src/state.rs`).
    pub fn with_direct_writes(mut self, on: bool) -> Self {
        self.direct_writes = on;
        self
    }

    /// Create the 256 fan-out directories (at repository init).
    pub fn create_layout(packs_dir: &Path) -> Result<()> {
        for i in 0..=255u8 {
            let d = packs_dir.join(hex_encode(&[i]));
            std::fs::create_dir_all(&d).map_err(|e| Error::io("creating", &d, e))?;
        }
        fsutil::sync_dir(packs_dir)
    }

    /// Path of pack `name`.
    pub fn path_of(&self, name: &Id) -> PathBuf {
        let hex = name.to_hex();
        self.packs.join(&hex[..2]).join(hex)
    }

    fn handle(&self, name: &Id) -> Result<Arc<File>> {
        let mut h = self
            .handles
            .lock()
            .map_err(|_| Error::Pipeline("handle cache poisoned".into()))?;
        if let Some(f) = h.get(name) {
            return Ok(f.clone());
        }
        let p = self.path_of(name);
        let f = Arc::new(File::open(&p).map_err(|e| Error::io("opening pack", &p, e))?);
        if h.len() >= HANDLE_CACHE {
            h.clear();
        }
        h.insert(*name, f.clone());
        Ok(f)
    }
}

impl PackStore for DirStore {
    fn create_temp(&self) -> Result<TempPack> {
        let path = fsutil::tmp_pack_path(&self.tmp);
        let opened = crate::direct::create_new(&path, self.direct_writes);
        let (file, direct) = opened.map_err(|e| Error::io("creating temporary pack", &path, e))?;
        Ok(TempPack { file, path, direct })
    }

    fn put(&self, tmp: TempPack, name: &Id) -> Result<()> {
        tmp.file
            .sync_all()
            .map_err(|e| Error::io("fsync of pack", &tmp.path, e))?;
        drop(tmp.file);
        let dest = self.path_of(name);
        std::fs::rename(&tmp.path, &dest).map_err(|e| Error::io("renaming pack into", &dest, e))?;
        let dir = dest.parent().unwrap_or(&self.packs);
        fsutil::sync_dir(dir)
    }

    fn read_at(&self, name: &Id, offset: u64, buf: &mut [u8]) -> Result<()> {
        let f = self.handle(name)?;
        f.read_exact_at(buf, offset)
            .map_err(|e| Error::io("reading (short or damaged pack?)", self.path_of(name), e))
    }

    fn read_span<'b>(
        &self,
        name: &Id,
        offset: u64,
        len: usize,
        buf: &'b mut AlignedBuf,
    ) -> Result<&'b [u8]> {
        let start = offset - offset % ALIGN as u64;
        let end = (offset + len as u64).next_multiple_of(ALIGN as u64);
        let want = (end - start) as usize;
        AlignedBuf::ensure(buf, want);
        let p = self.path_of(name);
        // Its own descriptor: the cached handles are buffered, and an
        // upload opens each pack a few times (one per span), not per blob.
        let (f, mut direct) = crate::direct::open_read(&p, self.direct_writes)
            .map_err(|e| Error::io("opening pack", &p, e))?;
        let got =
            crate::direct::read_full_at(&f, &mut direct, &mut buf.as_mut_slice()[..want], start)
                .map_err(|e| Error::io("reading", &p, e))?;
        let (from, to) = ((offset - start) as usize, (offset - start) as usize + len);
        if got < to {
            return Err(Error::io(
                "reading (short or damaged pack?)",
                &p,
                std::io::Error::from(std::io::ErrorKind::UnexpectedEof),
            ));
        }
        Ok(&buf.as_slice()[from..to])
    }

    fn size(&self, name: &Id) -> Result<u64> {
        let p = self.path_of(name);
        Ok(std::fs::metadata(&p)
            .map_err(|e| Error::io("stat of pack", &p, e))?
            .len())
    }

    fn remove(&self, name: &Id) -> Result<()> {
        if let Ok(mut h) = self.handles.lock() {
            h.remove(name);
        }
        let p = self.path_of(name);
        match std::fs::remove_file(&p) {
            Ok(()) => fsutil::sync_dir(p.parent().unwrap_or(&self.packs)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io("removing pack", &p, e)),
        }
    }

    fn move_out(&self, name: &Id, dest: &Path) -> Result<bool> {
        if let Ok(mut h) = self.handles.lock() {
            h.remove(name);
        }
        let p = self.path_of(name);
        std::fs::create_dir_all(dest).map_err(|e| Error::io("creating", dest, e))?;
        let to = dest.join(name.to_hex());
        match std::fs::rename(&p, &to) {
            Ok(()) => {
                fsutil::sync_dir(dest)?;
                fsutil::sync_dir(p.parent().unwrap_or(&self.packs))?;
                Ok(true)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(Error::io("moving damaged pack to", &to, e)),
        }
    }

    fn list(&self) -> Result<Vec<Id>> {
        let mut out = Vec::new();
        for i in 0..=255u8 {
            let d = self.packs.join(hex_encode(&[i]));
            let rd = match std::fs::read_dir(&d) {
                Ok(rd) => rd,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::io("listing", &d, e)),
            };
            for ent in rd {
                let ent = ent.map_err(|e| Error::io("listing", &d, e))?;
                if let Some(id) = ent.file_name().to_str().and_then(Id::from_hex) {
                    out.push(id);
                }
            }
        }
        out.sort();
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A store in a temp dir holding one pack of `len` patterned bytes.
    fn store_with_pack(direct: bool, len: usize) -> (tempfile::TempDir, DirStore, Id, Vec<u8>) {
        let dir = tempfile::tempdir().expect("tmp");
        let (packs, tmp) = (dir.path().join("packs"), dir.path().join("tmp"));
        DirStore::create_layout(&packs).expect("layout");
        std::fs::create_dir(&tmp).expect("tmp dir");
        let store = DirStore::new(packs, tmp).with_direct_writes(direct);
        let bytes: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
        let name = Id([3; 32]);
        let p = store.path_of(&name);
        std::fs::File::create(&p)
            .and_then(|mut f| f.write_all(&bytes))
            .expect("pack");
        (dir, store, name, bytes)
    }

    #[test]
    fn read_span_returns_exactly_the_bytes_asked_for() {
        for direct in [true, false] {
            let (_d, store, name, bytes) = store_with_pack(direct, 3 * ALIGN + 123);
            let mut buf = AlignedBuf::new(0, 0);
            // Unaligned start and end, one spanning to the last byte, one tiny.
            for (off, len) in [(5usize, 2 * ALIGN), (ALIGN + 17, 2 * ALIGN + 106), (0, 1)] {
                let got = store
                    .read_span(&name, off as u64, len, &mut buf)
                    .expect("span");
                assert_eq!(got, &bytes[off..off + len], "direct={direct} {off}+{len}");
            }
            // Past the end: an error naming the pack, not short data.
            let err = store
                .read_span(&name, ALIGN as u64, 3 * ALIGN, &mut buf)
                .expect_err("past the end");
            assert!(err.to_string().contains(&name.to_hex()), "{err}");
        }
    }
}
