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

/// Rename `from` to `to`, failing with `AlreadyExists` if `to` exists
/// (`renameat2(RENAME_NOREPLACE)` where the platform and file system have
/// it; elsewhere a check before a plain rename, which only a process racing
/// this one can defeat).
pub fn rename_noreplace(from: &Path, to: &Path) -> std::io::Result<()> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use nix::fcntl::{AT_FDCWD, RenameFlags, renameat2};
        match renameat2(AT_FDCWD, from, AT_FDCWD, to, RenameFlags::RENAME_NOREPLACE) {
            Ok(()) => return Ok(()),
            Err(nix::errno::Errno::EINVAL) => {} // the file system lacks the flag
            Err(e) => return Err(e.into()),
        }
    }
    if std::fs::symlink_metadata(to).is_ok() {
        return Err(std::io::Error::from(std::io::ErrorKind::AlreadyExists));
    }
    std::fs::rename(from, to)
}

/// Bytes of a name that [`tmp_name`] keeps in the temporary name.
pub(crate) const TMP_NAME_KEEP: usize = 200;

/// A temporary sibling name for `path` (same directory, so rename is atomic).
///
/// Built from the raw bytes of at most the first 200 bytes of the name, so
/// that a name near the 255-byte limit (or a non-UTF-8 one) still fits.
pub fn tmp_name(path: &Path) -> std::path::PathBuf {
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    let name = path.file_name().map(|n| n.as_bytes()).unwrap_or_default();
    let mut tmp = vec![b'.'];
    tmp.extend_from_slice(&name[..name.len().min(TMP_NAME_KEEP)]);
    tmp.extend_from_slice(format!(".tmp-{}", random_hex()).as_bytes());
    path.with_file_name(std::ffi::OsString::from_vec(tmp))
}

/// 16 random lowercase hex digits for a temporary name.
fn random_hex() -> String {
    let mut rnd = [0u8; 8];
    if crate::crypto::fill_random(&mut rnd).is_err() {
        // Unique enough within one process without randomness.
        let n = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        rnd = n.to_le_bytes();
    }
    crate::id::hex_encode(&rnd)
}

/// Open flags that ask for direct I/O (`O_DIRECT`: writes bypass the page
/// cache), where the platform has them; 0 elsewhere.
pub fn direct_flag() -> i32 {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        nix::fcntl::OFlag::O_DIRECT.bits()
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    {
        0
    }
}

/// Turn direct I/O off on an open file (a file system refused it).
pub fn clear_direct(file: &File) -> std::io::Result<()> {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    let flags = fcntl(file, FcntlArg::F_GETFL).map_err(std::io::Error::from)?;
    let flags = OFlag::from_bits_truncate(flags) & !OFlag::from_bits_truncate(direct_flag());
    fcntl(file, FcntlArg::F_SETFL(flags)).map_err(std::io::Error::from)?;
    Ok(())
}

/// Age after which a temporary file is taken as left by a crash: a live
/// writer finishes a pack in seconds and touches it as it writes.
pub const STALE_TMP: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// A temporary pack's path in `tmp_dir`: `pack-<pid>-<16 hex>`. The
/// writer's process id lets a sweep remove what a killed writer left at
/// once, instead of after [`STALE_TMP`] (a kill -9 mid-backup leaves up to
/// a pack per writer thread, 32 MiB each).
pub fn tmp_pack_path(tmp_dir: &Path) -> std::path::PathBuf {
    tmp_dir.join(format!("pack-{}-{}", std::process::id(), random_hex()))
}

/// The writer's process id in a [`tmp_pack_path`] name.
fn writer_pid(name: &[u8]) -> Option<u32> {
    let rest = name.strip_prefix(b"pack-")?;
    let end = rest.iter().position(|&b| b == b'-')?;
    std::str::from_utf8(&rest[..end]).ok()?.parse().ok()
}

/// False only when `pid` is known not to run (no `/proc/<pid>` while
/// `/proc/self` exists): without /proc every writer counts as alive.
fn writer_alive(pid: u32) -> bool {
    let proc = Path::new("/proc");
    pid == std::process::id() || !proc.join("self").exists() || proc.join(pid.to_string()).exists()
}

/// How long a dead writer's temporary pack is left alone: a writer in
/// another process-id namespace would look dead, but it touches its file
/// as it writes.
pub const STALE_DEAD_WRITER: std::time::Duration = std::time::Duration::from_secs(60);

/// Delete the temporary files in `dir` not modified for `older_than`:
/// everything in a repository's `tmp/`, and `.*.tmp-*` names
/// ([`tmp_name`]) elsewhere when `only_tmp_names`. In `tmp/`, a
/// [`tmp_pack_path`] whose writer no longer runs goes once untouched for
/// [`STALE_DEAD_WRITER`]. A crash between create and rename leaves them
/// behind; nothing refers to them. Best effort: returns how many went; a
/// file that cannot be removed stays for the next open.
pub fn sweep_stale(dir: &Path, older_than: std::time::Duration, only_tmp_names: bool) -> usize {
    use std::os::unix::ffi::OsStrExt;
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    let now = std::time::SystemTime::now();
    let mut n = 0;
    for e in rd.flatten() {
        let name = e.file_name();
        let b = name.as_bytes();
        if only_tmp_names && !(b.starts_with(b".") && b.windows(5).any(|w| w == b".tmp-")) {
            continue;
        }
        let Ok(m) = e.metadata() else { continue };
        let age = m.modified().ok().and_then(|t| now.duration_since(t).ok());
        let dead = !only_tmp_names && writer_pid(b).is_some_and(|pid| !writer_alive(pid));
        let limit = if dead {
            older_than.min(STALE_DEAD_WRITER)
        } else {
            older_than
        };
        if m.is_file() && age.is_some_and(|a| a >= limit) && std::fs::remove_file(e.path()).is_ok()
        {
            n += 1;
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    /// In `tmp/`: a dead writer's pack untouched for a minute goes; the
    /// same fresh, a live writer's (ours) old one, and an unknown name
    /// younger than the day limit stay. An old-style name still goes after
    /// the day limit.
    #[test]
    fn a_dead_writers_temporary_pack_is_swept_after_a_minute() {
        let d = tempfile::tempdir().expect("tempdir");
        let dead = {
            let mut child = std::process::Command::new("true").spawn().expect("spawn");
            let pid = child.id();
            child.wait().expect("wait");
            pid
        };
        let ago = |secs: u64| std::time::SystemTime::now() - std::time::Duration::from_secs(secs);
        let make = |name: &str, mtime: std::time::SystemTime| {
            let p = d.path().join(name);
            let f = File::create(&p).expect("create");
            f.set_modified(mtime).expect("mtime");
            p
        };
        let gone = make(&format!("pack-{dead}-00"), ago(120));
        let fresh = make(&format!("pack-{dead}-01"), ago(5));
        let mine = tmp_pack_path(d.path());
        File::create(&mine)
            .and_then(|f| f.set_modified(ago(3600)))
            .expect("ours");
        let other = make(".pack.tmp-0123456789abcdef", ago(3600));
        let ancient = make(".pack.tmp-fedcba9876543210", ago(2 * 86_400));
        assert_eq!(sweep_stale(d.path(), STALE_TMP, false), 2);
        assert!(!gone.exists() && !ancient.exists());
        assert!(fresh.exists() && mine.exists() && other.exists());
        assert_eq!(writer_pid(b"pack-42-abcd"), Some(42));
        assert_eq!(writer_pid(b".pack.tmp-42"), None);
    }

    #[test]
    fn rename_noreplace_never_replaces() {
        let d = tempfile::tempdir().expect("tempdir");
        let (from, to) = (d.path().join("from"), d.path().join("to"));
        std::fs::create_dir(&from).expect("mkdir");
        std::fs::write(from.join("x"), b"x").expect("write");
        // An empty directory or a file at the destination is not replaced.
        std::fs::create_dir(&to).expect("mkdir");
        let e = rename_noreplace(&from, &to).expect_err("existing directory");
        assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists);
        std::fs::remove_dir(&to).expect("rmdir");
        std::fs::write(&to, b"file").expect("write");
        let e = rename_noreplace(&from, &to).expect_err("existing file");
        assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&to).expect("read"), b"file");
        std::fs::remove_file(&to).expect("rm");
        rename_noreplace(&from, &to).expect("free destination");
        assert_eq!(std::fs::read(to.join("x")).expect("read"), b"x");
        assert!(!from.exists());
    }
}
