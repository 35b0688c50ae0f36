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

use std::collections::{BTreeMap, BTreeSet, HashSet};

use serde::Serialize;

use crate::blob;
use crate::error::Result;
use crate::id::Id;
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
    /// Snapshots and paths that use the damaged object (`snapshot id`, `path`).
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
    let packs = cat.packs()?;
    drop(cat);
    let stored: BTreeSet<Id> = repo.store().list()?.into_iter().collect();
    let catalogued: BTreeSet<Id> = packs.iter().map(|p| p.0).collect();
    r.unreferenced_packs = stored.difference(&catalogued).copied().collect();

    // Packs: present, right size, trailer agrees with the catalog.
    for (name, size, _) in &packs {
        r.packs += 1;
        let rows = repo.catalog()?.blobs_in_pack(name)?;
        let mut fail = |r: &mut CheckReport, detail: String| {
            for b in &rows {
                bad_blobs
                    .entry(b.id)
                    .or_insert_with(|| format!("in damaged pack {name}"));
            }
            problem(r, "pack", Some(*name), detail);
        };
        if !stored.contains(name) {
            fail(&mut r, "missing from the pack store".into());
            continue;
        }
        match repo.store().size(name) {
            Ok(s) if s == *size => {}
            Ok(s) => {
                fail(
                    &mut r,
                    format!("is {s} bytes, catalogued as {size} (truncated?)"),
                );
                continue;
            }
            Err(e) => {
                fail(&mut r, e.to_string());
                continue;
            }
        }
        match read_trailer(repo.store().as_ref(), name, &repo.keys().metadata) {
            Ok(mut entries) => {
                entries.sort_by_key(|e| e.offset);
                let listed: HashSet<_> =
                    entries.iter().map(|e| (e.id, e.offset, e.length)).collect();
                for b in &rows {
                    if !listed.contains(&(b.id, b.offset, b.length)) {
                        bad_blobs.insert(
                            b.id,
                            format!("catalogued in pack {name} but not in its trailer"),
                        );
                    }
                }
                if read_data {
                    read_pack_data(repo, name, &rows, &mut r, &mut bad_blobs);
                }
            }
            Err(e) => fail(&mut r, format!("trailer unreadable: {e}")),
        }
    }

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
    let reader = crate::catalog::Catalog::open_reader(&repo.catalog_path())?;
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

/// Verify the checksum of pack `name` and open each of its blobs.
fn read_pack_data(
    repo: &Repository,
    name: &Id,
    rows: &[crate::pack::PackEntry],
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
    for b in rows {
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

/// For each damaged id, the (snapshot, path) pairs that reference it.
fn find_users(
    repo: &Repository,
    snaps: &[(Id, crate::snapshot::Snapshot)],
    bad: &BTreeMap<Id, String>,
) -> Result<BTreeMap<Id, Vec<(Id, String)>>> {
    let mut out: BTreeMap<Id, Vec<(Id, String)>> = BTreeMap::new();
    for (sid, snap) in snaps {
        if bad.contains_key(&snap.tree) {
            out.entry(snap.tree).or_default().push((*sid, "/".into()));
        }
        let mut stack = vec![(snap.tree, String::new())];
        while let Some((t, prefix)) = stack.pop() {
            let Ok(entries) = repo.read_tree(&t) else {
                continue;
            };
            for e in entries {
                let path = format!("{prefix}/{}", String::from_utf8_lossy(&e.name));
                if e.kind == EntryKind::Dir
                    && let Some(s) = e.subtree
                {
                    if bad.contains_key(&s) {
                        out.entry(s).or_default().push((*sid, path.clone()));
                    }
                    stack.push((s, path.clone()));
                }
                for c in &e.chunks {
                    if bad.contains_key(c) {
                        let v = out.entry(*c).or_default();
                        if v.last() != Some(&(*sid, path.clone())) {
                            v.push((*sid, path.clone()));
                        }
                    }
                }
            }
        }
    }
    Ok(out)
}
