//! Who gets in, end to end with the real `hubvault-collector`, `hubvault-agent`
//! and `hubvault` binaries on loopback: enrollment and its tokens, hostile CSRs,
//! certificates refused at the door (none, rogue CA, flawed), revocation,
//! renewal, per-client connection caps, and an agent refused every admin call.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod support;

use proto::limits::PROTOCOL;
use proto::pb;
use support::*;

#[test]
fn enroll_once_then_online_then_revoked_everywhere() {
    let c = Collector::start();
    c.ok(&["site", "add", "paris"]);
    let tok = c.token("paris");
    let tmp = tempfile::tempdir().expect("tmp");
    let state = tmp.path().join("agent");
    let o = c.enroll(&tok, &state);
    assert!(
        o.status.success(),
        "enroll: {}",
        String::from_utf8_lossy(&o.stderr)
    );

    // The token works once.
    let again = c.enroll(&tok, &tmp.path().join("agent2"));
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already used"));

    // The agent's certificate holds only what the collector chose.
    let pem = std::fs::read(state.join("agent.pem")).expect("agent.pem");
    let (_, p) = x509_parser::pem::parse_x509_pem(&pem).expect("pem");
    let cert = p.parse_x509().expect("x509");
    assert!(!cert.is_ca());
    let life = cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
    assert!(life <= 8 * 86400, "short-lived certificate, got {life} s");

    let mut agent = Command::new(bin("hubvault-agent"))
        .args(["run", "--heartbeat-secs", "1", "--state"])
        .arg(&state)
        .env_remove("RUST_BACKTRACE")
        .stderr(Stdio::piped())
        .spawn()
        .expect("agent run");
    wait_for("agent online", || {
        c.agents().first().is_some_and(|a| a["online"] == true)
    });
    let status = c.ok(&["status", "--json"]);
    assert!(status.contains("\"agents_online\": 1"), "{status}");

    let id = c.agents()[0]["id"].as_str().expect("id").to_string();
    let rt = rt();
    rt.block_on(async {
        // A connection opened before the revocation...
        let ch = c
            .channel(Some((&state, "agent")))
            .await
            .expect("agent connects");
        let mut client = pb::agent_service_client::AgentServiceClient::new(ch);
        client
            .missing_blobs(pb::MissingBlobsRequest {
                protocol: PROTOCOL,
                ids: vec![],
            })
            .await
            .expect("calls work before the revocation");

        c.ok(&["agent", "revoke", &id]);

        // ...is refused on its very next call,
        let after = client
            .missing_blobs(pb::MissingBlobsRequest {
                protocol: PROTOCOL,
                ids: vec![],
            })
            .await
            .expect_err("revoked");
        assert_eq!(after.code(), tonic::Code::PermissionDenied, "{after:?}");
        // and a new connection fails its handshake (reported on first use with TLS 1.3).
        let fresh = match c.channel(Some((&state, "agent"))).await {
            Err(_) => true,
            Ok(ch) => pb::agent_service_client::AgentServiceClient::new(ch)
                .missing_blobs(pb::MissingBlobsRequest {
                    protocol: PROTOCOL,
                    ids: vec![],
                })
                .await
                .is_err_and(|s| s.code() != tonic::Code::PermissionDenied),
        };
        assert!(
            fresh,
            "a new handshake with a revoked certificate must fail"
        );
    });

    // The live control stream was closed and the agent stopped.
    let start = Instant::now();
    let code = loop {
        if let Some(s) = agent.try_wait().expect("wait") {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "agent kept running after revocation"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(!code.success());
    let mut err = String::new();
    std::io::Read::read_to_string(&mut agent.stderr.take().expect("stderr"), &mut err)
        .expect("read");
    assert!(err.contains("revoked"), "{err}");
    assert_eq!(c.agents()[0]["revoked"], true);
}

#[test]
fn callers_without_a_valid_certificate_are_refused() {
    let c = Collector::start();
    let rt = rt();
    rt.block_on(async {
        // No certificate at all: TLS lets it through (enrollment needs that), the call does not.
        let ch = c.channel(None).await.expect("anonymous TLS");
        let e = pb::admin_service_client::AdminServiceClient::new(ch)
            .list_agents(pb::ListAgentsRequest { protocol: PROTOCOL })
            .await
            .expect_err("no certificate");
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");

        // A certificate from another CA claiming to be the admin.
        let rogue = tempfile::tempdir().expect("tmp");
        let ca_key = rcgen::KeyPair::generate().expect("key");
        let mut ca_p = rcgen::CertificateParams::new(Vec::<String>::new()).expect("p");
        ca_p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_p.distinguished_name
            .push(rcgen::DnType::CommonName, "hubvault collector CA");
        let issuer = rcgen::Issuer::new(ca_p, ca_key);
        let key = rcgen::KeyPair::generate().expect("key");
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).expect("p");
        p.subject_alt_names = vec![rcgen::SanType::URI(
            "urn:hubvault:admin:admin".try_into().expect("uri"),
        )];
        p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let cert = p.signed_by(&key, &issuer).expect("sign");
        std::fs::write(rogue.path().join("rogue.pem"), cert.pem()).expect("w");
        std::fs::write(rogue.path().join("rogue.key"), key.serialize_pem()).expect("w");
        let refused = match c.channel(Some((rogue.path(), "rogue"))).await {
            Err(_) => true,
            Ok(ch) => pb::admin_service_client::AdminServiceClient::new(ch)
                .list_agents(pb::ListAgentsRequest { protocol: PROTOCOL })
                .await
                .is_err(),
        };
        assert!(refused, "a certificate from a rogue CA must be refused");

        // The real admin works, and the wrong protocol version is refused clearly.
        let ch = c
            .channel(Some((&c.admin_dir(), "admin")))
            .await
            .expect("admin");
        let mut admin = pb::admin_service_client::AdminServiceClient::new(ch);
        admin
            .list_agents(pb::ListAgentsRequest { protocol: PROTOCOL })
            .await
            .expect("admin call");
        let e = admin
            .list_agents(pb::ListAgentsRequest { protocol: 99 })
            .await
            .expect_err("v99");
        assert_eq!(e.code(), tonic::Code::FailedPrecondition);
        // An admin certificate is not an agent certificate.
        let e = pb::agent_service_client::AgentServiceClient::new(
            c.channel(Some((&c.admin_dir(), "admin")))
                .await
                .expect("ch"),
        )
        .missing_blobs(pb::MissingBlobsRequest {
            protocol: PROTOCOL,
            ids: vec![],
        })
        .await
        .expect_err("wrong role");
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
    });
}

/// One client cannot pile up connections: past its cap (per identity; for
/// connections without a certificate, per source address and for all
/// together) a new connection is closed at once, other clients are
/// unaffected, and a place comes back when a connection ends.
#[test]
fn connections_beyond_a_clients_cap_are_closed() {
    use collector::admission::{MAX_ANONYMOUS, MAX_ANONYMOUS_PER_ADDRESS, MAX_PER_ADMIN};
    let c = Collector::start();
    let rt = rt();
    rt.block_on(async {
        // A call that needs a live connection; the interceptor answers
        // Unauthenticated to anonymous callers, the admin gets a list.
        async fn call(ch: tonic::transport::Channel) -> Result<(), tonic::Status> {
            pb::admin_service_client::AdminServiceClient::new(ch)
                .list_agents(pb::ListAgentsRequest { protocol: PROTOCOL })
                .await
                .map(drop)
        }
        // A connection closed by the collector fails the call with whatever
        // code the transport error maps to (Unavailable, Unknown, Internal,
        // Cancelled, depending on when the close lands), so "refused" is
        // judged by the absence of the answer an admitted connection gets:
        // Unauthenticated for an anonymous caller, a list for the admin.
        let from = |i: usize| std::net::IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 1 + i as u8));
        let refused =
            |r: Result<(), String>| !matches!(&r, Err(e) if e.starts_with("Unauthenticated"));
        let c = &c;
        let try_anonymous = |addr| async move {
            match c.anonymous_channel_from(addr).await {
                Err(e) => Err(format!("connect: {e}")),
                Ok(ch) => call(ch)
                    .await
                    .map_err(|e| format!("{:?}: {}", e.code(), e.message())),
            }
        };
        // One address: its share of the anonymous pool, and no more.
        let mut anon = Vec::new();
        for i in 0..MAX_ANONYMOUS_PER_ADDRESS {
            let ch = c
                .anonymous_channel_from(from(0))
                .await
                .expect("anonymous TLS");
            let r = call(ch.clone()).await;
            assert_eq!(
                r.as_ref().map_err(|e| e.code()),
                Err(tonic::Code::Unauthenticated),
                "anonymous {i}"
            );
            anon.push(ch);
        }
        let extra = try_anonymous(from(0)).await;
        assert!(
            refused(extra.clone()),
            "address 0 over its share must be refused, got {extra:?}"
        );
        // Other addresses fill the pool; past it, any address is refused.
        for i in MAX_ANONYMOUS_PER_ADDRESS..MAX_ANONYMOUS {
            let addr = from(i / MAX_ANONYMOUS_PER_ADDRESS);
            let ch = c.anonymous_channel_from(addr).await.expect("anonymous TLS");
            let r = call(ch.clone()).await;
            assert_eq!(
                r.as_ref().map_err(|e| e.code()),
                Err(tonic::Code::Unauthenticated),
                "anonymous {i}"
            );
            anon.push(ch);
        }
        let fresh = from(MAX_ANONYMOUS / MAX_ANONYMOUS_PER_ADDRESS);
        let extra = try_anonymous(fresh).await;
        assert!(
            refused(extra.clone()),
            "anonymous connection {MAX_ANONYMOUS} must be refused, got {extra:?}"
        );

        // The admin has its own allowance, full to its cap and no further.
        let admin_dir = c.admin_dir();
        let mut admins = Vec::new();
        for i in 0..MAX_PER_ADMIN {
            let ch = c.channel(Some((&admin_dir, "admin"))).await.expect("admin");
            call(ch.clone())
                .await
                .unwrap_or_else(|e| panic!("admin {i}: {e:?}"));
            admins.push(ch);
        }
        let extra = match c.channel(Some((&admin_dir, "admin"))).await {
            Err(e) => Err(tonic::Status::unavailable(format!("connect: {e}"))),
            Ok(ch) => call(ch).await,
        };
        assert!(
            extra.is_err(),
            "admin connection {MAX_PER_ADMIN} must be refused"
        );

        // Connections that end give their places back.
        drop(anon);
        drop(admins);
        wait_for_async("an admin connection to be admitted again", || async {
            match c.channel(Some((&admin_dir, "admin"))).await {
                Ok(ch) => call(ch).await.is_ok(),
                Err(_) => false,
            }
        })
        .await;
        // The anonymous places come back too (each when the collector sees
        // its connection close, in no set order).
        wait_for_async("an anonymous connection to be admitted again", || async {
            match c.anonymous_channel_from(from(0)).await {
                Ok(ch) => {
                    matches!(call(ch).await, Err(e) if e.code() == tonic::Code::Unauthenticated)
                }
                Err(_) => false,
            }
        })
        .await;
    });
}

/// An agent enrolling while its address holds its whole share of
/// certificate-less connections (many agents enrolling at once behind one
/// NAT) is refused at first, tries again, and enrolls once a place is free.
#[test]
fn enrollment_tries_again_when_its_address_is_at_its_cap() {
    use collector::admission::MAX_ANONYMOUS_PER_ADDRESS;
    let c = Collector::start();
    c.ok(&["site", "add", "brest"]);
    let token = c.token("brest");
    let tmp = tempfile::tempdir().expect("tmp");
    let state = tmp.path().join("agent");
    let rt = rt();
    let held: Vec<_> = rt.block_on(async {
        let mut held = Vec::new();
        for _ in 0..MAX_ANONYMOUS_PER_ADDRESS {
            let ch = c
                .anonymous_channel_from(std::net::Ipv4Addr::LOCALHOST.into())
                .await
                .expect("anonymous TLS");
            // A call proves the connection was admitted (and holds its place).
            let r = pb::admin_service_client::AdminServiceClient::new(ch.clone())
                .list_agents(pb::ListAgentsRequest { protocol: PROTOCOL })
                .await;
            assert_eq!(
                r.map(drop).map_err(|e| e.code()),
                Err(tonic::Code::Unauthenticated)
            );
            held.push(ch);
        }
        held
    });
    let enroll = std::thread::scope(|s| {
        let e = s.spawn(|| c.enroll(&token, &state));
        std::thread::sleep(Duration::from_millis(1500));
        // Closed on the runtime that runs their connections.
        rt.block_on(async {
            drop(held);
            tokio::time::sleep(Duration::from_millis(200)).await;
        });
        e.join().expect("enroll thread")
    });
    let err = String::from_utf8_lossy(&enroll.stderr).to_string();
    assert!(enroll.status.success(), "enroll after a retry: {err}");
    assert!(
        err.contains("trying again"),
        "the first attempt was refused: {err}"
    );
    assert_eq!(c.agents().len(), 1);
}

/// Poll `cond` until it holds (60 s at most: CI machines are slow and shared).
async fn wait_for_async<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !cond().await {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[test]
fn hostile_csr_gets_only_what_the_collector_chooses() {
    let c = Collector::start();
    c.ok(&["site", "add", "lyon"]);
    let tok = c.token("lyon");
    use base64::Engine;
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(tok.strip_prefix("hv1.").expect("prefix"))
        .expect("b64");
    let key = rcgen::KeyPair::generate().expect("key");
    let mut p = rcgen::CertificateParams::new(vec!["evil.example".to_string()]).expect("p");
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.subject_alt_names.push(rcgen::SanType::URI(
        "urn:hubvault:agent:paris:boss".try_into().expect("uri"),
    ));
    p.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::CodeSigning,
    ];
    p.not_after = rcgen::date_time_ymd(2040, 1, 1);
    let csr = p.serialize_request(&key).expect("csr");
    let rt = rt();
    let resp = rt.block_on(async {
        let ch = c.channel(None).await.expect("ch");
        pb::enroll_service_client::EnrollServiceClient::new(ch)
            .enroll(pb::EnrollRequest {
                protocol: PROTOCOL,
                token_id: raw[..16].to_vec(),
                csr_der: csr.der().to_vec(),
                hostname: "x".into(),
            })
            .await
            .expect("enroll")
            .into_inner()
    });
    assert_eq!(resp.site, "lyon");
    let (_, pem) = x509_parser::pem::parse_x509_pem(resp.certificate_pem.as_bytes()).expect("pem");
    let cert = pem.parse_x509().expect("x509");
    assert!(!cert.is_ca(), "CSR asked for CA: must not get it");
    let eku = cert
        .extended_key_usage()
        .expect("eku")
        .expect("present")
        .value;
    assert!(
        eku.client_auth && !eku.server_auth && !eku.code_signing,
        "only clientAuth"
    );
    let sans: Vec<String> = cert
        .subject_alternative_name()
        .expect("san")
        .expect("present")
        .value
        .general_names
        .iter()
        .map(|n| format!("{n:?}"))
        .collect();
    assert_eq!(sans.len(), 1, "{sans:?}");
    assert!(sans[0].contains("urn:hubvault:agent:lyon:"), "{sans:?}");
    // The CSR asked for 2040; the collector gives its own short lifetime
    // (7 days, `pki::AGENT_CERT_TTL`). Judged against now, not a fixed date,
    // so the test does not start failing in some later year.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64;
    let lifetime = cert.validity().not_after.timestamp() - now;
    assert!(
        lifetime > 0 && lifetime <= 8 * 86_400,
        "agent certificate valid for {lifetime} s from now: want at most 7 days"
    );
}

#[test]
fn unknown_token_and_missing_site_are_refused() {
    let c = Collector::start();
    let o = c.hubvault(&["enroll-token", "--site", "nowhere"]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("site nowhere"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    c.ok(&["site", "add", "nice"]);
    let tok = c.token("nice");
    // Same CA and format, but an id the collector never issued.
    use base64::Engine;
    let mut raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(tok.strip_prefix("hv1.").expect("prefix"))
        .expect("b64");
    raw[0] ^= 0xff;
    let forged = format!(
        "hv1.{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
    );
    let tmp = tempfile::tempdir().expect("tmp");
    let o = c.enroll(&forged, &tmp.path().join("a"));
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("unknown enrollment token"));
    assert!(
        !tmp.path().join("a").join("agent.json").exists(),
        "nothing enrolled"
    );
}

/// An agent's certificate opens no admin call: every one of them answers
/// PERMISSION_DENIED to it, and nothing changes.
#[test]
fn an_agent_certificate_is_refused_by_every_admin_call() {
    let (c, _tmp, _paris, lyon) = paris_and_lyon();
    let paris_id = c
        .agents()
        .into_iter()
        .find(|a| a["site"] == "paris")
        .and_then(|a| a["id"].as_str().map(String::from))
        .expect("paris's agent");
    let before = (c.snapshot_ids(), c.agents().len());
    rt().block_on(async {
        let ch = c.channel(Some((&lyon, "agent"))).await.expect("connects");
        let a = pb::admin_service_client::AdminServiceClient::new(ch);
        let p = PROTOCOL;
        let mut results: Vec<(&str, Result<(), tonic::Status>)> = Vec::new();
        macro_rules! call {
            ($name:literal, $method:ident, $req:expr) => {{
                let mut a = a.clone();
                results.push(($name, a.$method($req).await.map(|_| ())));
            }};
        }
        call!(
            "add_site",
            add_site,
            pb::AddSiteRequest {
                protocol: p,
                name: "evil".into(),
            }
        );
        call!(
            "create_enroll_token",
            create_enroll_token,
            pb::CreateEnrollTokenRequest {
                protocol: p,
                site: "lyon".into(),
                ..Default::default()
            }
        );
        call!(
            "list_agents",
            list_agents,
            pb::ListAgentsRequest { protocol: p }
        );
        call!("status", status, pb::StatusRequest { protocol: p });
        call!(
            "revoke_agent",
            revoke_agent,
            pb::RevokeAgentRequest {
                protocol: p,
                agent_id: paris_id.clone(),
            }
        );
        call!(
            "list_snapshots",
            list_snapshots,
            pb::ListSnapshotsRequest {
                protocol: p,
                ..Default::default()
            }
        );
        call!(
            "restore",
            restore,
            pb::RestoreRequest {
                protocol: p,
                to_agent: paris_id.clone(),
                ..Default::default()
            }
        );
        call!(
            "list_jobs",
            list_jobs,
            pb::ListJobsRequest {
                protocol: p,
                ..Default::default()
            }
        );
        call!(
            "add_source",
            add_source,
            pb::AddSourceRequest {
                protocol: p,
                agent_id: paris_id.clone(),
                ..Default::default()
            }
        );
        call!(
            "backup_now",
            backup_now,
            pb::BackupNowRequest {
                protocol: p,
                agent_id: paris_id.clone(),
                ..Default::default()
            }
        );
        call!(
            "set_policy",
            set_policy,
            pb::SetPolicyRequest {
                protocol: p,
                ..Default::default()
            }
        );
        call!(
            "prune",
            prune,
            pb::PruneRequest {
                protocol: p,
                ..Default::default()
            }
        );
        for (name, r) in results {
            let e = r.expect_err(name);
            assert_eq!(e.code(), tonic::Code::PermissionDenied, "{name}: {e:?}");
        }
    });
    assert_eq!((c.snapshot_ids(), c.agents().len()), before);
    assert!(
        c.agents()
            .iter()
            .all(|a| a["revoked"] != serde_json::Value::Bool(true)),
        "{:?}",
        c.agents()
    );
}

#[test]
fn renewal_issues_a_new_certificate_and_retires_the_old_one() {
    let c = Collector::start();
    c.ok(&["site", "add", "metz"]);
    let tmp = tempfile::tempdir().expect("tmp");
    let state = enrolled(&c, "metz", tmp.path());
    let old = tmp.path().join("old");
    std::fs::create_dir_all(&old).expect("mkdir");
    std::fs::copy(state.join("agent.pem"), old.join("agent.pem")).expect("cp");
    std::fs::copy(state.join("agent.key"), old.join("agent.key")).expect("cp");
    let o = Command::new(bin("hubvault-agent"))
        .args(["renew", "--state"])
        .arg(&state)
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("renew");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_ne!(
        std::fs::read(state.join("agent.pem")).expect("r"),
        std::fs::read(old.join("agent.pem")).expect("r")
    );
    rt().block_on(async {
        let c = &c;
        let call = |dir: PathBuf| async move {
            match c.channel(Some((&dir, "agent"))).await {
                Err(_) => Err(tonic::Code::Unavailable),
                Ok(ch) => pb::agent_service_client::AgentServiceClient::new(ch)
                    .missing_blobs(pb::MissingBlobsRequest {
                        protocol: PROTOCOL,
                        ids: vec![],
                    })
                    .await
                    .map(|_| ())
                    .map_err(|s| s.code()),
            }
        };
        assert!(
            call(state.clone()).await.is_ok(),
            "the renewed certificate works"
        );
        assert!(
            call(old.clone()).await.is_err(),
            "the old certificate is retired"
        );
    });
    // Same identity after renewal: still the same agent, online-able, not revoked.
    let a = &c.agents()[0];
    assert_eq!(a["revoked"], false);
    assert_eq!(a["site"], "metz");
}

/// Issue a client certificate from the collector's own CA with chosen flaws.
fn flawed_cert(
    c: &Collector,
    dir: &Path,
    name: &str,
    tweak: impl FnOnce(&mut rcgen::CertificateParams),
) {
    let pki = c.dir.path().join("data").join("pki");
    let ca_key =
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(pki.join("ca.key")).expect("ca.key"))
            .expect("key");
    let issuer = rcgen::Issuer::from_ca_cert_pem(
        &std::fs::read_to_string(pki.join("ca.pem")).expect("ca.pem"),
        ca_key,
    )
    .expect("issuer");
    let key = rcgen::KeyPair::generate().expect("key");
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    p.subject_alt_names = vec![rcgen::SanType::URI(
        "urn:hubvault:admin:admin".try_into().expect("uri"),
    )];
    p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    p.serial_number = Some(rcgen::SerialNumber::from_slice(&[0x7f, 0x01]));
    tweak(&mut p);
    let cert = p.signed_by(&key, &issuer).expect("sign");
    std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).expect("w");
    std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).expect("w");
}

#[test]
fn real_ca_certificates_with_flaws_are_refused() {
    let c = Collector::start();
    let tmp = tempfile::tempdir().expect("tmp");
    let now = std::time::SystemTime::now();
    let day = Duration::from_secs(86400);
    flawed_cert(&c, tmp.path(), "expired", |p| {
        p.not_before = (now - 10 * day).into();
        p.not_after = (now - day).into();
    });
    flawed_cert(&c, tmp.path(), "future", |p| {
        p.not_before = (now + day).into();
        p.not_after = (now + 10 * day).into();
    });
    flawed_cert(&c, tmp.path(), "serveronly", |p| {
        p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    });
    flawed_cert(&c, tmp.path(), "fine", |_| {});
    rt().block_on(async {
        let call = |name: &'static str| {
            let c = &c;
            let dir = tmp.path().to_path_buf();
            async move {
                match c.channel(Some((&dir, name))).await {
                    Err(_) => Err(()),
                    Ok(ch) => pb::admin_service_client::AdminServiceClient::new(ch)
                        .list_agents(pb::ListAgentsRequest { protocol: PROTOCOL })
                        .await
                        .map(|_| ())
                        .map_err(|_| ()),
                }
            }
        };
        assert!(
            call("fine").await.is_ok(),
            "a sound certificate from the CA is accepted (control)"
        );
        for bad in ["expired", "future", "serveronly"] {
            assert!(
                call(bad).await.is_err(),
                "{bad} certificate must be refused"
            );
        }
    });
}
