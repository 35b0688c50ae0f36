//! scratch
use repo_format::blob::{BlobKind, Sealer};
use repo_format::chunker::{Chunker, ChunkerSetup};
use repo_format::config::ChunkerParams;
use repo_format::crypto::KeySet;
use repo_format::id::hex_encode;
use repo_format::tree::{self, Entry, EntryKind};

#[test]
fn scratch() {
    let c = KeySet::from_keys([0x11; 32], [0x22; 32]);
    let m = KeySet::from_keys([0x33; 32], [0x44; 32]);
    let ctx_n = "hubvault 2026-11 blob nonce key v1";
    println!(
        "nonce key c {}",
        hex_encode(&blake3::derive_key(ctx_n, &[0x22; 32]))
    );
    println!(
        "nonce key m {}",
        hex_encode(&blake3::derive_key(ctx_n, &[0x44; 32]))
    );
    println!("gear seed c {:#018x}", c.gear_seed());
    let id = c.id_of(b"hello");
    println!("id hello {id}");
    let mut s = Sealer::new(3).unwrap();
    println!(
        "seal hello {}",
        hex_encode(&s.seal(&c, BlobKind::Data, &id, b"hello").unwrap())
    );
    let a = [b'a'; 64];
    let ida = c.id_of(&a);
    println!("id a64 {ida}");
    let sa = s.seal(&c, BlobKind::Data, &ida, &a).unwrap();
    println!("seal a64 {} len {}", hex_encode(&sa), sa.len());
    let pa = c.open_blob(0, &ida, &sa).unwrap();
    println!("plain a64 {}", hex_encode(&pa));
    let mut e = Entry::new(b"hello.txt".to_vec(), EntryKind::File);
    e.mode = 0o644;
    e.uid = 1000;
    e.gid = 100;
    e.user = "alice".into();
    e.group = "users".into();
    e.mtime_ns = 1_767_225_600_000_000_000;
    e.ctime_ns = 1_767_225_600_000_000_000;
    e.dev = 0x801;
    e.ino = 12;
    e.nlink = 1;
    e.size = 5;
    e.xattrs = vec![(b"user.k".to_vec(), b"v".to_vec())];
    e.chunks = vec![id];
    let t = tree::encode(&[e]).unwrap();
    println!("tree {} len {}", hex_encode(&t), t.len());
    println!("tree id {}", m.id_of(&t));
    let empty = tree::encode(&[]).unwrap();
    println!("empty tree {} id {}", hex_encode(&empty), m.id_of(&empty));
    let st = s.seal(&m, BlobKind::Tree, &m.id_of(&t), &t).unwrap();
    println!(
        "tree sealed len {} flag {}",
        st.len(),
        m.open_blob(1, &m.id_of(&t), &st).unwrap()[0]
    );
    let mut buf = vec![0u8; 16384];
    let mut h = blake3::Hasher::new();
    h.update(b"hubvault chunker vector");
    h.finalize_xof().fill(&mut buf);
    let setup = ChunkerSetup::new(
        ChunkerParams {
            min: 256,
            avg: 1024,
            max: 4096,
        },
        c.gear_seed(),
    );
    let mut ch = Chunker::new(&buf[..], &setup, Vec::new());
    let mut lens = vec![];
    while let Some(x) = ch.next_chunk().unwrap() {
        lens.push(x.len());
    }
    println!("lens {lens:?}");
}

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use repo_format::snapshot::{Snapshot, SnapshotStats};

fn aead(key: &[u8; 32], nonce: &[u8; 24], aad: &[u8], p: &[u8]) -> Vec<u8> {
    XChaCha20Poly1305::new(key.into())
        .encrypt(XNonce::from_slice(nonce), Payload { msg: p, aad })
        .unwrap()
}

fn lines(b: &[u8]) -> String {
    b.chunks(32).map(hex_encode).collect::<Vec<_>>().join("\n")
}

#[test]
fn scratch2() {
    let c = KeySet::from_keys([0x11; 32], [0x22; 32]);
    let m = KeySet::from_keys([0x33; 32], [0x44; 32]);
    let nk = blake3::derive_key("hubvault 2026-11 blob nonce key v1", &[0x22; 32]);
    let d = c.id_of(b"hello");
    let mut h = blake3::Hasher::new_keyed(&nk);
    h.update(&[0]);
    h.update(&d.0);
    let fin = h.finalize();
    let nonce = &fin.as_bytes()[..24];
    println!("nonce D {}", hex_encode(nonce));
    let mut aad = b"hubvault blob v1".to_vec();
    aad.push(0);
    aad.extend_from_slice(&d.0);
    println!("aad D {}", hex_encode(&aad));
    let mut s = Sealer::new(3).unwrap();
    let sd = s.seal(&c, BlobKind::Data, &d, b"hello").unwrap();
    let mut e = Entry::new(b"hello.txt".to_vec(), EntryKind::File);
    e.mode = 0o644;
    e.uid = 1000;
    e.gid = 100;
    e.user = "alice".into();
    e.group = "users".into();
    e.mtime_ns = 1_767_225_600_000_000_000;
    e.ctime_ns = 1_767_225_600_000_000_000;
    e.dev = 0x801;
    e.ino = 12;
    e.nlink = 1;
    e.size = 5;
    e.xattrs = vec![(b"user.k".to_vec(), b"v".to_vec())];
    e.chunks = vec![d];
    let t = tree::encode(&[e]).unwrap();
    let tid = m.id_of(&t);
    let st = s.seal(&m, BlobKind::Tree, &tid, &t).unwrap();
    println!("tree sealed\n{}", lines(&st));
    println!(
        "tree plain after decrypt {}",
        hex_encode(&m.open_blob(1, &tid, &st).unwrap())
    );
    let nkm = blake3::derive_key("hubvault 2026-11 blob nonce key v1", &[0x44; 32]);
    let mut h = blake3::Hasher::new_keyed(&nkm);
    h.update(&[1]);
    h.update(&tid.0);
    println!("nonce T {}", hex_encode(&h.finalize().as_bytes()[..24]));
    // trailer
    let mut tr = 2u32.to_le_bytes().to_vec();
    for (k, id, off, len, raw) in [
        (0u8, d, 8u64, sd.len() as u32, 5u32),
        (1, tid, 8 + sd.len() as u64, st.len() as u32, t.len() as u32),
    ] {
        tr.push(k);
        tr.extend_from_slice(&id.0);
        tr.extend_from_slice(&off.to_le_bytes());
        tr.extend_from_slice(&len.to_le_bytes());
        tr.extend_from_slice(&raw.to_le_bytes());
    }
    println!("trailer plain\n{}", lines(&tr));
    let tct = aead(&[0x44; 32], &[0x55; 24], b"hubvault pack trailer v1", &tr);
    let mut pack = b"HVPACK01".to_vec();
    pack.extend_from_slice(&sd);
    pack.extend_from_slice(&st);
    let tstart = pack.len();
    pack.extend_from_slice(&[0x55; 24]);
    pack.extend_from_slice(&tct);
    let tlen = (pack.len() - tstart) as u32;
    pack.extend_from_slice(&tlen.to_le_bytes());
    pack.extend_from_slice(b"HVPKEND1");
    println!("tstart {tstart} tlen {tlen} total {}", pack.len());
    println!("trailer sealed ct\n{}", lines(&tct));
    println!("pack name {}", hex_encode(blake3::hash(&pack).as_bytes()));
    let snap = Snapshot {
        time_ns: 1_767_225_600_000_000_000,
        hostname: "paris-ws1".into(),
        paths: vec!["/home/alice/hello.txt".into()],
        tree: tid,
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
    };
    let json = serde_json::to_vec(&snap).unwrap();
    println!("snap json {}", String::from_utf8_lossy(&json));
    let sid = m.id_of(&json);
    println!("snap id {sid}");
    let mut saad = b"hubvault snapshot v1".to_vec();
    saad.extend_from_slice(&sid.0);
    let sct = aead(&[0x44; 32], &[0x66; 24], &saad, &json);
    let mut sf = b"HVSNAP01".to_vec();
    sf.extend_from_slice(&[0x66; 24]);
    sf.extend_from_slice(&sct);
    println!("snap file len {}\n{}", sf.len(), lines(&sf));
    // keyring
    let params = argon2::Params::new(64, 1, 1, Some(32)).unwrap();
    let a = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut kek = [0u8; 32];
    a.hash_password_into(b"hubvault test vector", &[0x77; 16], &mut kek)
        .unwrap();
    println!("kek {}", hex_encode(&kek));
    let mut plain = vec![];
    for b in [0x33u8, 0x44, 0x11, 0x22] {
        plain.extend_from_slice(&[b; 32]);
    }
    let w = aead(&kek, &[0x88; 24], b"hubvault keyring v1", &plain);
    let mut wrapped = vec![0x88u8; 24];
    wrapped.extend_from_slice(&w);
    println!("wrapped {}", hex_encode(&wrapped));
    let mut cfg = repo_format::config::RepoConfig::new().unwrap();
    cfg.repo_id = "99".repeat(16);
    println!(
        "{}",
        String::from_utf8(serde_json::to_vec_pretty(&cfg).unwrap()).unwrap()
    );
    println!(
        "{}",
        String::from_utf8(
            serde_json::to_vec_pretty(&repo_format::keyring::KdfParams {
                m_cost_kib: 64,
                t_cost: 1,
                p_cost: 1
            })
            .unwrap()
        )
        .unwrap()
    );
}
