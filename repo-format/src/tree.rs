//! Trees: one blob per directory, a deterministic binary listing.
//!
//! ```text
//! tree  = version(u8 = 1) || count(u32) || entry*        (entries strictly sorted by name bytes)
//! entry = name_len(u16) name kind(u8) mode(u32) uid(u32) gid(u32)
//!         user_len(u8) user group_len(u8) group
//!         mtime_ns(i64) ctime_ns(i64) dev(u64) ino(u64) nlink(u64) size(u64) rdev(u64)
//!         xattr_count(u16) { name_len(u16) name value_len(u32) value }*   (sorted by name)
//!         target_len(u32) target
//!         chunk_count(u32) chunk_id(32)*
//!         has_subtree(u8) [subtree_id(32)]
//! ```
//! All integers little-endian. Decoding validates everything a restore
//! relies on: names are never empty, `.`, `..`, and never hold `/` or NUL;
//! only directories have subtrees, only files have chunks, only symlinks
//! have targets. A tree that breaks a rule is corrupt, not restorable.

use crate::consts::{MAX_LINK_TARGET, MAX_NAME, MAX_XATTR_VALUE, TREE_VERSION};
use crate::error::{Error, Result};
use crate::id::Id;

/// What kind of file system object an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
#[repr(u8)]
pub enum EntryKind {
    /// A regular file (content in `chunks`).
    File = 0,
    /// A directory (listing in `subtree`).
    Dir = 1,
    /// A symbolic link (`target`).
    Symlink = 2,
    /// A named pipe, recreated empty.
    Fifo = 3,
    /// A character device (`rdev`), recreated only when running as root.
    CharDev = 4,
    /// A block device (`rdev`), recreated only when running as root.
    BlockDev = 5,
    /// A Unix socket: recorded, never recreated (meaningless without its server).
    Socket = 6,
}

impl EntryKind {
    fn from_u8(b: u8) -> Option<Self> {
        use EntryKind::*;
        Some(match b {
            0 => File,
            1 => Dir,
            2 => Symlink,
            3 => Fifo,
            4 => CharDev,
            5 => BlockDev,
            6 => Socket,
            _ => return None,
        })
    }
}

/// One directory entry with its metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// File name (raw bytes, may be non-UTF-8).
    pub name: Vec<u8>,
    /// Object kind.
    pub kind: EntryKind,
    /// Permission bits including setuid/setgid/sticky (`st_mode & 0o7777`).
    pub mode: u32,
    /// Owner id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
    /// Owner name at backup time (restore prefers the id).
    pub user: String,
    /// Group name at backup time.
    pub group: String,
    /// Modification time, ns since the epoch.
    pub mtime_ns: i64,
    /// Status change time, ns since the epoch (change detection only; not restored).
    pub ctime_ns: i64,
    /// Device of the source file (change detection and hard links).
    pub dev: u64,
    /// Inode of the source file (change detection and hard links).
    pub ino: u64,
    /// Hard link count at backup time.
    pub nlink: u64,
    /// Size in bytes (files); 0 otherwise.
    pub size: u64,
    /// Device number (character and block devices).
    pub rdev: u64,
    /// Extended attributes, sorted by name (POSIX ACLs are `system.posix_acl_*`).
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// Symlink target.
    pub target: Vec<u8>,
    /// Content chunk ids, in order (files).
    pub chunks: Vec<Id>,
    /// The directory's own tree (directories).
    pub subtree: Option<Id>,
}

impl Entry {
    /// An entry of `kind` named `name` with every other field zero.
    pub fn new(name: Vec<u8>, kind: EntryKind) -> Self {
        Entry {
            name,
            kind,
            mode: 0,
            uid: 0,
            gid: 0,
            user: String::new(),
            group: String::new(),
            mtime_ns: 0,
            ctime_ns: 0,
            dev: 0,
            ino: 0,
            nlink: 1,
            size: 0,
            rdev: 0,
            xattrs: Vec::new(),
            target: Vec::new(),
            chunks: Vec::new(),
            subtree: None,
        }
    }
}

/// Is `name` acceptable as one path component of a restore?
pub fn valid_name(name: &[u8]) -> bool {
    !name.is_empty()
        && name != b"."
        && name != b".."
        && name.len() <= MAX_NAME
        && !name.contains(&b'/')
        && !name.contains(&0)
}

/// Encode `entries` (must be sorted by name, names valid) as a tree.
pub fn encode(entries: &[Entry]) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(64 + entries.len() * 160);
    out.push(TREE_VERSION);
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    let mut prev: Option<&[u8]> = None;
    for e in entries {
        if !valid_name(&e.name) || prev.is_some_and(|p| p >= &e.name[..]) {
            return Err(Error::Pipeline(format!(
                "tree entry {:?} invalid or out of order",
                String::from_utf8_lossy(&e.name)
            )));
        }
        prev = Some(&e.name);
        let over = e.xattrs.len() > u16::MAX as usize
            || e.user.len() > u8::MAX as usize
            || e.group.len() > u8::MAX as usize
            || e.target.len() > MAX_LINK_TARGET
            || e.xattrs
                .iter()
                .any(|(k, v)| k.len() > u16::MAX as usize || v.len() > MAX_XATTR_VALUE);
        if over {
            return Err(Error::Pipeline(format!(
                "tree entry {:?} has metadata over the format's limits",
                String::from_utf8_lossy(&e.name)
            )));
        }
        put_bytes16(&mut out, &e.name);
        out.push(e.kind as u8);
        for v in [e.mode, e.uid, e.gid] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        put_bytes8(&mut out, e.user.as_bytes());
        put_bytes8(&mut out, e.group.as_bytes());
        out.extend_from_slice(&e.mtime_ns.to_le_bytes());
        out.extend_from_slice(&e.ctime_ns.to_le_bytes());
        for v in [e.dev, e.ino, e.nlink, e.size, e.rdev] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&(e.xattrs.len() as u16).to_le_bytes());
        for (k, v) in &e.xattrs {
            put_bytes16(&mut out, k);
            out.extend_from_slice(&(v.len() as u32).to_le_bytes());
            out.extend_from_slice(v);
        }
        out.extend_from_slice(&(e.target.len() as u32).to_le_bytes());
        out.extend_from_slice(&e.target);
        out.extend_from_slice(&(e.chunks.len() as u32).to_le_bytes());
        for c in &e.chunks {
            out.extend_from_slice(&c.0);
        }
        match &e.subtree {
            Some(id) => {
                out.push(1);
                out.extend_from_slice(&id.0);
            }
            None => out.push(0),
        }
    }
    Ok(out)
}

fn put_bytes16(out: &mut Vec<u8>, b: &[u8]) {
    let n = b.len().min(u16::MAX as usize);
    out.extend_from_slice(&(n as u16).to_le_bytes());
    out.extend_from_slice(&b[..n]);
}

fn put_bytes8(out: &mut Vec<u8>, b: &[u8]) {
    let n = b.len().min(u8::MAX as usize);
    out.push(n as u8);
    out.extend_from_slice(&b[..n]);
}

struct Cursor<'a> {
    b: &'a [u8],
    what: &'a str,
}

impl<'a> Cursor<'a> {
    fn err(&self, detail: impl Into<String>) -> Error {
        Error::corrupt(self.what, detail)
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.b.len() < n {
            return Err(self.err("truncated"));
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(
            self.take(2)?.try_into().map_err(|_| self.err("u16"))?,
        ))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().map_err(|_| self.err("u32"))?,
        ))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().map_err(|_| self.err("u64"))?,
        ))
    }
    fn id(&mut self) -> Result<Id> {
        Id::from_slice(self.take(32)?).ok_or_else(|| self.err("id"))
    }
}

/// Decode and validate a tree. `what` names it in errors (e.g. "tree 1a2b…").
pub fn decode(bytes: &[u8], what: &str) -> Result<Vec<Entry>> {
    let mut c = Cursor { b: bytes, what };
    let v = c.u8()?;
    if v != TREE_VERSION {
        return Err(c.err(format!("tree version {v}")));
    }
    let count = c.u32()? as usize;
    // Each entry takes at least 80 bytes: bound the allocation by the input.
    if count > bytes.len() / 80 {
        return Err(c.err(format!(
            "{count} entries cannot fit in {} bytes",
            bytes.len()
        )));
    }
    let mut out: Vec<Entry> = Vec::with_capacity(count);
    for _ in 0..count {
        let n = c.u16()? as usize;
        let name = c.take(n)?.to_vec();
        if !valid_name(&name) {
            return Err(c.err(format!(
                "hostile or invalid name {:?}",
                String::from_utf8_lossy(&name)
            )));
        }
        if out.last().is_some_and(|p| p.name >= name) {
            return Err(c.err(format!(
                "entry {:?} out of order or duplicated",
                String::from_utf8_lossy(&name)
            )));
        }
        let kb = c.u8()?;
        let kind = EntryKind::from_u8(kb).ok_or_else(|| c.err(format!("entry kind {kb}")))?;
        let mut e = Entry::new(name, kind);
        e.mode = c.u32()?;
        e.uid = c.u32()?;
        e.gid = c.u32()?;
        let n = c.u8()? as usize;
        e.user = String::from_utf8_lossy(c.take(n)?).into_owned();
        let n = c.u8()? as usize;
        e.group = String::from_utf8_lossy(c.take(n)?).into_owned();
        e.mtime_ns = c.u64()? as i64;
        e.ctime_ns = c.u64()? as i64;
        e.dev = c.u64()?;
        e.ino = c.u64()?;
        e.nlink = c.u64()?;
        e.size = c.u64()?;
        e.rdev = c.u64()?;
        let nx = c.u16()? as usize;
        for _ in 0..nx {
            let n = c.u16()? as usize;
            let k = c.take(n)?.to_vec();
            let n = c.u32()? as usize;
            if n > MAX_XATTR_VALUE {
                return Err(c.err("xattr value over limit"));
            }
            let v = c.take(n)?.to_vec();
            e.xattrs.push((k, v));
        }
        let n = c.u32()? as usize;
        if n > MAX_LINK_TARGET {
            return Err(c.err("symlink target over limit"));
        }
        e.target = c.take(n)?.to_vec();
        let nc = c.u32()? as usize;
        if nc > c.b.len() / 32 {
            return Err(c.err("chunk list longer than the tree"));
        }
        e.chunks.reserve(nc);
        for _ in 0..nc {
            e.chunks.push(c.id()?);
        }
        e.subtree = match c.u8()? {
            0 => None,
            1 => Some(c.id()?),
            b => return Err(c.err(format!("subtree flag {b}"))),
        };
        let shape_ok = match kind {
            EntryKind::Dir => e.subtree.is_some() && e.chunks.is_empty() && e.target.is_empty(),
            EntryKind::File => e.subtree.is_none() && e.target.is_empty(),
            EntryKind::Symlink => e.subtree.is_none() && e.chunks.is_empty(),
            _ => e.subtree.is_none() && e.chunks.is_empty() && e.target.is_empty(),
        };
        if !shape_ok {
            return Err(c.err(format!(
                "entry {:?} has fields its kind cannot have",
                String::from_utf8_lossy(&e.name)
            )));
        }
        out.push(e);
    }
    if !c.b.is_empty() {
        return Err(c.err("trailing bytes"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<Entry> {
        let mut a = Entry::new(b"a.txt".to_vec(), EntryKind::File);
        a.chunks = vec![Id([1; 32]), Id([2; 32])];
        a.size = 10;
        a.xattrs = vec![(b"user.x".to_vec(), b"1".to_vec())];
        let mut d = Entry::new(b"dir".to_vec(), EntryKind::Dir);
        d.subtree = Some(Id([3; 32]));
        let mut l = Entry::new(vec![0xff, b'l'], EntryKind::Symlink);
        l.target = b"../x".to_vec();
        vec![a, d, l]
    }

    #[test]
    fn round_trip() {
        let e = sample();
        let b = encode(&e).unwrap();
        assert_eq!(decode(&b, "t").unwrap(), e);
        assert_eq!(encode(&e).unwrap(), b, "deterministic");
    }

    #[test]
    fn hostile_names_rejected() {
        for bad in [&b".."[..], b".", b"", b"a/b", b"/etc", b"x\0y"] {
            let mut b = encode(&sample()[..1]).unwrap();
            // Replace the name "a.txt" (5 bytes at offset 7) with the hostile name.
            let mut t = b[..5].to_vec();
            t.extend_from_slice(&(bad.len() as u16).to_le_bytes());
            t.extend_from_slice(bad);
            t.extend_from_slice(&b[12..]);
            b = t;
            assert!(decode(&b, "t").is_err(), "{bad:?}");
        }
    }

    #[test]
    fn truncations_never_panic() {
        let b = encode(&sample()).unwrap();
        for n in 0..b.len() {
            assert!(decode(&b[..n], "t").is_err());
        }
    }
}
