//! The embedded certificate authority (rcgen): the CA itself, the
//! collector's server certificate, client certificates for admins and agents
//! (issued from CSRs with every field chosen here), and CRLs.
//!
//! Identity lives in a URI SAN: `urn:hubvault:agent:<site>:<agent-id>` or
//! `urn:hubvault:admin:<name>`. Files under `<data>/pki/`: `ca.pem`,
//! `ca.key` (0600), `server.pem`, `server.key` (0600).

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams,
    CertificateSigningRequestParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod,
    KeyPair, KeyUsagePurpose, PublicKeyData, RevocationReason, RevokedCertParams, SanType,
    SerialNumber,
};
use time::{Duration, OffsetDateTime};

use crate::error::ServiceError;

/// DNS name in the server certificate that clients verify, whatever address they dial.
pub const SERVER_NAME: &str = "hubvault-collector";
/// Lifetime of agent certificates (renewed by the agent at half).
pub const AGENT_CERT_TTL: Duration = Duration::days(7);
/// Lifetime of the admin certificate written at init.
pub const ADMIN_CERT_TTL: Duration = Duration::days(365);
/// How long a published CRL is valid (`enforce_revocation_expiration`).
pub const CRL_TTL: Duration = Duration::days(7);

/// Who a client certificate says its holder is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// An edge agent of a site.
    Agent {
        /// The site.
        site: String,
        /// The agent's id.
        agent_id: String,
    },
    /// Central IT.
    Admin {
        /// The admin's name.
        name: String,
    },
}

impl Role {
    /// The URI SAN encoding this role.
    pub fn uri(&self) -> String {
        match self {
            Role::Agent { site, agent_id } => format!("urn:hubvault:agent:{site}:{agent_id}"),
            Role::Admin { name } => format!("urn:hubvault:admin:{name}"),
        }
    }

    /// Parse a URI SAN written by [`Role::uri`].
    pub fn from_uri(uri: &str) -> Option<Role> {
        let rest = uri.strip_prefix("urn:hubvault:")?;
        let mut parts = rest.split(':');
        match (parts.next()?, parts.next(), parts.next(), parts.next()) {
            ("agent", Some(site), Some(agent), None) if !site.is_empty() && !agent.is_empty() => {
                Some(Role::Agent {
                    site: site.into(),
                    agent_id: agent.into(),
                })
            }
            ("admin", Some(name), None, None) if !name.is_empty() => {
                Some(Role::Admin { name: name.into() })
            }
            _ => None,
        }
    }
}

/// The CA and its files.
pub struct Pki {
    dir: PathBuf,
    ca_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

fn pki_err(what: &str) -> impl FnOnce(rcgen::Error) -> ServiceError + '_ {
    move |e| ServiceError::Internal(format!("{what}: {e}"))
}

/// Write `data` to `path` readable by the owner only.
pub fn write_private(path: &Path, data: &[u8]) -> Result<(), ServiceError> {
    use std::io::Write;
    let mut f = std::fs::File::options()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| ServiceError::io("creating", path, e))?;
    f.write_all(data)
        .and_then(|_| f.sync_all())
        .map_err(|e| ServiceError::io("writing", path, e))
}

fn ca_params() -> Result<CertificateParams, ServiceError> {
    let mut p = CertificateParams::new(Vec::<String>::new()).map_err(pki_err("CA params"))?;
    p.distinguished_name
        .push(DnType::CommonName, "hubvault collector CA");
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = OffsetDateTime::now_utc();
    p.not_before = now - Duration::hours(1);
    p.not_after = now + Duration::days(3650);
    Ok(p)
}

impl Pki {
    /// Create a new CA and server certificate under `dir` (which must not hold one).
    pub fn create(dir: &Path, server_names: &[String]) -> Result<Pki, ServiceError> {
        std::fs::create_dir_all(dir).map_err(|e| ServiceError::io("creating", dir, e))?;
        if dir.join("ca.key").exists() {
            return Err(ServiceError::Invalid(format!(
                "{} already holds a CA",
                dir.display()
            )));
        }
        let key = KeyPair::generate().map_err(pki_err("CA key"))?;
        let params = ca_params()?;
        let cert = params
            .self_signed(&key)
            .map_err(pki_err("CA certificate"))?;
        write_private(&dir.join("ca.key"), key.serialize_pem().as_bytes())?;
        std::fs::write(dir.join("ca.pem"), cert.pem())
            .map_err(|e| ServiceError::io("writing", dir.join("ca.pem"), e))?;
        let pki = Pki {
            dir: dir.to_path_buf(),
            ca_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        };
        pki.write_server_cert(server_names)?;
        Ok(pki)
    }

    /// Load the CA from `dir`.
    pub fn load(dir: &Path) -> Result<Pki, ServiceError> {
        let read = |n: &str| {
            std::fs::read_to_string(dir.join(n))
                .map_err(|e| ServiceError::io("reading", dir.join(n), e))
        };
        let ca_pem = read("ca.pem")?;
        let key = KeyPair::from_pem(&read("ca.key")?).map_err(pki_err("CA key"))?;
        let issuer = Issuer::from_ca_cert_pem(&ca_pem, key).map_err(pki_err("CA certificate"))?;
        Ok(Pki {
            dir: dir.to_path_buf(),
            ca_pem,
            issuer,
        })
    }

    /// The CA certificate, PEM.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The CA certificate, DER.
    pub fn ca_der(&self) -> Result<Vec<u8>, ServiceError> {
        pem_to_der(&self.ca_pem)
    }

    /// Paths of the server certificate and key.
    pub fn server_files(&self) -> (PathBuf, PathBuf) {
        (self.dir.join("server.pem"), self.dir.join("server.key"))
    }

    fn write_server_cert(&self, names: &[String]) -> Result<(), ServiceError> {
        let mut all = vec![SERVER_NAME.to_string(), "localhost".to_string()];
        all.extend(names.iter().cloned());
        let mut p = CertificateParams::new(all).map_err(pki_err("server params"))?;
        p.subject_alt_names
            .push(SanType::IpAddress([127, 0, 0, 1].into()));
        p.distinguished_name.push(DnType::CommonName, SERVER_NAME);
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let now = OffsetDateTime::now_utc();
        p.not_before = now - Duration::hours(1);
        p.not_after = now + Duration::days(825);
        let key = KeyPair::generate().map_err(pki_err("server key"))?;
        let cert = p
            .signed_by(&key, &self.issuer)
            .map_err(pki_err("server certificate"))?;
        let (c, k) = self.server_files();
        std::fs::write(&c, cert.pem()).map_err(|e| ServiceError::io("writing", &c, e))?;
        write_private(&k, key.serialize_pem().as_bytes())
    }

    /// Issue a client certificate for `role` over `public_key`, with serial
    /// `serial` and lifetime `ttl`. Nothing here comes from the requester.
    pub fn issue_client(
        &self,
        role: &Role,
        serial: u64,
        ttl: Duration,
        public_key: &impl PublicKeyData,
    ) -> Result<String, ServiceError> {
        let mut p =
            CertificateParams::new(Vec::<String>::new()).map_err(pki_err("client params"))?;
        let cn = match role {
            Role::Agent { site, agent_id } => format!("{agent_id}@{site}"),
            Role::Admin { name } => format!("admin {name}"),
        };
        p.distinguished_name.push(DnType::CommonName, cn);
        p.subject_alt_names = vec![SanType::URI(
            role.uri().try_into().map_err(pki_err("URI SAN"))?,
        )];
        p.serial_number = Some(SerialNumber::from_slice(&serial.to_be_bytes()));
        p.is_ca = IsCa::ExplicitNoCa;
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let now = OffsetDateTime::now_utc();
        p.not_before = now - Duration::minutes(5);
        p.not_after = now + ttl;
        let cert = p
            .signed_by(public_key, &self.issuer)
            .map_err(pki_err("client certificate"))?;
        Ok(cert.pem())
    }

    /// Check a CSR's signature and keep only its public key: every other
    /// field it asks for (CA, names, purposes, validity) is ignored.
    pub fn csr_public_key(csr_der: &[u8]) -> Result<rcgen::PublicKey, ServiceError> {
        let csr = CertificateSigningRequestParams::from_der(&csr_der.to_vec().into())
            .map_err(|e| ServiceError::Invalid(format!("CSR rejected: {e}")))?;
        Ok(csr.public_key)
    }

    /// A CRL listing `revoked` serials, numbered `number`.
    pub fn crl(&self, revoked: &[u64], number: u64) -> Result<Vec<u8>, ServiceError> {
        let now = OffsetDateTime::now_utc();
        let params = CertificateRevocationListParams {
            this_update: now - Duration::minutes(5),
            next_update: now + CRL_TTL,
            crl_number: SerialNumber::from_slice(&number.to_be_bytes()),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|s| RevokedCertParams {
                    serial_number: SerialNumber::from_slice(&s.to_be_bytes()),
                    revocation_time: now - Duration::minutes(1),
                    reason_code: Some(RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        Ok(params
            .signed_by(&self.issuer)
            .map_err(pki_err("CRL"))?
            .der()
            .to_vec())
    }
}

/// The DER of the first certificate in a PEM string.
pub fn pem_to_der(pem: &str) -> Result<Vec<u8>, ServiceError> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    CertificateDer::from_pem_slice(pem.as_bytes())
        .map(|c| c.to_vec())
        .map_err(|e| ServiceError::Invalid(format!("bad certificate PEM: {e}")))
}

/// Serial (big-endian, leading zeros trimmed) → u64.
pub fn serial_to_u64(raw: &[u8]) -> Option<u64> {
    let trimmed: Vec<u8> = raw.iter().copied().skip_while(|&b| b == 0).collect();
    if trimmed.len() > 8 {
        return None;
    }
    let mut b = [0u8; 8];
    b[8 - trimmed.len()..].copy_from_slice(&trimmed);
    Some(u64::from_be_bytes(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_uri_round_trip() {
        for r in [
            Role::Agent {
                site: "paris".into(),
                agent_id: "a1".into(),
            },
            Role::Admin { name: "it".into() },
        ] {
            assert_eq!(Role::from_uri(&r.uri()), Some(r));
        }
        assert_eq!(Role::from_uri("urn:hubvault:agent:paris"), None);
        assert_eq!(Role::from_uri("urn:other:admin:x"), None);
        assert_eq!(Role::from_uri("urn:hubvault:agent:a:b:c"), None);
    }

    #[test]
    fn serials() {
        assert_eq!(serial_to_u64(&[0, 0x03, 0xe9]), Some(1001));
        assert_eq!(serial_to_u64(&[1; 9]), None);
    }

    /// A CSR as an enrolling agent sends it.
    fn csr() -> (Vec<u8>, Vec<u8>) {
        let key = rcgen::KeyPair::generate().expect("key");
        let csr = CertificateParams::new(vec!["agent".to_string()])
            .expect("params")
            .serialize_request(&key)
            .expect("csr");
        (csr.der().to_vec(), key.der_bytes().to_vec())
    }

    /// Where a DER CSR's CertificationRequestInfo lies: the first element
    /// of the outer SEQUENCE, header included.
    fn signed_part(der: &[u8]) -> std::ops::Range<usize> {
        let header = |at: usize| -> (usize, usize) {
            let first = der[at + 1];
            if first < 0x80 {
                (2, usize::from(first))
            } else {
                let n = usize::from(first & 0x7f);
                let len = der[at + 2..at + 2 + n]
                    .iter()
                    .fold(0usize, |acc, &b| acc << 8 | usize::from(b));
                (2 + n, len)
            }
        };
        let (outer, _) = header(0);
        let (hl, len) = header(outer);
        outer..outer + hl + len
    }

    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        /// Enrollment parses a CSR from whoever holds a token (RELIABILITY.md
        /// scenarios 13 and 23). The key certified is always the key that
        /// signed the request: a change to any byte of what the signature
        /// covers (the CertificationRequestInfo), or to the signature, is
        /// refused. The parser tolerates changed tags in the unsigned
        /// envelope (the outer SEQUENCE, the algorithm identifier, the
        /// BIT STRING), which change nothing the collector uses.
        #[test]
        fn a_changed_csr_is_refused_or_gives_the_signing_key(
            at in any::<usize>(),
            mask in 1u8..=255,
        ) {
            let (der, public) = csr();
            let mut bad = der.clone();
            let at = at % bad.len();
            bad[at] ^= mask;
            if let Ok(key) = Pki::csr_public_key(&bad) {
                prop_assert!(!signed_part(&der).contains(&at), "signed byte {at} ^ {mask:#x} accepted");
                prop_assert_eq!(key.der_bytes(), &public[..]);
            }
        }

        /// Random bytes and truncated CSRs are refused without a panic.
        #[test]
        fn random_and_truncated_csrs_are_refused(
            noise in prop::collection::vec(any::<u8>(), 0..600),
            cut in any::<usize>(),
        ) {
            prop_assert!(Pki::csr_public_key(&noise).is_err());
            let (der, _) = csr();
            prop_assert!(Pki::csr_public_key(&der[..cut % der.len()]).is_err());
        }

        /// Whatever a certificate's URI SAN holds, the role read from it is
        /// the one that writes back to exactly that URI, or none.
        #[test]
        fn roles_parse_only_what_they_write(uri in "(urn:hubvault:)?((agent|admin)(:[a-z:]{0,6}){0,3})?") {
            if let Some(role) = Role::from_uri(&uri) {
                prop_assert_eq!(role.uri(), uri);
            }
        }

        /// Serials of any length: at most 8 significant bytes read back.
        #[test]
        fn serials_of_any_bytes(raw in prop::collection::vec(any::<u8>(), 0..12)) {
            let significant = raw.iter().skip_while(|&&b| b == 0).count();
            match serial_to_u64(&raw) {
                Some(v) => {
                    prop_assert!(significant <= 8);
                    let back = v.to_be_bytes();
                    prop_assert!(raw.ends_with(&back[8 - significant..]));
                }
                None => prop_assert!(significant > 8),
            }
        }
    }

    #[test]
    fn an_unchanged_csr_gives_the_signing_key() {
        let (der, public) = csr();
        let key = Pki::csr_public_key(&der).expect("valid CSR");
        assert_eq!(key.der_bytes(), &public[..]);
    }
}
