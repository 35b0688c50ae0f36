//! Snapshot commit at the collector: verify, then make visible atomically.
//!
//! Every tree reachable from the new root must be a catalogued tree blob
//! held by the caller's site, and every chunk it lists a catalogued data
//! blob held by the site. Subtrees verified for this site at an earlier
//! commit are skipped, so the work grows with the change, not the tree. The
//! snapshot's site, agent and time are the collector's, never the request's.
//! A retry with the same idempotency key returns the same snapshot.

use std::collections::{HashMap, HashSet};

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
///
/// The key's record goes into state.db before the snapshot is written
/// (to the repository, whose catalog is another database): a crash
/// between the two leaves a record without a snapshot, and the retry
/// finishes that commit, with the time the first attempt chose, so the
/// agent's retries converge on one snapshot. The other order would leave
/// a snapshot without a record, and the retry would make a second one.
pub fn commit(ctx: &Ctx, r: CommitRequest) -> Result<(Id, i64), ServiceError> {
    let earlier = match ctx.state.commit_of(&r.agent_id, &r.key)? {
        Some((snap, time)) => {
            let id = stored_id(&snap)?;
            if ctx.repo.has_snapshot(&id)? {
                return Ok((id, time));
            }
            tracing::info!(snapshot = %id.short(), agent = %r.agent_id,
                "finishing a commit an earlier attempt left unwritten");
            Some((id, time))
        }
        None => None,
    };
    let _gate = ctx
        .commit_gate
        .read()
        .map_err(|_| ServiceError::Internal("commit gate poisoned".into()))?;
    let Verified {
        trees: verified,
        entries,
    } = verify_tree(ctx, &r.site, &r.root)?;
    let time_ns = earlier.map_or_else(now_ns, |(_, t)| t);
    let site = r.site.clone();
    let agent_id = r.agent_id.clone();
    let snap = Snapshot {
        time_ns,
        hostname: r.hostname,
        paths: r.paths,
        tree: r.root,
        parent: None,
        stats: r.stats,
        issues: r.issues,
        issues_dropped: 0,
        site: Some(r.site),
        agent: Some(r.agent_id),
        source: Some(r.source),
    };
    let id = ctx.repo.snapshot_id(&snap)?;
    match earlier {
        None => {
            if !ctx
                .state
                .reserve_commit(&agent_id, &r.key, &id.0, time_ns)?
            {
                return Err(ServiceError::Exhausted(
                    "a commit with this idempotency key is in progress; retry".into(),
                ));
            }
        }
        Some((was, _)) if was != id => ctx.state.repoint_commit(&agent_id, &r.key, &id.0)?,
        Some(_) => {}
    }
    ctx.repo.commit_snapshot(&snap)?;
    ctx.state.add_verified_trees(&site, &verified)?;
    tracing::info!(snapshot = %id.short(), site = %site, agent = %agent_id, entries,
        "snapshot committed");
    Ok((id, time_ns))
}

fn stored_id(raw: &[u8]) -> Result<Id, ServiceError> {
    Id::from_slice(raw).ok_or_else(|| ServiceError::Internal("stored snapshot id".into()))
}

/// Chunks gathered (from as many trees as it takes) before they are
/// checked together: sorted, a batch walks both B-trees in key order.
const CHUNK_BATCH: usize = 16 * 1024;

/// The most entries (files, directories, links, counted along every path)
/// a committed snapshot may expand to: 2^30, past any file system an office
/// keeps (an ext4 file system holds at most 2^32 inodes), far below what a
/// crafted one reaches. Identical directories share a tree, so a snapshot
/// of 41 trees that each name the one below twice lists 2^40 paths; every
/// `ls`, `check` and restore of it would walk them all. The bound is
/// checked at commit, from counts kept per verified tree, so no snapshot
/// committed since this check existed expands further (older ones were
/// not counted; `check` lists a bounded number of paths either way).
pub const MAX_SNAPSHOT_ENTRIES: u64 = 1 << 30;

/// One step of the commit check's depth-first walk.
enum Visit {
    /// Check this tree (unless known) and schedule its subtrees.
    Enter(Id),
    /// Its subtrees are counted: add them up. Holds the tree's own entry
    /// count and its subtrees (as often as it names each).
    Leave(Id, u64, Vec<Id>),
}

/// What a commit check found.
struct Verified {
    /// The trees it checked, each with the entries it expands to.
    trees: Vec<(Vec<u8>, u64)>,
    /// The entries the root expands to.
    entries: u64,
}

/// Check every tree and chunk below `root` for `site`, and count the
/// entries each new tree expands to.
///
/// Chunks are checked in batches across trees, not a lookup per chunk (a
/// 200 000-file first backup lists as many): the site's holdings
/// (state.db) and the catalog's kinds (catalog.db) are read at the same
/// time on two threads, each batch in key order. On a 200 000-file first
/// backup the agent waits idle for this check, so both cores are free.
///
/// Each distinct tree is checked and counted once (its count is the sum of
/// its subtrees', after them): identical directories share a tree id, and
/// a crafted snapshot can name one subtree twice at every level. Memory
/// holds a count per distinct tree walked, not per path.
fn verify_tree(ctx: &Ctx, site: &str, root: &Id) -> Result<Verified, ServiceError> {
    let mut checked = Vec::new();
    let mut expanded: HashMap<Id, u64> = HashMap::new();
    // Trees entered and not yet left: meeting one again is a cycle.
    let mut open: HashSet<Id> = HashSet::new();
    let mut stack = vec![Visit::Enter(*root)];
    // (chunk, the tree that lists it), for the error message.
    let mut pending: Vec<(Id, Id)> = Vec::new();
    while let Some(v) = stack.pop() {
        match v {
            Visit::Enter(t) => {
                if expanded.contains_key(&t) {
                    continue;
                }
                if !open.insert(t) {
                    return Err(ServiceError::Invalid(format!("tree {t} contains itself")));
                }
                if let Some(n) = ctx.state.tree_verified(site, &t.0)? {
                    open.remove(&t);
                    expanded.insert(t, n);
                    continue;
                }
                require(ctx, site, &[(t, t)], BlobKind::Tree)?;
                let entries = ctx.repo.read_tree(&t)?;
                let own = entries.len() as u64;
                let mut subtrees = Vec::new();
                for e in entries {
                    if let Some(s) = e.subtree {
                        subtrees.push(s);
                    }
                    pending.extend(e.chunks.into_iter().map(|c| (c, t)));
                }
                if pending.len() >= CHUNK_BATCH {
                    require(ctx, site, &sorted(&mut pending), BlobKind::Data)?;
                }
                // Leave goes below its subtrees, so it runs after them.
                let enter: Vec<Visit> = subtrees.iter().map(|s| Visit::Enter(*s)).collect();
                stack.push(Visit::Leave(t, own, subtrees));
                stack.extend(enter);
            }
            Visit::Leave(t, own, subtrees) => {
                let mut n = own;
                for s in &subtrees {
                    let below = expanded.get(s).copied().ok_or_else(|| {
                        ServiceError::Internal(format!("subtree {s} of {t} was not counted"))
                    })?;
                    n = n.saturating_add(below);
                }
                if n > MAX_SNAPSHOT_ENTRIES {
                    return Err(ServiceError::Invalid(format!(
                        "tree {t} expands to more than {MAX_SNAPSHOT_ENTRIES} entries \
                         (directories named more than once are counted each time): \
                         a snapshot of it cannot be restored; refused"
                    )));
                }
                open.remove(&t);
                expanded.insert(t, n);
                checked.push((t.0.to_vec(), n));
            }
        }
    }
    require(ctx, site, &sorted(&mut pending), BlobKind::Data)?;
    let total = expanded
        .get(root)
        .copied()
        .ok_or_else(|| ServiceError::Internal(format!("root tree {root} was not counted")))?;
    Ok(Verified {
        trees: checked,
        entries: total,
    })
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

#[cfg(test)]
mod tests {
    //! The crash windows of a commit, made by removing what a crash would
    //! not have written: the records it leaves are the same.
    use super::*;
    use repo_format::keyring::KdfParams;

    fn collector() -> (tempfile::TempDir, std::sync::Arc<Ctx>) {
        let tmp = tempfile::tempdir().expect("tempdir");
        let data = tmp.path().join("data");
        crate::init::init(&data, &[], KdfParams::with_memory_kib(Some(64))).expect("init");
        let ctx = crate::server::load(&data).expect("load");
        (tmp, ctx)
    }

    /// A request for an empty root tree the site has verified already, so
    /// the commit needs no uploaded blob.
    fn request(ctx: &Ctx, key: u8) -> CommitRequest {
        let root = Id([7; 32]);
        ctx.state
            .add_verified_trees("paris", &[(root.0.to_vec(), 0)])
            .expect("verified tree");
        CommitRequest {
            site: "paris".into(),
            agent_id: "agent-1".into(),
            key: vec![key; 16],
            source: "docs".into(),
            root,
            paths: vec!["/srv/docs".into()],
            hostname: "paris-fs".into(),
            stats: SnapshotStats::default(),
            issues: vec![],
        }
    }

    fn snapshot_count(ctx: &Ctx) -> usize {
        ctx.repo.snapshots().expect("snapshots").len()
    }

    #[test]
    fn a_retry_finishes_a_commit_cut_short_before_its_snapshot_was_written() {
        let (_tmp, ctx) = collector();
        let (id, time) = commit(&ctx, request(&ctx, 1)).expect("commit");
        // The state a crash right after the reservation leaves: the record,
        // no snapshot file, no catalog row.
        ctx.repo.forget_snapshot(&id).expect("unwrite");
        assert_eq!(snapshot_count(&ctx), 0);
        assert_eq!(commit(&ctx, request(&ctx, 1)).expect("retry"), (id, time));
        assert_eq!(snapshot_count(&ctx), 1);
        let (got, snap) = ctx.repo.find_snapshot("latest").expect("latest");
        assert_eq!((got, snap.time_ns), (id, time));
        assert_eq!(commit(&ctx, request(&ctx, 1)).expect("again"), (id, time));
        assert_eq!(snapshot_count(&ctx), 1);
    }

    #[test]
    fn a_retry_finishes_a_commit_cut_short_before_its_catalog_row() {
        let (_tmp, ctx) = collector();
        let (id, time) = commit(&ctx, request(&ctx, 2)).expect("commit");
        // File written, row not: what a crash inside `commit_snapshot` leaves.
        assert!(
            ctx.repo
                .catalog()
                .expect("catalog")
                .delete_snapshot(&id)
                .expect("delete")
        );
        assert_eq!(commit(&ctx, request(&ctx, 2)).expect("retry"), (id, time));
        assert_eq!(snapshot_count(&ctx), 1);
        ctx.repo.find_snapshot(&id.to_hex()).expect("readable");
    }

    #[test]
    fn another_key_makes_another_snapshot_and_a_forgotten_one_stays_forgotten() {
        let (_tmp, ctx) = collector();
        let (a, _) = commit(&ctx, request(&ctx, 3)).expect("commit a");
        let (b, _) = commit(&ctx, request(&ctx, 4)).expect("commit b");
        assert_ne!(a, b);
        assert_eq!(snapshot_count(&ctx), 2);
        // Prune's order: the record, then the snapshot.
        ctx.state.forget_snapshot(&a.0).expect("forget record");
        ctx.repo.forget_snapshot(&a).expect("forget snapshot");
        let (again, _) = commit(&ctx, request(&ctx, 3)).expect("late retry");
        assert_ne!(
            again, a,
            "a late retry makes a new snapshot, not the forgotten one"
        );
    }
}
