//! `history.db`: what the agent remembers per source across restarts: when
//! it was assigned, its last scheduled run, its last committed snapshot
//! (collector time) and the last local snapshot (the parent of the next
//! continuous backup).

use std::path::Path;
use std::sync::Mutex;

use anyhow::{Context, Result};
use repo_format::Id;
use rusqlite::{Connection, OptionalExtension, params};

/// One source's record.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SourceRecord {
    /// When the source was first seen, ns since the epoch.
    pub assigned_ns: i64,
    /// Start of the last scheduled run, ns (0 = none).
    pub last_run_ns: i64,
    /// Collector time of the last committed snapshot, ns (0 = none).
    pub last_commit_ns: i64,
    /// The last local (spool) snapshot of this source.
    pub last_local: Option<Id>,
}

/// The history database.
pub struct History {
    conn: Mutex<Connection>,
}

impl History {
    /// Open (creating) the database at `path`.
    pub fn open(path: &Path) -> Result<History> {
        let conn = Connection::open(path).with_context(|| format!("opening {}", path.display()))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS sources (
                name           TEXT PRIMARY KEY,
                assigned_ns    INTEGER NOT NULL,
                last_run_ns    INTEGER NOT NULL DEFAULT 0,
                last_commit_ns INTEGER NOT NULL DEFAULT 0,
                last_local     TEXT
            );",
        )
        .with_context(|| format!("creating tables in {}", path.display()))?;
        Ok(History {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> Result<std::sync::MutexGuard<'_, Connection>> {
        self.conn
            .lock()
            .map_err(|_| anyhow::anyhow!("history db mutex poisoned"))
    }

    /// The record of `name`, created (assigned now) if new.
    pub fn get(&self, name: &str, now_ns: i64) -> Result<SourceRecord> {
        let c = self.conn()?;
        c.execute(
            "INSERT OR IGNORE INTO sources(name, assigned_ns) VALUES (?1, ?2)",
            params![name, now_ns],
        )?;
        let r = c
            .query_row(
                "SELECT assigned_ns, last_run_ns, last_commit_ns, last_local FROM sources WHERE name = ?1",
                [name],
                |r| {
                    let local: Option<String> = r.get(3)?;
                    Ok(SourceRecord {
                        assigned_ns: r.get(0)?,
                        last_run_ns: r.get(1)?,
                        last_commit_ns: r.get(2)?,
                        last_local: local.and_then(|h| Id::from_hex(&h)),
                    })
                },
            )
            .optional()?;
        Ok(r.unwrap_or_default())
    }

    /// Record the start of a scheduled run.
    pub fn ran(&self, name: &str, at_ns: i64) -> Result<()> {
        self.conn()?.execute(
            "UPDATE sources SET last_run_ns = ?2 WHERE name = ?1",
            params![name, at_ns],
        )?;
        Ok(())
    }

    /// Record a committed snapshot.
    pub fn committed(&self, name: &str, local: &Id, commit_ns: i64) -> Result<()> {
        self.conn()?.execute(
            "UPDATE sources SET last_commit_ns = ?2, last_local = ?3 WHERE name = ?1",
            params![name, commit_ns, local.to_hex()],
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_survive_reopening() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("history.db");
        let id = Id([7; 32]);
        {
            let h = History::open(&p).expect("open");
            assert_eq!(h.get("docs", 5).expect("get").assigned_ns, 5);
            h.ran("docs", 10).expect("ran");
            h.committed("docs", &id, 20).expect("committed");
        }
        let h = History::open(&p).expect("reopen");
        let r = h.get("docs", 99).expect("get");
        assert_eq!(
            r,
            SourceRecord {
                assigned_ns: 5,
                last_run_ns: 10,
                last_commit_ns: 20,
                last_local: Some(id)
            }
        );
    }
}
