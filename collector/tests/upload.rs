//! The upload and commit protocol, end to end with the real binaries on
//! loopback: a collector or agent killed (or the collector stopped by SIGTERM)
//! mid-upload and resumed, chunks compared across sites, site isolation, commit
//! checks and retries, per-agent stream caps, uploaded data leaving the spool.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod support;

use proto::limits::PROTOCOL;
use proto::pb;
use support::*;

#[test]
fn collector_killed_mid_upload_then_resumed_without_resending() {
    use integration_tests::fixture;
    let mut c = Collector::start();
    c.ok(&["site", "add", "paris"]);
    let tmp = tempfile::tempdir().expect("tmp");
    let paris = enrolled(&c, "paris", tmp.path());
    let src = tmp.path().join("src");
    // ~96 MiB of incompressible data: several upload batches (16 MiB each).
    fixture::build(&src, &fixture::bulk_tree(24, 4 * 1024 * 1024, 7)).expect("fixture");

    let up = Command::new(bin("hubvault-agent"))
        .args(["backup", "--source", "docs", "--state"])
        .arg(&paris)
        .arg(&src)
        .env_remove("RUST_BACKTRACE")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("backup");
    // Kill -9 the collector once its first batch is durable *and* held by
    // the site. A pack file alone is not enough: the kill could land after
    // its rename and before its catalog and holdings rows commit, and then
    // every blob is rightly sent again (seen once on a loaded CI machine).
    // A stream's batches are ingested one after the other, the next only
    // once the previous is committed and acknowledged, so a second pack
    // means the first batch is complete. Polled often: the whole upload
    // takes a fraction of a second.
    let start = Instant::now();
    while c.pack_count() < 2 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "timed out waiting for the second pack at the collector"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    c.child.kill().expect("kill -9");
    let _ = c.child.wait();
    let first = up.wait_with_output().expect("backup ends");
    assert!(!first.status.success(), "the cut upload fails loudly");

    // Restart on the same data directory and port; nothing partial is visible.
    c.restart();
    let snaps: Vec<serde_json::Value> =
        serde_json::from_str(&c.ok(&["snapshots", "--json"])).expect("json");
    assert!(snaps.is_empty(), "no snapshot from the cut upload");

    let second = agent_backup(&paris, &src);
    let err = String::from_utf8_lossy(&second.stderr).to_string();
    assert!(second.status.success(), "resumed backup: {err}");
    // "N files, M blobs new to this agent, K sent (B bytes)": fewer than all were sent again.
    let sent: u64 = number_before(&err, "sent", 1);
    let candidates: u64 = number_before(&err, "blobs", 1);
    assert!(sent < candidates + 1 && sent > 0, "{err}");
    // Sent again in all: less than the 96 MiB of (incompressible) content,
    // because what the first pack at the collector holds is not sent twice.
    let bytes: u64 = number_before(&err, "bytes)", 1);
    assert!(bytes < 96 << 20, "durable blobs were sent again: {err}");
    let snaps: Vec<serde_json::Value> =
        serde_json::from_str(&c.ok(&["snapshots", "--json"])).expect("json");
    assert_eq!(snaps.len(), 1);
}

/// DESIGN.md "Sites share storage, not knowledge": a chunk Paris stored is
/// sent once more by Lyon, compared byte for byte and stored once; a copy
/// whose bytes differ is refused (integrity event) and nothing is stored.
#[test]
fn a_chunk_another_site_stored_is_compared_and_stored_once() {
    use tokio_stream::StreamExt;
    let (c, tmp, paris, lyon) = paris_and_lyon();
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).expect("mkdir");
    let (one, two) = (
        b"shared report, first part".as_slice(),
        b"second part".as_slice(),
    );
    std::fs::write(src.join("one.txt"), one).expect("write");
    std::fs::write(src.join("two.txt"), two).expect("write");
    assert!(agent_backup(&paris, &src).status.success());
    let packs = c.pack_count();

    // Lyon seals the same plaintexts with its own keys: sealing is
    // deterministic, so these are the bytes Paris uploaded.
    let spool = open_spool(&lyon);
    // Enrollment gave the spool the collector's chunking (sizes and
    // normalisation) and zstd level: every agent cuts and seals alike.
    let central = repo_format::config::RepoConfig::load(
        &c.dir.path().join("data").join("repo").join("config"),
    )
    .expect("collector config");
    assert_eq!(spool.config().chunker, central.chunker);
    assert_eq!(spool.config().zstd_level, central.zstd_level);
    let keys = spool.keys().content().expect("content key");
    let mut sealer = repo_format::blob::Sealer::new(spool.config().zstd_level).expect("sealer");
    let mut msg = |plain: &[u8]| {
        let id = keys.id_of(plain);
        let sealed = sealer
            .seal(keys, repo_format::blob::BlobKind::Data, &id, plain)
            .expect("seal");
        pb::UploadRequest {
            protocol: PROTOCOL,
            blobs: vec![pb::UploadBlob {
                kind: 0,
                id: id.0.to_vec(),
                sealed,
                raw_length: plain.len() as u32,
            }],
        }
    };
    let same = msg(one);
    let mut tampered = msg(two);
    let last = tampered.blobs[0].sealed.len() - 1;
    tampered.blobs[0].sealed[last] ^= 1;
    drop(spool);

    rt().block_on(async {
        let ch = c
            .channel(Some((&lyon, "agent")))
            .await
            .expect("lyon connects");
        let mut l = pb::agent_service_client::AgentServiceClient::new(ch);
        let mut acks = l
            .upload(tokio_stream::iter(vec![same.clone()]))
            .await
            .expect("upload")
            .into_inner();
        let ack = acks.next().await.expect("an answer").expect("accepted");
        assert_eq!(ack.ids, vec![same.blobs[0].id.clone()]);

        let status = match l.upload(tokio_stream::iter(vec![tampered])).await {
            Err(s) => s,
            Ok(r) => r
                .into_inner()
                .next()
                .await
                .expect("an answer")
                .expect_err("a differing copy must be refused"),
        };
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
        assert!(status.message().contains("differs"), "{status:?}");
    });
    assert_eq!(
        c.pack_count(),
        packs,
        "the shared chunk was stored once, the bad copy not at all"
    );
}

/// Paris and Lyon enrolled, and Paris's backup of one small file done;
/// returns them with the snapshot's root tree and the file's chunk id
/// (read from Paris's own spool).
fn paris_backed_up_a_secret() -> (
    Collector,
    tempfile::TempDir,
    PathBuf,
    PathBuf,
    repo_format::Id,
    repo_format::Id,
) {
    let (c, tmp, paris, lyon) = paris_and_lyon();
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).expect("mkdir");
    std::fs::write(src.join("secret.txt"), b"paris only").expect("write");
    assert!(agent_backup(&paris, &src).status.success());
    let spool = open_spool(&paris);
    let (_, snap) = spool.find_snapshot("latest").expect("snap");
    let top = spool.read_tree(&snap.tree).expect("tree");
    let files = spool
        .read_tree(&top[0].subtree.expect("dir"))
        .expect("tree");
    let chunk = files[0].chunks[0];
    (c, tmp, paris, lyon, snap.tree, chunk)
}

/// A tree an agent crafts and uploads itself (the tree blob is stored: the
/// collector checks only that it opens to its id) cannot make a snapshot
/// of a chunk its site does not hold: the commit refuses it, and accepts a
/// tree whose chunk came in the same message.
#[test]
fn an_uploaded_tree_naming_a_chunk_the_site_lacks_does_not_commit() {
    let (c, _tmp, _paris, lyon, _root, paris_chunk) = paris_backed_up_a_secret();

    // Lyon seals a chunk of its own and two one-file trees: one naming its
    // chunk, one naming Paris's (which Lyon never uploaded).
    let spool = open_spool(&lyon);
    let keys = spool.keys();
    let content = keys.content().expect("content key");
    let mut sealer = repo_format::blob::Sealer::new(spool.config().zstd_level).expect("sealer");
    let plain = b"lyon's own bytes".to_vec();
    let own_chunk = content.id_of(&plain);
    let chunk_blob = pb::UploadBlob {
        kind: 0,
        id: own_chunk.0.to_vec(),
        sealed: sealer
            .seal(
                content,
                repo_format::blob::BlobKind::Data,
                &own_chunk,
                &plain,
            )
            .expect("seal"),
        raw_length: plain.len() as u32,
    };
    let tree_of = |chunk: repo_format::Id| {
        let mut e =
            repo_format::tree::Entry::new(b"f.txt".to_vec(), repo_format::tree::EntryKind::File);
        e.mode = 0o644;
        e.size = plain.len() as u64;
        e.chunks = vec![chunk];
        crafted_tree(&spool, &[e])
    };
    let (good, good_blob) = tree_of(own_chunk);
    let (bad, bad_blob) = tree_of(paris_chunk);
    drop(spool);

    rt().block_on(async {
        use tokio_stream::StreamExt;
        let ch = c.channel(Some((&lyon, "agent"))).await.expect("connects");
        let mut l = pb::agent_service_client::AgentServiceClient::new(ch);
        let sent = pb::UploadRequest {
            protocol: PROTOCOL,
            blobs: vec![chunk_blob, good_blob, bad_blob],
        };
        let acks: Vec<pb::UploadAck> = l
            .upload(tokio_stream::iter(vec![sent]))
            .await
            .expect("upload")
            .into_inner()
            .map(|a| a.expect("ack"))
            .collect()
            .await;
        let n: usize = acks.iter().map(|a| a.ids.len()).sum();
        assert_eq!(n, 3, "all three stored and acknowledged");
        let e = commit_root(&l, bad, 1)
            .await
            .expect_err("a chunk Lyon lacks");
        assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
        assert!(e.message().contains("not uploaded by this site"), "{e:?}");
        commit_root(&l, good, 2)
            .await
            .expect("Lyon's own tree commits");
    });
}

/// A snapshot whose trees name one subtree twice at every level (T_k =
/// {a: T_k-1, b: T_k-1}) is checked at commit one distinct tree at a time.
/// At 10 levels (a few thousand paths) it commits. At 40 levels (2^40 paths
/// from 41 small trees) it is refused, at once, as expanding past
/// `MAX_SNAPSHOT_ENTRIES`: walked path by path, as the first commit check
/// did, it would not finish in any time, and committed, every `ls`, check
/// and restore of it would walk 2^40 paths.
#[test]
fn a_commit_naming_one_subtree_many_times_is_counted_once_per_tree_and_bounded() {
    let (c, tmp, _paris, lyon) = paris_and_lyon();
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).expect("mkdir");
    std::fs::write(src.join("f.txt"), b"lyon").expect("write");
    assert!(agent_backup(&lyon, &src).status.success());
    let spool = open_spool(&lyon);
    let (_, snap) = spool.find_snapshot("latest").expect("snap");
    // The backed-up tree (known to the site) is the bottom level.
    let mut below = snap.tree;
    let mut blobs = Vec::new();
    let mut level_10 = below;
    for level in 1..=40 {
        let dir = |name: &[u8]| {
            let mut e =
                repo_format::tree::Entry::new(name.to_vec(), repo_format::tree::EntryKind::Dir);
            e.mode = 0o755;
            e.subtree = Some(below);
            e
        };
        let (id, blob) = crafted_tree(&spool, &[dir(b"a"), dir(b"b")]);
        blobs.push(blob);
        below = id;
        if level == 10 {
            level_10 = id;
        }
    }
    drop(spool);
    let before = c.snapshot_ids().len();
    rt().block_on(async {
        use tokio_stream::StreamExt;
        let ch = c.channel(Some((&lyon, "agent"))).await.expect("connects");
        let mut l = pb::agent_service_client::AgentServiceClient::new(ch);
        let sent = pb::UploadRequest {
            protocol: PROTOCOL,
            blobs,
        };
        let acks: Vec<pb::UploadAck> = l
            .upload(tokio_stream::iter(vec![sent]))
            .await
            .expect("upload")
            .into_inner()
            .map(|a| a.expect("ack"))
            .collect()
            .await;
        assert_eq!(acks.iter().map(|a| a.ids.len()).sum::<usize>(), 40);
        commit_root(&l, level_10, 6)
            .await
            .expect("10 levels: every tree and chunk is the site's, it commits");
        // A bound for a hang, not a speed assertion: the check takes
        // milliseconds; path by path it would take longer than the universe.
        let e = tokio::time::timeout(Duration::from_secs(60), commit_root(&l, below, 7))
            .await
            .expect("the commit check finishes")
            .expect_err("2^40 paths are refused");
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains("expands to more than"), "{e:?}");
    });
    assert_eq!(
        c.snapshot_ids().len(),
        before + 1,
        "the 10-level snapshot, not the refused one"
    );
}

/// An agent may hold a bounded number of blob-read streams open: one that
/// opens many and reads none of them gets `RESOURCE_EXHAUSTED` past the
/// cap (each open stream holds only its own few MiB at the collector), and
/// a stream it gives up frees its slot.
#[test]
fn one_agent_gets_a_bounded_number_of_read_streams() {
    let (c, tmp, _paris, lyon) = paris_and_lyon();
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).expect("mkdir");
    let mut big = vec![0u8; 3 << 20];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for b in big.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    std::fs::write(src.join("big.bin"), &big).expect("write");
    assert!(agent_backup(&lyon, &src).status.success());
    let spool = open_spool(&lyon);
    let (_, snap) = spool.find_snapshot("latest").expect("snap");
    let top = spool.read_tree(&snap.tree).expect("tree");
    let files = spool
        .read_tree(&top[0].subtree.expect("dir"))
        .expect("tree");
    let chunk = files[0].chunks[0];
    drop(spool);
    rt().block_on(async {
        let ch = c.channel(Some((&lyon, "agent"))).await.expect("connects");
        let l = pb::agent_service_client::AgentServiceClient::new(ch);
        // Each asks for the same ~1 MiB chunk 4096 times and is never read.
        let open = |l: &pb::agent_service_client::AgentServiceClient<tonic::transport::Channel>| {
            let mut l = l.clone();
            async move {
                l.read_blobs(pb::ReadBlobsRequest {
                    protocol: PROTOCOL,
                    job_id: 0,
                    ids: vec![chunk.0.to_vec(); 4096],
                })
                .await
            }
        };
        let mut held = Vec::new();
        for i in 0..collector::reads::MAX_READ_STREAMS {
            held.push(
                open(&l)
                    .await
                    .unwrap_or_else(|e| panic!("stream {i}: {e:?}")),
            );
        }
        let refused = open(&l).await.expect_err("one stream over the cap");
        assert_eq!(
            refused.code(),
            tonic::Code::ResourceExhausted,
            "{refused:?}"
        );
        assert!(
            refused.message().contains("read streams open"),
            "{refused:?}"
        );
        // Reading one shows the streams serve; giving it up frees a slot.
        let mut first = held.remove(0).into_inner();
        let b = first.message().await.expect("read").expect("a blob");
        assert_eq!(b.id, chunk.0.to_vec());
        drop(first);
        // The slot goes when the collector's side of the stream sees the
        // stream gone: soon, not at once.
        let start = Instant::now();
        let again = loop {
            match open(&l).await {
                Ok(s) => break s,
                Err(e) => assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}"),
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "the slot of a dropped stream was never freed"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        drop((again, held));
    });
}

/// A retried commit returns the same snapshot, also after the collector
/// was killed (-9) and restarted between the tries; one snapshot is made,
/// timed by the collector's clock.
#[test]
fn a_retried_commit_returns_the_same_snapshot_across_a_collector_crash() {
    let (mut c, tmp, _paris, lyon) = paris_and_lyon();
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).expect("mkdir");
    std::fs::write(src.join("f.txt"), b"lyon").expect("write");
    assert!(agent_backup(&lyon, &src).status.success());
    let (_, snap) = open_spool(&lyon).find_snapshot("latest").expect("snap");
    let before_ids = c.snapshot_ids();
    let commit = |c: &Collector| {
        let lyon = lyon.clone();
        rt().block_on(async {
            let ch = c.channel(Some((&lyon, "agent"))).await.expect("connects");
            pb::agent_service_client::AgentServiceClient::new(ch)
                .commit_snapshot(pb::CommitSnapshotRequest {
                    protocol: PROTOCOL,
                    idempotency_key: vec![42; 16],
                    source: "retried".into(),
                    root_tree: snap.tree.0.to_vec(),
                    ..Default::default()
                })
                .await
                .expect("commit")
                .into_inner()
        })
    };
    let now_ns = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_nanos() as i64
    };
    let t0 = now_ns();
    let first = commit(&c);
    let t1 = now_ns();
    assert!(
        (t0..=t1).contains(&first.time_ns),
        "the snapshot's time is the collector's, at the commit"
    );
    let second = commit(&c);
    c.child.kill().expect("kill -9");
    let _ = c.child.wait();
    c.restart();
    let third = commit(&c);
    for again in [&second, &third] {
        assert_eq!(again.snapshot_id, first.snapshot_id);
        assert_eq!(again.time_ns, first.time_ns);
    }
    let after_ids = c.snapshot_ids();
    assert_eq!(after_ids.len(), before_ids.len() + 1, "{after_ids:?}");
    c.check_repo();
}

#[test]
fn sites_are_isolated_and_commits_are_verified() {
    let (c, _tmp, _paris, lyon, root, chunk) = paris_backed_up_a_secret();
    let unknown = repo_format::Id([0x5a; 32]);

    rt().block_on(async {
        let ch = c
            .channel(Some((&lyon, "agent")))
            .await
            .expect("lyon connects");
        let mut l = pb::agent_service_client::AgentServiceClient::new(ch);
        // No dedup oracle: Paris's chunk and a chunk that exists nowhere get the same answer.
        let m = l
            .missing_blobs(pb::MissingBlobsRequest {
                protocol: PROTOCOL,
                ids: vec![chunk.0.to_vec(), unknown.0.to_vec()],
            })
            .await
            .expect("missing")
            .into_inner();
        assert_eq!(m.missing, vec![chunk.0.to_vec(), unknown.0.to_vec()]);
        // No reads outside its site and jobs, and the same error either way.
        let read = |id: repo_format::Id| {
            let mut l = l.clone();
            async move {
                match l
                    .read_blobs(pb::ReadBlobsRequest {
                        protocol: PROTOCOL,
                        job_id: 0,
                        ids: vec![id.0.to_vec()],
                    })
                    .await
                {
                    Err(s) => s,
                    Ok(r) => {
                        let mut s = r.into_inner();
                        use tokio_stream::StreamExt;
                        match s.next().await {
                            Some(Err(e)) => e,
                            other => panic!("read of a foreign blob must fail, got {other:?}"),
                        }
                    }
                }
            }
        };
        let a = read(chunk).await;
        let b = read(unknown).await;
        assert_eq!(a.code(), tonic::Code::NotFound);
        assert_eq!(b.code(), tonic::Code::NotFound);
        assert_eq!(
            a.message().len(),
            b.message().len(),
            "identical answers: {a:?} / {b:?}"
        );
        // A commit referencing a tree Lyon never uploaded is refused.
        let e = l
            .commit_snapshot(pb::CommitSnapshotRequest {
                protocol: PROTOCOL,
                idempotency_key: vec![1; 16],
                source: "x".into(),
                root_tree: root.0.to_vec(),
                ..Default::default()
            })
            .await
            .expect_err("foreign tree");
        assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
        // An oversized message is cut off by the decoding limit, clearly.
        let big = pb::UploadRequest {
            protocol: PROTOCOL,
            blobs: vec![pb::UploadBlob {
                kind: 0,
                id: vec![0; 32],
                sealed: vec![0; 17 * 1024 * 1024],
                raw_length: 1,
            }],
        };
        let r = l.upload(tokio_stream::iter(vec![big])).await;
        let status = match r {
            Err(s) => s,
            Ok(resp) => {
                use tokio_stream::StreamExt;
                let mut s = resp.into_inner();
                s.next().await.expect("an answer").expect_err("oversized")
            }
        };
        assert!(
            matches!(
                status.code(),
                tonic::Code::OutOfRange
                    | tonic::Code::ResourceExhausted
                    | tonic::Code::InvalidArgument
                    | tonic::Code::Internal
            ),
            "{status:?}"
        );
        // A message with no blob, and one whose second blob is malformed,
        // are refused as invalid.
        let empty = pb::UploadRequest {
            protocol: PROTOCOL,
            blobs: Vec::new(),
        };
        let bad = pb::UploadRequest {
            protocol: PROTOCOL,
            blobs: [32, 31]
                .map(|len| pb::UploadBlob {
                    kind: 0,
                    id: vec![7; len],
                    sealed: vec![7; 64],
                    raw_length: 40,
                })
                .to_vec(),
        };
        for (what, m) in [("empty", empty), ("short id", bad)] {
            let status = match l.upload(tokio_stream::iter(vec![m])).await {
                Err(s) => s,
                Ok(r) => {
                    use tokio_stream::StreamExt;
                    let mut s = r.into_inner();
                    s.next().await.expect("an answer").expect_err(what)
                }
            };
            assert_eq!(
                status.code(),
                tonic::Code::InvalidArgument,
                "{what}: {status:?}"
            );
        }
    });
    let snaps: Vec<serde_json::Value> =
        serde_json::from_str(&c.ok(&["snapshots", "--site", "lyon", "--json"])).expect("json");
    assert!(snaps.is_empty(), "nothing was committed for lyon");
}

#[test]
fn agent_killed_mid_upload_resumes_without_resending() {
    use integration_tests::fixture;
    let c = Collector::start();
    c.ok(&["site", "add", "brest"]);
    let tmp = tempfile::tempdir().expect("tmp");
    let state = enrolled(&c, "brest", tmp.path());
    let src = tmp.path().join("src");
    fixture::build(&src, &fixture::bulk_tree(24, 4 * 1024 * 1024, 9)).expect("fixture");
    let mut up = Command::new(bin("hubvault-agent"))
        .args(["backup", "--source", "docs", "--state"])
        .arg(&state)
        .arg(&src)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("backup");
    wait_for("first pack at the collector", || c.pack_count() >= 1);
    up.kill().expect("kill -9 the agent");
    let _ = up.wait();
    let snaps: Vec<serde_json::Value> =
        serde_json::from_str(&c.ok(&["snapshots", "--json"])).expect("json");
    assert!(snaps.is_empty(), "no snapshot from the killed agent");
    let again = agent_backup(&state, &src);
    let err = String::from_utf8_lossy(&again.stderr).to_string();
    assert!(again.status.success(), "{err}");
    // "N files, M blobs new to this agent, K sent": of the M blobs the
    // agent had not yet seen acknowledged, those the collector holds (its
    // first pack at least, finished after the agent died) are not sent.
    // (Comparing with 24 × 4 was vacuous: 24 files of 4 MiB make ~93 chunks.)
    let sent: u64 = number_before(&err, "sent", 1);
    let candidates: u64 = number_before(&err, "blobs", 1);
    assert!(
        sent < candidates,
        "acknowledged blobs were not sent again: {err}"
    );
    let snaps: Vec<serde_json::Value> =
        serde_json::from_str(&c.ok(&["snapshots", "--json"])).expect("json");
    assert_eq!(snaps.len(), 1);
}

#[test]
fn sigterm_mid_upload_shuts_down_cleanly_and_the_agent_resumes() {
    use integration_tests::fixture;
    let mut c = Collector::start();
    c.ok(&["site", "add", "caen"]);
    let tmp = tempfile::tempdir().expect("tmp");
    let state = enrolled(&c, "caen", tmp.path());
    let src = tmp.path().join("src");
    fixture::build(&src, &fixture::bulk_tree(24, 4 * 1024 * 1024, 21)).expect("fixture");
    let up = Command::new(bin("hubvault-agent"))
        .args(["backup", "--source", "docs", "--state"])
        .arg(&state)
        .arg(&src)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("backup");
    wait_for("first pack at the collector", || c.pack_count() >= 1);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(c.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    let start = Instant::now();
    let exit = loop {
        if let Some(s) = c.child.try_wait().expect("wait") {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "collector did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(exit.success(), "graceful shutdown exits 0, got {exit:?}");
    let _ = up.wait_with_output();

    // Restart: the repository is consistent and nothing partial is visible.
    c.restart();
    assert!(
        c.snapshot_ids().len() <= 1,
        "at most the one snapshot, complete if present"
    );
    let again = agent_backup(&state, &src);
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    c.check_repo();
}

/// Bytes of the files below `dir`.
fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("ls").flatten() {
            let m = e.metadata().expect("stat");
            if m.is_dir() {
                stack.push(e.path());
            } else {
                total += m.len();
            }
        }
    }
    total
}

#[test]
fn uploaded_data_leaves_the_spool_and_restores_still_work() {
    use integration_tests::{compare, fixture};
    let c = Collector::start();
    c.ok(&["site", "add", "rouen"]);
    let tmp = tempfile::tempdir().expect("tmp");
    let state = enrolled(&c, "rouen", tmp.path());
    let src = tmp.path().join("src");
    // 12 MiB of incompressible data in 6 files.
    fixture::build(&src, &fixture::bulk_tree(6, 2 * 1024 * 1024, 21)).expect("fixture");
    let o = agent_backup(&state, &src);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let spool = dir_bytes(&state.join("spool").join("packs"));
    assert!(
        spool < 1024 * 1024,
        "only trees stay in the spool once uploaded: {spool} bytes"
    );
    // Each data pack went whole, was marked uploaded and then dropped: its
    // rows stay (a backup still finds its chunks), and the acknowledged set
    // holds the trees alone, not a row per chunk.
    {
        let r = open_spool(&state);
        let cat = r.catalog().expect("catalog");
        let kept = cat
            .packs_only_of(repo_format::blob::BlobKind::Data)
            .expect("data packs");
        assert!(kept.is_empty(), "data packs left: {kept:?}");
        let blobs = cat.blob_count().expect("count");
        let acked: u64 = rusqlite::Connection::open(state.join("acked.db"))
            .expect("acked.db")
            .query_row("SELECT count(*) FROM acked", [], |r| r.get(0))
            .expect("count acked");
        assert!(
            blobs >= 8 && acked <= 3,
            "{blobs} blobs catalogued, {acked} acknowledged one by one"
        );
    }

    // Append to one file: its unchanged chunks (dropped from the spool) are
    // neither stored nor sent again.
    let victim = std::fs::read_dir(&src)
        .expect("ls")
        .flatten()
        .find(|e| e.path().is_file())
        .expect("a file")
        .path();
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&victim)
        .expect("open");
    std::io::Write::write_all(&mut f, &[7u8; 100_000]).expect("append");
    drop(f);
    let o = agent_backup(&state, &src);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "{err}");
    // At most the changed file's chunks (it is 2 MiB + 100 kB of 12 MiB).
    let bytes: u64 = number_before(&err, "bytes)", 1);
    assert!(
        bytes < 2 * 1024 * 1024 + 200_000,
        "only the changed file's tail was sent: {err}"
    );
    assert!(dir_bytes(&state.join("spool").join("packs")) < 1024 * 1024);

    // The agent restores its own latest snapshot. What it dropped from the
    // spool is still in its own files, but one file changed since the
    // backup (same size and mtime, other bytes): that chunk is not trusted
    // and is pulled, the rest is taken locally, and the restore is the
    // snapshot's, bit for bit.
    let pristine = tmp.path().join("pristine");
    let cp = Command::new("cp")
        .arg("-a")
        .arg(&src)
        .arg(&pristine)
        .status()
        .expect("cp");
    assert!(cp.success());
    let mtime = std::fs::metadata(&victim)
        .expect("stat")
        .modified()
        .expect("mtime");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&victim)
        .expect("open");
    std::os::unix::fs::FileExt::write_all_at(&f, &[0x5a; 4096], 0).expect("overwrite");
    f.set_modified(mtime).expect("keep mtime");
    drop(f);
    let _agent = KillOnDrop(spawn_agent(&state));
    let id = c.online_agent("rouen");
    let snap = c.snapshot_ids().last().expect("snapshots").clone(); // oldest first
    let target = tmp.path().join("restored");
    let jobs = c.restore_job(&snap, &id, &target);
    compare::assert_same_tree(&pristine, &target.join("src"));
    let pulled: u64 = number_before(&jobs, "pulled,", 2);
    let local: u64 = number_before(&jobs, "chunks", 1);
    assert!(
        (1..=2).contains(&pulled),
        "only the changed chunk was pulled: {jobs}"
    );
    assert!(
        local >= 8,
        "the rest came from the agent's own files: {jobs}"
    );
}

#[test]
fn a_blob_sent_twice_in_one_stream_is_acknowledged_twice_and_stored_once() {
    let c = Collector::start();
    c.ok(&["site", "add", "caen"]);
    let tmp = tempfile::tempdir().expect("tmp");
    let state = enrolled(&c, "caen", tmp.path());
    let packs_before = c.pack_count();
    rt().block_on(async {
        let ch = c.channel(Some((&state, "agent"))).await.expect("connects");
        let mut a = pb::agent_service_client::AgentServiceClient::new(ch);
        // Data blobs are opaque to the collector (content-blind): any sealed
        // bytes of a plausible length are stored as they are.
        let blob = |n: u8| pb::UploadBlob {
            kind: 0,
            id: vec![n; 32],
            sealed: vec![n; 64],
            raw_length: 40,
        };
        let message = |blobs| pb::UploadRequest {
            protocol: PROTOCOL,
            blobs,
        };
        // Repeats within one message and across messages.
        let sent = vec![
            message(vec![blob(1), blob(2), blob(1)]),
            message(vec![blob(1)]),
        ];
        let resp = a
            .upload(tokio_stream::iter(sent))
            .await
            .expect("upload")
            .into_inner();
        use tokio_stream::StreamExt;
        let acks: Vec<pb::UploadAck> = resp.map(|r| r.expect("ack")).collect().await;
        let ids: Vec<Vec<u8>> = acks.into_iter().flat_map(|a| a.ids).collect();
        assert_eq!(ids.len(), 4, "every copy is acknowledged: {ids:?}");
        assert_eq!(ids.iter().filter(|i| i[0] == 1).count(), 3);
    });
    assert_eq!(c.pack_count(), packs_before + 1, "stored once, in one pack");
}

#[test]
fn one_agent_gets_a_bounded_number_of_upload_streams_and_bytes_in_flight() {
    use tokio_stream::StreamExt;
    let c = Collector::start();
    c.ok(&["site", "add", "nantes"]);
    let tmp = tempfile::tempdir().expect("tmp");
    let state = enrolled(&c, "nantes", tmp.path());
    rt().block_on(async {
        let ch = c.channel(Some((&state, "agent"))).await.expect("connects");
        let a = pb::agent_service_client::AgentServiceClient::new(ch);
        // 16 streams held open (nothing sent yet): the 17th is refused.
        let mut held = Vec::new();
        let mut senders = Vec::new();
        for _ in 0..16 {
            let (tx, rx) = tokio::sync::mpsc::channel::<pb::UploadRequest>(1);
            let resp = a
                .clone()
                .upload(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
                .expect("under the cap");
            held.push(resp);
            senders.push(tx);
        }
        let (_tx, rx) = tokio::sync::mpsc::channel::<pb::UploadRequest>(1);
        let err = a
            .clone()
            .upload(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .expect_err("over the cap");
        assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err}");
        assert!(err.message().contains("upload streams open"), "{err}");
        // End the held streams and read each response to its end: the
        // collector gives a stream's slot back before it ends the response.
        drop(senders);
        for h in held {
            let _: Vec<_> = h.into_inner().collect().await;
        }

        // Four streams at once, 40 MiB each: more than the agent's 96 MiB
        // budget in all. Each waits its turn for room; none deadlocks, and
        // every blob is acknowledged.
        let mut tasks = Vec::new();
        for s in 0..4u8 {
            let mut a = a.clone();
            tasks.push(tokio::spawn(async move {
                let blobs = (0..10u8).map(move |i| pb::UploadRequest {
                    protocol: PROTOCOL,
                    blobs: vec![pb::UploadBlob {
                        kind: 0,
                        id: vec![s * 16 + i; 32],
                        sealed: vec![i; 4 * 1024 * 1024],
                        raw_length: 4 * 1024 * 1024 - 40,
                    }],
                });
                let resp = a
                    .upload(tokio_stream::iter(blobs))
                    .await
                    .expect("upload")
                    .into_inner();
                let acks: Vec<pb::UploadAck> = resp.map(|r| r.expect("ack")).collect().await;
                acks.into_iter().map(|a| a.ids.len()).sum::<usize>()
            }));
        }
        for t in tasks {
            let acked = tokio::time::timeout(Duration::from_secs(120), t)
                .await
                .expect("no deadlock")
                .expect("task");
            assert_eq!(acked, 10);
        }
    });
}
