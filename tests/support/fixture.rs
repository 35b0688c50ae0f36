//! File trees as data: described by [`Node`], built on disk by [`build`]
//! with exact metadata, generated deterministically ([`standard_tree`],
//! [`bulk_tree`]) or by proptest ([`arb_tree`]).

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use nix::sys::stat::{Mode, UtimensatFlags, utimensat};
use nix::sys::time::TimeSpec;
use proptest::prelude::*;

/// How a file's bytes are made from its seed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fill {
    /// Pseudo-random, incompressible, unique per seed.
    Random,
    /// All zeros (restored with holes).
    Zeros,
    /// A short seed-dependent pattern repeated (compressible, dedups within the file).
    Repeat,
}

/// Deterministic file content: `len` bytes made from `seed` as `fill` says.
pub fn content(len: usize, seed: u64, fill: Fill) -> Vec<u8> {
    match fill {
        Fill::Zeros => vec![0; len],
        Fill::Repeat => {
            let pat: Vec<u8> = content(37, seed, Fill::Random);
            pat.iter().copied().cycle().take(len).collect()
        }
        Fill::Random => {
            // xorshift64*: fast and good enough to defeat compression and dedup.
            let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            let mut out = Vec::with_capacity(len + 8);
            while out.len() < len {
                x ^= x >> 12;
                x ^= x << 25;
                x ^= x >> 27;
                out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
            }
            out.truncate(len);
            out
        }
    }
}

/// Metadata a fixture sets on a file, directory or fifo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    /// Permission bits (`& 0o7777`).
    pub mode: u32,
    /// Modification time, ns since the epoch (may be negative).
    pub mtime_ns: i64,
    /// Owner and group, set only when running as root.
    pub owner: Option<(u32, u32)>,
    /// Extended attributes (`user.*`), set where the file system allows.
    pub xattrs: Vec<(String, Vec<u8>)>,
}

impl Meta {
    /// Mode and mtime, no owner change, no xattrs.
    pub fn new(mode: u32, mtime_ns: i64) -> Self {
        Meta {
            mode,
            mtime_ns,
            owner: None,
            xattrs: Vec::new(),
        }
    }

    /// The same with one more extended attribute.
    pub fn xattr(mut self, name: &str, value: &[u8]) -> Self {
        self.xattrs.push((name.into(), value.to_vec()));
        self
    }

    /// The same with owner `uid:gid` (applied only as root).
    pub fn owner(mut self, uid: u32, gid: u32) -> Self {
        self.owner = Some((uid, gid));
        self
    }
}

/// One node of a fixture tree.
#[derive(Debug, Clone)]
pub enum Node {
    /// A regular file of `len` bytes of [`content`]`(len, seed, fill)`.
    File {
        /// Size in bytes.
        len: usize,
        /// Content seed.
        seed: u64,
        /// Content kind.
        fill: Fill,
        /// Metadata.
        meta: Meta,
    },
    /// A sparse file: `len` bytes, a hole in the middle, 4 KiB of data at both ends.
    Sparse {
        /// Logical size in bytes (at least 8 KiB).
        len: u64,
        /// Seed of the data at both ends.
        seed: u64,
        /// Metadata.
        meta: Meta,
    },
    /// A directory.
    Dir {
        /// Entries by name (raw bytes; valid file names).
        children: BTreeMap<Vec<u8>, Node>,
        /// Metadata, applied after the children exist.
        meta: Meta,
    },
    /// A symbolic link (never followed).
    Symlink {
        /// Link target (raw bytes, no NUL).
        target: Vec<u8>,
        /// Modification time of the link itself.
        mtime_ns: i64,
    },
    /// A named pipe.
    Fifo {
        /// Metadata.
        meta: Meta,
    },
    /// A hard link to regular file number `to` (in creation order, modulo
    /// their count); an empty file when the tree has no regular file.
    HardLink {
        /// Index of the file linked to.
        to: usize,
    },
    /// A hard link to the regular file at `to`, relative to the built root.
    HardLinkTo {
        /// Path of the file linked to, relative to the root given to [`build`].
        to: Vec<u8>,
    },
}

impl Node {
    /// A directory with `children` given as (name, node) pairs.
    pub fn dir(meta: Meta, children: Vec<(&[u8], Node)>) -> Node {
        Node::Dir {
            children: children.into_iter().map(|(n, c)| (n.to_vec(), c)).collect(),
            meta,
        }
    }

    /// A file of random content.
    pub fn file(len: usize, seed: u64, meta: Meta) -> Node {
        Node::File {
            len,
            seed,
            fill: Fill::Random,
            meta,
        }
    }

    /// A symbolic link to `target`.
    pub fn symlink(target: &[u8], mtime_ns: i64) -> Node {
        Node::Symlink {
            target: target.to_vec(),
            mtime_ns,
        }
    }
}

/// What [`build`] could not do (the file system refused it).
#[derive(Debug, Default, Clone)]
pub struct BuildReport {
    /// Extended attributes set.
    pub xattrs_set: usize,
    /// Extended attributes the file system refused (unsupported or not permitted).
    pub xattrs_refused: usize,
}

/// Build `node` at `path` (which must not exist), then apply every node's
/// metadata bottom-up so directory mtimes are final.
pub fn build(path: &Path, node: &Node) -> io::Result<BuildReport> {
    let mut files = Vec::new();
    let mut links = Vec::new();
    create(path, node, &mut files, &mut links)?;
    for (p, to) in &links {
        match to {
            LinkTarget::Path(rel) => std::fs::hard_link(path.join(OsStr::from_bytes(rel)), p)?,
            LinkTarget::Index(_) if files.is_empty() => {
                std::fs::File::create(p)?;
            }
            LinkTarget::Index(i) => std::fs::hard_link(&files[i % files.len()], p)?,
        }
    }
    let mut report = BuildReport::default();
    apply_tree(path, node, &mut report)?;
    Ok(report)
}

enum LinkTarget {
    Index(usize),
    Path(Vec<u8>),
}

fn create(
    path: &Path,
    node: &Node,
    files: &mut Vec<PathBuf>,
    links: &mut Vec<(PathBuf, LinkTarget)>,
) -> io::Result<()> {
    match node {
        Node::File {
            len, seed, fill, ..
        } => {
            std::fs::write(path, content(*len, *seed, *fill))?;
            files.push(path.to_path_buf());
        }
        Node::Sparse { len, seed, .. } => write_sparse(path, *len, *seed)?,
        Node::Dir { children, .. } => {
            std::fs::create_dir(path)?;
            for (name, child) in children {
                create(&path.join(OsStr::from_bytes(name)), child, files, links)?;
            }
        }
        Node::Symlink { target, .. } => {
            std::os::unix::fs::symlink(OsStr::from_bytes(target), path)?;
        }
        Node::Fifo { .. } => {
            nix::unistd::mkfifo(path, Mode::from_bits_truncate(0o600)).map_err(io::Error::from)?;
        }
        Node::HardLink { to } => links.push((path.to_path_buf(), LinkTarget::Index(*to))),
        Node::HardLinkTo { to } => links.push((path.to_path_buf(), LinkTarget::Path(to.clone()))),
    }
    Ok(())
}

/// Write a sparse file: 4 KiB of data at both ends of `len` bytes, a hole between.
pub fn write_sparse(path: &Path, len: u64, seed: u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path)?;
    let head = content(4096, seed, Fill::Random);
    f.write_all_at(&head, 0)?;
    f.write_all_at(&head, len - 4096)?;
    Ok(())
}

fn apply_tree(path: &Path, node: &Node, report: &mut BuildReport) -> io::Result<()> {
    match node {
        Node::Dir { children, meta } => {
            for (name, child) in children {
                apply_tree(&path.join(OsStr::from_bytes(name)), child, report)?;
            }
            apply_meta(path, meta, report)
        }
        Node::File { meta, .. } | Node::Sparse { meta, .. } | Node::Fifo { meta } => {
            apply_meta(path, meta, report)
        }
        Node::Symlink { mtime_ns, .. } => set_mtime(path, *mtime_ns),
        Node::HardLink { .. } | Node::HardLinkTo { .. } => Ok(()),
    }
}

/// Apply owner (as root), xattrs, mode and mtime to `path`, in that order.
pub fn apply_meta(path: &Path, meta: &Meta, report: &mut BuildReport) -> io::Result<()> {
    if let Some((uid, gid)) = meta.owner
        && is_root()
    {
        std::os::unix::fs::lchown(path, Some(uid), Some(gid))?;
    }
    for (k, v) in &meta.xattrs {
        match xattr::set(path, k, v) {
            Ok(()) => report.xattrs_set += 1,
            // Unsupported (EOPNOTSUPP) or not permitted on this kind (EPERM): skip.
            Err(e) if matches!(e.raw_os_error(), Some(95) | Some(1)) => {
                report.xattrs_refused += 1;
            }
            Err(e) => return Err(e),
        }
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(meta.mode))?;
    set_mtime(path, meta.mtime_ns)
}

/// Set atime and mtime of `path` (not following a symlink) to `ns`.
pub fn set_mtime(path: &Path, ns: i64) -> io::Result<()> {
    let ts = TimeSpec::new(ns.div_euclid(1_000_000_000), ns.rem_euclid(1_000_000_000));
    utimensat(
        nix::fcntl::AT_FDCWD,
        path,
        &ts,
        &ts,
        UtimensatFlags::NoFollowSymlink,
    )
    .map_err(io::Error::from)
}

/// True when running as root (owners can be set).
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// A fixed tree with every kind of entry and metadata a restore must keep.
///
/// `chunker` = (min, avg, max) chunk sizes: files of exactly those sizes and
/// one byte more are included. Names: unicode, non-UTF-8, leading dot and
/// dash. Also: empty file, empty directory, sparse file, hard links (one
/// across directories), relative, absolute and dangling symlinks, a fifo,
/// setuid/setgid/sticky modes, a read-only directory, xattrs, owners, and
/// mtimes with nanoseconds (one before 1970).
pub fn standard_tree(chunker: (usize, usize, usize)) -> Node {
    let t = |i: i64| 1_600_000_000_123_456_789 + i * 1_000_000_007;
    let (min, avg, max) = chunker;
    let f = |len: usize, seed: u64, mode: u32, i: i64| Node::file(len, seed, Meta::new(mode, t(i)));
    let sub = Node::dir(
        Meta::new(0o750, t(20))
            .xattr("user.dir", b"sub")
            .owner(2001, 2002),
        vec![
            (
                b"hardlink-b",
                Node::HardLinkTo {
                    to: b"hardlink-a".to_vec(),
                },
            ),
            ("unicodé ☃ 日本.txt".as_bytes(), f(777, 11, 0o644, 21)),
            (b"bad-\xff\xfe-name", f(10, 12, 0o644, 22)),
            (
                b"deeper",
                Node::dir(
                    Meta::new(0o755, t(23)),
                    vec![(b"nested.txt", f(5000, 13, 0o640, 24))],
                ),
            ),
        ],
    );
    let chunks = Node::dir(
        Meta::new(0o755, t(30)),
        vec![
            (b"min", f(min, 31, 0o644, 31)),
            (b"min+1", f(min + 1, 32, 0o644, 32)),
            (b"avg", f(avg, 33, 0o644, 33)),
            (b"avg+1", f(avg + 1, 34, 0o644, 34)),
            (b"max", f(max, 35, 0o644, 35)),
            (b"max+1", f(max + 1, 36, 0o644, 36)),
            (
                b"repeat",
                Node::File {
                    len: 3 * max + 5,
                    seed: 37,
                    fill: Fill::Repeat,
                    meta: Meta::new(0o644, t(37)),
                },
            ),
            (
                b"zeros",
                Node::File {
                    len: 2 * max + 3,
                    seed: 0,
                    fill: Fill::Zeros,
                    meta: Meta::new(0o644, t(38)),
                },
            ),
        ],
    );
    Node::dir(
        Meta::new(0o755, t(0)),
        vec![
            (
                b"hardlink-a",
                Node::file(3000, 1, Meta::new(0o644, t(1)).xattr("user.linked", b"yes")),
            ),
            (
                b"hello.txt",
                Node::file(
                    12,
                    2,
                    Meta::new(0o644, t(2)).xattr("user.comment", b"hello \x00 bytes"),
                ),
            ),
            (
                b"hardlink-c",
                Node::HardLinkTo {
                    to: b"hardlink-a".to_vec(),
                },
            ),
            (b"empty", f(0, 3, 0o644, 3)),
            (b"exec.sh", f(100, 4, 0o755, 4)),
            (
                b"secret",
                Node::file(64, 5, Meta::new(0o600, t(5)).owner(1234, 5678)),
            ),
            (b"setuid", f(64, 6, 0o4755, 6)),
            (b"setgid", f(64, 7, 0o2711, 7)),
            (b".hidden", f(1, 8, 0o400, 8)),
            (b"-dash", f(2, 9, 0o000, 9)),
            (
                b"old",
                Node::file(3, 10, Meta::new(0o644, -1_234_567_890_123_456_789)),
            ),
            (
                b"sparse.img",
                Node::Sparse {
                    len: 4 * 1024 * 1024,
                    seed: 14,
                    meta: Meta::new(0o644, t(14)),
                },
            ),
            (b"link-rel", Node::symlink(b"hello.txt", t(15))),
            (
                b"link-abs",
                Node::symlink(b"/nonexistent/abs/target", t(16)),
            ),
            (b"link-dangling", Node::symlink(b"../missing/\xff", t(17))),
            (
                b"fifo",
                Node::Fifo {
                    meta: Meta::new(0o640, t(18)),
                },
            ),
            (b"empty-dir", Node::dir(Meta::new(0o700, t(19)), vec![])),
            (
                b"sticky",
                Node::dir(Meta::new(0o1777, t(25)), vec![(b"f", f(1, 26, 0o644, 26))]),
            ),
            (
                b"read-only",
                Node::dir(
                    Meta::new(0o555, t(27)),
                    vec![(b"inside", f(10, 28, 0o444, 28))],
                ),
            ),
            (b"sub", sub),
            (b"chunks", chunks),
        ],
    )
}

/// `files` random files of `size` bytes each (distinct content) in one
/// directory: bulk data to fill several packs.
pub fn bulk_tree(files: usize, size: usize, seed: u64) -> Node {
    let children = (0..files)
        .map(|i| {
            (
                format!("bulk-{i:03}").into_bytes(),
                Node::file(
                    size,
                    seed + i as u64,
                    Meta::new(0o644, 1_500_000_000_000_000_000),
                ),
            )
        })
        .collect();
    Node::Dir {
        children,
        meta: Meta::new(0o755, 1_500_000_000_000_000_000),
    }
}

fn valid(name: &[u8]) -> bool {
    !name.is_empty() && name != b"." && name != b".." && name.len() <= 200
}

/// Valid file names: ASCII, any unicode, raw (often non-UTF-8) bytes, and a
/// few awkward fixed ones. At most 64 bytes (long names have their own test).
pub fn arb_name() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => "[a-z0-9_.-]{1,12}".prop_map(String::into_bytes),
        2 => "\\PC{1,8}".prop_map(String::into_bytes),
        2 => prop::collection::vec(any::<u8>(), 1..16),
        1 => prop::sample::select(vec![
            b"...".to_vec(),
            b".hidden".to_vec(),
            b"-n".to_vec(),
            b"sp ace\tand\nnewline".to_vec(),
            b"\xff\xfe".to_vec(),
            "é".as_bytes().to_vec(),
            "e\u{301}".as_bytes().to_vec(),
        ]),
    ]
    .prop_map(|mut n| {
        for b in &mut n {
            if *b == b'/' || *b == 0 {
                *b = b'_';
            }
        }
        n
    })
    .prop_filter("valid file name", |n| valid(n))
}

/// Modification times in ns, from 1906 to 2255, with nanoseconds.
pub fn arb_mtime() -> impl Strategy<Value = i64> {
    prop_oneof![
        -2_000_000_000_000_000_000i64..9_000_000_000_000_000_000i64,
        1_600_000_000_000_000_000i64..1_800_000_000_000_000_000i64,
        Just(0i64),
    ]
}

fn arb_xattrs() -> impl Strategy<Value = Vec<(String, Vec<u8>)>> {
    prop::collection::btree_map(
        "user\\.[a-z]{1,8}",
        prop::collection::vec(any::<u8>(), 0..48),
        0..3,
    )
    .prop_map(|m| m.into_iter().collect())
}

fn arb_owner() -> impl Strategy<Value = Option<(u32, u32)>> {
    prop_oneof![3 => Just(None), 1 => (1u32..70_000, 1u32..70_000).prop_map(Some)]
}

fn arb_meta(modes: Vec<u32>) -> impl Strategy<Value = Meta> {
    (
        prop::sample::select(modes),
        arb_mtime(),
        arb_owner(),
        arb_xattrs(),
    )
        .prop_map(|(mode, mtime_ns, owner, xattrs)| Meta {
            mode,
            mtime_ns,
            owner,
            xattrs,
        })
}

fn file_meta() -> impl Strategy<Value = Meta> {
    arb_meta(vec![
        0o644, 0o600, 0o755, 0o400, 0o000, 0o4755, 0o2750, 0o777, 0o1644,
    ])
}

fn dir_meta() -> impl Strategy<Value = Meta> {
    // Owner-writable modes only, so a non-root cleanup could still remove the tree.
    arb_meta(vec![0o755, 0o700, 0o750, 0o1777, 0o2775])
}

/// File sizes around the [`super::repo::small_chunker`] limits (1, 4 and 16 KiB) and random ones.
pub fn arb_file_len() -> impl Strategy<Value = usize> {
    prop_oneof![
        1 => prop::sample::select(vec![
            0usize, 1, 1023, 1024, 1025, 4095, 4096, 4097, 16383, 16384, 16385, 32768, 32769,
        ]),
        1 => 0usize..40_000,
    ]
}

fn arb_fill() -> impl Strategy<Value = Fill> {
    prop_oneof![4 => Just(Fill::Random), 1 => Just(Fill::Zeros), 1 => Just(Fill::Repeat)]
}

fn arb_leaf() -> impl Strategy<Value = Node> {
    prop_oneof![
        8 => (arb_file_len(), any::<u64>(), arb_fill(), file_meta())
            .prop_map(|(len, seed, fill, meta)| Node::File { len, seed, fill, meta }),
        2 => (
            prop_oneof![
                prop::collection::vec(1u8..=255, 1..40),
                Just(b"../../../etc/passwd".to_vec()),
                Just(b"/absolute/target".to_vec()),
            ],
            arb_mtime(),
        )
            .prop_map(|(target, mtime_ns)| Node::Symlink { target, mtime_ns }),
        1 => arb_meta(vec![0o644, 0o600, 0o640])
            .prop_map(|mut meta| {
                // user.* xattrs are not permitted on fifos.
                meta.xattrs.clear();
                Node::Fifo { meta }
            }),
        1 => (0usize..64).prop_map(|to| Node::HardLink { to }),
        1 => dir_meta().prop_map(|meta| Node::Dir { children: BTreeMap::new(), meta }),
    ]
}

/// Random trees: a root directory holding up to three levels of directories,
/// files of chunk-boundary and random sizes, symlinks, fifos and hard links.
pub fn arb_tree() -> impl Strategy<Value = Node> {
    let tree = arb_leaf().prop_recursive(3, 40, 6, |inner| {
        (
            prop::collection::btree_map(arb_name(), inner, 0..6),
            dir_meta(),
        )
            .prop_map(|(children, meta)| Node::Dir { children, meta })
    });
    (
        prop::collection::btree_map(arb_name(), tree, 0..8),
        dir_meta(),
    )
        .prop_map(|(children, meta)| Node::Dir { children, meta })
}
