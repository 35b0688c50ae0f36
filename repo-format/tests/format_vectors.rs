//! Golden tests pinning the repository format to `docs/repo-format.md`.
//!
//! Every example in the document is recomputed here from fixed keys and
//! inputs, and every limit, magic and context string it quotes is compared
//! with the code. The document is read at compile time, so an edit to
//! either side that breaks the agreement fails this test; a deliberate
//! format change must update both (and bump a version, see section 9).
//!
//! Marked blocks in the document:
//! - `<!-- vector: NAME -->` then a fenced block: hex bytes, `#` starts a comment;
//! - `<!-- text: NAME -->` then a fenced block: exact text;
//! - table rows `| label | `value` |` for single values.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, UNIX_EPOCH};

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use repo_format::blob::{self, BlobKind, Sealer};
use repo_format::catalog::{Catalog, SCHEMA_VERSION};
use repo_format::chunker::{Chunker, ChunkerSetup};
use repo_format::config::{ChunkerParams, RepoConfig};
use repo_format::consts::*;
use repo_format::crypto::{BLOB_AAD_PREFIX, GEAR_SEED_CONTEXT, KeySet, NONCE_KEY_CONTEXT};
use repo_format::id::{Id, hex_decode, hex_encode};
use repo_format::keyring::{KEYRING_AAD, KdfParams, read_keyring};
use repo_format::pack::reader::read_trailer;
use repo_format::pack::writer::PackWriter;
use repo_format::pack::{ENTRY_LEN, FOOTER_LEN, PackEntry, TRAILER_AAD};
use repo_format::snapshot::{SNAPSHOT_AAD, Snapshot, SnapshotStats};
use repo_format::store::dir::DirStore;
use repo_format::tree::{self, Entry, EntryKind};

const DOC: &str = include_str!("../../docs/repo-format.md");

/// 2026-01-01T00:00:00Z in ns.
const T0: i64 = 1_767_225_600_000_000_000;
const PASSPHRASE: &[u8] = b"hubvault test vector";

// ---- reading the document -------------------------------------------------

/// The lines of the fenced block that follows `marker`.
fn block(marker: &str) -> Vec<&'static str> {
    let start = DOC
        .find(marker)
        .unwrap_or_else(|| panic!("{marker} not in the document"));
    let mut lines = DOC[start + marker.len()..].lines().skip(1);
    let fence = lines.next().expect("a fenced block after the marker");
    assert!(fence.starts_with("```"), "{marker} must precede a fence");
    lines.take_while(|l| !l.starts_with("```")).collect()
}

/// The bytes of `<!-- vector: name -->`.
fn vector(name: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for line in block(&format!("<!-- vector: {name} -->")) {
        let data = line.split('#').next().unwrap_or_default();
        for tok in data.split_whitespace() {
            let b = hex_decode(tok).unwrap_or_else(|| panic!("vector {name}: bad hex {tok:?}"));
            out.extend_from_slice(&b);
        }
    }
    out
}

/// The exact text of `<!-- text: name -->` (lines joined with `\n`, no final newline).
fn text(name: &str) -> String {
    block(&format!("<!-- text: {name} -->")).join("\n")
}

/// Assert that the document has the table row `| label | `value` |`.
fn assert_row(label: &str, value: &str) {
    let row = format!("| {label} | `{value}` |");
    assert!(DOC.contains(&row), "document lacks the row {row}");
}

fn assert_doc_has(s: &str) {
    assert!(DOC.contains(s), "document lacks {s:?}");
}

// ---- the fixed inputs -----------------------------------------------------

fn content() -> KeySet {
    KeySet::from_keys([0x11; 32], [0x22; 32])
}

fn metadata() -> KeySet {
    KeySet::from_keys([0x33; 32], [0x44; 32])
}

/// The root tree `T` of the example repository.
fn example_tree() -> Vec<Entry> {
    let mut e = Entry::new(b"hello.txt".to_vec(), EntryKind::File);
    e.mode = 0o644;
    e.uid = 1000;
    e.gid = 100;
    e.user = "alice".into();
    e.group = "users".into();
    e.mtime_ns = T0;
    e.ctime_ns = T0;
    e.dev = 0x801;
    e.ino = 12;
    e.nlink = 1;
    e.size = 5;
    e.xattrs = vec![(b"user.k".to_vec(), b"v".to_vec())];
    e.chunks = vec![content().id_of(b"hello")];
    vec![e]
}

fn example_snapshot() -> Snapshot {
    Snapshot {
        time_ns: T0,
        hostname: "paris-ws1".into(),
        paths: vec!["/home/alice/hello.txt".into()],
        tree: metadata().id_of(&tree::encode(&example_tree()).expect("T encodes")),
        parent: None,
        stats: SnapshotStats {
            files: 1,
            dirs: 0,
            others: 0,
            bytes: 5,
            files_unchanged: 0,
            bytes_read: 5,
            new_blobs: 2,
            new_bytes: 158,
            new_bytes_stored: 170,
            duration_ms: 12,
        },
        issues: vec![],
        issues_dropped: 0,
        site: None,
        agent: None,
        source: None,
    }
}

/// An independent reading of section 4.2: nonce of (kind, id) under `cipher_key`.
fn nonce(cipher_key: &[u8; 32], kind: u8, id: &Id) -> [u8; 24] {
    let nonce_key = blake3::derive_key(NONCE_KEY_CONTEXT, cipher_key);
    let mut h = blake3::Hasher::new_keyed(&nonce_key);
    h.update(&[kind]);
    h.update(&id.0);
    let mut n = [0u8; 24];
    n.copy_from_slice(&h.finalize().as_bytes()[..24]);
    n
}

fn blob_aad(kind: u8, id: &Id) -> Vec<u8> {
    let mut a = b"hubvault blob v1".to_vec();
    a.push(kind);
    a.extend_from_slice(&id.0);
    a
}

fn aead_open(key: &[u8; 32], nonce: &[u8], aad: &[u8], sealed: &[u8]) -> Vec<u8> {
    XChaCha20Poly1305::new(key.into())
        .decrypt(XNonce::from_slice(nonce), Payload { msg: sealed, aad })
        .expect("the document's vector authenticates")
}

// ---- section 8: limits, magics, strings -----------------------------------

#[test]
fn limits_and_magics_match_consts() {
    let numbers: [(&str, u64); 15] = [
        ("REPO_VERSION", REPO_VERSION.into()),
        ("TREE_VERSION", TREE_VERSION.into()),
        ("DEFAULT_MIN_CHUNK", DEFAULT_MIN_CHUNK.into()),
        ("DEFAULT_AVG_CHUNK", DEFAULT_AVG_CHUNK.into()),
        ("DEFAULT_MAX_CHUNK", DEFAULT_MAX_CHUNK.into()),
        ("DEFAULT_ZSTD_LEVEL", DEFAULT_ZSTD_LEVEL as u64),
        ("DEFAULT_PACK_TARGET", DEFAULT_PACK_TARGET),
        ("MAX_BLOB_PLAINTEXT", MAX_BLOB_PLAINTEXT as u64),
        ("SEAL_OVERHEAD", SEAL_OVERHEAD as u64),
        ("MAX_BLOB_SEALED", MAX_BLOB_SEALED as u64),
        ("MAX_TRAILER", MAX_TRAILER as u64),
        ("MAX_NAME", MAX_NAME as u64),
        ("MAX_LINK_TARGET", MAX_LINK_TARGET as u64),
        ("MAX_XATTR_VALUE", MAX_XATTR_VALUE as u64),
        ("MAX_SNAPSHOT_FILE", MAX_SNAPSHOT_FILE as u64),
    ];
    for (name, v) in numbers {
        assert_doc_has(&format!("| `{name}` | {v} |"));
    }
    for (name, magic) in [
        ("PACK_MAGIC", PACK_MAGIC),
        ("PACK_END_MAGIC", PACK_END_MAGIC),
        ("SNAPSHOT_MAGIC", SNAPSHOT_MAGIC),
    ] {
        let m = std::str::from_utf8(magic).unwrap();
        assert_doc_has(&format!("| `{name}` | `{m}` |"));
        assert_doc_has(&format!("\"{m}\""));
    }
    // Context strings and associated data, quoted exactly.
    for s in [NONCE_KEY_CONTEXT, GEAR_SEED_CONTEXT] {
        assert_doc_has(&format!("\"{s}\""));
    }
    for aad in [BLOB_AAD_PREFIX, TRAILER_AAD, SNAPSHOT_AAD, KEYRING_AAD] {
        assert_doc_has(&format!("\"{}\"", std::str::from_utf8(aad).unwrap()));
    }
    // Derived sizes and other limits.
    assert_eq!(ENTRY_LEN, 49);
    assert_eq!(FOOTER_LEN, 12);
    assert_eq!(SCHEMA_VERSION, 3);
    assert_doc_has(&format!(
        "| trailer entry / footer | {ENTRY_LEN} bytes / {FOOTER_LEN} bytes |"
    ));
    assert_doc_has(&format!("| catalog `user_version` | {SCHEMA_VERSION} |"));
    assert_doc_has(&format!("PRAGMA user_version = {SCHEMA_VERSION}"));
    let k = KdfParams::default();
    assert_doc_has(&format!(
        "| default Argon2id | m_cost_kib {}, t_cost {}, p_cost {} |",
        k.m_cost_kib, k.t_cost, k.p_cost
    ));
    use fastcdc::v2020 as f;
    assert_doc_has(&format!(
        "| `chunker.min` / `avg` / `max` | {}..={} / {}..={} / {}..={}, `min <= avg <= max` |",
        f::MINIMUM_MIN,
        f::MINIMUM_MAX,
        f::AVERAGE_MIN,
        f::AVERAGE_MAX,
        f::MAXIMUM_MIN,
        f::MAXIMUM_MAX
    ));
    assert_doc_has(&format!("| `chunker.min` | integer | {}", f::MINIMUM_MIN));
}

// ---- sections 3.3 and 4: keys, ids, nonces, sealed blobs ------------------

#[test]
fn key_derivations() {
    let (c, m) = (content(), metadata());
    let d = c.id_of(b"hello");
    let t = m.id_of(&tree::encode(&example_tree()).unwrap());
    assert_row(
        "C.nonce_key",
        &hex_encode(&blake3::derive_key(NONCE_KEY_CONTEXT, &[0x22; 32])),
    );
    assert_row(
        "M.nonce_key",
        &hex_encode(&blake3::derive_key(NONCE_KEY_CONTEXT, &[0x44; 32])),
    );
    let k = blake3::derive_key(GEAR_SEED_CONTEXT, &[0x11; 32]);
    let seed = u64::from_le_bytes(k[..8].try_into().unwrap());
    assert_eq!(seed, c.gear_seed());
    assert_row("C gear seed", &format!("{seed:#018x}"));
    assert_eq!(d.0, *blake3::keyed_hash(&[0x11; 32], b"hello").as_bytes());
    assert_row("D = KH(C.id_key, \"hello\")", &d.to_hex());
    assert_row("N(0, D) with C", &hex_encode(&nonce(&[0x22; 32], 0, &d)));
    assert_row("A(0, D)", &hex_encode(&blob_aad(0, &d)));
    assert_row("KH(C.id_key, 61×64)", &c.id_of(&[b'a'; 64]).to_hex());
    assert_row("T = KH(M.id_key, tree)", &t.to_hex());
    assert_row("N(1, T) with M", &hex_encode(&nonce(&[0x44; 32], 1, &t)));
    assert_row(
        "empty tree id with M",
        &m.id_of(&tree::encode(&[]).unwrap()).to_hex(),
    );
}

#[test]
fn sealed_blobs() {
    let c = content();
    let mut sealer = Sealer::new(DEFAULT_ZSTD_LEVEL).unwrap();
    for (plain, name, inner) in [
        (b"hello".to_vec(), "blob-hello", None),
        (vec![b'a'; 64], "blob-a64", Some("blob-a64-plain")),
    ] {
        let id = c.id_of(&plain);
        let doc = vector(name);
        // The writer produces exactly the document's bytes (sealing is deterministic).
        assert_eq!(
            sealer
                .seal_verified(&c, BlobKind::Data, &id, &plain)
                .unwrap(),
            doc,
            "{name}"
        );
        assert_eq!(
            doc.len(),
            1 + inner.map_or(plain.len(), |v| vector(v).len() - 1) + 16
        );
        // An independent opening per section 3.3.
        let framed = aead_open(
            &[0x22; 32],
            &nonce(&[0x22; 32], 0, &id),
            &blob_aad(0, &id),
            &doc,
        );
        let expect_framed = match inner {
            None => [&[0u8][..], &plain].concat(),
            Some(v) => vector(v),
        };
        assert_eq!(framed, expect_framed, "{name}");
        if framed[0] == 1 {
            assert_eq!(
                zstd::bulk::decompress(&framed[1..], plain.len()).unwrap(),
                plain
            );
        }
        // And the reader accepts it.
        assert_eq!(blob::open(&c, BlobKind::Data, &id, &doc).unwrap(), plain);
        assert!(
            blob::open(&c, BlobKind::Tree, &id, &doc).is_err(),
            "kind is authenticated"
        );
    }
}

// ---- section 3.5: trees ---------------------------------------------------

#[test]
fn tree_encoding() {
    let m = metadata();
    let entries = example_tree();
    let bytes = vector("tree");
    assert_eq!(tree::encode(&entries).unwrap(), bytes);
    assert_eq!(tree::decode(&bytes, "T").unwrap(), entries);
    assert_eq!(bytes.len(), 153);
    // The sealed tree: flag 1 and libzstd's frame, as printed.
    let id = m.id_of(&bytes);
    let sealed = Sealer::new(DEFAULT_ZSTD_LEVEL)
        .unwrap()
        .seal_verified(&m, BlobKind::Tree, &id, &bytes)
        .unwrap();
    let framed = aead_open(
        &[0x44; 32],
        &nonce(&[0x44; 32], 1, &id),
        &blob_aad(1, &id),
        &sealed,
    );
    assert_eq!(framed, vector("tree-sealed-plain"));
    assert_eq!(sealed, vector("pack")[30..178]);
    // "An empty directory is `0100000000`" and "every entry takes at least 85 bytes".
    assert_doc_has(&format!(
        "An empty directory is `{}`",
        hex_encode(&tree::encode(&[]).unwrap())
    ));
    let minimal = tree::encode(&[Entry::new(b"f".to_vec(), EntryKind::Fifo)]).unwrap();
    assert_eq!(minimal.len(), 5 + 85);
    assert_doc_has("every entry takes at least 85 bytes");
    // Decoding enforces the documented `count` bound of len / 80.
    let mut huge = vec![TREE_VERSION];
    huge.extend_from_slice(&2u32.to_le_bytes());
    huge.extend_from_slice(&[0; 154]);
    assert!(tree::decode(&huge, "t").is_err());
}

// ---- section 3.4: packs ---------------------------------------------------

fn temp_store(root: &Path) -> DirStore {
    DirStore::create_layout(&root.join("packs")).expect("fan-out directories");
    std::fs::create_dir_all(root.join("tmp")).expect("tmp directory");
    DirStore::new(root.join("packs"), root.join("tmp"))
}

fn example_entries() -> Vec<PackEntry> {
    let (c, m) = (content(), metadata());
    vec![
        PackEntry {
            kind: BlobKind::Data,
            id: c.id_of(b"hello"),
            offset: 8,
            length: 22,
            raw_length: 5,
        },
        PackEntry {
            kind: BlobKind::Tree,
            id: m.id_of(&vector("tree")),
            offset: 30,
            length: 148,
            raw_length: 153,
        },
    ]
}

#[test]
fn pack_layout() {
    let m = metadata();
    let pack = vector("pack");
    assert_eq!(pack.len(), 332);
    assert_row(
        "example pack name",
        &hex_encode(blake3::hash(&pack).as_bytes()),
    );
    // Independent parse per section 3.4.
    assert_eq!(&pack[..8], PACK_MAGIC);
    assert_eq!(&pack[pack.len() - 8..], PACK_END_MAGIC);
    let tlen =
        u32::from_le_bytes(pack[pack.len() - 12..pack.len() - 8].try_into().unwrap()) as usize;
    assert_eq!(tlen, 142);
    let tstart = pack.len() - 12 - tlen;
    let trailer = &pack[tstart..tstart + tlen];
    let entries = aead_open(
        &[0x44; 32],
        &trailer[..24],
        b"hubvault pack trailer v1",
        &trailer[24..],
    );
    assert_eq!(entries, vector("trailer-entries"));
    assert_eq!(entries.len(), 4 + 2 * ENTRY_LEN);
    assert_eq!(&pack[8..30], vector("blob-hello"));

    // The v1 reader accepts the document's pack.
    let dir = tempfile::tempdir().unwrap();
    let store = temp_store(dir.path());
    let name = Id(*blake3::hash(&pack).as_bytes());
    std::fs::write(store.path_of(&name), &pack).unwrap();
    assert_eq!(read_trailer(&store, &name, &m).unwrap(), example_entries());
    repo_format::pack::reader::verify_checksum(&store, &name).unwrap();

    // The v1 writer produces the same bytes, up to the trailer's random nonce.
    let mut w = PackWriter::new(&store).unwrap();
    w.add(BlobKind::Data, example_entries()[0].id, &pack[8..30], 5)
        .unwrap();
    w.add(BlobKind::Tree, example_entries()[1].id, &pack[30..178], 153)
        .unwrap();
    let fp = w.finish(&store, &m).unwrap();
    assert_eq!(fp.entries, example_entries());
    let written = std::fs::read(store.path_of(&fp.name)).unwrap();
    assert_eq!(written.len(), pack.len());
    assert_eq!(written[..tstart], pack[..tstart]);
    assert_eq!(written[written.len() - 12..], pack[pack.len() - 12..]);
    let plain = m
        .open_random("trailer", TRAILER_AAD, &written[tstart..tstart + tlen])
        .unwrap();
    assert_eq!(plain, vector("trailer-entries"));
    assert_eq!(
        store.path_of(&fp.name),
        dir.path()
            .join("packs")
            .join(&fp.name.to_hex()[..2])
            .join(fp.name.to_hex())
    );
}

// ---- section 3.6: snapshots -----------------------------------------------

#[test]
fn snapshot_file() {
    let m = metadata();
    let snap = example_snapshot();
    let json = serde_json::to_vec(&snap).unwrap();
    assert_eq!(
        String::from_utf8(json.clone()).unwrap(),
        text("snapshot-json")
    );
    let id = m.id_of(&json);
    assert_row("example snapshot id", &id.to_hex());
    let file = vector("snapshot-file");
    assert_eq!(file.len(), 410);
    assert_eq!(&file[..8], SNAPSHOT_MAGIC);
    let aad = [&b"hubvault snapshot v1"[..], &id.0].concat();
    assert_eq!(
        aead_open(&[0x44; 32], &file[8..32], &aad, &file[32..]),
        json
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(id.to_hex()), &file).unwrap();
    assert_eq!(
        repo_format::snapshot::read(dir.path(), &m, &id).unwrap(),
        snap
    );
}

// ---- sections 3.1 and 3.2: config and keyring -----------------------------

#[test]
fn config_json() {
    let mut cfg = RepoConfig::new().unwrap();
    cfg.repo_id = "99".repeat(16);
    let doc = text("config");
    assert_eq!(
        String::from_utf8(serde_json::to_vec_pretty(&cfg).unwrap()).unwrap(),
        doc
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config"), &doc).unwrap();
    assert_eq!(RepoConfig::load(&dir.path().join("config")).unwrap(), cfg);
    // A config written before the normalisation level was a field: level 1.
    let old = doc.replace(",\n    \"normalization\": 2", "");
    assert_ne!(old, doc);
    std::fs::write(dir.path().join("config"), &old).unwrap();
    let loaded = RepoConfig::load(&dir.path().join("config")).unwrap();
    assert_eq!(loaded.chunker.normalization, 1);
}

#[test]
fn keyring_json() {
    let doc = text("keyring");
    let v: serde_json::Value = serde_json::from_str(&doc).unwrap();
    let p = argon2::Params::new(64, 1, 1, Some(32)).unwrap();
    let mut kek = [0u8; 32];
    argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, p)
        .hash_password_into(PASSPHRASE, &[0x77; 16], &mut kek)
        .unwrap();
    assert_row("example keyring KEK", &hex_encode(&kek));
    let wrapped = hex_decode(v["wrapped"].as_str().unwrap()).unwrap();
    assert_eq!(&wrapped[..24], &[0x88; 24]);
    let keys = aead_open(&kek, &wrapped[..24], b"hubvault keyring v1", &wrapped[24..]);
    assert_eq!(
        keys,
        [[0x33u8; 32], [0x44; 32], [0x11; 32], [0x22; 32]].concat()
    );

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keyring");
    std::fs::write(&path, &doc).unwrap();
    let k = read_keyring(&path, PASSPHRASE).unwrap();
    assert_eq!(k.metadata.id_of(b"x"), metadata().id_of(b"x"));
    assert_eq!(k.content().unwrap().id_of(b"x"), content().id_of(b"x"));
    assert!(read_keyring(&path, b"wrong").is_err());
    // The writer's JSON has the same shape.
    let keys = repo_format::crypto::Keys {
        metadata: metadata(),
        content: Some(content()),
    };
    let params = KdfParams {
        m_cost_kib: 64,
        t_cost: 1,
        p_cost: 1,
    };
    repo_format::keyring::write_keyring(&path, &keys, PASSPHRASE, params).unwrap();
    let w: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let fields = |v: &serde_json::Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
    assert_eq!(fields(&w), fields(&v));
    assert_eq!(w["params"], v["params"]);
    assert_eq!(
        hex_decode(w["wrapped"].as_str().unwrap()).unwrap().len(),
        24 + 128 + 16
    );
    assert_eq!(hex_decode(w["salt"].as_str().unwrap()).unwrap().len(), 16);
}

// ---- section 3.7: catalog -------------------------------------------------

#[test]
fn catalog_schema() {
    let schema = text("catalog-schema");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("catalog.db");
    drop(Catalog::create(&path).unwrap());
    let conn = rusqlite::Connection::open(&path).unwrap();
    let mut st = conn
        .prepare("SELECT sql FROM sqlite_master WHERE sql IS NOT NULL")
        .unwrap();
    let sqls: Vec<String> = st
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(sqls.len(), 4, "three tables and one index: {sqls:?}");
    for sql in sqls {
        assert!(
            schema.contains(&format!("{sql};")),
            "schema in the doc lacks {sql}"
        );
    }
    let v: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    assert_eq!(v, SCHEMA_VERSION);
    let mode: String = conn
        .pragma_query_value(None, "journal_mode", |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
}

// ---- section 4.5: chunking ------------------------------------------------

/// Section 4.5's `cut`, written from the document.
#[allow(clippy::too_many_arguments)]
fn doc_cut(
    buf: &[u8],
    min: usize,
    avg: usize,
    max: usize,
    level: u32,
    g: &[u64; 256],
    gl: &[u64; 256],
    masks: &BTreeMap<u32, u64>,
) -> usize {
    let bits = (avg as f64).log2().round() as u32;
    let (ms, ml) = (masks[&(bits + level)], masks[&(bits - level)]);
    let (msl, mll) = (ms << 1, ml << 1);
    let mut n = buf.len();
    if n <= min {
        return n;
    }
    let mut center = avg;
    if n > max {
        n = max;
    } else if n < center {
        center = n;
    }
    let mut h = 0u64;
    let mut i = min / 2;
    while i < center / 2 {
        h = (h << 2).wrapping_add(gl[buf[2 * i] as usize]);
        if h & msl == 0 {
            return 2 * i;
        }
        h = h.wrapping_add(g[buf[2 * i + 1] as usize]);
        if h & ms == 0 {
            return 2 * i + 1;
        }
        i += 1;
    }
    while i < n / 2 {
        h = (h << 2).wrapping_add(gl[buf[2 * i] as usize]);
        if h & mll == 0 {
            return 2 * i;
        }
        h = h.wrapping_add(g[buf[2 * i + 1] as usize]);
        if h & ml == 0 {
            return 2 * i + 1;
        }
        i += 1;
    }
    n
}

#[test]
fn chunker_vector() {
    use fastcdc::v2020::{MASKS, get_gear_with_seed};
    // The masks and gear values printed in the document are the library's.
    let mut masks = BTreeMap::new();
    for i in 5..=25u32 {
        let line = format!("MASKS[{i}] = {:#018x}", MASKS[i as usize]);
        assert_doc_has(&line);
        masks.insert(i, MASKS[i as usize]);
    }
    let (gear, gear_ls) = get_gear_with_seed(0);
    assert_doc_has(&format!(
        "GEAR[0] = {:#018x}, GEAR[1] = {:#018x}",
        gear[0], gear[1]
    ));
    let seed = content().gear_seed();
    let mut g = [0u64; 256];
    let mut gl = [0u64; 256];
    for i in 0..256 {
        assert_eq!(gear_ls[i], gear[i] << 1);
        g[i] = gear[i] ^ seed;
        gl[i] = (gear[i] << 1) ^ (seed << 1);
    }

    let mut input = vec![0u8; 16384];
    let mut h = blake3::Hasher::new();
    h.update(b"hubvault chunker vector");
    h.finalize_xof().fill(&mut input);
    for (level, row) in [
        (1u8, "chunk lengths"),
        (2, "chunk lengths, normalization 2"),
    ] {
        let params = ChunkerParams {
            min: 256,
            avg: 1024,
            max: 4096,
            normalization: level,
        };
        params.validate().unwrap();
        let setup = ChunkerSetup::new(params, seed);
        let mut chunker = Chunker::new(&input[..], &setup, Vec::new());
        let mut lens = Vec::new();
        while let Some(c) = chunker.next_chunk().unwrap() {
            lens.push(c.len());
        }
        let mut doc_lens = Vec::new();
        let mut pos = 0;
        while pos < input.len() {
            let n = doc_cut(
                &input[pos..],
                256,
                1024,
                4096,
                level.into(),
                &g,
                &gl,
                &masks,
            );
            doc_lens.push(n);
            pos += n;
        }
        assert_eq!(lens, doc_lens, "the pseudo-code of 4.5 is the chunker");
        let joined = lens
            .iter()
            .map(|n| n.to_string())
            .collect::<Vec<_>>()
            .join(" ");
        assert_row(row, &joined);
    }
}

// ---- section 5.6: the example repository ----------------------------------

#[test]
fn example_repository_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("repo");
    for d in ["packs", "snapshots", "tmp"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::write(root.join("config"), text("config")).unwrap();
    std::fs::write(root.join("keyring"), text("keyring")).unwrap();
    let pack = vector("pack");
    let name = Id(*blake3::hash(&pack).as_bytes()).to_hex();
    std::fs::create_dir_all(root.join("packs").join(&name[..2])).unwrap();
    std::fs::write(root.join("packs").join(&name[..2]).join(&name), &pack).unwrap();
    let sid = metadata().id_of(text("snapshot-json").as_bytes());
    std::fs::write(
        root.join("snapshots").join(sid.to_hex()),
        vector("snapshot-file"),
    )
    .unwrap();

    let (repo, report) = repo_format::rebuild::rebuild_catalog(&root, PASSPHRASE).unwrap();
    assert_eq!((report.packs, report.blobs, report.snapshots), (1, 2, 1));
    assert!(report.skipped.is_empty(), "{:?}", report.skipped);
    let check = repo_format::check::check(&repo, true).unwrap();
    assert!(check.is_ok(), "{:?}", check.problems);
    assert_eq!(
        repo.find_snapshot("latest").unwrap(),
        (sid, example_snapshot())
    );

    let target = dir.path().join("restored");
    let out = repo_format::restore::restore(
        &repo,
        "latest",
        &target,
        &repo_format::restore::RestoreOptions::default(),
    )
    .unwrap();
    assert!(out.errors.is_empty(), "{:?}", out.errors);
    let file = target.join("hello.txt");
    assert_eq!(std::fs::read(&file).unwrap(), b"hello");
    let md = std::fs::symlink_metadata(&file).unwrap();
    assert_eq!(md.permissions().mode() & 0o7777, 0o644);
    assert_eq!(
        md.modified().unwrap(),
        UNIX_EPOCH + Duration::from_nanos(T0 as u64)
    );
}
