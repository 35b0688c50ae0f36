//! Every decoder of bytes that come from disk or another party, fed bytes
//! it did not write (RELIABILITY.md scenario 13, "Fuzzing", as property
//! tests that run on stable Rust in CI): random bytes, valid encodings with
//! bytes flipped, truncated or extended, and length fields set to anything.
//!
//! What must hold: no panic; an error for anything that is not what the
//! writer wrote (the authenticated formats reject every change); and no
//! allocation a length field asks for without a check, which this
//! binary's capped allocator turns into a failed run.

use std::alloc::System;
use std::path::Path;

use cap::Cap;
use proptest::prelude::*;
use repo_format::blob::{self, BlobKind, Sealer};
use repo_format::crypto::{KeySet, Keys};
use repo_format::id::Id;
use repo_format::keyring;
use repo_format::pack::reader::{read_trailer, verify_checksum};
use repo_format::pack::writer::PackWriter;
use repo_format::snapshot::{self, Snapshot, SnapshotStats};
use repo_format::store::dir::DirStore;
use repo_format::tree::{self, Entry, EntryKind};

/// This binary's allocator refuses to hold more than [`LIMIT`] at once. A
/// decoder that believed a length field (a tree claiming 2^32 entries, a
/// trailer claiming 4 GiB, a zstd frame claiming 2^40 bytes) asks for more,
/// and the allocation failure aborts the test binary with "memory
/// allocation of N bytes failed": a failed test, not an out-of-memory kill
/// of CI.
#[global_allocator]
static ALLOC: Cap<System> = Cap::new(System, LIMIT);

/// What all of this binary's tests together may hold at once. Far above
/// what they need (two run at a time; the largest input is a 300 KB
/// plaintext), far below what a believed length field asks for (2^32
/// entries, a 4 GiB trailer, a 2^40-byte frame). It must leave room for a
/// failing test's backtrace, which can take hundreds of MiB to symbolise:
/// an allocation failure inside the panic hook hangs the binary.
const LIMIT: usize = 1 << 30;

/// A change made to valid bytes.
#[derive(Debug, Clone)]
enum Mutation {
    /// XOR one byte (position taken modulo the length) with a non-zero mask.
    Flip(usize, u8),
    /// Keep only the first bytes (modulo the length).
    Truncate(usize),
    /// Append bytes.
    Extend(Vec<u8>),
    /// Overwrite four bytes with a little-endian u32 (a length field).
    Length(usize, u32),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1u8..=255).prop_map(|(p, m)| Mutation::Flip(p, m)),
        any::<usize>().prop_map(Mutation::Truncate),
        prop::collection::vec(any::<u8>(), 1..64).prop_map(Mutation::Extend),
        (
            any::<usize>(),
            prop_oneof![Just(u32::MAX), Just(1 << 31), Just(1 << 24), any::<u32>()]
        )
            .prop_map(|(p, v)| Mutation::Length(p, v)),
    ]
}

/// `valid` changed by `m`; `None` when `m` leaves it as it was.
fn mutate(valid: &[u8], m: &Mutation) -> Option<Vec<u8>> {
    let mut b = valid.to_vec();
    match m {
        Mutation::Flip(p, mask) if !b.is_empty() => b[p % valid.len()] ^= mask,
        Mutation::Truncate(n) if !b.is_empty() => b.truncate(n % valid.len()),
        Mutation::Extend(more) => b.extend_from_slice(more),
        Mutation::Length(p, v) if b.len() >= 4 => {
            let p = p % (b.len() - 3);
            b[p..p + 4].copy_from_slice(&v.to_le_bytes());
        }
        _ => {}
    }
    (b != valid).then_some(b)
}

/// A tree of a few entries of every kind, with xattrs, chunks and a subtree.
fn sample_tree() -> Vec<u8> {
    let mut file = Entry::new(b"file".to_vec(), EntryKind::File);
    file.size = 3 << 20;
    file.chunks = vec![Id([1; 32]), Id([2; 32]), Id([1; 32])];
    file.xattrs = vec![(b"user.a".to_vec(), b"value".to_vec())];
    file.user = "alice".into();
    let mut link = Entry::new(b"link".to_vec(), EntryKind::Symlink);
    link.target = b"../elsewhere".to_vec();
    let mut dir = Entry::new(b"sub".to_vec(), EntryKind::Dir);
    dir.subtree = Some(Id([3; 32]));
    tree::encode(&[file, link, dir]).expect("encode")
}

/// What restore relies on in a decoded tree: every name a single safe
/// path component, names strictly ascending (no duplicates), each entry's
/// shape that of its kind; and the writer can write it and reads it back
/// the same.
fn sound(entries: &[Entry]) -> bool {
    let names_ok = entries.iter().all(|e| tree::valid_name(&e.name))
        && entries.windows(2).all(|w| w[0].name < w[1].name);
    let shapes_ok = entries.iter().all(|e| match e.kind {
        EntryKind::Dir => e.subtree.is_some() && e.chunks.is_empty() && e.target.is_empty(),
        EntryKind::File => e.subtree.is_none() && e.target.is_empty(),
        EntryKind::Symlink => e.subtree.is_none() && e.chunks.is_empty(),
        _ => e.subtree.is_none() && e.chunks.is_empty() && e.target.is_empty(),
    });
    let again = tree::encode(entries)
        .and_then(|b| tree::decode(&b, "re-encoded"))
        .is_ok_and(|back| back == entries);
    names_ok && shapes_ok && again
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Trees are decoded from blobs another party sealed (an agent's, read
    /// by the collector and by restores elsewhere): any bytes at all.
    #[test]
    fn a_tree_of_random_bytes_is_refused_or_sound(
        bytes in prop::collection::vec(any::<u8>(), 0..2048),
    ) {
        if let Ok(entries) = tree::decode(&bytes, "fuzzed tree") {
            prop_assert!(sound(&entries), "{entries:?}");
        }
    }

    /// A valid tree changed anywhere decodes to an error or to a sound
    /// tree. (Not always to one that encodes back to the same bytes: the
    /// reader accepts, as docs/repo-format.md says, non-UTF-8 owner names
    /// and unsorted xattrs, which the writer never produces.)
    #[test]
    fn a_changed_tree_is_refused_or_sound(m in mutation()) {
        let valid = sample_tree();
        let Some(bytes) = mutate(&valid, &m) else { return Ok(()); };
        if let Ok(entries) = tree::decode(&bytes, "changed tree") {
            prop_assert!(sound(&entries), "{m:?}: {entries:?}");
        }
    }

    /// Any plaintext seals and opens to itself (stored or compressed,
    /// either kind); any change to the sealed bytes, the kind or the id is
    /// refused.
    #[test]
    fn blobs_round_trip_and_refuse_every_change(
        plain in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..70_000),
            (any::<u8>(), 0usize..300_000).prop_map(|(b, n)| vec![b; n]),
            "[a-c ]{0,5000}".prop_map(String::into_bytes),
        ],
        tree_kind in any::<bool>(),
        m in mutation(),
    ) {
        let keys = KeySet::random().expect("keys");
        let kind = if tree_kind { BlobKind::Tree } else { BlobKind::Data };
        let id = keys.id_of(&plain);
        let sealed = Sealer::new(3).expect("sealer")
            .seal_verified(&keys, kind, &id, &plain).expect("seal");
        prop_assert_eq!(&blob::open(&keys, kind, &id, &sealed).expect("open"), &plain);
        let other = if tree_kind { BlobKind::Data } else { BlobKind::Tree };
        prop_assert!(blob::open(&keys, other, &id, &sealed).is_err(), "other kind");
        let mut wrong = id;
        wrong.0[0] ^= 1;
        prop_assert!(blob::open(&keys, kind, &wrong, &sealed).is_err(), "other id");
        if let Some(bad) = mutate(&sealed, &m) {
            let res = blob::open(&keys, kind, &id, &bad);
            prop_assert!(res.is_err(), "{m:?} opened");
        }
    }

    /// Random bytes presented as a sealed blob are refused within bounds.
    #[test]
    fn random_sealed_bytes_are_refused_within_bounds(
        sealed in prop::collection::vec(any::<u8>(), 0..4096),
    ) {
        let keys = KeySet::random().expect("keys");
        let id = Id([7; 32]);
        let res = blob::open(&keys, BlobKind::Data, &id, &sealed);
        prop_assert!(res.is_err());
    }
}

/// `frame` (a zstd frame without a dictionary) declaring `size` bytes of
/// content: its Frame_Content_Size field rewritten as 8 bytes (RFC 8878
/// 3.1.1.1: the descriptor's top two bits give the field's length; it
/// follows the window byte, present unless the frame is single-segment).
fn redeclare(frame: &[u8], size: u64) -> Vec<u8> {
    let descriptor = frame[4];
    let single_segment = descriptor & 0x20 != 0;
    let old_len = match descriptor >> 6 {
        0 => usize::from(single_segment),
        1 => 2,
        2 => 4,
        _ => 8,
    };
    assert_eq!(descriptor & 0x03, 0, "no dictionary id");
    let at = 5 + usize::from(!single_segment);
    let mut out = frame.to_vec();
    out[4] = descriptor | 0xc0;
    out.splice(at..at + old_len, size.to_le_bytes());
    out
}

/// A blob sealed with the real keys (so it authenticates: any holder of
/// the content key can make one) whose zstd frame declares more than the
/// plaintext limit, or more than it holds, or is not zstd at all: refused,
/// without asking for the declared size.
#[test]
fn a_sealed_zstd_bomb_is_refused_before_it_is_allocated() {
    let keys = KeySet::random().expect("keys");
    let id = Id([9; 32]);
    let zeros = zstd::bulk::compress(&vec![0u8; 1 << 20], 19).expect("zstd");
    let tiny = zstd::bulk::compress(b"tiny", 3).expect("zstd");
    let size_of = |f: &[u8]| zstd::zstd_safe::get_frame_content_size(f).ok().flatten();
    assert_eq!(size_of(&redeclare(&zeros, 1 << 40)), Some(1 << 40));
    assert_eq!(size_of(&redeclare(&tiny, 1 << 20)), Some(1 << 20));
    for (what, payload) in [
        ("claims 2^40 bytes", redeclare(&zeros, 1 << 40)),
        (
            "declares 1 MiB and holds 4 bytes",
            redeclare(&tiny, 1 << 20),
        ),
        ("is not zstd", b"not a zstd frame at all".to_vec()),
    ] {
        let mut framed = vec![1u8]; // flag: zstd
        framed.extend_from_slice(&payload);
        keys.seal_blob_in_place(BlobKind::Data as u8, &id, &mut framed)
            .expect("seal");
        let res = blob::open(&keys, BlobKind::Data, &id, &framed);
        assert!(res.is_err(), "a frame that {what} opened");
    }
}

/// A pack of three blobs in a fresh store; its name and trailer entries.
fn pack_in(dir: &Path, meta: &KeySet) -> (DirStore, Id, Vec<u8>) {
    let packs = dir.join("packs");
    DirStore::create_layout(&packs).expect("layout");
    std::fs::create_dir(dir.join("tmp")).expect("tmp");
    let store = DirStore::new(packs, dir.join("tmp"));
    let mut w = PackWriter::new(&store).expect("writer");
    for (i, len) in [100usize, 5000, 70_000].into_iter().enumerate() {
        let sealed: Vec<u8> = (0..len).map(|j| (i * 31 + j * 7) as u8).collect();
        w.add(BlobKind::Data, Id([i as u8 + 1; 32]), &sealed, len as u32)
            .expect("add");
    }
    let fp = w.finish(&store, meta).expect("finish");
    let bytes = std::fs::read(store.path_of(&fp.name)).expect("read pack");
    (store, fp.name, bytes)
}

/// The pack [`a_changed_pack_is_caught_by_its_trailer_or_its_checksum`]
/// changes: written (and fsynced) once, its file overwritten by each case.
#[allow(clippy::type_complexity)]
fn changed_pack() -> &'static (tempfile::TempDir, KeySet, DirStore, Id, Vec<u8>) {
    static PACK: std::sync::OnceLock<(tempfile::TempDir, KeySet, DirStore, Id, Vec<u8>)> =
        std::sync::OnceLock::new();
    PACK.get_or_init(|| {
        let tmp = tempfile::tempdir().expect("tempdir");
        let meta = KeySet::random().expect("keys");
        let (store, name, valid) = pack_in(tmp.path(), &meta);
        (tmp, meta, store, name, valid)
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// A pack changed anywhere: a change in its trailer or frame is refused
    /// when the trailer is read; a change in a blob's bytes (which the
    /// trailer does not cover) leaves the trailer readable and fails the
    /// pack's checksum, which `check --read-data` and scrubs verify. Either
    /// way nothing is believed, and nothing is allocated out of proportion.
    #[test]
    fn a_changed_pack_is_caught_by_its_trailer_or_its_checksum(m in mutation()) {
        let (_tmp, meta, store, name, valid) = changed_pack();
        let Some(bad) = mutate(valid, &m) else { return Ok(()); };
        std::fs::write(store.path_of(name), &bad).expect("write");
        if read_trailer(store, name, meta).is_ok() {
            prop_assert!(verify_checksum(store, name).is_err(), "{m:?} went unnoticed");
        }
    }
}

/// Random bytes where a pack should be, at every size around the frame's
/// fixed parts: refused, within bounds.
#[test]
fn random_packs_are_refused_within_bounds() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let meta = KeySet::random().expect("keys");
    let (store, name, valid) = pack_in(tmp.path(), &meta);
    let mut noise = vec![0u8; 512];
    repo_format::crypto::fill_random(&mut noise).expect("random");
    for len in 0..noise.len() {
        // Random bytes, then the same behind the real magic and footer.
        let mut framed = valid[..8].to_vec();
        framed.extend_from_slice(&noise[..len]);
        framed.extend_from_slice(&valid[valid.len() - 12..]);
        for bytes in [&noise[..len], &framed[..]] {
            std::fs::write(store.path_of(&name), bytes).expect("write");
            let res = read_trailer(&store, &name, &meta);
            assert!(res.is_err(), "{len} random bytes read as a pack");
        }
    }
}

fn sample_snapshot() -> Snapshot {
    Snapshot {
        time_ns: 1_700_000_000_000_000_000,
        hostname: "office-7".into(),
        paths: vec!["/srv/share".into()],
        tree: Id([5; 32]),
        parent: None,
        stats: SnapshotStats::default(),
        issues: Vec::new(),
        issues_dropped: 0,
        site: Some("paris".into()),
        agent: None,
        source: None,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// A snapshot file changed anywhere is refused (it is sealed and named
    /// by its content), within bounds.
    #[test]
    fn a_changed_snapshot_file_is_refused(m in mutation()) {
        let tmp = tempfile::tempdir().expect("tempdir");
        let meta = KeySet::random().expect("keys");
        let id = snapshot::write(tmp.path(), &meta, &sample_snapshot()).expect("write");
        let path = tmp.path().join(id.to_hex());
        let valid = std::fs::read(&path).expect("read");
        prop_assert_eq!(snapshot::read(tmp.path(), &meta, &id).expect("read"), sample_snapshot());
        let Some(bad) = mutate(&valid, &m) else { return Ok(()); };
        std::fs::write(&path, &bad).expect("write");
        let res = snapshot::read(tmp.path(), &meta, &id);
        prop_assert!(res.is_err(), "{m:?} read");
    }

    /// Keys wrapped for an enrollment token, changed anywhere or random,
    /// do not unwrap.
    #[test]
    fn changed_enrollment_keys_do_not_unwrap(
        m in mutation(),
        noise in prop::collection::vec(any::<u8>(), 0..300),
    ) {
        let keys = Keys::generate().expect("keys");
        let secret = [42u8; 32];
        let wrapped = keyring::wrap_for_enrollment(&keys, &secret).expect("wrap");
        prop_assert!(keyring::unwrap_enrollment(&wrapped, &secret).is_ok());
        if let Some(bad) = mutate(&wrapped, &m) {
            prop_assert!(keyring::unwrap_enrollment(&bad, &secret).is_err(), "{m:?}");
        }
        prop_assert!(keyring::unwrap_enrollment(&noise, &secret).is_err());
    }
}

/// A keyring file changed anywhere gives an error, never the keys and never
/// a panic; Argon2 settings beyond the limits are refused before any
/// memory is taken for them.
#[test]
fn a_changed_keyring_file_is_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = tmp.path().join("keyring");
    let keys = Keys::generate().expect("keys");
    let params = keyring::KdfParams::with_memory_kib(Some(8));
    keyring::write_keyring(&path, &keys, b"pw", params).expect("write");
    let valid = std::fs::read(&path).expect("read");
    assert!(keyring::read_keyring(&path, b"pw").is_ok());
    // Every single-byte change, and every truncation.
    for p in 0..valid.len() {
        for bad in [
            mutate(&valid, &Mutation::Flip(p, 0x01)),
            mutate(&valid, &Mutation::Truncate(p)),
        ]
        .into_iter()
        .flatten()
        {
            std::fs::write(&path, &bad).expect("write");
            assert!(
                keyring::read_keyring(&path, b"pw").is_err(),
                "changed at {p}: {}",
                String::from_utf8_lossy(&bad)
            );
        }
    }
    let text = String::from_utf8(valid).expect("utf-8");
    let greedy = text.replace("\"m_cost_kib\": 8,", "\"m_cost_kib\": 4294967295,");
    assert_ne!(greedy, text, "the memory setting is where expected");
    std::fs::write(&path, greedy).expect("write");
    let res = keyring::read_keyring(&path, b"pw");
    let err = res.err().expect("refused").to_string();
    assert!(err.contains("limits are"), "{err}");
}
