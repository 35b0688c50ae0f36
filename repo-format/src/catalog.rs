//! The catalog: an SQLite index of blobs → (pack, offset, length), packs and
//! snapshots.
//!
//! It is an index, not the truth: packs and snapshot files are, and
//! [`crate::rebuild`] recreates the catalog from them. WAL mode with
//! `synchronous=FULL`: once a transaction commits, it survives power loss,
//! so a blob is acknowledged only when its pack is durable *and* its rows are.
//! Blob rows of a pack go in one transaction, after the pack is durable.
//!
//! Schema 2 has no index on `blobs(pack_id)`: it held `(pack_id, id)` per
//! blob, over 40% of the file. What needed it reads the pack's trailer
//! instead (dropping a pack: [`Catalog::forget_pack`]), `packs.kind`
//! (listing data-only packs: [`Catalog::packs_only_of`]), or one sorted pass
//! over every blob ([`Catalog::for_each_blob_by_pack`], for `check`).
//! Schema-1 catalogs are migrated by [`Catalog::open`].
//!
//! Schema 3 adds `packs.state` ([`PackState`]): an agent's spool marks a
//! data pack uploaded once the collector holds its every blob, and dropped
//! once its file is deleted. A dropped pack keeps its rows, so the blobs
//! still count as stored for deduplication ([`Catalog::contains`]) but not
//! as readable here ([`Catalog::lookup`], [`Catalog::not_local`]).

use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags, OptionalExtension, TransactionBehavior, params};

use crate::blob::BlobKind;
use crate::error::{Error, Result};
use crate::id::Id;
use crate::pack::PackEntry;
use crate::snapshot::Snapshot;

/// Schema version stored in `PRAGMA user_version`.
pub const SCHEMA_VERSION: i64 = 3;

/// `packs.kind` of a pack listing both kinds of blob, or none; a pack
/// listing one kind has that kind's byte (`BlobKind as u8`).
pub const PACK_KIND_MIXED: u8 = 2;

/// `kind DEFAULT 2`, `state DEFAULT 0`: `ALTER TABLE … ADD COLUMN … NOT
/// NULL` needs a default, so a migrated catalog and a new one have the same
/// columns.
const SCHEMA: &str = "
CREATE TABLE packs (
    pack_id INTEGER PRIMARY KEY,
    name    BLOB NOT NULL UNIQUE,
    size    INTEGER NOT NULL,
    blobs   INTEGER NOT NULL,
    kind    INTEGER NOT NULL DEFAULT 2,
    state   INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE blobs (
    id         BLOB PRIMARY KEY,
    kind       INTEGER NOT NULL,
    pack_id    INTEGER NOT NULL REFERENCES packs(pack_id),
    offset     INTEGER NOT NULL,
    length     INTEGER NOT NULL,
    raw_length INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE snapshots (
    id      BLOB PRIMARY KEY,
    time_ns INTEGER NOT NULL,
    tree    BLOB NOT NULL,
    json    TEXT NOT NULL
) WITHOUT ROWID;
CREATE INDEX snapshots_by_time ON snapshots(time_ns);
";

/// Where a pack's bytes are (`packs.state`). Only an agent's spool, which
/// is not a store of record, ever leaves [`PackState::Local`]: see
/// docs/repo-format.md, 5.10.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum PackState {
    /// The pack file is here; nothing is known of other copies.
    Local = 0,
    /// The pack file is here, and every blob it lists is durable at the
    /// agent's collector: it can be dropped without a blob-by-blob check.
    Uploaded = 1,
    /// The file was deleted after upload. The rows stay: the blobs are
    /// stored (at the collector), so a backup does not store them again,
    /// but they cannot be read here.
    Dropped = 2,
}

impl PackState {
    fn from_i64(v: i64) -> Option<PackState> {
        match v {
            0 => Some(PackState::Local),
            1 => Some(PackState::Uploaded),
            2 => Some(PackState::Dropped),
            _ => None,
        }
    }
}

/// Where a blob is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobLocation {
    /// Data or tree.
    pub kind: BlobKind,
    /// Name of the pack holding it.
    pub pack: Id,
    /// Offset of its sealed bytes in the pack.
    pub offset: u64,
    /// Length of its sealed bytes.
    pub length: u32,
    /// Length of its plaintext.
    pub raw_length: u32,
}

/// Schema 1 → 2, in one transaction: `packs.kind` filled from the blob rows
/// while `blobs_by_pack` still exists (one index range per pack), then the
/// index dropped. A pack without blob rows gets the default, 2 (mixed).
const MIGRATE_1_TO_2: &str = "
ALTER TABLE packs ADD COLUMN kind INTEGER NOT NULL DEFAULT 2;
UPDATE packs SET kind = (
    SELECT CASE WHEN min(b.kind) = max(b.kind) THEN min(b.kind) ELSE 2 END
    FROM blobs b WHERE b.pack_id = packs.pack_id
);
DROP INDEX blobs_by_pack;
PRAGMA user_version = 2;
";

/// Schema 2 → 3: every pack is local.
const MIGRATE_2_TO_3: &str = "
ALTER TABLE packs ADD COLUMN state INTEGER NOT NULL DEFAULT 0;
PRAGMA user_version = 3;
";

/// Every blob row with its pack's name, grouped by pack. CROSS JOIN keeps
/// `blobs` the outer loop: one scan, a primary-key search of `packs` per
/// row, then a sort; never a scan of `blobs` per pack.
/// Rows of dropped packs are left out: there is no file to compare them with.
const BLOBS_BY_PACK_SQL: &str =
    "SELECT b.pack_id, p.name, b.kind, b.id, b.offset, b.length, b.raw_length
     FROM blobs b CROSS JOIN packs p ON p.pack_id = b.pack_id
     WHERE p.state < 2
     ORDER BY b.pack_id, b.offset";

/// One blob row of one pack, by primary key.
const FORGET_BLOB_SQL: &str = "DELETE FROM blobs WHERE id = ?1 AND pack_id = ?2";

/// Packs of one kind whose files are here, from `packs` alone.
const PACKS_OF_KIND_SQL: &str =
    "SELECT name, state FROM packs WHERE kind = ?1 AND state < 2 ORDER BY name";

/// A pack row; one that names a dropped pack is taken back (its file was
/// written again, by a restore that fetched its blobs).
const INSERT_PACK_SQL: &str = "INSERT INTO packs(name, size, blobs, kind) VALUES (?1, ?2, ?3, ?4)
     ON CONFLICT(name) DO UPDATE SET state = 0 WHERE state = 2";

/// A blob row. An id already catalogued keeps its first location, unless
/// that location's pack was dropped: the new, readable copy replaces it.
/// (An upsert's update counts as a change; a false `WHERE` as none.)
const INSERT_BLOB_SQL: &str =
    "INSERT INTO blobs(id, kind, pack_id, offset, length, raw_length) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
     ON CONFLICT(id) DO UPDATE SET kind = excluded.kind, pack_id = excluded.pack_id,
         offset = excluded.offset, length = excluded.length, raw_length = excluded.raw_length
     WHERE (SELECT state FROM packs WHERE pack_id = blobs.pack_id) = 2";

/// A blob's location and its pack's state.
const LOCATE_SQL: &str = "SELECT b.kind, p.name, b.offset, b.length, b.raw_length, p.state
     FROM blobs b JOIN packs p ON p.pack_id = b.pack_id WHERE b.id = ?1";

/// `packs.kind` of a pack listing `entries`.
fn pack_kind(entries: &[PackEntry]) -> u8 {
    let mut kinds = entries.iter().map(|e| e.kind);
    match kinds.next() {
        Some(first) if kinds.all(|k| k == first) => first as u8,
        _ => PACK_KIND_MIXED,
    }
}

/// `kind, id, offset, length, raw_length` of a blob row, from column `first` on.
fn blob_columns(
    r: &rusqlite::Row<'_>,
    first: usize,
) -> rusqlite::Result<(u8, Vec<u8>, i64, u32, u32)> {
    Ok((
        r.get(first)?,
        r.get(first + 1)?,
        r.get(first + 2)?,
        r.get(first + 3)?,
        r.get(first + 4)?,
    ))
}

/// A connection to the catalog.
pub struct Catalog {
    conn: Connection,
    path: PathBuf,
}

fn cat_err(what: &str) -> impl FnOnce(rusqlite::Error) -> Error + '_ {
    move |e| Error::catalog(what, e)
}

impl Catalog {
    /// Create a new, empty catalog at `path` (fails if one exists).
    pub fn create(path: &Path) -> Result<Self> {
        if path.exists() {
            return Err(Error::Refused(format!(
                "catalog {} already exists",
                path.display()
            )));
        }
        let c = Self::open_conn(path, true)?;
        c.conn
            .execute_batch(SCHEMA)
            .map_err(cat_err("creating schema"))?;
        c.conn
            .pragma_update(None, "user_version", SCHEMA_VERSION)
            .map_err(cat_err("setting schema version"))?;
        Ok(c)
    }

    /// Open the existing catalog read-write, checking it (`quick_check`) and
    /// its schema version; a schema-1 catalog is migrated to schema 2 first
    /// (see [`Catalog::migrate_from_1`]). Any other version is refused.
    pub fn open(path: &Path) -> Result<Self> {
        if !path.exists() {
            return Err(Error::BadRepository {
                path: path.to_path_buf(),
                detail: "catalog is missing; run `hubvault repo rebuild-catalog` to recreate it from the packs".into(),
            });
        }
        // A file too damaged to set up (a truncated header) fails here,
        // before the integrity check: it needs the same advice.
        let mut c = Self::open_conn(path, true).map_err(|e| Error::BadRepository {
            path: path.to_path_buf(),
            detail: format!("catalog unreadable ({e}); run `hubvault repo rebuild-catalog`"),
        })?;
        let check: String = c
            .conn
            .query_row("PRAGMA quick_check", [], |r| r.get(0))
            .map_err(|e| Error::BadRepository {
                path: path.to_path_buf(),
                detail: format!("catalog unreadable ({e}); run `hubvault repo rebuild-catalog`"),
            })?;
        if check != "ok" {
            return Err(Error::BadRepository {
                path: path.to_path_buf(),
                detail: format!("catalog damaged ({check}); run `hubvault repo rebuild-catalog`"),
            });
        }
        let mut v = c.schema_version()?;
        if v == 1 {
            c.migrate(1, MIGRATE_1_TO_2)?;
            v = c.schema_version()?;
        }
        if v == 2 {
            c.migrate(2, MIGRATE_2_TO_3)?;
            v = c.schema_version()?;
        }
        if v != SCHEMA_VERSION {
            return Err(Error::BadRepository {
                path: path.to_path_buf(),
                detail: format!(
                    "catalog schema {v}, this build reads {SCHEMA_VERSION} (and migrates 1 and 2)"
                ),
            });
        }
        Ok(c)
    }

    /// The catalog's `PRAGMA user_version`.
    fn schema_version(&self) -> Result<i64> {
        self.conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(cat_err("reading schema version"))
    }

    /// Migrate a catalog of schema `from` to `from + 1` by running `sql` (which
    /// sets `user_version`) in one write transaction. The version is read
    /// again under the write lock, so two processes opening one catalog at
    /// once migrate it once. 1 → 2 adds and fills `packs.kind` and drops
    /// `blobs_by_pack` (freed index pages stay in the file for later
    /// inserts; a rebuild or `VACUUM` returns them); 2 → 3 adds `packs.state`.
    fn migrate(&mut self, from: i64, sql: &str) -> Result<()> {
        let what = || {
            format!(
                "migrating catalog {} from schema {from} to {} (rolled back; \
                 `hubvault repo rebuild-catalog` recreates it at schema {SCHEMA_VERSION})",
                self.path.display(),
                from + 1
            )
        };
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| Error::catalog(what(), e))?;
        let v: i64 = tx
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(|e| Error::catalog(what(), e))?;
        if v != from {
            return Ok(()); // another process migrated it meanwhile
        }
        tx.execute_batch(sql)
            .map_err(|e| Error::catalog(what(), e))?;
        tx.commit().map_err(|e| Error::catalog(what(), e))
    }

    /// A second, read-only connection (one per pipeline thread; WAL lets them read concurrently).
    pub fn open_reader(path: &Path) -> Result<Self> {
        Self::open_conn(path, false)
    }

    fn open_conn(path: &Path, write: bool) -> Result<Self> {
        let flags = if write {
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE
        } else {
            OpenFlags::SQLITE_OPEN_READ_ONLY
        } | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(path, flags)
            .map_err(|e| Error::catalog(format!("opening {}", path.display()), e))?;
        conn.busy_timeout(std::time::Duration::from_secs(30))
            .map_err(cat_err("setting busy timeout"))?;
        if write {
            conn.pragma_update(None, "journal_mode", "WAL")
                .map_err(cat_err("enabling WAL"))?;
            conn.pragma_update(None, "synchronous", "FULL")
                .map_err(cat_err("setting synchronous=FULL"))?;
        }
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(cat_err("enabling foreign keys"))?;
        conn.pragma_update(None, "cache_size", -65536)
            .map_err(cat_err("setting cache size"))?;
        Ok(Catalog {
            conn,
            path: path.to_path_buf(),
        })
    }

    /// Path of the database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Record a durable pack and its blobs, in one transaction.
    /// A blob already catalogued (a concurrent writer stored it too) keeps its
    /// first location, unless that location's pack was dropped (the new copy
    /// is readable: it takes the row); the ids of blobs that kept their
    /// first location are returned, in entry order, so
    /// a caller that must compare its copy with the first needs no lookup
    /// per blob to find them. `packs.kind` comes from `entries`: 0 only data,
    /// 1 only trees, 2 both or none.
    pub fn insert_pack(&mut self, name: &Id, size: u64, entries: &[PackEntry]) -> Result<Vec<Id>> {
        let tx = self
            .conn
            .transaction()
            .map_err(cat_err("beginning pack transaction"))?;
        tx.execute(
            INSERT_PACK_SQL,
            params![
                &name.0[..],
                size as i64,
                entries.len() as i64,
                pack_kind(entries)
            ],
        )
        .map_err(cat_err("inserting pack row"))?;
        let mut elsewhere = Vec::new();
        let pack_id: i64 = tx
            .query_row(
                "SELECT pack_id FROM packs WHERE name = ?1",
                [&name.0[..]],
                |r| r.get(0),
            )
            .map_err(cat_err("reading pack row"))?;
        {
            let mut st = tx
                .prepare_cached(INSERT_BLOB_SQL)
                .map_err(cat_err("preparing blob insert"))?;
            // In key order: each insert then lands next to the previous one
            // in the B-tree, on pages already in the cache.
            let mut order: Vec<usize> = (0..entries.len()).collect();
            order.sort_unstable_by_key(|&i| entries[i].id);
            let mut kept = vec![false; entries.len()];
            for i in order {
                let e = &entries[i];
                let added = st
                    .execute(params![
                        &e.id.0[..],
                        e.kind as u8,
                        pack_id,
                        e.offset as i64,
                        e.length,
                        e.raw_length
                    ])
                    .map_err(cat_err("inserting blob row"))?;
                kept[i] = added == 0;
            }
            elsewhere.extend(
                entries
                    .iter()
                    .zip(kept)
                    .filter(|(_, k)| *k)
                    .map(|(e, _)| e.id),
            );
        }
        tx.commit().map_err(cat_err("committing pack"))?;
        Ok(elsewhere)
    }

    /// Remove pack `name` and its blob rows, in one transaction (the pack
    /// file is the caller's to delete, afterwards). A pack not catalogued is
    /// not an error.
    ///
    /// `entries` MUST list every blob the catalog holds in this pack: the
    /// pack's trailer (`pack::reader::read_trailer`) does, as rows are only
    /// ever inserted from it; when the trailer is unreadable,
    /// [`Catalog::blobs_in_pack`] does (a full scan). Each entry's row goes
    /// only if it is in this pack (`id` and `pack_id`): an id the trailer
    /// lists but the catalog locates in another pack keeps its row. Without
    /// an index on `blobs(pack_id)`, neither the removal nor the pack row's
    /// foreign-key check could find the rest, so a row left out of `entries`
    /// would stay, pointing at no pack: `check` reports such rows.
    pub fn forget_pack(&mut self, name: &Id, entries: &[PackEntry]) -> Result<()> {
        // Deleting a parent row makes SQLite look for child rows, a scan of
        // every blob without the index: enforcement is off for this one
        // transaction (the pragma is a no-op inside one), back on after it.
        self.conn
            .pragma_update(None, "foreign_keys", "OFF")
            .map_err(cat_err("disabling foreign keys to forget a pack"))?;
        let res = self.forget_pack_rows(name, entries);
        let on = self
            .conn
            .pragma_update(None, "foreign_keys", "ON")
            .map_err(cat_err("re-enabling foreign keys after forgetting a pack"));
        res.and(on)
    }

    fn forget_pack_rows(&mut self, name: &Id, entries: &[PackEntry]) -> Result<()> {
        let what = |step: &str| format!("forgetting pack {name}: {step}");
        let tx = self
            .conn
            .transaction()
            .map_err(|e| Error::catalog(what("beginning the transaction"), e))?;
        let pack_id: Option<i64> = tx
            .query_row(
                "SELECT pack_id FROM packs WHERE name = ?1",
                [&name.0[..]],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| Error::catalog(what("reading its pack row"), e))?;
        if let Some(pack_id) = pack_id {
            {
                let mut st = tx
                    .prepare_cached(FORGET_BLOB_SQL)
                    .map_err(|e| Error::catalog(what("preparing blob row removal"), e))?;
                // In key order: each delete then finds its page where the
                // previous one left off, not at a random place in the B-tree.
                let mut ids: Vec<Id> = entries.iter().map(|e| e.id).collect();
                ids.sort_unstable();
                for id in &ids {
                    st.execute(params![&id.0[..], pack_id]).map_err(|err| {
                        Error::catalog(what(&format!("removing the row of blob {id}")), err)
                    })?;
                }
            }
            tx.execute("DELETE FROM packs WHERE pack_id = ?1", [pack_id])
                .map_err(|e| Error::catalog(what("removing its pack row"), e))?;
        }
        tx.commit()
            .map_err(|e| Error::catalog(what("committing"), e))
    }

    /// Packs holding only blobs of `kind` (and at least one) whose files are
    /// here, by name, with their state: from `packs` alone, without reading
    /// blob rows.
    pub fn packs_only_of(&self, kind: BlobKind) -> Result<Vec<(Id, PackState)>> {
        let mut st = self
            .conn
            .prepare_cached(PACKS_OF_KIND_SQL)
            .map_err(cat_err("preparing pack list by kind"))?;
        let rows = st
            .query_map([kind as u8], |r| {
                Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, i64>(1)?))
            })
            .map_err(cat_err("listing packs by kind"))?;
        let mut out = Vec::new();
        for row in rows {
            let (n, state) = row.map_err(cat_err("reading pack row"))?;
            let name = Id::from_slice(&n)
                .ok_or_else(|| Error::corrupt("catalog", "pack name not 32 bytes"))?;
            let state = PackState::from_i64(state).ok_or_else(|| {
                Error::corrupt("catalog", format!("pack {name} has state {state}"))
            })?;
            out.push((name, state));
        }
        Ok(out)
    }

    /// Whether any pack here may hold data blobs not known to be held
    /// elsewhere: a [`PackState::Local`] pack that is not tree-only. When
    /// none is, every data blob catalogued is in an uploaded or dropped
    /// pack (an agent then knows its collector holds them all).
    pub fn any_local_data(&self) -> Result<bool> {
        self.conn
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM packs WHERE state = 0 AND kind != 1)",
                [],
                |r| r.get(0),
            )
            .map_err(cat_err("looking for local data packs"))
    }

    /// Set the state of packs `names` (one transaction; a name not
    /// catalogued is skipped). An agent marks a data pack
    /// [`PackState::Uploaded`] once the collector holds its every blob, and
    /// [`PackState::Dropped`] before it deletes the file (so the catalog
    /// never offers a missing file for reading).
    pub fn set_pack_state(&mut self, names: &[Id], state: PackState) -> Result<()> {
        let tx = self
            .conn
            .transaction()
            .map_err(cat_err("beginning pack state update"))?;
        {
            let mut st = tx
                .prepare_cached("UPDATE packs SET state = ?1 WHERE name = ?2")
                .map_err(cat_err("preparing pack state update"))?;
            for n in names {
                st.execute(params![state as i64, &n.0[..]])
                    .map_err(|e| Error::catalog(format!("setting the state of pack {n}"), e))?;
            }
        }
        tx.commit().map_err(cat_err("committing pack states"))
    }

    /// Remove the rows of blobs `ids` (one transaction; an id not
    /// catalogued is skipped); returns how many went. For an agent told that
    /// its collector lost these blobs: uncatalogued, they are stored (and
    /// so uploaded) again by the next backup that meets them. Their packs
    /// keep their rows: what remains in them is still valid.
    pub fn forget_blobs(&mut self, ids: &[Id]) -> Result<u64> {
        let tx = self
            .conn
            .transaction()
            .map_err(cat_err("beginning blob removal"))?;
        let mut n = 0;
        {
            let mut st = tx
                .prepare_cached("DELETE FROM blobs WHERE id = ?1")
                .map_err(cat_err("preparing blob removal"))?;
            for id in ids {
                n += st
                    .execute([&id.0[..]])
                    .map_err(|e| Error::catalog(format!("removing blob {id}"), e))?
                    as u64;
            }
        }
        tx.commit().map_err(cat_err("committing blob removal"))?;
        Ok(n)
    }

    /// Where blob `id` can be read here: `None` when it is not catalogued
    /// or its pack was dropped.
    pub fn lookup(&self, id: &Id) -> Result<Option<BlobLocation>> {
        Ok(self
            .locate(id)?
            .filter(|(_, state)| *state != PackState::Dropped)
            .map(|(loc, _)| loc))
    }

    /// Where blob `id` is catalogued and the state of its pack (a dropped
    /// pack's location cannot be read: see [`PackState::Dropped`]).
    pub fn locate(&self, id: &Id) -> Result<Option<(BlobLocation, PackState)>> {
        let mut st = self
            .conn
            .prepare_cached(LOCATE_SQL)
            .map_err(cat_err("preparing lookup"))?;
        st.query_row([&id.0[..]], |r| {
            let kind: u8 = r.get(0)?;
            let pack: Vec<u8> = r.get(1)?;
            Ok((
                kind,
                pack,
                r.get::<_, i64>(2)?,
                r.get::<_, u32>(3)?,
                r.get::<_, u32>(4)?,
                r.get::<_, i64>(5)?,
            ))
        })
        .optional()
        .map_err(cat_err("looking up blob"))?
        .map(|(kind, pack, offset, length, raw_length, state)| {
            let loc = BlobLocation {
                kind: BlobKind::from_u8(kind).ok_or_else(|| {
                    Error::corrupt("catalog", format!("blob {id} has kind {kind}"))
                })?,
                pack: Id::from_slice(&pack)
                    .ok_or_else(|| Error::corrupt("catalog", "pack name not 32 bytes"))?,
                offset: offset as u64,
                length,
                raw_length,
            };
            let state = PackState::from_i64(state).ok_or_else(|| {
                Error::corrupt("catalog", format!("pack {} has state {state}", loc.pack))
            })?;
            Ok((loc, state))
        })
        .transpose()
    }

    /// True when blob `id` is catalogued: stored here, or uploaded from here
    /// and dropped (a backup need not store it again).
    pub fn contains(&self, id: &Id) -> Result<bool> {
        let mut st = self
            .conn
            .prepare_cached("SELECT 1 FROM blobs WHERE id = ?1")
            .map_err(cat_err("preparing contains"))?;
        st.exists([&id.0[..]]).map_err(cat_err("checking blob"))
    }

    /// Start a read transaction that lasts until this connection is dropped:
    /// every lookup then reads one snapshot of the catalog without taking
    /// locks per statement. For a backup's walker, which only asks whether
    /// blobs of the parent still exist: blobs vanish only through a rebuild
    /// or a prune, which need the exclusive repository lock.
    pub fn hold_read_snapshot(&self) -> Result<()> {
        self.conn
            .execute_batch("BEGIN DEFERRED; SELECT count(*) FROM packs WHERE 0;")
            .map_err(cat_err("starting a read snapshot"))
    }

    /// Begin a read transaction: lookups until [`Catalog::end_read`] see one
    /// snapshot (SQLite takes it at the first read) and take no lock each.
    pub fn begin_read(&self) -> Result<()> {
        self.conn
            .execute_batch("BEGIN DEFERRED")
            .map_err(cat_err("beginning a read transaction"))
    }

    /// End the read transaction [`Catalog::begin_read`] began.
    pub fn end_read(&self) -> Result<()> {
        self.conn
            .execute_batch("COMMIT")
            .map_err(cat_err("ending a read transaction"))
    }

    /// True when every id in `ids` is catalogued (stops at the first missing one).
    pub fn all_present(&self, ids: &[Id]) -> Result<bool> {
        for id in ids {
            if !self.contains(id)? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Of `ids`, the ones not catalogued, in the given order (one read transaction for the batch).
    pub fn missing(&mut self, ids: &[Id]) -> Result<Vec<Id>> {
        self.without_row(ids, "SELECT 1 FROM blobs WHERE id = ?1")
    }

    /// Of `ids`, the ones that cannot be read here (not catalogued, or in a
    /// dropped pack), in the given order, in one read transaction: what a
    /// restore must fetch first.
    pub fn not_local(&mut self, ids: &[Id]) -> Result<Vec<Id>> {
        self.without_row(
            ids,
            "SELECT 1 FROM blobs b JOIN packs p ON p.pack_id = b.pack_id
             WHERE b.id = ?1 AND p.state < 2",
        )
    }

    /// Of `ids`, those for which `sql` (one parameter, the id) finds no row,
    /// in the given order, in one read transaction.
    fn without_row(&mut self, ids: &[Id], sql: &str) -> Result<Vec<Id>> {
        let tx = self
            .conn
            .transaction()
            .map_err(cat_err("beginning lookup batch"))?;
        let mut out = Vec::new();
        {
            let mut st = tx
                .prepare_cached(sql)
                .map_err(cat_err("preparing batch lookup"))?;
            for id in ids {
                if !st.exists([&id.0[..]]).map_err(cat_err("checking blob"))? {
                    out.push(*id);
                }
            }
        }
        tx.commit().map_err(cat_err("ending lookup batch"))?;
        Ok(out)
    }

    /// The kind of each of `ids` (`None` where not catalogued), in the given
    /// order, in one read transaction: what a commit check needs per chunk.
    pub fn kinds(&mut self, ids: &[Id]) -> Result<Vec<Option<BlobKind>>> {
        let tx = self
            .conn
            .transaction()
            .map_err(cat_err("beginning kind batch"))?;
        let mut out = Vec::with_capacity(ids.len());
        {
            let mut st = tx
                .prepare_cached("SELECT kind FROM blobs WHERE id = ?1")
                .map_err(cat_err("preparing kind lookup"))?;
            for id in ids {
                let kind: Option<u8> = st
                    .query_row([&id.0[..]], |r| r.get(0))
                    .optional()
                    .map_err(cat_err("looking up a blob's kind"))?;
                out.push(match kind {
                    None => None,
                    Some(k) => Some(BlobKind::from_u8(k).ok_or_else(|| {
                        Error::corrupt("catalog", format!("blob {id} has kind {k}"))
                    })?),
                });
            }
        }
        tx.commit().map_err(cat_err("ending kind batch"))?;
        Ok(out)
    }

    /// Record a snapshot (after its file is durable).
    pub fn insert_snapshot(&self, id: &Id, snap: &Snapshot) -> Result<()> {
        let json = serde_json::to_string(snap)
            .map_err(|e| Error::corrupt(format!("snapshot {id}"), e.to_string()))?;
        self.conn
            .execute(
                "INSERT OR IGNORE INTO snapshots(id, time_ns, tree, json) VALUES (?1, ?2, ?3, ?4)",
                params![&id.0[..], snap.time_ns, &snap.tree.0[..], json],
            )
            .map_err(cat_err("inserting snapshot"))?;
        Ok(())
    }

    /// Remove the row of snapshot `id`; true when there was one. The
    /// snapshot file is the caller's (see `Repository::forget_snapshot`).
    pub fn delete_snapshot(&self, id: &Id) -> Result<bool> {
        let n = self
            .conn
            .execute("DELETE FROM snapshots WHERE id = ?1", [&id.0[..]])
            .map_err(cat_err("deleting snapshot row"))?;
        Ok(n > 0)
    }

    /// The ids of all catalogued snapshots, in no particular order.
    pub fn snapshot_ids(&self) -> Result<Vec<Id>> {
        let mut st = self
            .conn
            .prepare_cached("SELECT id FROM snapshots")
            .map_err(cat_err("preparing snapshot id list"))?;
        let rows = st
            .query_map([], |r| r.get::<_, Vec<u8>>(0))
            .map_err(cat_err("listing snapshot ids"))?;
        let mut out = Vec::new();
        for row in rows {
            let id = row.map_err(cat_err("reading snapshot id"))?;
            out.push(
                Id::from_slice(&id)
                    .ok_or_else(|| Error::corrupt("catalog", "snapshot id not 32 bytes"))?,
            );
        }
        Ok(out)
    }

    /// All snapshots, oldest first.
    pub fn snapshots(&self) -> Result<Vec<(Id, Snapshot)>> {
        let mut st = self
            .conn
            .prepare_cached("SELECT id, json FROM snapshots ORDER BY time_ns, id")
            .map_err(cat_err("preparing snapshot list"))?;
        let rows = st
            .query_map([], |r| {
                Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, String>(1)?))
            })
            .map_err(cat_err("listing snapshots"))?;
        let mut out = Vec::new();
        for row in rows {
            let (id, json) = row.map_err(cat_err("reading snapshot row"))?;
            let id = Id::from_slice(&id)
                .ok_or_else(|| Error::corrupt("catalog", "snapshot id not 32 bytes"))?;
            let snap: Snapshot = serde_json::from_str(&json).map_err(|e| {
                Error::corrupt(format!("catalog row of snapshot {id}"), e.to_string())
            })?;
            out.push((id, snap));
        }
        Ok(out)
    }

    /// One snapshot by its full id (None if not catalogued): continuous
    /// backups look up their parent every few seconds, among thousands.
    pub fn snapshot(&self, id: &Id) -> Result<Option<Snapshot>> {
        let mut st = self
            .conn
            .prepare_cached("SELECT json FROM snapshots WHERE id = ?1")
            .map_err(cat_err("preparing snapshot lookup"))?;
        let json: Option<String> = st
            .query_row([&id.0[..]], |r| r.get(0))
            .optional()
            .map_err(cat_err("looking up a snapshot"))?;
        json.map(|j| {
            serde_json::from_str(&j)
                .map_err(|e| Error::corrupt(format!("catalog row of snapshot {id}"), e.to_string()))
        })
        .transpose()
    }

    /// All catalogued packs whose files are here (not dropped): (name, size,
    /// blob count).
    pub fn packs(&self) -> Result<Vec<(Id, u64, u64)>> {
        let mut st = self
            .conn
            .prepare_cached("SELECT name, size, blobs FROM packs WHERE state < 2 ORDER BY name")
            .map_err(cat_err("preparing pack list"))?;
        let rows = st
            .query_map([], |r| {
                Ok((
                    r.get::<_, Vec<u8>>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                ))
            })
            .map_err(cat_err("listing packs"))?;
        let mut out = Vec::new();
        for row in rows {
            let (n, s, b) = row.map_err(cat_err("reading pack row"))?;
            let n = Id::from_slice(&n)
                .ok_or_else(|| Error::corrupt("catalog", "pack name not 32 bytes"))?;
            out.push((n, s as u64, b as u64));
        }
        Ok(out)
    }

    /// The blobs catalogued in pack `name`, by offset.
    ///
    /// A full scan of the blob rows (schema 2 has no index by pack): for
    /// tests, diagnostics and the rare pack whose trailer is unreadable.
    /// To visit every pack's rows use [`Catalog::for_each_blob_by_pack`];
    /// to learn what a pack holds, read its trailer.
    pub fn blobs_in_pack(&self, name: &Id) -> Result<Vec<PackEntry>> {
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT b.kind, b.id, b.offset, b.length, b.raw_length FROM blobs b
                 JOIN packs p ON p.pack_id = b.pack_id WHERE p.name = ?1 ORDER BY b.offset",
            )
            .map_err(cat_err("preparing pack contents"))?;
        let rows = st
            .query_map([&name.0[..]], |r| blob_columns(r, 0))
            .map_err(cat_err("listing pack contents"))?;
        let mut out = Vec::new();
        for row in rows {
            let (k, id, off, len, raw) = row.map_err(cat_err("reading blob row"))?;
            out.push(PackEntry {
                kind: BlobKind::from_u8(k)
                    .ok_or_else(|| Error::corrupt("catalog", "bad blob kind"))?,
                id: Id::from_slice(&id)
                    .ok_or_else(|| Error::corrupt("catalog", "blob id not 32 bytes"))?,
                offset: off as u64,
                length: len,
                raw_length: raw,
            });
        }
        Ok(out)
    }

    /// Call `f` once per pack that has blob rows, with the pack's name and
    /// its rows by offset, in one pass over the blob rows. SQLite sorts them
    /// by pack (in bounded memory, spilling to temporary files), so this
    /// holds one pack's rows at a time. Packs without rows are not visited:
    /// list them with [`Catalog::packs`]. Rows whose pack row is missing are
    /// not visited either: see [`Catalog::blobs_without_pack`].
    ///
    /// The statement stays open, in one read snapshot, until the last call
    /// returns; `f` may use other connections but should not write through
    /// this one. An error from `f` stops the pass and is returned.
    pub fn for_each_blob_by_pack(
        &self,
        mut f: impl FnMut(Id, Vec<PackEntry>) -> Result<()>,
    ) -> Result<()> {
        let mut st = self
            .conn
            .prepare(BLOBS_BY_PACK_SQL)
            .map_err(cat_err("preparing the pass over blobs by pack"))?;
        let mut rows = st
            .query([])
            .map_err(cat_err("starting the pass over blobs by pack"))?;
        let mut current: Option<(i64, Id)> = None;
        let mut group = Vec::new();
        while let Some(r) = rows.next().map_err(cat_err("reading blob rows by pack"))? {
            let pack_id: i64 = r.get(0).map_err(cat_err("reading a blob's pack"))?;
            let pack = match current {
                Some((p, name)) if p == pack_id => name,
                _ => {
                    if let Some((_, name)) = current.take() {
                        f(name, std::mem::take(&mut group))?;
                    }
                    let name: Vec<u8> = r.get(1).map_err(cat_err("reading a pack name"))?;
                    let name = Id::from_slice(&name).ok_or_else(|| {
                        Error::corrupt(
                            "catalog",
                            format!("name of pack row {pack_id} not 32 bytes"),
                        )
                    })?;
                    current = Some((pack_id, name));
                    name
                }
            };
            let (k, id, off, len, raw) = blob_columns(r, 2)
                .map_err(|e| Error::catalog(format!("reading a blob row of pack {pack}"), e))?;
            let id = Id::from_slice(&id).ok_or_else(|| {
                Error::corrupt(
                    "catalog",
                    format!("a blob id in pack {pack} is not 32 bytes"),
                )
            })?;
            group.push(PackEntry {
                kind: BlobKind::from_u8(k).ok_or_else(|| {
                    Error::corrupt("catalog", format!("blob {id} in pack {pack} has kind {k}"))
                })?,
                id,
                offset: off as u64,
                length: len,
                raw_length: raw,
            });
        }
        if let Some((_, name)) = current {
            f(name, group)?;
        }
        Ok(())
    }

    /// Blob rows whose `pack_id` has no pack row, as (blob id, pack_id): a
    /// pack forgotten without all its rows listed (see
    /// [`Catalog::forget_pack`]). A full scan, for `check`.
    pub fn blobs_without_pack(&self) -> Result<Vec<(Id, i64)>> {
        let mut st = self
            .conn
            .prepare(
                "SELECT b.id, b.pack_id FROM blobs b
                 WHERE NOT EXISTS (SELECT 1 FROM packs p WHERE p.pack_id = b.pack_id)",
            )
            .map_err(cat_err("preparing the search for blobs without a pack"))?;
        let rows = st
            .query_map([], |r| Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, i64>(1)?)))
            .map_err(cat_err("searching blobs without a pack"))?;
        let mut out = Vec::new();
        for row in rows {
            let (id, pack_id) = row.map_err(cat_err("reading a blob without a pack"))?;
            let id = Id::from_slice(&id).ok_or_else(|| {
                Error::corrupt(
                    "catalog",
                    format!("a blob id of pack row {pack_id} is not 32 bytes"),
                )
            })?;
            out.push((id, pack_id));
        }
        Ok(out)
    }

    /// Number of catalogued blobs.
    pub fn blob_count(&self) -> Result<u64> {
        self.conn
            .query_row("SELECT count(*) FROM blobs", [], |r| r.get::<_, i64>(0))
            .map(|n| n as u64)
            .map_err(cat_err("counting blobs"))
    }

    /// Run `PRAGMA integrity_check` (full, slow): `Ok(())` or the problems found.
    pub fn integrity_check(&self) -> Result<std::result::Result<(), String>> {
        let mut st = self
            .conn
            .prepare("PRAGMA integrity_check")
            .map_err(cat_err("preparing integrity check"))?;
        let rows: Vec<String> = st
            .query_map([], |r| r.get(0))
            .map_err(cat_err("running integrity check"))?
            .collect::<std::result::Result<_, _>>()
            .map_err(cat_err("reading integrity check"))?;
        if rows.len() == 1 && rows[0] == "ok" {
            Ok(Ok(()))
        } else {
            Ok(Err(rows.join("; ")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The schema-1 SQL, as `git show` gives it for the last schema-1 commit.
    const SCHEMA_V1: &str = "
CREATE TABLE packs (
    pack_id INTEGER PRIMARY KEY,
    name    BLOB NOT NULL UNIQUE,
    size    INTEGER NOT NULL,
    blobs   INTEGER NOT NULL
);
CREATE TABLE blobs (
    id         BLOB PRIMARY KEY,
    kind       INTEGER NOT NULL,
    pack_id    INTEGER NOT NULL REFERENCES packs(pack_id),
    offset     INTEGER NOT NULL,
    length     INTEGER NOT NULL,
    raw_length INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX blobs_by_pack ON blobs(pack_id);
CREATE TABLE snapshots (
    id      BLOB PRIMARY KEY,
    time_ns INTEGER NOT NULL,
    tree    BLOB NOT NULL,
    json    TEXT NOT NULL
) WITHOUT ROWID;
CREATE INDEX snapshots_by_time ON snapshots(time_ns);
";

    fn id(n: u32) -> Id {
        let mut b = [0u8; 32];
        b[..4].copy_from_slice(&n.to_be_bytes());
        // Spread ids so that blob-id order interleaves the packs.
        b[4..8].copy_from_slice(&n.wrapping_mul(2_654_435_761).to_be_bytes());
        Id(*blake3::hash(&b).as_bytes())
    }

    fn entry(kind: BlobKind, n: u32, offset: u64) -> PackEntry {
        PackEntry {
            kind,
            id: id(n),
            offset,
            length: 100 + n,
            raw_length: 90 + n,
        }
    }

    fn pack_name(n: u8) -> Id {
        Id([n; 32])
    }

    fn fresh() -> (tempfile::TempDir, Catalog) {
        let dir = tempfile::tempdir().expect("tempdir");
        let cat = Catalog::create(&dir.path().join("catalog.db")).expect("create");
        (dir, cat)
    }

    fn sqlite_master_has(cat: &Catalog, name: &str) -> bool {
        cat.conn
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE name = ?1",
                [name],
                |r| r.get::<_, i64>(0),
            )
            .expect("sqlite_master")
            > 0
    }

    /// A schema-1 catalog as the previous build wrote it: data-only pack 1,
    /// tree-only pack 2, mixed pack 3, pack 4 without blob rows.
    fn write_schema_1(path: &Path) -> Vec<(Id, Vec<PackEntry>)> {
        let conn = Connection::open(path).expect("open v1");
        conn.pragma_update(None, "journal_mode", "WAL")
            .expect("wal");
        conn.execute_batch(SCHEMA_V1).expect("v1 schema");
        conn.pragma_update(None, "user_version", 1).expect("v1");
        let packs = vec![
            (
                pack_name(1),
                vec![entry(BlobKind::Data, 1, 8), entry(BlobKind::Data, 2, 200)],
            ),
            (
                pack_name(2),
                vec![entry(BlobKind::Tree, 3, 8), entry(BlobKind::Tree, 4, 300)],
            ),
            (
                pack_name(3),
                vec![entry(BlobKind::Tree, 5, 8), entry(BlobKind::Data, 6, 400)],
            ),
            (pack_name(4), vec![]),
        ];
        for (name, entries) in &packs {
            conn.execute(
                "INSERT INTO packs(name, size, blobs) VALUES (?1, 1000, ?2)",
                params![&name.0[..], entries.len() as i64],
            )
            .expect("v1 pack");
            for e in entries {
                conn.execute(
                    "INSERT INTO blobs(id, kind, pack_id, offset, length, raw_length)
                     VALUES (?1, ?2, (SELECT pack_id FROM packs WHERE name = ?3), ?4, ?5, ?6)",
                    params![
                        &e.id.0[..],
                        e.kind as u8,
                        &name.0[..],
                        e.offset as i64,
                        e.length,
                        e.raw_length
                    ],
                )
                .expect("v1 blob");
            }
        }
        packs
    }

    #[test]
    fn open_migrates_schema_1() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("catalog.db");
        let packs = write_schema_1(&path);

        // A reader does not migrate.
        let reader = Catalog::open_reader(&path).expect("reader");
        assert_eq!(reader.schema_version().expect("v"), 1);
        assert!(sqlite_master_has(&reader, "blobs_by_pack"));
        drop(reader);

        let mut cat = Catalog::open(&path).expect("open migrates");
        assert_eq!(cat.schema_version().expect("v"), SCHEMA_VERSION);
        assert!(!sqlite_master_has(&cat, "blobs_by_pack"), "index dropped");
        let kinds: Vec<(Vec<u8>, i64)> = cat
            .conn
            .prepare("SELECT name, kind FROM packs ORDER BY name")
            .expect("prepare")
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .expect("kinds")
            .collect::<rusqlite::Result<_>>()
            .expect("kinds");
        let want: Vec<(Vec<u8>, i64)> = [0, 1, 2, 2]
            .iter()
            .zip(&packs)
            .map(|(k, (n, _))| (n.0.to_vec(), *k))
            .collect();
        assert_eq!(kinds, want, "data, tree, mixed, no rows");
        assert_eq!(
            cat.packs_only_of(BlobKind::Data).expect("data"),
            vec![(pack_name(1), PackState::Local)]
        );
        assert_eq!(
            cat.packs_only_of(BlobKind::Tree).expect("tree"),
            vec![(pack_name(2), PackState::Local)]
        );
        for (name, entries) in &packs {
            for e in entries {
                let loc = cat.lookup(&e.id).expect("lookup").expect("catalogued");
                assert_eq!(
                    (loc.kind, loc.pack, loc.offset, loc.length, loc.raw_length),
                    (e.kind, *name, e.offset, e.length, e.raw_length)
                );
            }
        }
        assert_eq!(cat.blob_count().expect("count"), 6);
        // It takes new packs, and opening it again changes nothing.
        cat.insert_pack(&pack_name(5), 10, &[entry(BlobKind::Data, 7, 8)])
            .expect("insert after migration");
        drop(cat);
        let cat = Catalog::open(&path).expect("reopen");
        assert_eq!(
            cat.packs_only_of(BlobKind::Data).expect("data"),
            vec![
                (pack_name(1), PackState::Local),
                (pack_name(5), PackState::Local)
            ]
        );
        assert_eq!(cat.integrity_check().expect("check"), Ok(()));
    }

    #[test]
    fn open_refuses_other_schema_versions() {
        for v in [0, 4, 99] {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("catalog.db");
            write_schema_1(&path);
            Connection::open(&path)
                .expect("open")
                .pragma_update(None, "user_version", v)
                .expect("version");
            let err = Catalog::open(&path).err().expect("refused").to_string();
            assert!(
                err.contains(&format!("catalog schema {v}, this build reads 3")),
                "{err}"
            );
        }
    }

    /// The ids `insert_pack` reports as catalogued elsewhere are exactly
    /// those whose rows it did not add (the ingest compares only those).
    #[test]
    fn insert_pack_reports_blobs_already_catalogued() {
        let (_dir, mut cat) = fresh();
        let first = [entry(BlobKind::Data, 1, 8), entry(BlobKind::Data, 2, 20)];
        assert_eq!(
            cat.insert_pack(&pack_name(1), 1, &first).expect("first"),
            vec![]
        );
        let second = [
            entry(BlobKind::Data, 3, 8),
            entry(BlobKind::Data, 2, 30),
            entry(BlobKind::Data, 4, 40),
            entry(BlobKind::Data, 1, 50),
        ];
        let ignored = cat.insert_pack(&pack_name(2), 1, &second).expect("second");
        assert_eq!(ignored, vec![second[1].id, second[3].id]);
        // The first location stays.
        let loc = cat.lookup(&second[1].id).expect("lookup").expect("present");
        assert_eq!((loc.pack, loc.offset), (pack_name(1), 20));
        // The same pack again: every row exists already.
        let again = cat.insert_pack(&pack_name(1), 1, &first).expect("again");
        assert_eq!(again, vec![first[0].id, first[1].id]);
    }

    #[test]
    fn insert_pack_records_the_pack_kind() {
        let (_dir, mut cat) = fresh();
        cat.insert_pack(&pack_name(1), 1, &[entry(BlobKind::Data, 1, 8)])
            .expect("data");
        cat.insert_pack(&pack_name(2), 1, &[entry(BlobKind::Tree, 2, 8)])
            .expect("tree");
        let mixed = [entry(BlobKind::Data, 3, 8), entry(BlobKind::Tree, 4, 9)];
        cat.insert_pack(&pack_name(3), 1, &mixed).expect("mixed");
        cat.insert_pack(&pack_name(4), 1, &[]).expect("empty");
        // Data blob catalogued in pack 1 already: pack 5 has no rows, but its
        // trailer lists only data.
        cat.insert_pack(&pack_name(5), 1, &[entry(BlobKind::Data, 1, 8)])
            .expect("duplicate");
        assert_eq!(
            cat.packs_only_of(BlobKind::Data).expect("data"),
            vec![
                (pack_name(1), PackState::Local),
                (pack_name(5), PackState::Local)
            ]
        );
        assert_eq!(
            cat.packs_only_of(BlobKind::Tree).expect("tree"),
            vec![(pack_name(2), PackState::Local)]
        );
    }

    /// A dropped pack's blobs stay stored (a backup does not store them
    /// again) but are not readable; a new copy of one takes its row, and
    /// the same pack written again is local once more.
    #[test]
    fn dropped_packs_keep_rows_that_are_not_readable() {
        let (_dir, mut cat) = fresh();
        let a = [entry(BlobKind::Data, 1, 8), entry(BlobKind::Data, 2, 200)];
        cat.insert_pack(&pack_name(1), 1000, &a).expect("a");
        assert!(cat.any_local_data().expect("local data"));
        cat.set_pack_state(&[pack_name(1)], PackState::Uploaded)
            .expect("uploaded");
        assert!(!cat.any_local_data().expect("none local"));
        assert_eq!(
            cat.packs_only_of(BlobKind::Data).expect("data"),
            vec![(pack_name(1), PackState::Uploaded)]
        );
        assert!(
            cat.lookup(&id(1)).expect("lookup").is_some(),
            "uploaded: still here"
        );
        cat.set_pack_state(&[pack_name(1)], PackState::Dropped)
            .expect("dropped");

        assert!(cat.contains(&id(1)).expect("contains"));
        assert!(cat.missing(&[id(1), id(3)]).expect("missing") == vec![id(3)]);
        assert!(cat.lookup(&id(1)).expect("lookup").is_none());
        let (loc, state) = cat.locate(&id(1)).expect("locate").expect("row kept");
        assert_eq!((loc.pack, state), (pack_name(1), PackState::Dropped));
        assert_eq!(
            cat.not_local(&[id(1), id(2), id(3)]).expect("not local"),
            vec![id(1), id(2), id(3)]
        );
        assert!(cat.packs_only_of(BlobKind::Data).expect("data").is_empty());
        assert!(cat.packs().expect("packs").is_empty());
        let mut visited = 0;
        cat.for_each_blob_by_pack(|_, _| {
            visited += 1;
            Ok(())
        })
        .expect("pass");
        assert_eq!(visited, 0, "no file to compare dropped rows with");

        // Blob 2 fetched back into another pack: that copy is the one read.
        let b = [entry(BlobKind::Data, 2, 8), entry(BlobKind::Data, 3, 300)];
        assert_eq!(cat.insert_pack(&pack_name(2), 1000, &b).expect("b"), vec![]);
        assert!(cat.any_local_data().expect("local again"));
        let loc = cat.lookup(&id(2)).expect("lookup").expect("readable again");
        assert_eq!((loc.pack, loc.offset), (pack_name(2), 8));
        assert_eq!(cat.not_local(&[id(1), id(2)]).expect("nl"), vec![id(1)]);
        // A live copy is not displaced by a later one.
        let c = [entry(BlobKind::Data, 2, 50)];
        assert_eq!(
            cat.insert_pack(&pack_name(3), 1000, &c).expect("c"),
            vec![id(2)]
        );
        assert_eq!(
            cat.lookup(&id(2)).expect("l").expect("2").pack,
            pack_name(2)
        );

        // Pack 1 written again (same content, same name): local again.
        assert_eq!(
            cat.insert_pack(&pack_name(1), 1000, &a)
                .expect("a again")
                .len(),
            2
        );
        assert_eq!(
            cat.lookup(&id(1)).expect("l").expect("1").pack,
            pack_name(1)
        );
        assert_eq!(cat.blob_count().expect("count"), 3);
        assert_eq!(cat.integrity_check().expect("check"), Ok(()));
    }

    /// A schema-2 catalog gets `packs.state`, every pack local.
    #[test]
    fn open_migrates_schema_2() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("catalog.db");
        {
            let cat = Catalog::create(&path).expect("create");
            cat.conn
                .execute_batch("ALTER TABLE packs DROP COLUMN state; PRAGMA user_version = 2;")
                .expect("back to schema 2");
        }
        let mut cat = Catalog::open(&path).expect("open migrates");
        assert_eq!(cat.schema_version().expect("v"), SCHEMA_VERSION);
        let a = [entry(BlobKind::Data, 1, 8)];
        cat.insert_pack(&pack_name(1), 1000, &a).expect("a");
        assert_eq!(
            cat.packs_only_of(BlobKind::Data).expect("data"),
            vec![(pack_name(1), PackState::Local)]
        );
    }

    #[test]
    fn forget_pack_keeps_rows_catalogued_in_another_pack() {
        let (_dir, mut cat) = fresh();
        let a = [entry(BlobKind::Data, 1, 8), entry(BlobKind::Data, 2, 200)];
        // Pack b lists blob 2 again (a concurrent writer stored it too): its
        // catalogued copy stays the one in pack a.
        let b = [entry(BlobKind::Data, 2, 8), entry(BlobKind::Data, 3, 300)];
        cat.insert_pack(&pack_name(1), 1000, &a).expect("a");
        cat.insert_pack(&pack_name(2), 1000, &b).expect("b");
        assert_eq!(
            cat.lookup(&id(2)).expect("l").expect("2").pack,
            pack_name(1)
        );

        cat.forget_pack(&pack_name(2), &b).expect("forget b");
        let loc = cat.lookup(&id(2)).expect("lookup").expect("2 kept");
        assert_eq!((loc.pack, loc.offset), (pack_name(1), 200));
        assert!(cat.lookup(&id(3)).expect("lookup").is_none());
        assert!(cat.contains(&id(1)).expect("contains"));
        let names: Vec<Id> = cat.packs().expect("packs").iter().map(|p| p.0).collect();
        assert_eq!(names, vec![pack_name(1)]);
        assert!(cat.blobs_without_pack().expect("orphans").is_empty());

        // Again, and a pack never catalogued: nothing to do.
        cat.forget_pack(&pack_name(2), &b).expect("idempotent");
        cat.forget_pack(&pack_name(9), &a).expect("unknown pack");
        assert_eq!(cat.blob_count().expect("count"), 2);
        cat.forget_pack(&pack_name(1), &a).expect("forget a");
        assert_eq!(cat.blob_count().expect("count"), 0);
        assert!(cat.packs().expect("packs").is_empty());
    }

    #[test]
    fn forget_pack_does_not_look_for_unlisted_rows() {
        // Foreign keys are off while the pack row goes (the check would scan
        // every blob row), so a row left out of `entries` stays behind, and
        // `blobs_without_pack` finds it; enforcement is back on afterwards.
        let (_dir, mut cat) = fresh();
        let a = [entry(BlobKind::Data, 1, 8), entry(BlobKind::Data, 2, 200)];
        cat.insert_pack(&pack_name(1), 1000, &a).expect("a");
        cat.forget_pack(&pack_name(1), &a[..1])
            .expect("forget with a row unlisted");
        let fk: i64 = cat
            .conn
            .pragma_query_value(None, "foreign_keys", |r| r.get(0))
            .expect("fk");
        assert_eq!(fk, 1, "foreign keys enforced again");
        let orphans = cat.blobs_without_pack().expect("orphans");
        assert_eq!(orphans.len(), 1);
        assert_eq!(orphans[0].0, id(2));
        assert!(cat.lookup(&id(2)).expect("lookup").is_none());
    }

    #[test]
    fn for_each_blob_by_pack_groups_rows_by_pack() {
        let (_dir, mut cat) = fresh();
        let mut want = Vec::new();
        let mut n = 0;
        for p in 1..=5u8 {
            // Offsets inserted out of order; pack 3 has no rows.
            let count = if p == 3 { 0 } else { 3 + p as u32 };
            let entries: Vec<PackEntry> = (0..count)
                .rev()
                .map(|i| {
                    n += 1;
                    let kind = if i % 2 == 0 {
                        BlobKind::Data
                    } else {
                        BlobKind::Tree
                    };
                    entry(kind, n, 8 + 1000 * i as u64)
                })
                .collect();
            cat.insert_pack(&pack_name(p), 10_000, &entries)
                .expect("insert");
            let mut sorted = entries.clone();
            sorted.sort_by_key(|e| e.offset);
            if !sorted.is_empty() {
                want.push((pack_name(p), sorted));
            }
        }
        let mut got = Vec::new();
        cat.for_each_blob_by_pack(|name, rows| {
            got.push((name, rows));
            Ok(())
        })
        .expect("pass");
        assert_eq!(got, want);
        for (name, rows) in &want {
            assert_eq!(&cat.blobs_in_pack(name).expect("blobs_in_pack"), rows);
        }

        // An error from the callback stops the pass and comes back.
        let mut calls = 0;
        let err = cat
            .for_each_blob_by_pack(|_, _| {
                calls += 1;
                Err(Error::Refused("stop".into()))
            })
            .expect_err("error returned");
        assert_eq!(calls, 1);
        assert!(err.to_string().contains("stop"), "{err}");
    }

    #[test]
    fn pack_queries_do_not_scan_per_pack() {
        let (_dir, cat) = fresh();
        let plan = |sql: &str| -> String {
            let mut st = cat
                .conn
                .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
                .expect("explain");
            let nulls = std::iter::repeat_n(rusqlite::types::Null, st.parameter_count());
            let rows: Vec<String> = st
                .query_map(rusqlite::params_from_iter(nulls), |r| r.get::<_, String>(3))
                .expect("plan")
                .collect::<rusqlite::Result<_>>()
                .expect("plan");
            rows.join("; ")
        };
        let p = plan(BLOBS_BY_PACK_SQL);
        assert!(p.contains("SCAN b") && !p.contains("AUTOMATIC"), "{p}");
        assert!(p.contains("SEARCH p USING INTEGER PRIMARY KEY"), "{p}");
        let p = plan(FORGET_BLOB_SQL);
        assert!(p.contains("SEARCH blobs USING PRIMARY KEY (id=?)"), "{p}");
        let p = plan(PACKS_OF_KIND_SQL);
        assert!(!p.contains("blobs"), "{p}");
    }
}
