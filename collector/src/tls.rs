//! The collector's TLS: a rustls `ServerConfig` built here (tonic's own TLS
//! config can neither check CRLs nor change its verifier at run time), with
//! a client verifier that is swapped whenever a new CRL is published.
//!
//! Client certificates are optional at the TLS layer so that `Enroll` can be
//! reached with a token alone; every other service's interceptor requires a
//! verified certificate ([`crate::auth`]). Revocation is enforced three ways,
//! because a CRL alone only stops *new* handshakes (RELIABILITY.md, part c):
//! the CRL in the verifier, a serial check on every call, and a bounded
//! connection age.

use std::sync::{Arc, RwLock};

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig, SignatureScheme,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, UnixTime};

use crate::error::ServiceError;

/// The ring crypto provider, used everywhere.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A client verifier whose inner verifier can be replaced while serving.
#[derive(Debug)]
pub struct SwappableVerifier {
    inner: RwLock<Arc<dyn ClientCertVerifier>>,
}

impl SwappableVerifier {
    /// A verifier trusting `ca_der` and rejecting what `crl_der` revokes.
    pub fn new(ca_der: &[u8], crl_der: &[u8]) -> Result<Self, ServiceError> {
        Ok(SwappableVerifier {
            inner: RwLock::new(build_verifier(ca_der, crl_der)?),
        })
    }

    /// Install a new CRL: new handshakes are checked against it from now on.
    pub fn publish(&self, ca_der: &[u8], crl_der: &[u8]) -> Result<(), ServiceError> {
        let v = build_verifier(ca_der, crl_der)?;
        *self
            .inner
            .write()
            .map_err(|_| ServiceError::Internal("verifier lock poisoned".into()))? = v;
        Ok(())
    }

    fn get(&self) -> Result<Arc<dyn ClientCertVerifier>, rustls::Error> {
        self.inner
            .read()
            .map(|g| g.clone())
            .map_err(|_| rustls::Error::General("verifier lock poisoned".into()))
    }
}

fn build_verifier(
    ca_der: &[u8],
    crl_der: &[u8],
) -> Result<Arc<dyn ClientCertVerifier>, ServiceError> {
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from(ca_der.to_vec()))
        .map_err(|e| ServiceError::Internal(format!("CA certificate unusable: {e}")))?;
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .with_crls([CertificateRevocationListDer::from(crl_der.to_vec())])
        .only_check_end_entity_revocation()
        .enforce_revocation_expiration()
        .allow_unauthenticated()
        .build()
        .map_err(|e| ServiceError::Internal(format!("client verifier: {e}")))
}

impl ClientCertVerifier for SwappableVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.get()?
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.get()?.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.get()?.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.get()
            .map(|v| v.supported_verify_schemes())
            .unwrap_or_default()
    }
}

/// The server config: our certificate, the swappable verifier, ALPN h2.
pub fn server_config(
    cert_pem: &str,
    key_pem: &str,
    verifier: Arc<SwappableVerifier>,
) -> Result<ServerConfig, ServiceError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| ServiceError::Invalid(format!("server certificate PEM: {e}")))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| ServiceError::Invalid(format!("server key PEM: {e}")))?;
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| ServiceError::Internal(format!("TLS versions: {e}")))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| ServiceError::Invalid(format!("server certificate/key: {e}")))?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cfg)
}
