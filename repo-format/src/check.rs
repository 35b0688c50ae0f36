//! Check: is everything a snapshot needs present and intact?
//!
//! Structure (always): the catalog passes `integrity_check`; every
//! catalogued pack exists with its catalogued size and its trailer agrees
//! with the catalog; every snapshot file is readable and catalogued; every
//! tree of every snapshot opens and decodes, and every blob it references is
//! catalogued. With `read_data`: every pack's checksum is verified and every
//! blob is opened (authenticated, decompressed, id re-derived).
//!
//! A damaged or missing blob is reported with the snapshots and paths that
//! use it, so the operator knows what a restore would lose.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use serde::Serialize;

use crate::blob::{self, BlobKind};
use crate::error::Result;
use crate::id::Id;
use crate::pack::PackEntry;
use crate::pack::reader::{read_trailer, verify_checksum};
use crate::repo::Repository;
use crate::snapshot;
use crate::tree::EntryKind;

/// One thing `check` found wrong.
#[derive(Debug, Clone, Serialize)]
pub struct Problem {
    /// Short category: "catalog", "pack", "blob", "tree", "snapshot".
    pub what: String,
    /// The damaged object's id (blob, pack or snapshot), when there is one.
    pub id: Option<Id>,
    /// What is wrong.
    pub detail: String,
    /// Snapshots and paths that use the damaged object (`snapshot id`,
    /// `path`): every snapshot, with at most [`PATHS_PER_SNAPSHOT`] paths
    /// each.
    pub used_by: Vec<(Id, String)>,
}

/// The findings of a check.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CheckReport {
    /// Packs examined.
    pub packs: u64,
    /// Snapshots examined.
    pub snapshots: u64,
    /// Trees walked (each distinct tree once).
    pub trees: u64,
    /// Blobs opened and verified (with `read_data`).
    pub blobs_read: u64,
    /// Packs present in the store that the catalog does not know (harmless; reclaimable).
    pub unreferenced_packs: Vec<Id>,
    /// Everything found wrong.
    pub problems: Vec<Problem>,
}

impl CheckReport {
    /// True when nothing is wrong.
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Run a check of `repo`; `read_data` also opens every blob.
pub fn check(repo: &Repository, read_data: bool) -> Result<CheckReport> {
    let mut r = CheckReport::default();
    let mut bad_blobs: BTreeMap<Id, String> = BTreeMap::new();
    let problem = |r: &mut CheckReport, what: &str, id: Option<Id>, detail: String| {
        r.problems.push(Problem {
            what: what.into(),
            id,
            detail,
            used_by: Vec::new(),
        })
    };

    let cat = repo.catalog()?;
    if let Err(e) = cat.integrity_check()? {
        problem(
            &mut r,
            "catalog",
            None,
            format!("SQLite integrity check: {e}"),
        );
    }
    drop(cat);
    // One read snapshot for the pack list and the pass over blob rows, taken
    // before listing the store: a pack is durable before its row commits,
    // so every pack in the snapshot is in the listing. With `read_data` it
    // lasts while every pack is read; meanwhile checkpoints cannot pass it,
    // so concurrent writers grow `catalog.db-wal` until the check ends.
    let reader = crate::catalog::Catalog::open_reader(&repo.catalog_path())?;
    reader.begin_read()?;
    let packs = reader.packs()?;
    let stored: BTreeSet<Id> = repo.store().list()?.into_iter().collect();
    let catalogued: BTreeMap<Id, u64> = packs.iter().map(|p| (p.0, p.1)).collect();
    drop(packs);
    r.unreferenced_packs = stored
        .iter()
        .filter(|n| !catalogued.contains_key(n))
        .copied()
        .collect();

    // Packs: present, right size, trailer agrees with the catalog. Each
    // pack's rows come from one sorted pass (no index by pack); packs
    // without rows are checked after it. Problems are sorted by pack name.
    let first_pack_problem = r.problems.len();
    let mut unvisited: BTreeSet<Id> = catalogued.keys().copied().collect();
    let pc = PackCheck {
        repo,
        stored: &stored,
        read_data,
    };
    reader.for_each_blob_by_pack(|name, rows| {
        // Same snapshot as `packs`: every pack with rows is listed there.
        if let Some(&size) = catalogued.get(&name) {
            unvisited.remove(&name);
            pc.check(&name, size, &rows, &mut r, &mut bad_blobs);
        }
        Ok(())
    })?;
    for (name, &size) in catalogued.iter().filter(|(n, _)| unvisited.contains(n)) {
        pc.check(name, size, &[], &mut r, &mut bad_blobs);
    }
    r.problems[first_pack_problem..].sort_by_key(|p| p.id);
    for (id, pack_id) in reader.blobs_without_pack()? {
        bad_blobs.insert(
            id,
            format!(
                "catalogued in pack row {pack_id}, which the catalog does not have \
                 (a pack forgotten without all its rows); run `hubvault repo rebuild-catalog`"
            ),
        );
    }
    reader.end_read()?;

    // Snapshots: files and rows agree; every tree opens; every blob is catalogued.
    let rows = repo.snapshots()?;
    let row_ids: BTreeSet<Id> = rows.iter().map(|(id, _)| *id).collect();
    if let Ok(rd) = std::fs::read_dir(repo.snapshots_dir()) {
        for f in rd.flatten() {
            if let Some(id) = f.file_name().to_str().and_then(Id::from_hex) {
                match snapshot::read(&repo.snapshots_dir(), &repo.keys().metadata, &id) {
                    Ok(_) if !row_ids.contains(&id) => problem(
                        &mut r,
                        "snapshot",
                        Some(id),
                        "snapshot file not in the catalog (run rebuild-catalog)".into(),
                    ),
                    Ok(_) => {}
                    Err(e) => problem(&mut r, "snapshot", Some(id), e.to_string()),
                }
            }
        }
    }
    // Distinct trees are walked once (an unchanged subtree is shared by every
    // snapshot); data ids are looked up per reference rather than remembered,
    // so memory stays bounded by the number of trees, not of blobs.
    let mut seen_trees = HashSet::new();
    for (sid, snap) in &rows {
        r.snapshots += 1;
        if !repo.snapshots_dir().join(sid.to_hex()).exists() {
            problem(
                &mut r,
                "snapshot",
                Some(*sid),
                "catalogued but its snapshot file is missing".into(),
            );
        }
        let mut stack = vec![snap.tree];
        while let Some(t) = stack.pop() {
            if !seen_trees.insert(t) {
                continue;
            }
            r.trees += 1;
            let entries = match repo.read_tree(&t) {
                Ok(e) => e,
                Err(e) => {
                    bad_blobs
                        .entry(t)
                        .or_insert_with(|| format!("tree unreadable: {e}"));
                    continue;
                }
            };
            for e in entries {
                if let Some(s) = e.subtree {
                    stack.push(s);
                }
                for c in e.chunks {
                    if !bad_blobs.contains_key(&c) && !reader.contains(&c)? {
                        bad_blobs.insert(c, "referenced but not catalogued (missing)".into());
                    }
                }
            }
        }
    }

    // A clean structure check lifts a rebuild's "degraded" marker.
    if bad_blobs.is_empty() && r.problems.is_empty() {
        let marker = repo.root().join(crate::rebuild::DEGRADED_MARKER);
        if marker.exists() {
            let _ = std::fs::remove_file(&marker);
        }
    }
    // Name every damaged blob with where it is used.
    if !bad_blobs.is_empty() {
        let users = find_users(repo, &rows, &bad_blobs)?;
        for (id, detail) in bad_blobs {
            r.problems.push(Problem {
                what: "blob".into(),
                id: Some(id),
                detail,
                used_by: users.get(&id).cloned().unwrap_or_default(),
            });
        }
    }
    Ok(r)
}

/// What checking one pack needs besides the pack.
struct PackCheck<'a> {
    repo: &'a Repository,
    /// Packs in the store.
    stored: &'a BTreeSet<Id>,
    read_data: bool,
}

impl PackCheck<'_> {
    /// Check catalogued pack `name` of `size` bytes, whose catalogued blob
    /// rows are `rows`: present in the store, of that size, with a trailer
    /// listing every row; with `read_data`, its checksum and blobs.
    fn check(
        &self,
        name: &Id,
        size: u64,
        rows: &[PackEntry],
        r: &mut CheckReport,
        bad_blobs: &mut BTreeMap<Id, String>,
    ) {
        let repo = self.repo;
        r.packs += 1;
        let mut fail = |r: &mut CheckReport, detail: String| {
            for b in rows {
                bad_blobs
                    .entry(b.id)
                    .or_insert_with(|| format!("in damaged pack {name}"));
            }
            r.problems.push(Problem {
                what: "pack".into(),
                id: Some(*name),
                detail,
                used_by: Vec::new(),
            });
        };
        if !self.stored.contains(name) {
            fail(r, "missing from the pack store".into());
            return;
        }
        match repo.store().size(name) {
            Ok(s) if s == size => {}
            Ok(s) => {
                fail(
                    r,
                    format!("is {s} bytes, catalogued as {size} (truncated?)"),
                );
                return;
            }
            Err(e) => {
                fail(r, e.to_string());
                return;
            }
        }
        match read_trailer(repo.store().as_ref(), name, &repo.keys().metadata) {
            Ok(entries) => {
                let listed: HashSet<_> =
                    entries.iter().map(|e| (e.id, e.offset, e.length)).collect();
                for b in rows {
                    if !listed.contains(&(b.id, b.offset, b.length)) {
                        bad_blobs.insert(
                            b.id,
                            format!("catalogued in pack {name} but not in its trailer"),
                        );
                    }
                }
                if self.read_data {
                    read_pack_data(repo, name, rows, r, bad_blobs);
                }
            }
            Err(e) => fail(r, format!("trailer unreadable: {e}")),
        }
    }
}

/// Verify the checksum of pack `name` and open each of its blobs.
fn read_pack_data(
    repo: &Repository,
    name: &Id,
    rows: &[PackEntry],
    r: &mut CheckReport,
    bad: &mut BTreeMap<Id, String>,
) {
    if let Err(e) = verify_checksum(repo.store().as_ref(), name) {
        r.problems.push(Problem {
            what: "pack".into(),
            id: Some(*name),
            detail: e.to_string(),
            used_by: Vec::new(),
        });
    }
    // A content-blind keyring (a collector's) cannot open data blobs: their
    // bytes are covered by the pack checksum above, trees are still opened.
    let blind = repo.keys().content.is_none();
    for b in rows.iter().filter(|b| !(blind && b.kind == BlobKind::Data)) {
        let mut sealed = vec![0u8; b.length as usize];
        let res = repo
            .store()
            .read_at(name, b.offset, &mut sealed)
            .and_then(|_| repo.keyset(b.kind))
            .and_then(|k| blob::open(k, b.kind, &b.id, &sealed));
        r.blobs_read += 1;
        if let Err(e) = res {
            bad.insert(b.id, e.to_string());
        }
    }
}

/// Paths listed per damaged id and snapshot; the rest are not looked for.
/// Every snapshot that uses the id is listed.
pub const PATHS_PER_SNAPSHOT: usize = 20;

/// For each damaged id, the (snapshot, path) pairs that reference it: every
/// snapshot that does, with at most [`PATHS_PER_SNAPSHOT`] paths each.
///
/// What lies below each distinct tree (per damaged id, its first paths
/// relative to that tree) is worked out once and memoised: snapshots of one
/// source share most of their trees, and a tree naming one subtree many
/// times costs one visit. So the work grows with the distinct trees plus
/// the paths listed, not with snapshots times files.
fn find_users(
    repo: &Repository,
    snaps: &[(Id, crate::snapshot::Snapshot)],
    bad: &BTreeMap<Id, String>,
) -> Result<BTreeMap<Id, Vec<(Id, String)>>> {
    let mut memo: HashMap<Id, Option<Below>> = HashMap::new();
    let mut out: BTreeMap<Id, Vec<(Id, String)>> = BTreeMap::new();
    for (sid, snap) in snaps {
        if bad.contains_key(&snap.tree) {
            out.entry(snap.tree)
                .or_default()
                .push((*sid, "/".to_string()));
        }
        damaged_below(repo, bad, snap.tree, &mut memo);
        if let Some(Some(below)) = memo.get(&snap.tree) {
            for (id, paths) in below {
                let v = out.entry(*id).or_default();
                v.extend(paths.iter().map(|p| (*sid, p.clone())));
            }
        }
    }
    Ok(out)
}

/// Per damaged id below a tree, its first [`PATHS_PER_SNAPSHOT`] paths
/// relative to the tree ("/dir/file").
type Below = BTreeMap<Id, Vec<String>>;

/// Add `path` to `id`'s paths in `below`, unless there are enough already
/// or it was the last one added (one file naming one chunk twice).
fn note_path(below: &mut Below, id: Id, path: &str) {
    let v = below.entry(id).or_default();
    if v.len() < PATHS_PER_SNAPSHOT && v.last().is_none_or(|p| p != path) {
        v.push(path.to_string());
    }
}

/// Fill `memo` for `root` and every tree below it: `None` when the tree
/// leads to no damaged id, otherwise what it leads to and where.
/// Post-order with an explicit stack, each distinct tree read once; a tree
/// that cannot be read leads nowhere further (it is damaged itself, and
/// named so), and a tree met again while still open (a cycle) is not
/// followed.
fn damaged_below(
    repo: &Repository,
    bad: &BTreeMap<Id, String>,
    root: Id,
    memo: &mut HashMap<Id, Option<Below>>,
) {
    /// An entry that matters here: its path, the damaged ids it names
    /// itself, and its subtree.
    struct Named {
        path: String,
        bad: Vec<Id>,
        sub: Option<Id>,
    }
    enum Visit {
        Enter(Id),
        Leave(Id, Vec<Named>),
    }
    // Entered, not yet left: met again, it would be a cycle.
    let mut open: HashSet<Id> = HashSet::new();
    let mut stack = vec![Visit::Enter(root)];
    while let Some(v) = stack.pop() {
        match v {
            Visit::Enter(t) => {
                if memo.contains_key(&t) || !open.insert(t) {
                    continue;
                }
                let Ok(entries) = repo.read_tree(&t) else {
                    open.remove(&t);
                    memo.insert(t, None);
                    continue;
                };
                let mut named = Vec::new();
                for e in entries {
                    let sub = e.subtree.filter(|_| e.kind == EntryKind::Dir);
                    let mut ids: Vec<Id> = e
                        .chunks
                        .iter()
                        .filter(|c| bad.contains_key(c))
                        .copied()
                        .collect();
                    if let Some(s) = sub.filter(|s| bad.contains_key(s)) {
                        ids.push(s);
                    }
                    if sub.is_some() || !ids.is_empty() {
                        let path = format!("/{}", String::from_utf8_lossy(&e.name));
                        named.push(Named {
                            path,
                            bad: ids,
                            sub,
                        });
                    }
                }
                let enter: Vec<Visit> = named
                    .iter()
                    .filter_map(|n| n.sub.map(Visit::Enter))
                    .collect();
                stack.push(Visit::Leave(t, named));
                stack.extend(enter);
            }
            Visit::Leave(t, named) => {
                let mut below = Below::new();
                for n in &named {
                    for id in &n.bad {
                        note_path(&mut below, *id, &n.path);
                    }
                    if let Some(Some(sub)) = n.sub.and_then(|s| memo.get(&s)) {
                        for (id, paths) in sub {
                            for p in paths {
                                note_path(&mut below, *id, &format!("{}{p}", n.path));
                            }
                        }
                    }
                }
                open.remove(&t);
                memo.insert(t, (!below.is_empty()).then_some(below));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backup::{self, BackupOptions, ParentChoice};
    use crate::blob::BlobKind;

    fn entry(n: u8, offset: u64) -> PackEntry {
        PackEntry {
            kind: BlobKind::Data,
            id: Id([n; 32]),
            offset,
            length: 10,
            raw_length: 10,
        }
    }

    fn detail_of<'a>(r: &'a CheckReport, what: &str, id: Id) -> Vec<&'a str> {
        r.problems
            .iter()
            .filter(|p| p.what == what && p.id == Some(id))
            .map(|p| p.detail.as_str())
            .collect()
    }

    /// Every per-pack finding, with the rows of each pack coming from the
    /// one pass over blob rows, and packs without rows checked too.
    #[test]
    fn check_finds_what_is_wrong_with_each_pack() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("repo");
        let repo = crate::repo::test_repository(&root);
        let src = dir.path().join("src");
        std::fs::create_dir(&src).expect("mkdir");
        std::fs::write(src.join("f"), b"some content").expect("write");
        let opts = BackupOptions {
            parent: ParentChoice::None,
            threads: 1,
            ..BackupOptions::default()
        };
        backup::backup(&repo, &[src], &opts).expect("backup");
        let clean = check(&repo, true).expect("check");
        assert!(clean.is_ok(), "{:#?}", clean.problems);
        let real = repo.catalog().expect("c").packs().expect("packs");
        let real_count = real.len() as u64;
        let (real_pack, real_size, _) = real[0];

        let (no_rows, gone, orphaned) = (Id([0xf0; 32]), Id([0x01; 32]), Id([0x02; 32]));
        {
            let mut cat = repo.catalog().expect("c");
            // A pack without rows (its one blob catalogued elsewhere), no file.
            cat.insert_pack(&no_rows, 100, &[])
                .expect("pack without rows");
            // A pack with rows, no file.
            cat.insert_pack(&gone, 100, &[entry(1, 8), entry(2, 18)])
                .expect("missing pack");
            // A row in the real pack that its trailer does not list.
            cat.insert_pack(&real_pack, real_size, &[entry(3, 8)])
                .expect("extra row");
            // A row left behind by a pack forgotten without it.
            cat.insert_pack(&orphaned, 100, &[entry(4, 8), entry(5, 18)])
                .expect("orphaned");
            cat.forget_pack(&orphaned, &[entry(4, 8)]).expect("forget");
        }
        let r = check(&repo, false).expect("check");
        assert_eq!(r.packs, real_count + 2);
        assert_eq!(
            detail_of(&r, "pack", no_rows),
            vec!["missing from the pack store"]
        );
        assert_eq!(
            detail_of(&r, "pack", gone),
            vec!["missing from the pack store"]
        );
        let gone_msg = format!("in damaged pack {gone}");
        assert_eq!(detail_of(&r, "blob", Id([1; 32])), vec![gone_msg.as_str()]);
        assert_eq!(detail_of(&r, "blob", Id([2; 32])), vec![gone_msg.as_str()]);
        assert_eq!(
            detail_of(&r, "blob", Id([3; 32])),
            vec![format!("catalogued in pack {real_pack} but not in its trailer").as_str()]
        );
        let orphan = detail_of(&r, "blob", Id([5; 32]));
        assert!(
            orphan.len() == 1 && orphan[0].contains("which the catalog does not have"),
            "{orphan:?}"
        );
        assert!(detail_of(&r, "blob", Id([4; 32])).is_empty());
        // Pack problems come sorted by pack name.
        let pack_ids: Vec<Id> = r
            .problems
            .iter()
            .filter(|p| p.what == "pack")
            .filter_map(|p| p.id)
            .collect();
        assert_eq!(pack_ids, vec![gone, no_rows]);

        // A truncated pack names its blobs.
        let store = crate::store::dir::DirStore::new(root.join("packs"), root.join("tmp"));
        let path = store.path_of(&real_pack);
        let f = std::fs::File::options()
            .write(true)
            .open(&path)
            .expect("open pack");
        f.set_len(real_size / 2).expect("truncate");
        let r = check(&repo, false).expect("check");
        assert_eq!(
            detail_of(&r, "pack", real_pack),
            vec![
                format!(
                    "is {} bytes, catalogued as {real_size} (truncated?)",
                    real_size / 2
                )
                .as_str()
            ]
        );
        let rows = repo
            .catalog()
            .expect("c")
            .blobs_in_pack(&real_pack)
            .expect("rows");
        for b in rows.iter().filter(|b| b.id != Id([3; 32])) {
            assert_eq!(
                detail_of(&r, "blob", b.id),
                vec![format!("in damaged pack {real_pack}").as_str()]
            );
        }
    }
}
