//! `acked.db`: the ids the collector acknowledged as durable for this agent,
//! one by one: trees, and data blobs not sent as part of a whole spool pack
//! (a pack sent whole is marked uploaded in the spool's catalog instead:
//! see `upload`). A blob listed here is never sent again (resumption after a
//! cut transfer, an agent restart or a collector restart).

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use anyhow::{Context, Result};
use repo_format::Id;
use rusqlite::{Connection, OpenFlags};

/// The acknowledged set.
pub struct Acked {
    conn: Mutex<Connection>,
    path: PathBuf,
    /// Idle read connections for [`Acked::contains`], so that lookups from
    /// several threads do not queue on the writer's mutex (they did when
    /// every backup thread asked per chunk: 12 % of the agent's time on a
    /// 200 000-file first backup).
    readers: Mutex<Vec<Reader>>,
}

/// A read connection that keeps one read transaction over many lookups.
///
/// A stale view is harmless here: an id acknowledged after the transaction
/// began reads as not acknowledged, and its chunk is stored in the spool
/// once more. The transaction is renewed every [`Reader::RENEW_AFTER`]
/// lookups and ended by [`Acked::end_reads`], so it never holds back the
/// WAL checkpoint for long.
struct Reader {
    conn: Connection,
    lookups: u32,
}

impl Reader {
    const RENEW_AFTER: u32 = 4096;

    fn contains(&mut self, id: &Id) -> Result<bool> {
        if self.lookups == 0 {
            self.conn.execute_batch("BEGIN DEFERRED")?;
        }
        self.lookups += 1;
        let found = self
            .conn
            .prepare_cached("SELECT 1 FROM acked WHERE id = ?1")?
            .exists([&id.0[..]])?;
        if self.lookups >= Self::RENEW_AFTER {
            self.end()?;
        }
        Ok(found)
    }

    fn end(&mut self) -> Result<()> {
        if self.lookups > 0 {
            self.lookups = 0;
            self.conn.execute_batch("COMMIT")?;
        }
        Ok(())
    }
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
            path: path.to_path_buf(),
            readers: Mutex::new(Vec::new()),
        })
    }

    fn idle_readers(&self) -> Result<MutexGuard<'_, Vec<Reader>>> {
        self.readers
            .lock()
            .map_err(|_| anyhow::anyhow!("acked db reader pool poisoned"))
    }

    /// True when `id` was acknowledged, possibly as of a few thousand
    /// lookups ago (see [`Reader`]): for the upload walk's test of each
    /// tree, and any thread that may call at once.
    pub fn contains(&self, id: &Id) -> Result<bool> {
        let pooled = self.idle_readers()?.pop();
        let mut r = match pooled {
            Some(r) => r,
            None => Reader {
                conn: Connection::open_with_flags(
                    &self.path,
                    OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
                )
                .with_context(|| format!("opening {} to read", self.path.display()))?,
                lookups: 0,
            },
        };
        let found = r.contains(id);
        if found.is_ok() {
            self.idle_readers()?.push(r);
        }
        found
    }

    /// End the read transactions of idle readers (after a backup), so that
    /// none holds back the WAL checkpoint while the agent waits.
    pub fn end_reads(&self) -> Result<()> {
        for r in self.idle_readers()?.iter_mut() {
            r.end()?;
        }
        Ok(())
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
