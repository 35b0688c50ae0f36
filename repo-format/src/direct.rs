//! Direct I/O: aligned memory and positional reads and writes that bypass
//! the page cache (`O_DIRECT`), falling back to buffered I/O of the same
//! bytes where a file system refuses them.
//!
//! Why: on the virtual machines hubvault is measured on, copying into fresh
//! page-cache pages costs a fault per page (11 % of a backup's CPU time when
//! packs were written buffered; 20 % of a large-file restore). A direct
//! write of 400 MiB took 0.07 s of system time against 0.26-1.1 s buffered.
//! Reading a just-written pack back in small pieces through the page cache
//! cost 0.3-0.75 s of system time per 256 MiB; 4 MiB direct reads 0.02 s.
//! Used for pack files (written, and read back by an agent's upload) and
//! for the content of large restored files.

use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

/// Alignment of direct writes: their memory, file offset and length (the
/// largest logical block size of common devices).
pub const ALIGN: usize = 4096;

/// A zeroed buffer of `len` bytes whose start is aligned to [`ALIGN`]
/// (allocated `ALIGN` bytes larger, used from the first aligned address).
pub struct AlignedBuf {
    mem: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    /// A buffer of `len` bytes, shifted by `misalign` bytes from the aligned
    /// start (0 in production; tests misalign it to see a refused direct
    /// write fall back).
    pub fn new(len: usize, misalign: usize) -> Self {
        let mem = vec![0u8; len + ALIGN + misalign];
        // align_offset may (in theory) give up: `is_aligned` then says no.
        let start = mem.as_ptr().align_offset(ALIGN).min(ALIGN) + misalign;
        AlignedBuf { mem, start, len }
    }

    /// Make `buf` at least `len` bytes long (a new zeroed buffer when it
    /// is shorter; its contents are not kept).
    pub fn ensure(buf: &mut AlignedBuf, len: usize) {
        if buf.len < len {
            *buf = AlignedBuf::new(len, 0);
        }
    }

    /// True when the buffer's start is aligned for direct writes.
    pub fn is_aligned(&self) -> bool {
        (self.mem.as_ptr() as usize + self.start).is_multiple_of(ALIGN)
    }

    /// The whole buffer.
    pub fn as_slice(&self) -> &[u8] {
        &self.mem[self.start..self.start + self.len]
    }

    /// The whole buffer, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.mem[self.start..self.start + self.len]
    }

    /// Its length.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for a zero-length buffer.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Create a new file at `path` for writing (and reading), with `O_DIRECT`
/// when `direct` is asked and the platform and file system accept it at
/// open (tmpfs refuses it there). Returns the file and whether it is direct.
pub fn create_new(path: &Path, direct: bool) -> std::io::Result<(File, bool)> {
    open_with(direct, |flags| {
        File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .custom_flags(flags)
            .open(path)
    })
}

/// `open(O_DIRECT)` when `direct` is asked and the platform has it, falling
/// back to `open(0)` when the file system refuses it at open; returns the
/// file and whether it is direct.
fn open_with(
    direct: bool,
    open: impl Fn(i32) -> std::io::Result<File>,
) -> std::io::Result<(File, bool)> {
    let direct = direct && crate::fsutil::direct_flag() != 0;
    if !direct {
        return open(0).map(|f| (f, false));
    }
    match open(crate::fsutil::direct_flag()) {
        Ok(f) => Ok((f, true)),
        Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => open(0).map(|f| (f, false)),
        Err(e) => Err(e),
    }
}

/// Write all of `data` at `offset`. When `*direct` and the write is refused
/// as invalid (a file system that accepted `O_DIRECT` at open but not this
/// write), turn direct I/O off on the file, clear `*direct`, and write the
/// same bytes at the same place through the page cache.
pub fn write_all_at(
    file: &File,
    direct: &mut bool,
    data: &[u8],
    offset: u64,
) -> std::io::Result<()> {
    match file.write_all_at(data, offset) {
        Err(e) if *direct && e.raw_os_error() == Some(nix::errno::Errno::EINVAL as i32) => {
            *direct = false;
            crate::fsutil::clear_direct(file)?;
            file.write_all_at(data, offset)
        }
        other => other,
    }
}

/// Open `path` for reading, with `O_DIRECT` when `direct` is asked and the
/// file system accepts it at open. Returns the file and whether it is direct.
pub fn open_read(path: &Path, direct: bool) -> std::io::Result<(File, bool)> {
    open_with(direct, |flags| {
        File::options().read(true).custom_flags(flags).open(path)
    })
}

/// Read into `buf` from `offset` until it is full or the file ends; returns
/// the bytes read. With `*direct`, `buf`'s memory, `offset` and `buf.len()`
/// must be aligned to [`ALIGN`]; a read refused as invalid turns direct I/O
/// off on the file, clears `*direct` and reads through the page cache.
pub fn read_full_at(
    file: &File,
    direct: &mut bool,
    buf: &mut [u8],
    offset: u64,
) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if *direct && e.raw_os_error() == Some(nix::errno::Errno::EINVAL as i32) => {
                *direct = false;
                crate::fsutil::clear_direct(file)?;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}
