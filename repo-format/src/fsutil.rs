//! Small durable-write helpers: write to a temporary name, fsync, rename,
//! fsync the directory. Every file of the repository is written this way.

use std::fs::File;
use std::io::Write;
use std::path::Path;

use crate::error::{Error, Result};

/// Write `data` to `path` atomically and durably.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| Error::Refused(format!("{} has no parent directory", path.display())))?;
    let tmp = tmp_name(path);
    let mut f = File::create(&tmp).map_err(|e| Error::io("creating", &tmp, e))?;
    f.write_all(data)
        .map_err(|e| Error::io("writing", &tmp, e))?;
    f.sync_all().map_err(|e| Error::io("fsync of", &tmp, e))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(|e| Error::io("renaming into place", path, e))?;
    sync_dir(dir)
}

/// fsync a directory so that a rename or create in it is durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    let d = File::open(dir).map_err(|e| Error::io("opening directory", dir, e))?;
    d.sync_all()
        .map_err(|e| Error::io("fsync of directory", dir, e))
}

/// A temporary sibling name for `path` (same directory, so rename is atomic).
pub fn tmp_name(path: &Path) -> std::path::PathBuf {
    let mut rnd = [0u8; 6];
    let _ = crate::crypto::fill_random(&mut rnd);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", crate::id::hex_encode(&rnd)))
}
