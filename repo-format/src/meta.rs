//! File-system metadata: capturing it into tree entries at backup, applying
//! it at restore (owner, xattrs/ACLs, mode, times), never following symlinks.

use std::collections::HashMap;
use std::fs::Metadata;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use nix::sys::stat::{Mode, SFlag, UtimensatFlags, utimensat};
use nix::sys::time::TimeSpec;

use crate::tree::{Entry, EntryKind};

/// The tree kind of a file type, or `None` for a kind we cannot represent.
pub fn kind_of(md: &Metadata) -> EntryKind {
    let ft = md.file_type();
    if ft.is_dir() {
        EntryKind::Dir
    } else if ft.is_symlink() {
        EntryKind::Symlink
    } else if ft.is_fifo() {
        EntryKind::Fifo
    } else if ft.is_char_device() {
        EntryKind::CharDev
    } else if ft.is_block_device() {
        EntryKind::BlockDev
    } else if ft.is_socket() {
        EntryKind::Socket
    } else {
        EntryKind::File
    }
}

/// A tree entry for `name` from `lstat` metadata (no xattrs, names or content yet).
pub fn entry_from_metadata(name: Vec<u8>, md: &Metadata) -> Entry {
    let kind = kind_of(md);
    let mut e = Entry::new(name, kind);
    e.mode = md.mode() & 0o7777;
    e.uid = md.uid();
    e.gid = md.gid();
    // Saturating: a timestamp outside 1677..2262 must not panic (it clamps).
    e.mtime_ns = md
        .mtime()
        .saturating_mul(1_000_000_000)
        .saturating_add(md.mtime_nsec());
    e.ctime_ns = md
        .ctime()
        .saturating_mul(1_000_000_000)
        .saturating_add(md.ctime_nsec());
    e.dev = md.dev();
    e.ino = md.ino();
    e.nlink = md.nlink();
    e.size = if kind == EntryKind::File {
        md.size()
    } else {
        0
    };
    e.rdev = if matches!(kind, EntryKind::CharDev | EntryKind::BlockDev) {
        md.rdev()
    } else {
        0
    };
    e
}

/// Read all extended attributes of `path` (not following symlinks), sorted by name.
/// A file system without xattr support yields an empty list.
pub fn read_xattrs(path: &Path) -> std::io::Result<Xattrs> {
    collect_xattrs(xattr::list(path), |n| xattr::get(path, n))
}

/// [`read_xattrs`] of an open file: no second path lookup for a file the
/// backup has open anyway.
pub fn read_xattrs_of(file: &std::fs::File) -> std::io::Result<Xattrs> {
    use xattr::FileExt;
    collect_xattrs(file.list_xattr(), |n| file.get_xattr(n))
}

type Xattrs = Vec<(Vec<u8>, Vec<u8>)>;

fn collect_xattrs(
    names: std::io::Result<xattr::XAttrs>,
    get: impl Fn(&std::ffi::OsStr) -> std::io::Result<Option<Vec<u8>>>,
) -> std::io::Result<Xattrs> {
    let names = match names {
        Ok(n) => n,
        Err(e) if is_unsupported(&e) => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for n in names {
        if let Some(v) = get(&n)? {
            out.push((n.as_bytes().to_vec(), v));
        }
    }
    out.sort();
    Ok(out)
}

fn is_unsupported(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc_enotsup) if libc_enotsup == 95)
}

/// Caches uid → user name and gid → group name lookups.
#[derive(Default)]
pub struct NameCache {
    users: HashMap<u32, String>,
    groups: HashMap<u32, String>,
}

impl NameCache {
    /// Fill in `e.user` and `e.group` from the system's databases.
    pub fn fill(&mut self, e: &mut Entry) {
        e.user = self
            .users
            .entry(e.uid)
            .or_insert_with(|| {
                nix::unistd::User::from_uid(e.uid.into())
                    .ok()
                    .flatten()
                    .map(|u| u.name)
                    .unwrap_or_default()
            })
            .clone();
        e.group = self
            .groups
            .entry(e.gid)
            .or_insert_with(|| {
                nix::unistd::Group::from_gid(e.gid.into())
                    .ok()
                    .flatten()
                    .map(|g| g.name)
                    .unwrap_or_default()
            })
            .clone();
    }
}

/// True when the process may set owners and create device nodes.
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Create a special file (fifo or device) at `path` for `e`.
pub fn make_special(path: &Path, e: &Entry) -> std::io::Result<()> {
    let perm = Mode::from_bits_truncate((e.mode & 0o7777) as _);
    let kind = match e.kind {
        EntryKind::Fifo => return nix::unistd::mkfifo(path, perm).map_err(std::io::Error::from),
        EntryKind::CharDev => SFlag::S_IFCHR,
        EntryKind::BlockDev => SFlag::S_IFBLK,
        _ => return Err(std::io::Error::other("not a special file")),
    };
    nix::sys::stat::mknod(path, kind, perm, e.rdev as _).map_err(std::io::Error::from)
}

/// [`apply`] for a regular file the restorer just created and still has
/// open: every call goes through the descriptor (no path lookup in a
/// directory being filled), and owner and mode are changed only where they
/// differ from what the new file got (its `fstat`), which on a 200 000-file
/// restore saves two journalled inode updates per file.
pub fn apply_to_file(file: &std::fs::File, e: &Entry, set_owner: bool) -> Vec<String> {
    use xattr::FileExt;
    let mut warn = Vec::new();
    let st = match nix::sys::stat::fstat(file) {
        Ok(st) => Some(st),
        Err(err) => {
            warn.push(format!("fstat: {err}"));
            None
        }
    };
    let chown = set_owner && st.is_none_or(|st| st.st_uid != e.uid || st.st_gid != e.gid);
    if chown
        && let Err(err) = nix::unistd::fchown(
            file,
            Some(nix::unistd::Uid::from_raw(e.uid)),
            Some(nix::unistd::Gid::from_raw(e.gid)),
        )
    {
        warn.push(format!("chown {}:{}: {err}", e.uid, e.gid));
    }
    // See `apply`: ACLs the snapshot lacks (inherited from a default ACL) go.
    let mut acl_changed = false;
    if let Ok(names) = file.list_xattr() {
        for n in names {
            acl_changed = true;
            if n.as_bytes().starts_with(b"system.posix_acl_")
                && !e.xattrs.iter().any(|(k, _)| k.as_slice() == n.as_bytes())
                && let Err(err) = file.remove_xattr(&n)
            {
                warn.push(format!("removing xattr {}: {err}", n.to_string_lossy()));
            }
        }
    }
    for (k, v) in &e.xattrs {
        if let Err(err) = file.set_xattr(std::ffi::OsStr::from_bytes(k), v) {
            warn.push(format!("xattr {}: {err}", String::from_utf8_lossy(k)));
        }
    }
    // A chown clears set-id bits and an ACL changes the mode: after either,
    // chmod whatever fstat said.
    let mode = e.mode & 0o7777;
    let changed = chown || acl_changed || !e.xattrs.is_empty();
    if (changed || st.is_none_or(|st| st.st_mode & 0o7777 != mode))
        && let Err(err) = nix::sys::stat::fchmod(file, Mode::from_bits_truncate(mode))
    {
        warn.push(format!("chmod {:o}: {err}", e.mode));
    }
    let ts = TimeSpec::new(
        e.mtime_ns.div_euclid(1_000_000_000),
        e.mtime_ns.rem_euclid(1_000_000_000),
    );
    if let Err(err) = nix::sys::stat::futimens(file, &ts, &ts) {
        warn.push(format!("set mtime: {err}"));
    }
    warn
}

/// Apply owner (when root), xattrs, mode (not on symlinks) and mtime to `path`,
/// in that order (chown clears setuid; chmod after ACLs keeps the captured mask).
/// Returns a description of each step that failed; restore reports them as warnings.
pub fn apply(path: &Path, e: &Entry, set_owner: bool) -> Vec<String> {
    let mut warn = Vec::new();
    if set_owner && let Err(err) = std::os::unix::fs::lchown(path, Some(e.uid), Some(e.gid)) {
        warn.push(format!("chown {}:{}: {err}", e.uid, e.gid));
    }
    if e.kind != EntryKind::Symlink {
        // Remove ACLs the snapshot does not have (e.g. inherited from a default
        // ACL of the target directory): restore the access captured, no more.
        // Other xattrs (SELinux labels...) are left to the target system.
        if let Ok(names) = xattr::list(path) {
            for n in names {
                if n.as_bytes().starts_with(b"system.posix_acl_")
                    && !e.xattrs.iter().any(|(k, _)| k.as_slice() == n.as_bytes())
                    && let Err(err) = xattr::remove(path, &n)
                {
                    warn.push(format!("removing xattr {}: {err}", n.to_string_lossy()));
                }
            }
        }
        for (k, v) in &e.xattrs {
            let name = std::ffi::OsStr::from_bytes(k);
            if let Err(err) = xattr::set(path, name, v) {
                warn.push(format!("xattr {}: {err}", String::from_utf8_lossy(k)));
            }
        }
        use std::os::unix::fs::PermissionsExt;
        if let Err(err) =
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(e.mode & 0o7777))
        {
            warn.push(format!("chmod {:o}: {err}", e.mode));
        }
    }
    let ts = TimeSpec::new(
        e.mtime_ns.div_euclid(1_000_000_000),
        e.mtime_ns.rem_euclid(1_000_000_000),
    );
    if let Err(err) = utimensat(
        nix::fcntl::AT_FDCWD,
        path,
        &ts,
        &ts,
        UtimensatFlags::NoFollowSymlink,
    ) {
        warn.push(format!("set mtime: {err}"));
    }
    warn
}
