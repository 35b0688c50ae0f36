//! Faults at the collector, end to end with the real binaries on loopback:
//! an expired enrollment token, a damaged or lost catalog (RELIABILITY.md
//! scenario 11), a tree uploaded under an id its bytes do not open to and
//! a batch refused part-way (scenario 8), and a damaged pack at rest seen
//! by two sites (scenario 5).

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

mod support;

use integration_tests::{compare, fixture};
use proto::limits::PROTOCOL;
use proto::pb;
use support::*;

/// An enrollment token past its lifetime is refused with a clear
/// "expired" (UNAUTHENTICATED) answer and spends nothing: no agent row at
/// the collector, no key, certificate or config in the agent's state
/// directory. A fresh token for the same site then enrolls, so the refusal
/// was the expiry and nothing else.
#[test]
fn an_expired_enrollment_token_is_refused_and_enrolls_nothing() {
    let c = Collector::start();
    c.ok(&["site", "add", "paris"]);
    // The shortest lifetime the CLI takes: one second.
    let tok = c
        .ok(&["enroll-token", "--site", "paris", "--ttl", "1s"])
        .trim()
        .to_string();
    // Nothing to wait on but the clock: the token's lifetime is what is tested.
    std::thread::sleep(Duration::from_millis(2500));

    let tmp = tempfile::tempdir().expect("tmp");
    let state = tmp.path().join("agent");
    let o = c.enroll(&tok, &state);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!o.status.success(), "an expired token enrolled: {err}");
    assert!(err.contains("enrollment token expired"), "{err}");
    assert!(
        err.contains("hubvault enroll-token"),
        "says how to get a new one: {err}"
    );
    assert!(err.contains("unauthenticated"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(c.agents().is_empty(), "no agent row: {:?}", c.agents());
    for f in [
        "agent.key",
        "agent.pem",
        "ca.pem",
        "agent.json",
        "passphrase",
    ] {
        assert!(
            !state.join(f).exists(),
            "{f} written by a refused enrollment"
        );
    }

    // The same answer to a direct call, with a well-formed CSR: the token
    // is judged before anything is issued.
    use base64::Engine;
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(tok.strip_prefix("hv1.").expect("prefix"))
        .expect("b64");
    let key = rcgen::KeyPair::generate().expect("key");
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())
        .expect("params")
        .serialize_request(&key)
        .expect("csr");
    let e = rt().block_on(async {
        let ch = c.channel(None).await.expect("anonymous TLS");
        pb::enroll_service_client::EnrollServiceClient::new(ch)
            .enroll(pb::EnrollRequest {
                protocol: PROTOCOL,
                token_id: raw[..16].to_vec(),
                csr_der: csr.der().to_vec(),
                hostname: "late".into(),
            })
            .await
            .expect_err("an expired token")
    });
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("expired"), "{e:?}");
    assert!(c.agents().is_empty(), "no agent row: {:?}", c.agents());

    // Control: a token within its lifetime enrolls.
    enrolled(&c, "paris", tmp.path());
    assert_eq!(c.agents().len(), 1);
}

/// The collector's data directory.
fn data_dir(c: &Collector) -> PathBuf {
    c.dir.path().join("data")
}

/// Stop the collector with SIGTERM (a clean shutdown: the catalog is
/// checkpointed and closed) and wait for it to exit.
fn stop(c: &mut Collector) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(c.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    let start = Instant::now();
    loop {
        if let Some(s) = c.child.try_wait().expect("wait") {
            assert!(s.success(), "graceful shutdown exits 0, got {s:?}");
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "collector did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Run `hubvault-collector run` on `data` where it must refuse to start:
/// its exit status and stderr. Fails the test as soon as it prints its
/// listening line (it serves a damaged repository), or if it is still
/// running after 30 s.
fn start_refused(data: &Path) -> (ExitStatus, String) {
    use std::io::{BufRead, Read};
    let mut child = Command::new(env!("CARGO_BIN_EXE_hubvault-collector"))
        .args(["run", "--listen", "127.0.0.1:0", "--data"])
        .arg(data)
        .env("HUBVAULT_LOG", "warn")
        .env_remove("RUST_BACKTRACE")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("collector run");
    let stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        let serving = lines.try_iter().find(|l| l.starts_with("listening on"));
        let late = start.elapsed() > Duration::from_secs(30);
        if serving.is_some() || late {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "the collector started on a damaged catalog ({}): {}",
                serving.unwrap_or_else(|| "still running after 30 s".into()),
                err.join().unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    (status, err.join().expect("stderr reader"))
}

/// `hubvault repo <args> --repo <data>/repo --passphrase-file <data>/repo.pass`:
/// an offline command on the collector's repository, with its
/// (metadata-only) keyring.
fn repo_cmd(c: &Collector, args: &[&str]) -> Output {
    let data = data_dir(c);
    Command::new(bin("hubvault"))
        .arg("repo")
        .args(args)
        .arg("--repo")
        .arg(data.join("repo"))
        .arg("--passphrase-file")
        .arg(data.join("repo.pass"))
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("running hubvault repo")
}

/// The collector's repository opened from the test (a shared lock: the
/// collector may be running).
fn collector_repo(c: &Collector) -> repo_format::Repository {
    let data = data_dir(c);
    let pass = std::fs::read_to_string(data.join("repo.pass")).expect("repo.pass");
    repo_format::Repository::open(
        &data.join("repo"),
        pass.trim().as_bytes(),
        repo_format::LockMode::Shared,
    )
    .expect("opening the collector's repository")
}

/// Overwrite, with garbage, the B-tree page nearest the middle of the
/// SQLite database at `db` (page 1, the header and schema, is left alone:
/// the damage is to the data, not to the file's identity). Returns the
/// page number (from 1) and the number of pages.
fn garble_middle_page(db: &Path) -> (usize, usize) {
    let mut bytes = std::fs::read(db).expect("read catalog");
    let page_size = match u16::from_be_bytes([bytes[16], bytes[17]]) {
        1 => 65536,
        n => n as usize,
    };
    let pages = bytes.len() / page_size;
    // Table and index pages (interior or leaf) start with one of these
    // type bytes; free pages and overflow pages do not, and SQLite's
    // checks would not necessarily look at them.
    let is_btree = |p: usize| matches!(bytes[p * page_size], 0x02 | 0x05 | 0x0a | 0x0d);
    let page = (1..pages)
        .filter(|&p| is_btree(p))
        .min_by_key(|&p| p.abs_diff(pages / 2))
        .unwrap_or_else(|| panic!("no B-tree page past page 1 in {pages} pages"));
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for b in &mut bytes[page * page_size..(page + 1) * page_size] {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    std::fs::write(db, bytes).expect("write catalog");
    (page + 1, pages)
}

/// Scenario 11 at the collector: after a backup is committed, the
/// collector is stopped and `fault` damages `<data>/repo/catalog.db`. The
/// collector then refuses to start (non-zero exit, no listening line, no
/// panic) and its error names the fix, `rebuild-catalog`. After `hubvault
/// repo rebuild-catalog` it starts, lists the same snapshot, restores it
/// bit-exact at another site's agent, and its repository checks clean.
fn catalog_fault_case(fault: impl FnOnce(&Path)) {
    let (mut c, tmp, paris, lyon) = paris_and_lyon();
    let src = tmp.path().join("src");
    fixture::build(&src, &fixture::bulk_tree(4, 300 * 1024, 41)).expect("fixture");
    std::fs::write(src.join("note.txt"), b"a small file").expect("write");
    let o = agent_backup(&paris, &src);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let before = c.snapshot_ids();
    assert_eq!(before.len(), 1);

    stop(&mut c);
    let repo = data_dir(&c).join("repo");
    let wal = repo.join("catalog.db-wal");
    assert!(
        std::fs::metadata(&wal).map_or(true, |m| m.len() == 0),
        "a clean stop leaves no catalog WAL (it would mask damage to the file)"
    );
    fault(&repo.join("catalog.db"));

    let (status, err) = start_refused(&data_dir(&c));
    assert!(!status.success(), "{status:?}: {err}");
    assert!(!err.contains("panicked"), "a panic, not a refusal: {err}");
    eprintln!("the collector refused to start: {err}");
    assert!(
        err.contains("rebuild-catalog"),
        "the refusal names the fix: {err}"
    );

    let rebuilt = repo_cmd(&c, &["rebuild-catalog"]);
    assert!(
        rebuilt.status.success(),
        "rebuild: {}\n{}",
        String::from_utf8_lossy(&rebuilt.stdout),
        String::from_utf8_lossy(&rebuilt.stderr)
    );
    c.restart();
    assert_eq!(c.snapshot_ids(), before, "the committed snapshot is back");

    let _agent = KillOnDrop(spawn_agent(&lyon));
    let lyon_id = c.online_agent("lyon");
    let target = tmp.path().join("restored");
    c.restore_job(&before[0], &lyon_id, &target);
    compare::assert_same_tree(&src, &target.join("src"));
    c.check_repo();
}

/// A catalog with a page of garbage in the middle: refused at start with
/// the fix named; rebuilt, every snapshot is back and restores bit-exact.
#[test]
fn a_garbled_catalog_page_refuses_start_until_rebuilt() {
    catalog_fault_case(|db| {
        let (page, pages) = garble_middle_page(db);
        eprintln!("garbled page {page} of {pages} of {}", db.display());
    });
}

/// A catalog cut short (the end of the file lost): refused at start with
/// the fix named; rebuilt, every snapshot is back and restores bit-exact.
#[test]
fn a_truncated_catalog_refuses_start_until_rebuilt() {
    catalog_fault_case(|db| {
        let len = std::fs::metadata(db).expect("stat").len();
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(db)
            .expect("open");
        f.set_len(len / 2).expect("truncate");
    });
}

/// A lost catalog (file deleted): refused at start with the fix named;
/// rebuilt, every snapshot is back and restores bit-exact.
#[test]
fn a_deleted_catalog_refuses_start_until_rebuilt() {
    catalog_fault_case(|db| {
        std::fs::remove_file(db).expect("rm catalog.db");
        for side in ["catalog.db-wal", "catalog.db-shm"] {
            let p = db.with_file_name(side);
            if p.exists() {
                std::fs::remove_file(p).expect("rm");
            }
        }
    });
}

/// What the tree-forgery tests upload, all sealed with Lyon's keys.
struct Forgeries {
    /// The id of the tree Lyon really has (one empty file, `a.txt`).
    real: repo_format::Id,
    /// That tree, sealed for and sent under its true id.
    honest: pb::UploadBlob,
    /// The id the forgeries claim (another tree's).
    claimed: repo_format::Id,
    /// `honest`'s bytes (sealed for `real`) sent as `claimed`.
    relabelled: pb::UploadBlob,
    /// `real`'s body sealed under `claimed` (nonce and associated data):
    /// it authenticates, but its plaintext hashes to `real`.
    lying: pb::UploadBlob,
    /// A sound, new data blob.
    data: pb::UploadBlob,
}

/// [`Forgeries`] made with the keys in `lyon`'s spool.
fn forgeries(lyon: &Path) -> Forgeries {
    use repo_format::blob::BlobKind;
    use repo_format::tree::{Entry, EntryKind};
    let spool = open_spool(lyon);
    let keys = spool.keys();
    let mut sealer = repo_format::blob::Sealer::new(spool.config().zstd_level).expect("sealer");
    let empty_file = |name: &[u8]| {
        let mut e = Entry::new(name.to_vec(), EntryKind::File);
        e.mode = 0o644;
        e
    };
    let (real, honest) = crafted_tree(&spool, &[empty_file(b"a.txt")]);
    let (claimed, _) = crafted_tree(&spool, &[empty_file(b"b.txt")]);
    let body = repo_format::tree::encode(&[empty_file(b"a.txt")]).expect("encode");
    let as_claimed = |sealed: Vec<u8>| pb::UploadBlob {
        kind: 1,
        id: claimed.0.to_vec(),
        sealed,
        raw_length: body.len() as u32,
    };
    let relabelled = as_claimed(honest.sealed.clone());
    let lying = as_claimed(
        sealer
            .seal(&keys.metadata, BlobKind::Tree, &claimed, &body)
            .expect("seal"),
    );
    let content = keys.content().expect("content key");
    let plain = b"bytes of lyon".to_vec();
    let chunk = content.id_of(&plain);
    let data = pb::UploadBlob {
        kind: 0,
        id: chunk.0.to_vec(),
        sealed: sealer
            .seal(content, BlobKind::Data, &chunk, &plain)
            .expect("seal"),
        raw_length: plain.len() as u32,
    };
    Forgeries {
        real,
        honest,
        claimed,
        relabelled,
        lying,
        data,
    }
}

/// Upload `blobs` in one message on a stream of its own, which must be
/// refused: the refusal. Fails the test if `never` is acknowledged or the
/// stream ends without an error.
async fn upload_refused(
    l: &mut pb::agent_service_client::AgentServiceClient<tonic::transport::Channel>,
    blobs: Vec<pb::UploadBlob>,
    never: repo_format::Id,
) -> tonic::Status {
    use tokio_stream::StreamExt;
    let sent = pb::UploadRequest {
        protocol: PROTOCOL,
        blobs,
    };
    match l.upload(tokio_stream::iter(vec![sent])).await {
        Err(s) => s,
        Ok(r) => {
            let mut acks = r.into_inner();
            loop {
                match acks.next().await {
                    Some(Ok(a)) => assert!(
                        !a.ids.contains(&never.0.to_vec()),
                        "the forged tree {never} was acknowledged"
                    ),
                    Some(Err(s)) => break s,
                    None => panic!("the upload ended without a refusal"),
                }
            }
        }
    }
}

/// Scenario 8 (b) for trees. The collector holds the metadata key, so it
/// opens every uploaded tree and re-derives its id before storing it. A
/// tree uploaded under an id that does not match its bytes is refused
/// (INVALID_ARGUMENT, "does not open to its id"), whether the bytes were
/// sealed for another id (the AEAD fails) or sealed under the claimed id
/// around a body whose keyed hash is another (the AEAD opens, the id check
/// fails), alone or after a sound data blob in the same message. Nothing
/// lands for it: no pack, no catalog row, and MissingBlobs still lists it;
/// a commit naming it is NOT_FOUND. Then the same tree uploaded under its
/// true id is stored and commits (control: the refusals were the ids').
///
/// (Data blobs cannot be checked so: the collector is content-blind. A
/// data blob under a wrong id is stored and only its own site can name
/// it; see `an_uploaded_tree_naming_a_chunk_the_site_lacks_does_not_commit`
/// and `a_chunk_another_site_stored_is_compared_and_stored_once` in
/// upload.rs.)
#[test]
fn a_tree_uploaded_under_an_id_its_bytes_do_not_open_to_is_refused() {
    use tokio_stream::StreamExt;
    let c = Collector::start();
    c.ok(&["site", "add", "lyon"]);
    let tmp = tempfile::tempdir().expect("tmp");
    let lyon = enrolled(&c, "lyon", tmp.path());
    let f = forgeries(&lyon);
    let (real, claimed) = (f.real, f.claimed);
    let packs_before = c.pack_count();
    rt().block_on(async {
        let ch = c.channel(Some((&lyon, "agent"))).await.expect("connects");
        let mut l = pb::agent_service_client::AgentServiceClient::new(ch);
        let cases = [
            ("relabelled", vec![f.relabelled]),
            ("lying sealer", vec![f.lying.clone()]),
            ("after a data blob", vec![f.data, f.lying]),
        ];
        for (what, blobs) in cases {
            let status = upload_refused(&mut l, blobs, claimed).await;
            assert_eq!(
                status.code(),
                tonic::Code::InvalidArgument,
                "{what}: {status:?}"
            );
            assert!(
                status.message().contains("does not open to its id"),
                "{what}: {status:?}"
            );
            assert_eq!(c.pack_count(), packs_before, "{what}: a pack was stored");
            let gone = collector_repo(&c)
                .catalog()
                .expect("catalog")
                .missing(&[claimed, real])
                .expect("missing");
            assert_eq!(gone, vec![claimed, real], "{what}: a catalog row was added");
        }

        let m = l
            .missing_blobs(pb::MissingBlobsRequest {
                protocol: PROTOCOL,
                ids: vec![claimed.0.to_vec()],
            })
            .await
            .expect("missing")
            .into_inner();
        assert_eq!(m.missing, vec![claimed.0.to_vec()], "still lacking");
        let e = commit_root(&l, claimed, 1)
            .await
            .expect_err("a tree never stored");
        assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");

        // Control: the honest upload of the tree is stored and commits.
        let acks: Vec<pb::UploadAck> = l
            .clone()
            .upload(tokio_stream::iter(vec![pb::UploadRequest {
                protocol: PROTOCOL,
                blobs: vec![f.honest],
            }]))
            .await
            .expect("upload")
            .into_inner()
            .map(|a| a.expect("ack"))
            .collect()
            .await;
        assert_eq!(
            acks.into_iter().flat_map(|a| a.ids).collect::<Vec<_>>(),
            vec![real.0.to_vec()]
        );
        commit_root(&l, real, 2)
            .await
            .expect("the honest tree commits");
    });
    assert_eq!(c.snapshot_ids().len(), 1, "only the honest commit");
}

/// The files below `dir` with their sizes (none if it does not exist).
fn files_below(dir: &Path) -> Vec<(PathBuf, u64)> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    rd.flatten()
        .flat_map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => files_below(&e.path()),
            Ok(m) => vec![(e.path(), m.len())],
            Err(_) => Vec::new(),
        })
        .collect()
}

/// A batch the collector refuses part-way (here: 12 MiB of new data blobs,
/// then a tree that does not open to its id) leaves nothing on disk: the
/// temporary pack its first blobs were written to is removed, not left in
/// `<data>/repo/tmp` (swept only when the repository is opened, and only
/// once a day old), where an enrolled agent repeating the upload could fill
/// the collector's disk a batch (up to 16 MiB) at a time.
#[test]
fn a_batch_refused_part_way_leaves_no_temporary_pack() {
    let c = Collector::start();
    c.ok(&["site", "add", "lyon"]);
    let tmp = tempfile::tempdir().expect("tmp");
    let lyon = enrolled(&c, "lyon", tmp.path());
    let f = forgeries(&lyon);
    let tmp_dir = data_dir(&c).join("repo").join("tmp");
    assert_eq!(files_below(&tmp_dir), Vec::new(), "nothing there before");
    let packs_before = c.pack_count();
    let status = rt().block_on(async {
        let ch = c.channel(Some((&lyon, "agent"))).await.expect("connects");
        let mut l = pb::agent_service_client::AgentServiceClient::new(ch);
        // Data blobs are opaque to the collector (content-blind): any
        // sealed bytes of a plausible length are taken as they are.
        let mut blobs: Vec<pb::UploadBlob> = (1..=3u8)
            .map(|n| pb::UploadBlob {
                kind: 0,
                id: vec![n; 32],
                sealed: vec![n; 4 << 20],
                raw_length: (4 << 20) - 40,
            })
            .collect();
        blobs.extend([f.data, f.lying]);
        upload_refused(&mut l, blobs, f.claimed).await
    });
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert_eq!(c.pack_count(), packs_before, "no pack was stored");
    assert_eq!(
        files_below(&tmp_dir),
        Vec::new(),
        "the refused batch's temporary pack was left behind"
    );
}

/// How a pack is damaged at rest.
#[derive(Debug, Clone, Copy)]
enum Damage {
    /// One bit flipped in the middle of the blob.
    BitFlip,
    /// The pack cut off in the middle of the blob.
    Truncated,
}

/// The chunk ids of file `name` directly in the backed-up directory `dir`
/// of the latest snapshot in `state`'s spool.
fn chunks_of(state: &Path, dir: &str, name: &str) -> Vec<repo_format::Id> {
    let spool = open_spool(state);
    let (_, snap) = spool.find_snapshot("latest").expect("snap");
    let top = spool.read_tree(&snap.tree).expect("tree");
    let d = top
        .iter()
        .find(|e| e.name == dir.as_bytes())
        .and_then(|e| e.subtree)
        .unwrap_or_else(|| panic!("no directory {dir} at the top"));
    spool
        .read_tree(&d)
        .expect("tree")
        .into_iter()
        .find(|e| e.name == name.as_bytes())
        .unwrap_or_else(|| panic!("no file {name} in {dir}"))
        .chunks
}

/// Restore `snap` onto the agent `agent` into `target` through a restore
/// job: whether the job succeeded, and its listing.
fn try_restore(c: &Collector, snap: &str, agent: &str, target: &Path) -> (bool, String) {
    let job = c.ok(&[
        "restore",
        snap,
        "--to-agent",
        agent,
        "--target",
        target.to_str().expect("utf8"),
    ]);
    let o = c.hubvault(&["jobs", "--wait", job.trim(), "--timeout", "120"]);
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
    )
}

/// A collector where Paris backed up `src/victim.bin` (one chunk), and
/// the pack holding that chunk was then damaged at rest (`damage`) while
/// the collector was stopped; it runs again. Brest is enrolled for
/// restores: it never backs the file up, so whatever it restores came from
/// the collector (an agent takes what its own spool or files hold).
struct DamagedPack {
    c: Collector,
    tmp: tempfile::TempDir,
    paris: PathBuf,
    lyon: PathBuf,
    brest: PathBuf,
    src: PathBuf,
    victim: Vec<u8>,
    /// The snapshot Paris committed before the damage.
    first: String,
    chunk: repo_format::Id,
    /// The damaged pack's name (hex).
    pack: String,
}

fn damaged_pack(damage: Damage) -> DamagedPack {
    let (mut c, tmp, paris, lyon) = paris_and_lyon();
    c.ok(&["site", "add", "brest"]);
    let brest = enrolled(&c, "brest", tmp.path());
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).expect("mkdir");
    // Under the minimum chunk size: one chunk.
    let victim = integration_tests::content(200 * 1024, 77, integration_tests::Fill::Random);
    std::fs::write(src.join("victim.bin"), &victim).expect("write");
    let o = agent_backup(&paris, &src);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ids = c.snapshot_ids();
    assert_eq!(ids.len(), 1);
    let chunks = chunks_of(&paris, "src", "victim.bin");
    assert_eq!(chunks.len(), 1, "{chunks:?}");
    let chunk = chunks[0];
    let loc = collector_repo(&c)
        .catalog()
        .expect("catalog")
        .lookup(&chunk)
        .expect("lookup")
        .expect("the chunk is catalogued at the collector");
    let hex = loc.pack.to_hex();
    let path = data_dir(&c)
        .join("repo")
        .join("packs")
        .join(&hex[..2])
        .join(&hex);

    stop(&mut c);
    let mid = loc.offset + loc.length as u64 / 2;
    match damage {
        Damage::BitFlip => {
            let mut bytes = std::fs::read(&path).expect("read pack");
            bytes[mid as usize] ^= 0x10;
            std::fs::write(&path, bytes).expect("write pack");
        }
        Damage::Truncated => {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .expect("open pack");
            f.set_len(mid).expect("truncate pack");
        }
    }
    c.restart();
    DamagedPack {
        c,
        tmp,
        paris,
        lyon,
        brest,
        src,
        victim,
        first: ids[0].clone(),
        chunk,
        pack: hex,
    }
}

impl DamagedPack {
    /// Every snapshot at the collector restores bit-exact at Brest.
    fn all_restore_at_brest(&self, brest_id: &str) {
        let all = self.c.snapshot_ids();
        for (i, snap) in all.iter().enumerate() {
            let target = self.tmp.path().join(format!("restored-{i}"));
            self.c.restore_job(snap, brest_id, &target);
            assert_eq!(
                std::fs::read(target.join("src").join("victim.bin")).expect("restored"),
                self.victim,
                "snapshot {snap}"
            );
        }
    }
}

/// Scenario 5 with a pack cut short (the size check, where
/// `a_damaged_pack_is_set_aside_and_the_next_backup_heals_old_snapshots`
/// in scrub.rs flips a bit), and the chunk stored again by two sites.
/// Before any scrub, `check --read-data` names the pack and a restore of
/// the file at Brest fails loudly and writes nothing. `hubvault scrub`
/// names the pack, the site and the snapshot and sets the pack aside; from
/// then on MissingBlobs tells Paris it lacks the chunk; Paris's next backup
/// of the same, unchanged data sends it again; Lyon's first backup of the
/// same data is stored too; every snapshot, the first one included (the
/// chunk's id does not change), restores bit-exact at Brest; and a second
/// scrub and the repository check are clean.
#[test]
fn a_truncated_pack_is_set_aside_and_its_chunk_is_stored_again() {
    let d = damaged_pack(Damage::Truncated);
    let c = &d.c;

    let check = repo_cmd(c, &["check", "--read-data"]);
    let report = String::from_utf8_lossy(&check.stdout).to_string();
    assert!(!check.status.success(), "check found nothing: {report}");
    assert!(
        report.contains(&format!("DAMAGED pack {}", d.pack)),
        "check names the pack: {report}"
    );
    let _agent = KillOnDrop(spawn_agent(&d.brest));
    let brest_id = c.online_agent("brest");
    let target = d.tmp.path().join("restored-damaged");
    let (ok, jobs) = try_restore(c, &d.first, &brest_id, &target);
    assert!(!ok, "a restore of the damaged file succeeded: {jobs}");
    assert!(
        !target.join("src").join("victim.bin").exists(),
        "the damaged file was written: {jobs}"
    );

    let (code, report) = scrub(c, false);
    assert_eq!(code, 3, "{report}");
    let damaged = report["damaged"].as_array().expect("damaged");
    assert_eq!(damaged.len(), 1, "{report}");
    assert_eq!(damaged[0]["pack"], d.pack.as_str(), "{report}");
    // Brest holds it too: the restore job granted it the snapshot's blobs.
    assert_eq!(
        damaged[0]["sites"],
        serde_json::json!(["brest", "paris"]),
        "{report}"
    );
    assert_eq!(
        report["affected"][0]["snapshot"],
        d.first.as_str(),
        "{report}"
    );

    // A lost copy is not a held copy: Paris is told it lacks the chunk.
    let missing = rt().block_on(async {
        let ch = c
            .channel(Some((&d.paris, "agent")))
            .await
            .expect("connects");
        pb::agent_service_client::AgentServiceClient::new(ch)
            .missing_blobs(pb::MissingBlobsRequest {
                protocol: PROTOCOL,
                ids: vec![d.chunk.0.to_vec()],
            })
            .await
            .expect("missing")
            .into_inner()
            .missing
    });
    assert_eq!(missing, vec![d.chunk.0.to_vec()], "paris still holds it");

    let again = agent_backup(&d.paris, &d.src);
    let err = String::from_utf8_lossy(&again.stderr).to_string();
    assert!(again.status.success(), "paris again: {err}");
    let sent: u64 = number_before(&err, "sent", 1);
    assert!(sent >= 1, "paris did not send the lost chunk again: {err}");
    let l = agent_backup(&d.lyon, &d.src);
    assert!(
        l.status.success(),
        "lyon's backup of the same data: {}",
        String::from_utf8_lossy(&l.stderr)
    );
    assert_eq!(c.snapshot_ids().len(), 3);
    d.all_restore_at_brest(&brest_id);
    let (code, clean) = scrub(c, false);
    assert_eq!(code, 0, "{clean}");
    c.check_repo();
    // With the collector's content-blind keyring, --read-data checks pack
    // checksums and trees (data blobs it cannot open are not "damaged").
    let check = repo_cmd(c, &["check", "--read-data"]);
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
}

/// Scenario 5 before a scrub: Paris's chunk sits in a damaged pack that no
/// scrub has set aside yet, and Lyon backs up the same data. Its sound
/// copy differs from the damaged stored one (or the stored one cannot be
/// read), and the damage is the collector's, not Lyon's: expected, Lyon's
/// backup is accepted (the collector sees that its stored copy is the bad
/// one, for instance by checking that pack's hash, and keeps Lyon's), and
/// then Lyon's snapshot and Paris's first one (same chunk id) restore
/// bit-exact at Brest.
fn second_site_before_a_scrub(damage: Damage) {
    let d = damaged_pack(damage);
    let c = &d.c;
    let l = agent_backup(&d.lyon, &d.src);
    assert!(
        l.status.success(),
        "lyon's backup of data whose stored copy is damaged ({damage:?}): {}",
        String::from_utf8_lossy(&l.stderr)
    );
    assert_eq!(c.snapshot_ids().len(), 2);
    let _agent = KillOnDrop(spawn_agent(&d.brest));
    let brest_id = c.online_agent("brest");
    d.all_restore_at_brest(&brest_id);
}

/// [`second_site_before_a_scrub`] with a bit flipped in the stored chunk.
#[test]
fn a_second_site_is_not_refused_for_a_chunk_in_a_bit_flipped_pack() {
    second_site_before_a_scrub(Damage::BitFlip);
}

/// [`second_site_before_a_scrub`] with the stored chunk's pack cut short.
#[test]
fn a_second_site_is_not_refused_for_a_chunk_in_a_truncated_pack() {
    second_site_before_a_scrub(Damage::Truncated);
}

/// `hubvault scrub-schedule --json [ARGS]`, parsed.
fn scrub_schedule(c: &Collector, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["scrub-schedule", "--json"];
    all.extend_from_slice(args);
    serde_json::from_str(&c.ok(&all)).expect("scrub-schedule json")
}

/// Scenario 5 found by the collector on its own: with a scrub schedule set
/// (cron with seconds, UTC, and a read rate), the collector scrubs when
/// the schedule says, sets the bit-flipped pack aside as an admin's scrub
/// would, and keeps the outcome: `scrub-schedule` and `status` say when the
/// last scrub ran, who started it and what it found. A bad schedule is
/// refused with the format and changes nothing; "off" stops the schedule;
/// an admin's rate-limited scrub afterwards is clean and is kept as such.
#[test]
fn a_scheduled_scrub_sets_a_damaged_pack_aside_and_status_tells() {
    let d = damaged_pack(Damage::BitFlip);
    let c = &d.c;
    let none = scrub_schedule(c, &[]);
    assert_eq!(none["schedule"], "", "{none}");
    assert_eq!(none["next_ns"], 0, "{none}");
    assert!(none["last"].is_null(), "{none}");
    assert!(
        c.ok(&["status"])
            .contains("scrub: never run; not scheduled"),
        "{}",
        c.ok(&["status"])
    );

    let o = c.hubvault(&["scrub-schedule", "every night"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(err.contains("sec min hour day month weekday"), "{err}");
    for (args, says) in [
        (&["0 0 0 30 2 *"][..], "never fires"),
        (&["0 0 3 * * *", "--limit", "200"][..], "too slow"),
    ] {
        let mut all = vec!["scrub-schedule"];
        all.extend_from_slice(args);
        let o = c.hubvault(&all);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(says), "{args:?}: {err}");
    }
    assert_eq!(scrub_schedule(c, &[])["schedule"], "", "nothing changed");
    assert!(c.ok(&["scrub", "--cancel"]).contains("no scrub is running"));

    let set = scrub_schedule(c, &["* * * * * *", "--limit", "100MB/s"]);
    assert_eq!(set["schedule"], "* * * * * *", "{set}");
    assert_eq!(set["bytes_per_sec"], 100_000_000, "{set}");
    assert!(set["next_ns"].as_i64().is_some_and(|n| n > 0), "{set}");
    let mut last = serde_json::Value::Null;
    wait_for("a scheduled scrub", || {
        last = scrub_schedule(c, &[])["last"].clone();
        !last.is_null()
    });
    assert_eq!(last["trigger"], "schedule", "{last}");
    assert_eq!(last["damaged"], 1, "{last}");
    assert_eq!(last["dry_run"], false, "{last}");
    assert_eq!(last["error"], "", "{last}");
    let aside = data_dir(c).join("repo").join("damaged").join(&d.pack);
    assert!(aside.exists(), "the pack is set aside: {}", aside.display());
    let status = c.ok(&["status"]);
    assert!(
        status.contains("(schedule, ") && status.contains("1 damaged packs"),
        "{status}"
    );

    let off = scrub_schedule(c, &["off"]);
    assert_eq!(off["schedule"], "", "{off}");
    assert_eq!(off["next_ns"], 0, "{off}");
    // A scheduled scrub may still be running (one at a time: the admin's
    // is refused as RESOURCE_EXHAUSTED meanwhile).
    let mut done = None;
    wait_for("the admin's scrub", || {
        let o = c.hubvault(&["scrub", "--limit", "64MiB/s"]);
        let busy = String::from_utf8_lossy(&o.stderr).contains("already running");
        done = Some(o);
        !busy
    });
    let o = done.expect("the scrub ran");
    assert!(
        o.status.success(),
        "the damaged pack is gone: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let last = &scrub_schedule(c, &[])["last"];
    assert_eq!(last["trigger"], "admin", "{last}");
    assert_eq!(last["damaged"], 0, "{last}");
    assert!(c.ok(&["status"]).contains("(admin, "), "status");
    let status: serde_json::Value =
        serde_json::from_str(&c.ok(&["status", "--json"])).expect("status --json");
    assert_eq!(status["scrub"]["last"]["trigger"], "admin", "{status}");
    assert_eq!(status["scrub"]["last"]["damaged"], 0, "{status}");
    let o = c.hubvault(&["scrub", "--limit", "fast"]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("bad rate"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}
