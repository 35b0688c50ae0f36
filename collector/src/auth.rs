//! Who is calling: the verified client certificate → [`Caller`], checked on
//! every call against the revoked set (a revoked agent's already-open
//! HTTP/2 connection must stop working too), and against the role the
//! service requires. Nothing in a request body is trusted for identity.

use std::collections::HashSet;
use std::sync::{Arc, RwLock};

use tonic::{Request, Status};
use x509_parser::extensions::GeneralName;

use crate::pki::{Role, serial_to_u64};

/// The authenticated caller, inserted into request extensions.
#[derive(Debug, Clone)]
pub struct Caller {
    /// What the certificate says the caller is.
    pub role: Role,
    /// The certificate's serial.
    pub serial: u64,
}

/// Which role a service admits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// Agents only.
    Agent,
    /// Admins only.
    Admin,
}

/// Serials revoked so far (loaded from the state database, grown by revocations).
#[derive(Debug, Default)]
pub struct Revoked {
    serials: RwLock<HashSet<u64>>,
}

impl Revoked {
    /// A set holding `serials`.
    pub fn new(serials: impl IntoIterator<Item = u64>) -> Self {
        Revoked {
            serials: RwLock::new(serials.into_iter().collect()),
        }
    }

    /// Add a serial.
    pub fn insert(&self, s: u64) {
        if let Ok(mut g) = self.serials.write() {
            g.insert(s);
        }
    }

    /// True when `s` is revoked (or the set is unreadable: fail closed).
    pub fn contains(&self, s: u64) -> bool {
        self.serials.read().map(|g| g.contains(&s)).unwrap_or(true)
    }
}

/// Parse the caller out of a DER certificate (already verified by TLS).
pub fn caller_from_der(der: &[u8]) -> Result<Caller, Status> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|_| Status::unauthenticated("client certificate unparsable"))?;
    let serial = serial_to_u64(cert.raw_serial())
        .ok_or_else(|| Status::unauthenticated("client certificate serial too long"))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|_| Status::unauthenticated("client certificate SAN unparsable"))?
        .ok_or_else(|| Status::unauthenticated("client certificate has no hubvault identity"))?;
    let role = san
        .value
        .general_names
        .iter()
        .find_map(|n| match n {
            GeneralName::URI(u) => Role::from_uri(u),
            _ => None,
        })
        .ok_or_else(|| Status::unauthenticated("client certificate has no hubvault identity"))?;
    Ok(Caller { role, serial })
}

/// An interceptor admitting callers of role `want` whose serial is not revoked.
pub fn interceptor(
    revoked: Arc<Revoked>,
    want: Want,
) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone {
    move |mut req: Request<()>| {
        let certs = req.peer_certs().ok_or_else(|| {
            Status::unauthenticated("no client certificate: enroll first (hubvault-agent enroll)")
        })?;
        let der = certs
            .first()
            .ok_or_else(|| Status::unauthenticated("empty client certificate chain"))?;
        let caller = caller_from_der(der)?;
        if revoked.contains(caller.serial) {
            return Err(Status::permission_denied(format!(
                "certificate serial {:x} is revoked",
                caller.serial
            )));
        }
        let ok = matches!(
            (&caller.role, want),
            (Role::Agent { .. }, Want::Agent) | (Role::Admin { .. }, Want::Admin)
        );
        if !ok {
            return Err(Status::permission_denied(
                "this service is not for your role",
            ));
        }
        req.extensions_mut().insert(caller);
        Ok(req)
    }
}
