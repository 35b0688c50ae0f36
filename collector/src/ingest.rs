//! Ingest: sealed blobs from an agent become durable packs, blocking code
//! run off the async runtime.
//!
//! Rules (DESIGN.md "Sites share storage, not knowledge"):
//! - a blob the site already holds is acknowledged at once;
//! - a blob another site stored is compared byte for byte with the stored
//!   copy (sealing is deterministic): equal → the site now holds it; different
//!   → an integrity event, and the upload is refused;
//! - a new blob is written into a pack; it is acknowledged only after the
//!   pack is fsynced, renamed, its directory fsynced and its rows committed.
//!   If a concurrent upload of the same id won the catalog race, our copy is
//!   compared with the winner's exactly as above.
//! - tree blobs are opened (the collector holds the metadata key) and their id
//!   re-derived before anything is stored; data blobs cannot be (content-blind).

use std::collections::HashSet;

use proto::limits::{MAX_BLOBS_PER_UPLOAD, MAX_UPLOAD_BLOB};
use repo_format::Id;
use repo_format::blob::{self, BlobKind};
use repo_format::consts::MAX_BLOB_PLAINTEXT;
use repo_format::pack::writer::PackWriter;

use crate::Ctx;
use crate::error::ServiceError;

/// One validated blob of an upload.
pub struct Incoming {
    /// Data or tree.
    pub kind: BlobKind,
    /// Its id.
    pub id: Id,
    /// Sealed bytes.
    pub sealed: Vec<u8>,
    /// Plaintext length.
    pub raw_len: u32,
}

/// Validate one upload message: its version, then each blob in it.
pub fn validate(m: proto::pb::UploadRequest) -> Result<Vec<Incoming>, ServiceError> {
    proto::convert::protocol(m.protocol)?;
    if m.blobs.is_empty() || m.blobs.len() > MAX_BLOBS_PER_UPLOAD {
        return Err(ServiceError::Invalid(format!(
            "upload message with {} blobs; 1..={MAX_BLOBS_PER_UPLOAD} per message",
            m.blobs.len()
        )));
    }
    m.blobs.into_iter().map(validate_blob).collect()
}

fn validate_blob(b: proto::pb::UploadBlob) -> Result<Incoming, ServiceError> {
    let kind = proto::convert::kind(b.kind)?;
    let id = proto::convert::id("id", &b.id)?;
    if b.sealed.len() > MAX_UPLOAD_BLOB || b.sealed.len() < 17 {
        return Err(ServiceError::Invalid(format!(
            "blob {id}: sealed length {} outside 17..={MAX_UPLOAD_BLOB}",
            b.sealed.len()
        )));
    }
    if b.raw_length as usize > MAX_BLOB_PLAINTEXT {
        return Err(ServiceError::Invalid(format!(
            "blob {id}: plaintext length over the limit"
        )));
    }
    Ok(Incoming {
        kind,
        id,
        sealed: b.sealed,
        raw_len: b.raw_length,
    })
}

/// Store a batch for `site`; returns the ids now durable and held by the site.
pub fn ingest(ctx: &Ctx, site: &str, batch: Vec<Incoming>) -> Result<Vec<Vec<u8>>, ServiceError> {
    let repo = &ctx.repo;
    // One read transaction for the batch instead of a lookup per blob; a
    // location is looked up only where a copy must be compared.
    let all: Vec<Id> = batch.iter().map(|b| b.id).collect();
    let absent: HashSet<Id> = repo.catalog()?.missing(&all)?.into_iter().collect();
    // Whether the site holds a blob matters only for one the catalog has
    // (an absent one is stored either way): on a first backup, none.
    let present: Vec<Vec<u8>> = all
        .iter()
        .filter(|id| !absent.contains(id))
        .map(|id| id.0.to_vec())
        .collect();
    let mut held_present = ctx.state.site_has(site, &present)?.into_iter();
    let held: Vec<bool> = all
        .iter()
        .map(|id| !absent.contains(id) && held_present.next() == Some(true))
        .collect();
    let mut acked = Vec::new();
    let mut now_held = Vec::new();
    let mut writer: Option<PackWriter> = None;
    let mut written: Vec<Incoming> = Vec::new();
    let mut seen = HashSet::new();
    // A blob sent twice in one batch is acknowledged twice, once its first
    // copy is durable (the agent counts acknowledgements).
    let mut repeated = Vec::new();
    for (b, held) in batch.into_iter().zip(held) {
        if !seen.insert(b.id) {
            repeated.push(b.id.0.to_vec());
            continue;
        }
        if b.kind == BlobKind::Tree {
            blob::open(&repo.keys().metadata, BlobKind::Tree, &b.id, &b.sealed).map_err(|e| {
                ServiceError::Invalid(format!("tree blob {} does not open to its id: {e}", b.id))
            })?;
        }
        let present = !absent.contains(&b.id);
        if present && held {
            acked.push(b.id.0.to_vec());
            continue;
        }
        // Present but not this site's: compare with the stored copy (a pack
        // dropped meanwhile by a prune makes it absent again: store it).
        let loc = match present {
            true => repo.catalog()?.lookup(&b.id)?,
            false => None,
        };
        // A stored copy found damaged is set aside: store this one.
        let loc = match loc {
            Some(loc) if compare_with_stored(ctx, site, &b, &loc)? == Stored::Damaged => None,
            other => other,
        };
        match loc {
            Some(_) => now_held.push(b.id.0.to_vec()),
            None => {
                let w = match writer.as_mut() {
                    Some(w) => w,
                    None => writer.insert(PackWriter::new(repo.store().as_ref())?),
                };
                w.add(b.kind, b.id, &b.sealed, b.raw_len)?;
                written.push(b);
            }
        }
    }
    if let Some(w) = writer {
        let fp = w.finish(repo.store().as_ref(), &repo.keys().metadata)?;
        let elsewhere: HashSet<Id> = repo
            .catalog()?
            .insert_pack(&fp.name, fp.size, &fp.entries)?
            .into_iter()
            .collect();
        for b in written {
            if elsewhere.contains(&b.id) {
                let loc = repo
                    .catalog()?
                    .lookup(&b.id)?
                    .ok_or(repo_format::Error::MissingBlob(b.id))?;
                // A concurrent upload of the same id was catalogued first.
                // Its copy found damaged (and set aside) is refused here:
                // ours is not catalogued, and the agent's retry stores it.
                if loc.pack != fp.name
                    && compare_with_stored(ctx, site, &b, &loc)? == Stored::Damaged
                {
                    return Err(ServiceError::Exhausted(format!(
                        "blob {}: the stored copy was damaged and is set aside; send it again",
                        b.id
                    )));
                }
            }
            now_held.push(b.id.0.to_vec());
        }
    }
    ctx.state.add_site_blobs(site, &now_held)?;
    acked.extend(now_held);
    acked.extend(repeated);
    Ok(acked)
}

/// What the comparison with the stored copy found.
#[derive(Debug, PartialEq, Eq)]
enum Stored {
    /// The same bytes: the uploading site now holds the blob.
    Same,
    /// The stored copy's pack is damaged; it was set aside (see
    /// `scrub::set_aside_if_damaged`), and the upload is to be stored.
    Damaged,
}

/// Compare upload `b` with the stored copy at `loc`. Different bytes are
/// refused (an integrity event) unless the stored copy's pack turns out to
/// be damaged: sealing is deterministic, so a sound upload of the same id
/// must match a sound stored copy.
fn compare_with_stored(
    ctx: &Ctx,
    site: &str,
    b: &Incoming,
    loc: &repo_format::catalog::BlobLocation,
) -> Result<Stored, ServiceError> {
    let mut stored = vec![0u8; loc.length as usize];
    let read = ctx.repo.store().read_at(&loc.pack, loc.offset, &mut stored);
    if (read.is_err() || stored != b.sealed || loc.kind != b.kind)
        && crate::scrub::set_aside_if_damaged(ctx, &loc.pack)?
    {
        return Ok(Stored::Damaged);
    }
    if let Err(e) = read {
        // The path is the collector's business, not the agent's.
        tracing::error!("reading the stored copy of blob {}: {e}", b.id);
        return Err(ServiceError::Internal(format!(
            "the stored copy of blob {} could not be read; the collector's log says why",
            b.id
        )));
    }
    if stored != b.sealed || loc.kind != b.kind {
        let detail = format!(
            "site {site} uploaded blob {} whose sealed bytes differ from the stored copy; kept the stored copy",
            b.id
        );
        ctx.state.event("integrity", &detail)?;
        return Err(ServiceError::Denied(format!(
            "blob {} differs from the copy already stored (integrity event recorded)",
            b.id
        )));
    }
    Ok(Stored::Same)
}
