//! `hubvault-collector init`: a new data directory with its CA, server
//! certificate, content-blind repository and the first admin identity.
//!
//! The repository keys are generated here once. The collector's own keyring
//! keeps only the metadata keys; the full keys go into the admin identity
//! (`<data>/admin/keyring`, passphrase in `<data>/admin/passphrase`), which the
//! operator moves to central IT's machine. From then on the content key
//! reaches agents only sealed under enrollment tokens.

use std::path::Path;

use repo_format::Repository;
use repo_format::config::RepoConfig;
use repo_format::crypto::{Keys, fill_random};
use repo_format::id::hex_encode;
use repo_format::keyring::{KdfParams, write_keyring};

use crate::error::ServiceError;
use crate::pki::{ADMIN_CERT_TTL, Pki, Role, write_private};
use crate::state::State;

/// What init created.
#[derive(Debug)]
pub struct InitReport {
    /// Directory of the admin identity.
    pub admin_dir: std::path::PathBuf,
}

fn random_pass() -> Result<String, ServiceError> {
    let mut b = [0u8; 24];
    fill_random(&mut b)?;
    Ok(hex_encode(&b))
}

/// Initialise `data`; `names` are extra DNS names for the server certificate.
pub fn init(data: &Path, names: &[String], kdf: KdfParams) -> Result<InitReport, ServiceError> {
    if data.join("state.db").exists() {
        return Err(ServiceError::Exists(format!(
            "{} is already a collector data directory",
            data.display()
        )));
    }
    std::fs::create_dir_all(data).map_err(|e| ServiceError::io("creating", data, e))?;
    let pki = Pki::create(&data.join("pki"), names)?;
    let state = State::open(&data.join("state.db"))?;

    let keys = Keys::generate()?;
    let blind = Keys {
        metadata: keys.metadata.clone(),
        content: None,
    };
    let repo_pass = random_pass()?;
    write_private(&data.join("repo.pass"), repo_pass.as_bytes())?;
    Repository::init_with_keys(
        &data.join("repo"),
        repo_pass.as_bytes(),
        kdf,
        RepoConfig::new()?,
        &blind,
    )?;

    let admin = data.join("admin");
    std::fs::create_dir_all(&admin).map_err(|e| ServiceError::io("creating", &admin, e))?;
    let admin_pass = random_pass()?;
    write_private(&admin.join("passphrase"), admin_pass.as_bytes())?;
    write_keyring(&admin.join("keyring"), &keys, admin_pass.as_bytes(), kdf)?;
    let key = rcgen::KeyPair::generate()
        .map_err(|e| ServiceError::Internal(format!("admin key: {e}")))?;
    let cert = pki.issue_client(
        &Role::Admin {
            name: "admin".into(),
        },
        state.next_serial()?,
        ADMIN_CERT_TTL,
        &key,
    )?;
    std::fs::write(admin.join("admin.pem"), cert)
        .map_err(|e| ServiceError::io("writing", admin.join("admin.pem"), e))?;
    write_private(&admin.join("admin.key"), key.serialize_pem().as_bytes())?;
    std::fs::write(admin.join("ca.pem"), pki.ca_pem())
        .map_err(|e| ServiceError::io("writing", admin.join("ca.pem"), e))?;
    Ok(InitReport { admin_dir: admin })
}
