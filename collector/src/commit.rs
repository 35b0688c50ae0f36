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

/// Chunks gathered (from as many trees as it takes) before they are
/// checked together: sorted, a batch walks both B-trees in key order.
const CHUNK_BATCH: usize = 16 * 1024;

/// Check every tree and chunk below `root` for `site`; returns the trees checked.
///
/// Chunks are checked in batches across trees, not a lookup per chunk (a
/// 200 000-file first backup lists as many): the site's holdings
/// (state.db) and the catalog's kinds (catalog.db) are read at the same
/// time on two threads, each batch in key order. On a 200 000-file first
/// backup the agent waits idle for this check, so both cores are free.
///
/// Each distinct tree is checked once: identical directories share a tree
/// id, and a crafted snapshot can name one subtree twice at every level
/// (41 trees of two entries each would otherwise be 2^41 visits).
fn verify_tree(ctx: &Ctx, site: &str, root: &Id) -> Result<Vec<Vec<u8>>, ServiceError> {
    let mut checked = Vec::new();
    let mut seen: std::collections::HashSet<Id> = std::collections::HashSet::new();
    let mut stack = vec![*root];
    // (chunk, the tree that lists it), for the error message.
    let mut pending: Vec<(Id, Id)> = Vec::new();
    while let Some(t) = stack.pop() {
        if !seen.insert(t) || ctx.state.tree_verified(site, &t.0)? {
            continue;
        }
        require(ctx, site, &[(t, t)], BlobKind::Tree)?;
        let entries = ctx.repo.read_tree(&t)?;
        for e in entries {
            if let Some(s) = e.subtree {
                stack.push(s);
            }
            pending.extend(e.chunks.into_iter().map(|c| (c, t)));
        }
        if pending.len() >= CHUNK_BATCH {
            require(ctx, site, &sorted(&mut pending), BlobKind::Data)?;
        }
        checked.push(t.0.to_vec());
    }
    require(ctx, site, &sorted(&mut pending), BlobKind::Data)?;
    Ok(checked)
}

/// `pending` sorted by chunk id, each chunk once.
fn sorted(pending: &mut Vec<(Id, Id)>) -> Vec<(Id, Id)> {
    pending.sort_unstable_by_key(|a| a.0);
    pending.dedup_by(|a, b| a.0 == b.0);
    std::mem::take(pending)
}

/// Every blob of `ids` (each with the tree that lists it; a tree lists
/// itself) is a catalogued blob of `kind` held by `site`.
fn require(ctx: &Ctx, site: &str, ids: &[(Id, Id)], kind: BlobKind) -> Result<(), ServiceError> {
    if ids.is_empty() {
        return Ok(());
    }
    let blobs: Vec<Id> = ids.iter().map(|(id, _)| *id).collect();
    let raw: Vec<Vec<u8>> = blobs.iter().map(|c| c.0.to_vec()).collect();
    let kinds_of = || -> Result<Vec<Option<BlobKind>>, ServiceError> {
        Ok(ctx.repo.catalog()?.kinds(&blobs)?)
    };
    let (held, kinds) = if ids.len() > 1 {
        std::thread::scope(|s| {
            let kinds = s.spawn(kinds_of);
            let held = ctx.state.site_has(site, &raw);
            let kinds = kinds
                .join()
                .map_err(|_| ServiceError::Internal("the catalog lookup thread panicked".into()));
            (held, kinds)
        })
    } else {
        (ctx.state.site_has(site, &raw), Ok(kinds_of()))
    };
    let (held, kinds) = (held?, kinds??);
    for (((id, of), held), k) in ids.iter().zip(held).zip(kinds) {
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
