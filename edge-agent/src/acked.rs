//! `acked.db`: the ids the collector acknowledged as durable for this agent,
//! one by one: trees, and data blobs not sent as part of a whole spool pack
//! (a pack sent whole is marked uploaded in the spool's catalog instead:
//! see `upload`). A blob listed here is never sent again (resumption after a
//! cut transfer, an agent restart or a collector restart).

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
            "CREATE TABLE IF NOT EXISTS acked (id BLOB PRIMARY KEY) WITHOUT ROWID;",
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
}
