//! `acked.db`: the ids the collector acknowledged as durable for this agent,
//! one by one: trees, and data blobs not sent as part of a whole spool pack
//! (a pack sent whole is marked uploaded in the spool's catalog instead:
//! see `upload`). A blob listed here is never sent again (resumption after a
//! cut transfer, an agent restart or a collector restart).
//!
//! Beside it, in `meta`, what this agent learnt of blobs the collector lost
//! (see `lost`): how far it has read the collector's list (`lost_seq`), how
//! many times that forgot something (`lost_gen`), and per source the
//! generation its last parent-verifying backup covered (`verified:<source>`).

use std::path::Path;
use std::sync::Mutex;

use anyhow::{Context, Result};
use repo_format::Id;
use rusqlite::Connection;

/// The acknowledged set.
pub struct Acked {
    conn: Mutex<Connection>,
}

impl Acked {
    /// Open (creating) the database at `path`.
    pub fn open(path: &Path) -> Result<Acked> {
        let conn = Connection::open(path).with_context(|| format!("opening {}", path.display()))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        // Ids are random, so inserts touch pages all over the table: with
        // SQLite's default 2 MiB cache a 200 000-blob upload re-read them
        // from the kernel per insert. Allocated as used, up to 32 MiB.
        conn.pragma_update(None, "cache_size", -32768)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS acked (id BLOB PRIMARY KEY) WITHOUT ROWID;
             CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);",
        )?;
        Ok(Acked {
            conn: Mutex::new(conn),
        })
    }

    /// True when `id` was acknowledged: for the upload walk's test of each
    /// tree (a few thousand per snapshot, not one per chunk).
    pub fn contains(&self, id: &Id) -> Result<bool> {
        let c = self
            .conn
            .lock()
            .map_err(|_| anyhow::anyhow!("acked db mutex poisoned"))?;
        Ok(c.prepare_cached("SELECT 1 FROM acked WHERE id = ?1")?
            .exists([&id.0[..]])?)
    }

    /// For each of `ids`, whether it was acknowledged: one read transaction
    /// for the lot (a query per id took an SQLite lock round each: 12 % of
    /// the agent's time on a 200 000-file upload).
    pub fn contains_each(&self, ids: &[Id]) -> Result<Vec<bool>> {
        let mut c = self
            .conn
            .lock()
            .map_err(|_| anyhow::anyhow!("acked db mutex poisoned"))?;
        let tx = c.transaction()?;
        let mut out = Vec::with_capacity(ids.len());
        {
            let mut st = tx.prepare_cached("SELECT 1 FROM acked WHERE id = ?1")?;
            for id in ids {
                out.push(st.exists([&id.0[..]])?);
            }
        }
        tx.commit()?;
        Ok(out)
    }

    /// Record acknowledged ids.
    pub fn insert(&self, ids: &[Id]) -> Result<()> {
        let mut c = self
            .conn
            .lock()
            .map_err(|_| anyhow::anyhow!("acked db mutex poisoned"))?;
        let tx = c.transaction()?;
        {
            let mut st = tx.prepare_cached("INSERT OR IGNORE INTO acked(id) VALUES (?1)")?;
            for id in ids {
                st.execute([&id.0[..]])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// How far the collector's list of lost blobs was read (0: never).
    pub fn lost_seq(&self) -> Result<u64> {
        self.meta("lost_seq")
    }

    /// Record that the collector's lost list was read up to `next`; when
    /// `forgot` (some of it was held here), also drop every acknowledgement
    /// (a tree acknowledged vouches for a subtree that may now lack a blob)
    /// and start a generation every source must back up verifying its
    /// parent once. One transaction.
    pub fn lost_read(&self, next: u64, forgot: bool) -> Result<()> {
        let mut c = self
            .conn
            .lock()
            .map_err(|_| anyhow::anyhow!("acked db mutex poisoned"))?;
        let tx = c.transaction()?;
        set_meta(&tx, "lost_seq", next)?;
        if forgot {
            tx.execute("DELETE FROM acked", [])?;
            let generation = get_meta(&tx, "lost_gen")?;
            set_meta(&tx, "lost_gen", generation + 1)?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Whether `source`'s next backup must verify its parent's chunks, and
    /// the generation to pass to [`Acked::verified`] once it did.
    pub fn needs_verify(&self, source: &str) -> Result<(bool, u64)> {
        let generation = self.meta("lost_gen")?;
        let done = self.meta(&format!("verified:{source}"))?;
        Ok((done < generation, generation))
    }

    /// `source` backed up verifying its parent, covering `generation`.
    pub fn verified(&self, source: &str, generation: u64) -> Result<()> {
        let c = self
            .conn
            .lock()
            .map_err(|_| anyhow::anyhow!("acked db mutex poisoned"))?;
        set_meta(&c, &format!("verified:{source}"), generation)
    }

    fn meta(&self, key: &str) -> Result<u64> {
        let c = self
            .conn
            .lock()
            .map_err(|_| anyhow::anyhow!("acked db mutex poisoned"))?;
        get_meta(&c, key)
    }
}

fn get_meta(c: &Connection, key: &str) -> Result<u64> {
    use rusqlite::OptionalExtension;
    let v: Option<i64> = c
        .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
        .optional()?;
    Ok(v.unwrap_or(0).max(0) as u64)
}

fn set_meta(c: &Connection, key: &str, value: u64) -> Result<()> {
    let v = i64::try_from(value).unwrap_or(i64::MAX);
    c.execute(
        "INSERT INTO meta(key, value) VALUES (?1, ?2)
         ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        rusqlite::params![key, v],
    )?;
    Ok(())
}
