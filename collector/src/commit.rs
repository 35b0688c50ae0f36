//! Snapshot commit at the collector: verify, then make visible atomically.
//!
//! Every tree reachable from the new root must be a catalogued tree blob
//! held by the caller's site, and every chunk it lists a catalogued data
//! blob held by the site. Subtrees verified for this site at an earlier
//! commit are skipped, so the work grows with the change, not the tree. The
//! snapshot's site, agent and time are the collector's, never the request's.
//! A retry with the same idempotency key returns the same snapshot.

use repo_format::Id;
use repo_format::blob::BlobKind;
use repo_format::snapshot::{BackupIssue, Snapshot, SnapshotStats};

use crate::Ctx;
use crate::error::ServiceError;
use crate::state::now_ns;

/// What the agent asked to commit, validated.
pub struct CommitRequest {
    /// The site of the caller (from its certificate).
    pub site: String,
    /// The caller's agent id (from its certificate).
    pub agent_id: String,
    /// Idempotency key.
    pub key: Vec<u8>,
    /// Source name.
    pub source: String,
    /// Root tree.
    pub root: Id,
    /// Paths backed up.
    pub paths: Vec<String>,
    /// Agent host name.
    pub hostname: String,
    /// Agent-side statistics.
    pub stats: SnapshotStats,
    /// Agent-side issues.
    pub issues: Vec<BackupIssue>,
}

/// Verify and commit; returns (snapshot id, collector time).
pub fn commit(ctx: &Ctx, r: CommitRequest) -> Result<(Id, i64), ServiceError> {
    if let Some((snap, time)) = ctx.state.commit_of(&r.agent_id, &r.key)? {
        let id = Id::from_slice(&snap)
            .ok_or_else(|| ServiceError::Internal("stored snapshot id".into()))?;
        return Ok((id, time));
    }
    let verified = verify_tree(ctx, &r.site, &r.root)?;
    let time_ns = now_ns();
    let snap = Snapshot {
        time_ns,
        hostname: r.hostname,
        paths: r.paths,
        tree: r.root,
        parent: None,
        stats: r.stats,
        issues: r.issues,
        issues_dropped: 0,
        site: Some(r.site.clone()),
        agent: Some(r.agent_id.clone()),
        source: Some(r.source),
    };
    let id = ctx.repo.commit_snapshot(&snap)?;
    ctx.state.add_verified_trees(&r.site, &verified)?;
    ctx.state
        .record_commit(&r.agent_id, &r.key, &id.0, time_ns)?;
    tracing::info!(snapshot = %id.short(), site = %r.site, agent = %r.agent_id, "snapshot committed");
    Ok((id, time_ns))
}

/// Check every tree and chunk below `root` for `site`; returns the trees checked.
///
/// Each tree's chunks are checked in two batched reads (the site's holdings,
/// then the catalog's kinds), not a lookup per chunk: a 200 000-file first
/// backup lists as many chunks.
fn verify_tree(ctx: &Ctx, site: &str, root: &Id) -> Result<Vec<Vec<u8>>, ServiceError> {
    let mut checked = Vec::new();
    let mut stack = vec![*root];
    while let Some(t) = stack.pop() {
        if ctx.state.tree_verified(site, &t.0)? {
            continue;
        }
        require(ctx, site, &[t], BlobKind::Tree, &t)?;
        let entries = ctx.repo.read_tree(&t)?;
        let mut chunks = Vec::new();
        for e in entries {
            if let Some(s) = e.subtree {
                stack.push(s);
            }
            chunks.extend(e.chunks);
        }
        chunks.sort_unstable();
        chunks.dedup();
        require(ctx, site, &chunks, BlobKind::Data, &t)?;
        checked.push(t.0.to_vec());
    }
    Ok(checked)
}

/// Every one of `ids` (listed by tree `of`) is a catalogued blob of `kind`
/// held by `site`.
fn require(ctx: &Ctx, site: &str, ids: &[Id], kind: BlobKind, of: &Id) -> Result<(), ServiceError> {
    let raw: Vec<Vec<u8>> = ids.iter().map(|c| c.0.to_vec()).collect();
    let held = ctx.state.site_has(site, &raw)?;
    let kinds = ctx.repo.catalog()?.kinds(ids)?;
    for ((id, held), k) in ids.iter().zip(held).zip(kinds) {
        let whose = if id == of {
            format!("tree {id}")
        } else {
            format!("chunk {id} referenced by tree {of}")
        };
        match k {
            Some(k) if held && k == kind => {}
            Some(k) if held => {
                return Err(ServiceError::Invalid(format!(
                    "{whose} is a {k:?} blob, expected {kind:?}"
                )));
            }
            _ => {
                return Err(ServiceError::NotFound(format!(
                    "{whose} was not uploaded by this site"
                )));
            }
        }
    }
    Ok(())
}
