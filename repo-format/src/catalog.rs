//! The catalog: an SQLite index of blobs → (pack, offset, length), packs and
//! snapshots.
//!
//! It is an index, not the truth: packs and snapshot files are, and
//! [`crate::rebuild`] recreates the catalog from them. WAL mode with
//! `synchronous=FULL`: once a transaction commits, it survives power loss,
//! so a blob is acknowledged only when its pack is durable *and* its rows are.
//! Blob rows of a pack go in one transaction, after the pack is durable.

use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};

use crate::blob::BlobKind;
use crate::error::{Error, Result};
use crate::id::Id;
use crate::pack::PackEntry;
use crate::snapshot::Snapshot;

/// Schema version stored in `PRAGMA user_version`.
pub const SCHEMA_VERSION: i64 = 1;

const SCHEMA: &str = "
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

    /// Open the existing catalog read-write, checking it (`quick_check`) and its schema version.
    pub fn open(path: &Path) -> Result<Self> {
        if !path.exists() {
            return Err(Error::BadRepository {
                path: path.to_path_buf(),
                detail: "catalog is missing; run `hubvault repo rebuild-catalog` to recreate it from the packs".into(),
            });
        }
        let c = Self::open_conn(path, true)?;
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
        let v: i64 = c
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(cat_err("reading schema version"))?;
        if v != SCHEMA_VERSION {
            return Err(Error::BadRepository {
                path: path.to_path_buf(),
                detail: format!("catalog schema {v}, this build reads {SCHEMA_VERSION}"),
            });
        }
        Ok(c)
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
    /// A blob already catalogued (a concurrent writer stored it too) keeps its first location.
    pub fn insert_pack(&mut self, name: &Id, size: u64, entries: &[PackEntry]) -> Result<()> {
        let tx = self
            .conn
            .transaction()
            .map_err(cat_err("beginning pack transaction"))?;
        tx.execute(
            "INSERT OR IGNORE INTO packs(name, size, blobs) VALUES (?1, ?2, ?3)",
            params![&name.0[..], size as i64, entries.len() as i64],
        )
        .map_err(cat_err("inserting pack row"))?;
        let pack_id: i64 = tx
            .query_row(
                "SELECT pack_id FROM packs WHERE name = ?1",
                [&name.0[..]],
                |r| r.get(0),
            )
            .map_err(cat_err("reading pack row"))?;
        {
            let mut st = tx
                .prepare_cached(
                    "INSERT OR IGNORE INTO blobs(id, kind, pack_id, offset, length, raw_length)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                )
                .map_err(cat_err("preparing blob insert"))?;
            for e in entries {
                st.execute(params![
                    &e.id.0[..],
                    e.kind as u8,
                    pack_id,
                    e.offset as i64,
                    e.length,
                    e.raw_length
                ])
                .map_err(cat_err("inserting blob row"))?;
            }
        }
        tx.commit().map_err(cat_err("committing pack"))
    }

    /// Remove pack `name` and its blob rows, in one transaction (the pack
    /// file is the caller's to delete, afterwards).
    pub fn forget_pack(&mut self, name: &Id) -> Result<()> {
        let tx = self
            .conn
            .transaction()
            .map_err(cat_err("beginning pack removal"))?;
        tx.execute(
            "DELETE FROM blobs WHERE pack_id = (SELECT pack_id FROM packs WHERE name = ?1)",
            [&name.0[..]],
        )
        .map_err(cat_err("removing blob rows"))?;
        tx.execute("DELETE FROM packs WHERE name = ?1", [&name.0[..]])
            .map_err(cat_err("removing pack row"))?;
        tx.commit().map_err(cat_err("committing pack removal"))
    }

    /// Packs holding only blobs of `kind` (and at least one), by name.
    pub fn packs_only_of(&self, kind: BlobKind) -> Result<Vec<Id>> {
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT p.name FROM packs p
                 WHERE EXISTS (SELECT 1 FROM blobs b WHERE b.pack_id = p.pack_id)
                   AND NOT EXISTS (SELECT 1 FROM blobs b WHERE b.pack_id = p.pack_id AND b.kind != ?1)
                 ORDER BY p.name",
            )
            .map_err(cat_err("preparing pack list by kind"))?;
        let rows = st
            .query_map([kind as u8], |r| r.get::<_, Vec<u8>>(0))
            .map_err(cat_err("listing packs by kind"))?;
        let mut out = Vec::new();
        for row in rows {
            let n = row.map_err(cat_err("reading pack row"))?;
            out.push(
                Id::from_slice(&n)
                    .ok_or_else(|| Error::corrupt("catalog", "pack name not 32 bytes"))?,
            );
        }
        Ok(out)
    }

    /// Where blob `id` is, if catalogued.
    pub fn lookup(&self, id: &Id) -> Result<Option<BlobLocation>> {
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT b.kind, p.name, b.offset, b.length, b.raw_length
                 FROM blobs b JOIN packs p ON p.pack_id = b.pack_id WHERE b.id = ?1",
            )
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
            ))
        })
        .optional()
        .map_err(cat_err("looking up blob"))?
        .map(|(kind, pack, offset, length, raw_length)| {
            Ok(BlobLocation {
                kind: BlobKind::from_u8(kind).ok_or_else(|| {
                    Error::corrupt("catalog", format!("blob {id} has kind {kind}"))
                })?,
                pack: Id::from_slice(&pack)
                    .ok_or_else(|| Error::corrupt("catalog", "pack name not 32 bytes"))?,
                offset: offset as u64,
                length,
                raw_length,
            })
        })
        .transpose()
    }

    /// True when blob `id` is catalogued.
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
        let tx = self
            .conn
            .transaction()
            .map_err(cat_err("beginning lookup batch"))?;
        let mut out = Vec::new();
        {
            let mut st = tx
                .prepare_cached("SELECT 1 FROM blobs WHERE id = ?1")
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

    /// All catalogued packs: (name, size, blob count).
    pub fn packs(&self) -> Result<Vec<(Id, u64, u64)>> {
        let mut st = self
            .conn
            .prepare_cached("SELECT name, size, blobs FROM packs ORDER BY name")
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
    pub fn blobs_in_pack(&self, name: &Id) -> Result<Vec<PackEntry>> {
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT b.kind, b.id, b.offset, b.length, b.raw_length FROM blobs b
                 JOIN packs p ON p.pack_id = b.pack_id WHERE p.name = ?1 ORDER BY b.offset",
            )
            .map_err(cat_err("preparing pack contents"))?;
        let rows = st
            .query_map([&name.0[..]], |r| {
                Ok((
                    r.get::<_, u8>(0)?,
                    r.get::<_, Vec<u8>>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, u32>(3)?,
                    r.get::<_, u32>(4)?,
                ))
            })
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
