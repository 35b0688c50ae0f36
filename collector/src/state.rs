//! The collector's own state (SQLite, WAL, synchronous=FULL): sites and
//! their policies, agents, sources and their policies, enrollment tokens,
//! revoked serials, counters, jobs, events and the agents' latest
//! recovery-point reports. Separate from the repository catalog, which stays
//! the pure index `repo-format` defines.
//!
//! One connection behind a mutex; callers use it from `spawn_blocking`.

use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use rusqlite::{Connection, OptionalExtension, params};

use crate::error::ServiceError;
use crate::policy::{Retention, SitePolicy, SourcePolicy};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS sites (
    name       TEXT PRIMARY KEY,
    created_ns INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS agents (
    agent_id     TEXT PRIMARY KEY,
    site         TEXT NOT NULL REFERENCES sites(name),
    hostname     TEXT NOT NULL,
    serial       INTEGER NOT NULL UNIQUE,
    enrolled_ns  INTEGER NOT NULL,
    last_seen_ns INTEGER NOT NULL DEFAULT 0,
    revoked_ns   INTEGER
);
CREATE TABLE IF NOT EXISTS tokens (
    token_id     BLOB PRIMARY KEY,
    site         TEXT NOT NULL REFERENCES sites(name),
    expires_ns   INTEGER NOT NULL,
    used_ns      INTEGER,
    wrapped_keys BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS revoked (
    serial  INTEGER PRIMARY KEY,
    time_ns INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
-- Which blobs each site uploaded or received: the only source of answers to
-- which-do-you-lack. Keyed by id first: ids are random, so a lookup's key
-- comparisons end at the id's first bytes instead of comparing the same site
-- name at every step (site first made this table a fifth of the collector's
-- CPU time on a 200 000-file upload). Replaces `site_blobs` (site, id).
CREATE TABLE IF NOT EXISTS site_holdings (
    id   BLOB NOT NULL,
    site TEXT NOT NULL,
    PRIMARY KEY (id, site)
) WITHOUT ROWID;
-- Trees whose whole subtree was verified present for a site at a commit,
-- with the number of entries the subtree expands to (counted along every
-- path). A row without it (from before the column) is verified again.
CREATE TABLE IF NOT EXISTS site_trees (
    site    TEXT NOT NULL,
    id      BLOB NOT NULL,
    entries INTEGER,
    PRIMARY KEY (site, id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS commits (
    agent_id TEXT NOT NULL,
    key      BLOB NOT NULL,
    snapshot BLOB NOT NULL,
    time_ns  INTEGER NOT NULL,
    PRIMARY KEY (agent_id, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS commits_by_snapshot ON commits(snapshot);
CREATE TABLE IF NOT EXISTS jobs (
    job_id     INTEGER PRIMARY KEY,
    kind       TEXT NOT NULL,
    agent_id   TEXT NOT NULL,
    snapshot   BLOB NOT NULL,
    target     TEXT NOT NULL,
    path       TEXT NOT NULL,
    state      INTEGER NOT NULL,
    message    TEXT NOT NULL DEFAULT '',
    files      INTEGER NOT NULL DEFAULT 0,
    bytes      INTEGER NOT NULL DEFAULT 0,
    created_ns INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS sources (
    agent_id TEXT NOT NULL REFERENCES agents(agent_id),
    name     TEXT NOT NULL,
    paths    TEXT NOT NULL,
    excludes TEXT NOT NULL,
    schedule TEXT NOT NULL,
    realtime INTEGER NOT NULL,
    PRIMARY KEY (agent_id, name)
);
CREATE TABLE IF NOT EXISTS events (
    time_ns INTEGER NOT NULL,
    kind    TEXT NOT NULL,
    detail  TEXT NOT NULL
);
-- The latest recovery-point report of each (agent, source), from heartbeats.
CREATE TABLE IF NOT EXISTS source_lag (
    agent_id               TEXT NOT NULL,
    source                 TEXT NOT NULL,
    oldest_change_age_secs INTEGER NOT NULL,
    pending_bytes          INTEGER NOT NULL,
    note                   TEXT NOT NULL,
    last_commit_ns         INTEGER NOT NULL,
    reported_ns            INTEGER NOT NULL,
    PRIMARY KEY (agent_id, source)
) WITHOUT ROWID;
-- Blobs a site held that a scrub found lost (their pack damaged), in the
-- order they were lost: the site's agents read them after their last `seq`
-- and forget them, so their next backup uploads them again. A blob lost
-- again later gets a new seq (INSERT OR REPLACE).
CREATE TABLE IF NOT EXISTS lost (
    seq  INTEGER PRIMARY KEY AUTOINCREMENT,
    site TEXT NOT NULL,
    id   BLOB NOT NULL,
    UNIQUE (site, id)
);
CREATE INDEX IF NOT EXISTS lost_by_site ON lost(site, seq);
CREATE INDEX IF NOT EXISTS lost_by_id ON lost(id);
-- Collector-wide settings changed through the admin API (the scrub
-- schedule and its read rate).
CREATE TABLE IF NOT EXISTS settings (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
-- Every finished scrub, newest last: what central IT asks first after a
-- disk scare is when the data was last read back, and what it found.
CREATE TABLE IF NOT EXISTS scrubs (
    started_ns  INTEGER NOT NULL,
    finished_ns INTEGER NOT NULL,
    dry_run     INTEGER NOT NULL,
    trigger     TEXT NOT NULL,
    packs       INTEGER NOT NULL,
    bytes       INTEGER NOT NULL,
    damaged     INTEGER NOT NULL,
    error       TEXT NOT NULL
);
INSERT OR IGNORE INTO counters(name, value) VALUES ('serial', 1000), ('crl', 0);
";

/// Move the rows of `site_blobs` (site, id), as releases before
/// `site_holdings` kept them, into `site_holdings` and drop the old table, in
/// one transaction. Nothing to do on a database without it.
fn migrate_site_blobs(conn: &Connection) -> Result<(), ServiceError> {
    let old: bool = conn.query_row(
        "SELECT count(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = 'site_blobs'",
        [],
        |r| r.get(0),
    )?;
    if old {
        conn.execute_batch(
            "BEGIN IMMEDIATE;
             INSERT OR IGNORE INTO site_holdings(id, site) SELECT id, site FROM site_blobs;
             DROP TABLE site_blobs;
             COMMIT;",
        )?;
    }
    Ok(())
}

/// An agent as the collector knows it.
#[derive(Debug, Clone)]
pub struct AgentRow {
    /// Its id.
    pub agent_id: String,
    /// Its site.
    pub site: String,
    /// Host name it gave at enrollment.
    pub hostname: String,
    /// Its certificate serial.
    pub serial: u64,
    /// Last heartbeat, ns since the epoch (0 = never).
    pub last_seen_ns: i64,
    /// When it was revoked, if it was.
    pub revoked_ns: Option<i64>,
}

/// A consumed enrollment token.
#[derive(Debug, Clone)]
pub struct TokenRow {
    /// The site it enrolls into.
    pub site: String,
    /// Repository keys sealed under the token's secret.
    pub wrapped_keys: Vec<u8>,
}

/// The state database.
pub struct State {
    conn: Mutex<Connection>,
}

/// Finished scrubs kept in state.db: about a week's of a schedule every
/// minute, decades of a nightly one.
pub const SCRUBS_KEPT: i64 = 10_000;

/// Nanoseconds since the epoch, now.
pub fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

impl State {
    /// Open (creating if needed) the state database at `path`.
    pub fn open(path: &Path) -> Result<State, ServiceError> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        // site_holdings grows by a 40-byte row per blob a site uploads and is
        // read and written at random ids: with SQLite's default 2 MiB cache a
        // 200 000-blob upload re-read its pages from the kernel per lookup.
        // Pages are allocated as used, up to this cap (the catalog's too).
        conn.pragma_update(None, "cache_size", -65536)?;
        conn.busy_timeout(std::time::Duration::from_secs(30))?;
        let ok: String = conn.query_row("PRAGMA quick_check", [], |r| r.get(0))?;
        if ok != "ok" {
            return Err(ServiceError::Internal(format!(
                "state database {} is damaged: {ok}",
                path.display()
            )));
        }
        conn.execute_batch(SCHEMA)?;
        // Columns added after the first release: a database from before
        // them opens and reads them as empty policies ("{}" = all defaults).
        add_column(&conn, "sources", "policy", "TEXT NOT NULL DEFAULT '{}'")?;
        add_column(&conn, "sites", "policy", "TEXT NOT NULL DEFAULT '{}'")?;
        add_column(&conn, "site_trees", "entries", "INTEGER")?;
        migrate_site_blobs(&conn)?;
        Ok(State {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> Result<MutexGuard<'_, Connection>, ServiceError> {
        self.conn
            .lock()
            .map_err(|_| ServiceError::Internal("state mutex poisoned".into()))
    }

    /// Add a site.
    pub fn add_site(&self, name: &str) -> Result<(), ServiceError> {
        let n = self.conn()?.execute(
            "INSERT OR IGNORE INTO sites(name, created_ns) VALUES (?1, ?2)",
            params![name, now_ns()],
        )?;
        if n == 0 {
            return Err(ServiceError::Exists(format!("site {name}")));
        }
        Ok(())
    }

    /// True when the site exists.
    pub fn site_exists(&self, name: &str) -> Result<bool, ServiceError> {
        Ok(self
            .conn()?
            .query_row("SELECT 1 FROM sites WHERE name = ?1", [name], |_| Ok(()))
            .optional()?
            .is_some())
    }

    /// All site names.
    pub fn sites(&self) -> Result<Vec<String>, ServiceError> {
        let c = self.conn()?;
        let mut st = c.prepare("SELECT name FROM sites ORDER BY name")?;
        let rows = st.query_map([], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Register a one-time token.
    pub fn add_token(
        &self,
        id: &[u8],
        site: &str,
        expires_ns: i64,
        wrapped: &[u8],
    ) -> Result<(), ServiceError> {
        let n = self.conn()?.execute(
            "INSERT OR IGNORE INTO tokens(token_id, site, expires_ns, wrapped_keys) VALUES (?1, ?2, ?3, ?4)",
            params![id, site, expires_ns, wrapped],
        )?;
        if n == 0 {
            return Err(ServiceError::Exists("token id".into()));
        }
        Ok(())
    }

    /// Consume a token and record the enrolled agent, atomically: a token
    /// works once, and only before it expires.
    pub fn enroll(
        &self,
        token_id: &[u8],
        hostname: &str,
    ) -> Result<(TokenRow, String, u64), ServiceError> {
        let mut c = self.conn()?;
        let tx = c.transaction()?;
        let row: Option<(String, i64, Option<i64>, Vec<u8>)> = tx
            .query_row(
                "SELECT site, expires_ns, used_ns, wrapped_keys FROM tokens WHERE token_id = ?1",
                [token_id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .optional()?;
        let now = now_ns();
        let (site, wrapped_keys) = match row {
            None => {
                return Err(ServiceError::Unauthenticated(
                    "unknown enrollment token (copy it whole, or create a new one with \
                     `hubvault enroll-token --site SITE`)"
                        .into(),
                ));
            }
            Some((_, _, Some(_), _)) => {
                return Err(ServiceError::Unauthenticated(
                    "enrollment token already used; create a new one with `hubvault enroll-token`"
                        .into(),
                ));
            }
            Some((_, exp, None, _)) if exp <= now => {
                return Err(ServiceError::Unauthenticated(
                    "enrollment token expired; create a new one with `hubvault enroll-token \
                     --site SITE [--ttl 24h]`"
                        .into(),
                ));
            }
            Some((site, _, None, w)) => (site, w),
        };
        tx.execute(
            "UPDATE tokens SET used_ns = ?1 WHERE token_id = ?2",
            params![now, token_id],
        )?;
        let serial = next_counter(&tx, "serial")?;
        let agent_id = format!("{site}-{serial}");
        tx.execute(
            "INSERT INTO agents(agent_id, site, hostname, serial, enrolled_ns) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![agent_id, site, hostname, serial as i64, now],
        )?;
        tx.commit()?;
        Ok((TokenRow { site, wrapped_keys }, agent_id, serial))
    }

    /// Give `agent_id` a new certificate serial (renewal): the old serial is
    /// revoked so that a stolen old certificate stops working too.
    pub fn renew_serial(&self, agent_id: &str, old: u64) -> Result<u64, ServiceError> {
        let mut c = self.conn()?;
        let tx = c.transaction()?;
        let serial = next_counter(&tx, "serial")?;
        let n = tx.execute(
            "UPDATE agents SET serial = ?1 WHERE agent_id = ?2 AND serial = ?3 AND revoked_ns IS NULL",
            params![serial as i64, agent_id, old as i64],
        )?;
        if n == 0 {
            return Err(ServiceError::Denied(format!(
                "agent {agent_id} cannot renew with this certificate"
            )));
        }
        tx.execute(
            "INSERT OR IGNORE INTO revoked(serial, time_ns) VALUES (?1, ?2)",
            params![old as i64, now_ns()],
        )?;
        next_counter(&tx, "crl")?;
        tx.commit()?;
        Ok(serial)
    }

    /// The next certificate serial (for admin certificates).
    pub fn next_serial(&self) -> Result<u64, ServiceError> {
        let mut c = self.conn()?;
        let tx = c.transaction()?;
        let s = next_counter(&tx, "serial")?;
        tx.commit()?;
        Ok(s)
    }

    /// All agents.
    pub fn agents(&self) -> Result<Vec<AgentRow>, ServiceError> {
        let c = self.conn()?;
        let mut st = c.prepare(
            "SELECT agent_id, site, hostname, serial, last_seen_ns, revoked_ns FROM agents ORDER BY site, agent_id",
        )?;
        let rows = st.query_map([], |r| {
            Ok(AgentRow {
                agent_id: r.get(0)?,
                site: r.get(1)?,
                hostname: r.get(2)?,
                serial: r.get::<_, i64>(3)? as u64,
                last_seen_ns: r.get(4)?,
                revoked_ns: r.get(5)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Record a heartbeat.
    pub fn seen(&self, agent_id: &str) -> Result<(), ServiceError> {
        self.conn()?.execute(
            "UPDATE agents SET last_seen_ns = ?1 WHERE agent_id = ?2",
            params![now_ns(), agent_id],
        )?;
        Ok(())
    }

    /// Revoke an agent: returns its serial and the new CRL number.
    pub fn revoke(&self, agent_id: &str) -> Result<(u64, u64), ServiceError> {
        let mut c = self.conn()?;
        let tx = c.transaction()?;
        let serial: Option<i64> = tx
            .query_row(
                "SELECT serial FROM agents WHERE agent_id = ?1",
                [agent_id],
                |r| r.get(0),
            )
            .optional()?;
        let serial = serial.ok_or_else(|| ServiceError::NotFound(format!("agent {agent_id}")))?;
        let now = now_ns();
        tx.execute(
            "UPDATE agents SET revoked_ns = coalesce(revoked_ns, ?1) WHERE agent_id = ?2",
            params![now, agent_id],
        )?;
        tx.execute(
            "INSERT OR IGNORE INTO revoked(serial, time_ns) VALUES (?1, ?2)",
            params![serial, now],
        )?;
        let crl = next_counter(&tx, "crl")?;
        tx.commit()?;
        Ok((serial as u64, crl))
    }

    /// Every revoked serial and the current CRL number.
    pub fn revoked(&self) -> Result<(Vec<u64>, u64), ServiceError> {
        let c = self.conn()?;
        let mut st = c.prepare("SELECT serial FROM revoked ORDER BY serial")?;
        let rows = st.query_map([], |r| r.get::<_, i64>(0).map(|v| v as u64))?;
        let serials = rows.collect::<Result<_, _>>()?;
        let crl: i64 = c.query_row("SELECT value FROM counters WHERE name = 'crl'", [], |r| {
            r.get(0)
        })?;
        Ok((serials, crl as u64))
    }
}

/// A job row.
#[derive(Debug, Clone)]
pub struct JobRow {
    /// Its id.
    pub job_id: u64,
    /// "restore".
    pub kind: String,
    /// The agent doing it.
    pub agent_id: String,
    /// The snapshot it works on.
    pub snapshot: Vec<u8>,
    /// Target directory on the agent.
    pub target: String,
    /// Path inside the snapshot.
    pub path: String,
    /// proto JobState as i32.
    pub state: i32,
    /// Last message.
    pub message: String,
    /// Files done.
    pub files: u64,
    /// Bytes done.
    pub bytes: u64,
    /// Creation time.
    pub created_ns: i64,
}

impl State {
    /// Of `ids`, those `site` holds (uploaded or received).
    pub fn site_has(&self, site: &str, ids: &[Vec<u8>]) -> Result<Vec<bool>, ServiceError> {
        let mut c = self.conn()?;
        // One read transaction for the batch: outside one, SQLite takes and
        // releases its WAL read lock around every statement.
        let tx = c.transaction()?;
        let out = {
            let mut st =
                tx.prepare_cached("SELECT 1 FROM site_holdings WHERE id = ?2 AND site = ?1")?;
            ids.iter()
                .map(|id| st.exists(params![site, id]).map_err(ServiceError::from))
                .collect::<Result<Vec<bool>, ServiceError>>()?
        };
        tx.commit()?;
        Ok(out)
    }

    /// Record that `site` holds `ids`.
    pub fn add_site_blobs(&self, site: &str, ids: &[Vec<u8>]) -> Result<(), ServiceError> {
        let mut c = self.conn()?;
        let tx = c.transaction()?;
        {
            let mut st =
                tx.prepare_cached("INSERT OR IGNORE INTO site_holdings(site, id) VALUES (?1, ?2)")?;
            // In key order: each insert lands next to the previous one.
            let mut sorted: Vec<&Vec<u8>> = ids.iter().collect();
            sorted.sort_unstable();
            for id in sorted {
                st.execute(params![site, id])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// A collector-wide setting, if set.
    pub fn setting(&self, name: &str) -> Result<Option<String>, ServiceError> {
        let c = self.conn()?;
        Ok(
            c.query_row("SELECT value FROM settings WHERE name = ?1", [name], |r| {
                r.get(0)
            })
            .optional()?,
        )
    }

    /// Set (`Some`) or clear (`None`) a collector-wide setting.
    pub fn set_setting(&self, name: &str, value: Option<&str>) -> Result<(), ServiceError> {
        let c = self.conn()?;
        match value {
            Some(v) => c.execute(
                "INSERT OR REPLACE INTO settings(name, value) VALUES (?1, ?2)",
                params![name, v],
            )?,
            None => c.execute("DELETE FROM settings WHERE name = ?1", [name])?,
        };
        Ok(())
    }

    /// Keep the outcome of a finished scrub (the last [`SCRUBS_KEPT`]).
    pub fn record_scrub(&self, run: &proto::pb::ScrubRun) -> Result<(), ServiceError> {
        let c = self.conn()?;
        c.execute(
            "DELETE FROM scrubs WHERE rowid <= (SELECT max(rowid) FROM scrubs) - ?1",
            [SCRUBS_KEPT - 1],
        )?;
        c.execute(
            "INSERT INTO scrubs(started_ns, finished_ns, dry_run, trigger, packs, bytes,
                 damaged, error) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                run.started_ns,
                run.finished_ns,
                run.dry_run,
                run.trigger,
                run.packs_checked as i64,
                run.bytes_checked as i64,
                run.damaged as i64,
                run.error
            ],
        )?;
        Ok(())
    }

    /// The scrub that finished last, if any.
    pub fn last_scrub(&self) -> Result<Option<proto::pb::ScrubRun>, ServiceError> {
        let c = self.conn()?;
        Ok(c.query_row(
            "SELECT started_ns, finished_ns, dry_run, trigger, packs, bytes, damaged, error
             FROM scrubs ORDER BY rowid DESC LIMIT 1",
            [],
            |r| {
                Ok(proto::pb::ScrubRun {
                    started_ns: r.get(0)?,
                    finished_ns: r.get(1)?,
                    dry_run: r.get(2)?,
                    trigger: r.get(3)?,
                    packs_checked: r.get::<_, i64>(4)? as u64,
                    bytes_checked: r.get::<_, i64>(5)? as u64,
                    damaged: r.get::<_, i64>(6)? as u64,
                    error: r.get(7)?,
                })
            },
        )
        .optional()?)
    }

    /// The number of entries `tree` expands to, when its whole subtree was
    /// verified for `site`; `None` when it must be verified.
    pub fn tree_verified(&self, site: &str, tree: &[u8]) -> Result<Option<u64>, ServiceError> {
        let c = self.conn()?;
        let mut st = c.prepare_cached(
            "SELECT entries FROM site_trees WHERE site = ?1 AND id = ?2 AND entries IS NOT NULL",
        )?;
        let n: Option<i64> = st.query_row(params![site, tree], |r| r.get(0)).optional()?;
        Ok(n.map(|n| n as u64))
    }

    /// Record verified trees, each with the entries it expands to.
    pub fn add_verified_trees(
        &self,
        site: &str,
        trees: &[(Vec<u8>, u64)],
    ) -> Result<(), ServiceError> {
        let mut c = self.conn()?;
        let tx = c.transaction()?;
        {
            let mut st = tx.prepare_cached(
                "INSERT OR REPLACE INTO site_trees(site, id, entries) VALUES (?1, ?2, ?3)",
            )?;
            for (t, n) in trees {
                st.execute(params![site, t, *n as i64])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// The snapshot an earlier commit with this key produced, if any.
    pub fn commit_of(
        &self,
        agent_id: &str,
        key: &[u8],
    ) -> Result<Option<(Vec<u8>, i64)>, ServiceError> {
        Ok(self
            .conn()?
            .query_row(
                "SELECT snapshot, time_ns FROM commits WHERE agent_id = ?1 AND key = ?2",
                params![agent_id, key],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?)
    }

    /// Record, before the snapshot is written, what a commit with this key
    /// will produce, so that a retry after a crash finishes that commit
    /// instead of making a second snapshot. False when a row for the key
    /// exists already (a concurrent call with the same key got there first).
    pub fn reserve_commit(
        &self,
        agent_id: &str,
        key: &[u8],
        snapshot: &[u8],
        time_ns: i64,
    ) -> Result<bool, ServiceError> {
        let n = self.conn()?.execute(
            "INSERT OR IGNORE INTO commits(agent_id, key, snapshot, time_ns) VALUES (?1, ?2, ?3, ?4)",
            params![agent_id, key, snapshot, time_ns],
        )?;
        Ok(n == 1)
    }

    /// Point the record of an unfinished commit at another snapshot id (the
    /// retry that finishes it asked for something else under the same key).
    pub fn repoint_commit(
        &self,
        agent_id: &str,
        key: &[u8],
        snapshot: &[u8],
    ) -> Result<(), ServiceError> {
        self.conn()?.execute(
            "UPDATE commits SET snapshot = ?3 WHERE agent_id = ?1 AND key = ?2",
            params![agent_id, key, snapshot],
        )?;
        Ok(())
    }

    /// Record an integrity or security event.
    pub fn event(&self, kind: &str, detail: &str) -> Result<(), ServiceError> {
        tracing::warn!(kind, "{detail}");
        self.record_event(kind, detail)
    }

    /// Record an event of routine administration (a prune): logged at info.
    pub fn admin_event(&self, kind: &str, detail: &str) -> Result<(), ServiceError> {
        tracing::info!(kind, "{detail}");
        self.record_event(kind, detail)
    }

    fn record_event(&self, kind: &str, detail: &str) -> Result<(), ServiceError> {
        self.conn()?.execute(
            "INSERT INTO events(time_ns, kind, detail) VALUES (?1, ?2, ?3)",
            params![now_ns(), kind, detail],
        )?;
        Ok(())
    }

    /// The site of an agent (None when unknown or revoked).
    pub fn agent_site(&self, agent_id: &str) -> Result<Option<String>, ServiceError> {
        Ok(self
            .conn()?
            .query_row(
                "SELECT site FROM agents WHERE agent_id = ?1 AND revoked_ns IS NULL",
                [agent_id],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// Create a job; returns its id.
    pub fn add_job(
        &self,
        kind: &str,
        agent_id: &str,
        snapshot: &[u8],
        target: &str,
        path: &str,
    ) -> Result<u64, ServiceError> {
        let c = self.conn()?;
        c.execute(
            "INSERT INTO jobs(kind, agent_id, snapshot, target, path, state, created_ns) VALUES (?1, ?2, ?3, ?4, ?5, 1, ?6)",
            params![kind, agent_id, snapshot, target, path, now_ns()],
        )?;
        Ok(c.last_insert_rowid() as u64)
    }

    /// Update a job from an agent's report (only the agent doing it may).
    pub fn report_job(&self, agent_id: &str, r: &proto::pb::JobReport) -> Result<(), ServiceError> {
        let n = self.conn()?.execute(
            "UPDATE jobs SET state = ?1, message = ?2, files = ?3, bytes = ?4 WHERE job_id = ?5 AND agent_id = ?6",
            params![r.state, r.message, r.files as i64, r.bytes as i64, r.job_id as i64, agent_id],
        )?;
        if n == 0 {
            return Err(ServiceError::NotFound(format!(
                "job {} of this agent",
                r.job_id
            )));
        }
        Ok(())
    }

    /// Jobs (all, or one).
    pub fn jobs(&self, job_id: Option<u64>) -> Result<Vec<JobRow>, ServiceError> {
        let c = self.conn()?;
        let mut st = c.prepare(
            "SELECT job_id, kind, agent_id, snapshot, target, path, state, message, files, bytes, created_ns
             FROM jobs WHERE ?1 IS NULL OR job_id = ?1 ORDER BY job_id",
        )?;
        let rows = st.query_map([job_id.map(|j| j as i64)], |r| {
            Ok(JobRow {
                job_id: r.get::<_, i64>(0)? as u64,
                kind: r.get(1)?,
                agent_id: r.get(2)?,
                snapshot: r.get(3)?,
                target: r.get(4)?,
                path: r.get(5)?,
                state: r.get(6)?,
                message: r.get(7)?,
                files: r.get::<_, i64>(8)? as u64,
                bytes: r.get::<_, i64>(9)? as u64,
                created_ns: r.get(10)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Jobs of `agent_id` not yet finished (pushed again when it reconnects).
    pub fn open_jobs(&self, agent_id: &str) -> Result<Vec<JobRow>, ServiceError> {
        Ok(self
            .jobs(None)?
            .into_iter()
            .filter(|j| j.agent_id == agent_id && j.state <= 2)
            .collect())
    }
}

impl State {
    /// Define or replace a source.
    pub fn put_source(&self, agent_id: &str, s: &proto::pb::Source) -> Result<(), ServiceError> {
        let paths =
            serde_json::to_string(&s.paths).map_err(|e| ServiceError::Internal(e.to_string()))?;
        let excludes = serde_json::to_string(&s.excludes)
            .map_err(|e| ServiceError::Internal(e.to_string()))?;
        let policy = serde_json::to_string(&SourcePolicy::of(s))
            .map_err(|e| ServiceError::Internal(e.to_string()))?;
        self.conn()?.execute(
            "INSERT OR REPLACE INTO sources(agent_id, name, paths, excludes, schedule, realtime, policy)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![agent_id, s.name, paths, excludes, s.schedule, s.realtime, policy],
        )?;
        Ok(())
    }

    /// The sources of an agent, each with its own policy (its retention
    /// empty when it has none: see [`State::agent_sources`] for what agents get).
    pub fn sources(&self, agent_id: &str) -> Result<Vec<proto::pb::Source>, ServiceError> {
        let c = self.conn()?;
        let mut st = c.prepare(
            "SELECT name, paths, excludes, schedule, realtime, policy FROM sources WHERE agent_id = ?1 ORDER BY name",
        )?;
        let rows = st.query_map([agent_id], |r| {
            let paths: String = r.get(1)?;
            let excludes: String = r.get(2)?;
            let policy: String = r.get(5)?;
            let mut s = proto::pb::Source {
                name: r.get(0)?,
                paths: serde_json::from_str(&paths).unwrap_or_default(),
                excludes: serde_json::from_str(&excludes).unwrap_or_default(),
                schedule: r.get(3)?,
                realtime: r.get(4)?,
                ..Default::default()
            };
            serde_json::from_str::<SourcePolicy>(&policy)
                .unwrap_or_default()
                .apply(&mut s);
            Ok(s)
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// What `agent_id` is sent: its sources with their effective retention
    /// (their own, else the site's default) and its site's agent policy
    /// (time zone, per-agent bandwidth).
    pub fn agent_sources(&self, agent_id: &str) -> Result<proto::pb::Sources, ServiceError> {
        let site = match self.agent_site(agent_id)? {
            Some(site) => self.site_policy(&site)?,
            None => SitePolicy::default(),
        };
        let mut sources = self.sources(agent_id)?;
        for s in &mut sources {
            let own = s
                .retention
                .as_ref()
                .map(Retention::from)
                .unwrap_or_default();
            if own.is_empty() {
                s.retention = Some(site.retention.into());
            }
        }
        Ok(proto::pb::Sources {
            sources,
            agent: Some(site.agent_policy()),
        })
    }

    /// The policy of `site` (defaults when it has none; NOT_FOUND when the
    /// site does not exist).
    pub fn site_policy(&self, site: &str) -> Result<SitePolicy, ServiceError> {
        let json: Option<String> = self
            .conn()?
            .query_row("SELECT policy FROM sites WHERE name = ?1", [site], |r| {
                r.get(0)
            })
            .optional()?;
        let json = json.ok_or_else(|| ServiceError::NotFound(format!("site {site}")))?;
        Ok(serde_json::from_str(&json).unwrap_or_default())
    }

    /// Replace the policy of `site`.
    pub fn set_site_policy(&self, site: &str, p: &SitePolicy) -> Result<(), ServiceError> {
        let json = serde_json::to_string(p).map_err(|e| ServiceError::Internal(e.to_string()))?;
        let n = self.conn()?.execute(
            "UPDATE sites SET policy = ?1 WHERE name = ?2",
            params![json, site],
        )?;
        if n == 0 {
            return Err(ServiceError::NotFound(format!(
                "site {site} (add it with `hubvault site add`)"
            )));
        }
        Ok(())
    }
}

/// Most lag entries accepted from one heartbeat (agents are untrusted).
pub const MAX_LAG_ENTRIES: usize = 100;
/// Longest source name kept from a heartbeat, in characters.
pub const MAX_LAG_SOURCE_CHARS: usize = 128;
/// Longest note kept from a heartbeat, in characters.
pub const MAX_LAG_NOTE_CHARS: usize = 1024;

/// The latest recovery-point report of one (agent, source).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LagRow {
    /// The agent.
    pub agent_id: String,
    /// The source.
    pub source: String,
    /// Age of the oldest change not yet committed, seconds (0 = none).
    pub oldest_change_age_secs: u64,
    /// Bytes waiting to be sent.
    pub pending_bytes: u64,
    /// What central IT must act on; empty = all well.
    pub note: String,
    /// The agent's idea of the source's last commit, ns since the epoch.
    pub last_commit_ns: i64,
    /// When the collector received the report, ns since the epoch.
    pub reported_ns: i64,
}

impl State {
    /// Record the lag entries of a heartbeat of `agent_id`: they replace
    /// its previous ones. At most [`MAX_LAG_ENTRIES`] are taken, names and
    /// notes are cut to their limits, entries without a source name dropped.
    pub fn record_lag(
        &self,
        agent_id: &str,
        lag: &[proto::pb::SourceLag],
    ) -> Result<(), ServiceError> {
        let now = now_ns();
        let clamp = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        let mut c = self.conn()?;
        let tx = c.transaction()?;
        tx.execute("DELETE FROM source_lag WHERE agent_id = ?1", [agent_id])?;
        {
            let mut st = tx.prepare_cached(
                "INSERT OR REPLACE INTO source_lag(agent_id, source, oldest_change_age_secs,
                 pending_bytes, note, last_commit_ns, reported_ns) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?;
            for l in lag.iter().take(MAX_LAG_ENTRIES) {
                let source: String = l.source.chars().take(MAX_LAG_SOURCE_CHARS).collect();
                if source.is_empty() {
                    continue;
                }
                let note: String = l.note.chars().take(MAX_LAG_NOTE_CHARS).collect();
                st.execute(params![
                    agent_id,
                    source,
                    clamp(l.oldest_change_age_secs),
                    clamp(l.pending_bytes),
                    note,
                    l.last_commit_ns.max(0),
                    now
                ])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Every recorded lag report, by agent and source.
    pub fn lags(&self) -> Result<Vec<LagRow>, ServiceError> {
        let c = self.conn()?;
        let mut st = c.prepare(
            "SELECT agent_id, source, oldest_change_age_secs, pending_bytes, note, last_commit_ns, reported_ns
             FROM source_lag ORDER BY agent_id, source",
        )?;
        let rows = st.query_map([], |r| {
            Ok(LagRow {
                agent_id: r.get(0)?,
                source: r.get(1)?,
                oldest_change_age_secs: r.get::<_, i64>(2)?.max(0) as u64,
                pending_bytes: r.get::<_, i64>(3)?.max(0) as u64,
                note: r.get(4)?,
                last_commit_ns: r.get(5)?,
                reported_ns: r.get(6)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The sites holding any of `ids`, by name (nothing is changed).
    pub fn holders(&self, ids: &[Vec<u8>]) -> Result<Vec<String>, ServiceError> {
        let mut c = self.conn()?;
        let tx = c.transaction()?;
        let mut sites = std::collections::BTreeSet::new();
        {
            let mut st = tx.prepare_cached("SELECT site FROM site_holdings WHERE id = ?1")?;
            for id in ids {
                let rows = st.query_map([id], |r| r.get::<_, String>(0))?;
                for site in rows {
                    sites.insert(site?);
                }
            }
        }
        tx.commit()?;
        Ok(sites.into_iter().collect())
    }

    /// Record that `ids` are lost, in one transaction: each site holding one
    /// gets a `lost` row for it (for its agents to read) and no longer holds
    /// it (so it is asked for again), and every tree verified for those
    /// sites must be verified again (a verified tree vouches for its whole
    /// subtree, which may now lack a blob). Returns the sites affected.
    pub fn lose_blobs(&self, ids: &[Vec<u8>]) -> Result<Vec<String>, ServiceError> {
        let mut c = self.conn()?;
        let tx = c.transaction()?;
        let mut sites = std::collections::BTreeSet::new();
        {
            let mut holders = tx.prepare_cached("SELECT site FROM site_holdings WHERE id = ?1")?;
            let mut lost =
                tx.prepare_cached("INSERT OR REPLACE INTO lost(site, id) VALUES (?1, ?2)")?;
            let mut drop = tx.prepare_cached("DELETE FROM site_holdings WHERE id = ?1")?;
            for id in ids {
                let held: Vec<String> = holders
                    .query_map([id], |r| r.get(0))?
                    .collect::<Result<_, _>>()?;
                for site in held {
                    lost.execute(params![site, id])?;
                    sites.insert(site);
                }
                drop.execute([id])?;
            }
            let mut unverify = tx.prepare_cached("DELETE FROM site_trees WHERE site = ?1")?;
            for site in &sites {
                unverify.execute([site])?;
            }
        }
        tx.commit()?;
        Ok(sites.into_iter().collect())
    }

    /// True when a scrub set blob `id` aside (a `lost` row, of any site:
    /// a site granted the blob by a restore job after the scrub has none).
    pub fn was_lost(&self, id: &[u8]) -> Result<bool, ServiceError> {
        let c = self.conn()?;
        let mut st = c.prepare_cached("SELECT 1 FROM lost WHERE id = ?1")?;
        Ok(st.exists([id])?)
    }

    /// Up to `limit` blobs `site` lost after `after`, in order, with their
    /// sequence numbers.
    pub fn lost_after(
        &self,
        site: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, ServiceError> {
        let c = self.conn()?;
        let mut st = c.prepare_cached(
            "SELECT seq, id FROM lost WHERE site = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
        )?;
        let after = i64::try_from(after).unwrap_or(i64::MAX);
        let rows = st.query_map(params![site, after, limit as i64], |r| {
            Ok((r.get::<_, i64>(0)?.max(0) as u64, r.get(1)?))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Forget the collector's own rows about snapshot `id` (the idempotency
    /// records of the commit that made it), once the repository forgot it.
    pub fn forget_snapshot(&self, id: &[u8]) -> Result<(), ServiceError> {
        self.conn()?
            .execute("DELETE FROM commits WHERE snapshot = ?1", [id])?;
        Ok(())
    }
}

/// Add `column` to `table` unless it is there already.
fn add_column(
    conn: &Connection,
    table: &str,
    column: &str,
    decl: &str,
) -> Result<(), ServiceError> {
    let present = conn
        .prepare("SELECT 1 FROM pragma_table_info(?1) WHERE name = ?2")?
        .exists(params![table, column])?;
    if !present {
        conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {decl}"))?;
    }
    Ok(())
}

fn next_counter(tx: &rusqlite::Transaction<'_>, name: &str) -> Result<u64, ServiceError> {
    tx.execute(
        "UPDATE counters SET value = value + 1 WHERE name = ?1",
        [name],
    )?;
    let v: i64 = tx.query_row("SELECT value FROM counters WHERE name = ?1", [name], |r| {
        r.get(0)
    })?;
    Ok(v as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::pb;

    fn state_with_agent(dir: &Path) -> (State, String) {
        let st = State::open(&dir.join("state.db")).expect("open");
        st.add_site("paris").expect("site");
        st.add_token(&[1; 16], "paris", now_ns() + 1_000_000_000_000, b"w")
            .expect("token");
        let (_, agent, _) = st.enroll(&[1; 16], "host").expect("enroll");
        (st, agent)
    }

    /// A `site_trees` row from before the entry counts is verified again
    /// (the commit check needs every count) and then keeps its count.
    #[test]
    fn verified_trees_from_before_entry_counts_are_verified_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.db");
        {
            let c = Connection::open(&path).expect("open");
            c.execute_batch(
                "CREATE TABLE site_trees (site TEXT NOT NULL, id BLOB NOT NULL,
                     PRIMARY KEY (site, id)) WITHOUT ROWID;
                 INSERT INTO site_trees VALUES ('paris', x'01');",
            )
            .expect("old schema");
        }
        let st = State::open(&path).expect("reopen");
        assert_eq!(st.tree_verified("paris", &[1]).expect("read"), None);
        st.add_verified_trees("paris", &[(vec![1], 7), (vec![2], 3)])
            .expect("record");
        assert_eq!(st.tree_verified("paris", &[1]).expect("read"), Some(7));
        assert_eq!(st.tree_verified("paris", &[2]).expect("read"), Some(3));
        assert_eq!(st.tree_verified("lyon", &[2]).expect("read"), None);
    }

    #[test]
    fn heartbeat_lag_is_recorded_capped_and_replaced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (st, agent) = state_with_agent(dir.path());
        let lag = |source: &str, age: u64, note: &str| pb::SourceLag {
            source: source.into(),
            oldest_change_age_secs: age,
            pending_bytes: u64::MAX,
            note: note.into(),
            last_commit_ns: 42,
        };
        st.record_lag(
            &agent,
            &[
                lag("docs", 7, ""),
                lag("", 1, ""),
                lag("mail", 0, &"x".repeat(5000)),
            ],
        )
        .expect("record");
        let rows = st.lags().expect("lags");
        assert_eq!(rows.len(), 2, "the nameless entry is dropped");
        assert_eq!(rows[0].source, "docs");
        assert_eq!(rows[0].oldest_change_age_secs, 7);
        assert_eq!(
            rows[0].pending_bytes,
            i64::MAX as u64,
            "clamped, not wrapped"
        );
        assert_eq!(rows[0].last_commit_ns, 42);
        assert!(rows[0].reported_ns > 0);
        assert_eq!(rows[1].note.chars().count(), MAX_LAG_NOTE_CHARS);

        // The next heartbeat replaces the agent's lines; at most 100 are taken.
        let many: Vec<_> = (0..500).map(|i| lag(&format!("s{i:03}"), i, "")).collect();
        st.record_lag(&agent, &many).expect("record");
        let rows = st.lags().expect("lags");
        assert_eq!(rows.len(), MAX_LAG_ENTRIES);
        assert!(rows.iter().all(|r| r.source != "docs"));
    }

    #[test]
    fn an_older_database_opens_and_sources_get_effective_policies() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.db");
        {
            // The tables as the first release created them, with a source row.
            let c = Connection::open(&path).expect("open");
            c.execute_batch(
                "CREATE TABLE sites (name TEXT PRIMARY KEY, created_ns INTEGER NOT NULL);
                 CREATE TABLE sources (agent_id TEXT NOT NULL, name TEXT NOT NULL, paths TEXT NOT NULL,
                     excludes TEXT NOT NULL, schedule TEXT NOT NULL, realtime INTEGER NOT NULL,
                     PRIMARY KEY (agent_id, name));
                 INSERT INTO sites VALUES ('paris', 1);
                 INSERT INTO sources VALUES ('paris-1001', 'docs', '[\"/srv\"]', '[]', '', 1);
                 CREATE TABLE site_blobs (site TEXT NOT NULL, id BLOB NOT NULL,
                     PRIMARY KEY (site, id)) WITHOUT ROWID;
                 INSERT INTO site_blobs VALUES ('paris', x'01'), ('lyon', x'01'), ('paris', x'02');",
            )
            .expect("old schema");
        }
        let st = State::open(&path).expect("migrates");
        let old = st.sources("paris-1001").expect("sources");
        assert_eq!(old.len(), 1);
        assert!(old[0].realtime);
        assert_eq!(old[0].paths, vec!["/srv".to_string()]);
        assert_eq!(old[0].priority, 0);
        // What each site held moved to the table keyed by id.
        let ids = [vec![1u8], vec![2u8], vec![3u8]];
        assert_eq!(
            st.site_has("paris", &ids).expect("has"),
            [true, true, false]
        );
        assert_eq!(
            st.site_has("lyon", &ids).expect("has"),
            [true, false, false]
        );
        drop(st);
        // Opening again does not add the columns twice.
        let st = State::open(&path).expect("reopens");
        assert_eq!(
            st.site_policy("paris").expect("policy"),
            SitePolicy::default()
        );
        assert!(matches!(
            st.site_policy("nowhere"),
            Err(ServiceError::NotFound(_))
        ));
    }

    #[test]
    fn sources_carry_their_own_or_the_sites_retention() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (st, agent) = state_with_agent(dir.path());
        let site = SitePolicy {
            timezone: "Europe/Paris".into(),
            agent_bandwidth: crate::policy::Bandwidth {
                bytes_per_sec: 2_000_000,
                window_start_min: 480,
                window_end_min: 1080,
            },
            retention: Retention {
                daily: 30,
                ..Default::default()
            },
        };
        st.set_site_policy("paris", &site).expect("site policy");
        let mut own = pb::Source {
            name: "mail".into(),
            paths: vec!["/var/mail".into()],
            priority: 5,
            quiet_ms: 500,
            retention: Some(pb::Retention {
                keep_last: 3,
                ..Default::default()
            }),
            ..Default::default()
        };
        st.put_source(&agent, &own).expect("put");
        own.name = "docs".into();
        own.retention = None;
        st.put_source(&agent, &own).expect("put");

        let raw = st.sources(&agent).expect("sources");
        assert_eq!(raw[0].name, "docs");
        assert_eq!(raw[0].retention, Some(pb::Retention::default()));
        assert_eq!(raw[1].priority, 5);
        assert_eq!(raw[1].quiet_ms, 500);

        let sent = st.agent_sources(&agent).expect("agent sources");
        let agent_policy = sent.agent.expect("agent policy");
        assert_eq!(agent_policy.timezone, "Europe/Paris");
        assert_eq!(
            agent_policy.bandwidth.map(|b| b.bytes_per_sec),
            Some(2_000_000)
        );
        assert_eq!(sent.sources[0].retention.map(|r| r.daily), Some(30));
        assert_eq!(
            sent.sources[1].retention.map(|r| (r.keep_last, r.daily)),
            Some((3, 0))
        );
    }
}
