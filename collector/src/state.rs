//! The collector's own state (SQLite, WAL, synchronous=FULL): sites,
//! agents, enrollment tokens, revoked serials and counters. Separate from the
//! repository catalog, which stays the pure index `repo-format` defines.
//!
//! One connection behind a mutex; callers use it from `spawn_blocking`.

use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use rusqlite::{Connection, OptionalExtension, params};

use crate::error::ServiceError;

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
-- Which blobs each site uploaded or received: the only source of answers to which-do-you-lack.
CREATE TABLE IF NOT EXISTS site_blobs (
    site TEXT NOT NULL,
    id   BLOB NOT NULL,
    PRIMARY KEY (site, id)
) WITHOUT ROWID;
-- Trees whose whole subtree was verified present for a site at a commit.
CREATE TABLE IF NOT EXISTS site_trees (
    site TEXT NOT NULL,
    id   BLOB NOT NULL,
    PRIMARY KEY (site, id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS commits (
    agent_id TEXT NOT NULL,
    key      BLOB NOT NULL,
    snapshot BLOB NOT NULL,
    time_ns  INTEGER NOT NULL,
    PRIMARY KEY (agent_id, key)
) WITHOUT ROWID;
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
INSERT OR IGNORE INTO counters(name, value) VALUES ('serial', 1000), ('crl', 0);
";

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
        conn.busy_timeout(std::time::Duration::from_secs(30))?;
        let ok: String = conn.query_row("PRAGMA quick_check", [], |r| r.get(0))?;
        if ok != "ok" {
            return Err(ServiceError::Internal(format!(
                "state database {} is damaged: {ok}",
                path.display()
            )));
        }
        conn.execute_batch(SCHEMA)?;
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
                    "unknown enrollment token".into(),
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
                    "enrollment token expired".into(),
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
        let c = self.conn()?;
        let mut st = c.prepare_cached("SELECT 1 FROM site_blobs WHERE site = ?1 AND id = ?2")?;
        ids.iter()
            .map(|id| st.exists(params![site, id]).map_err(ServiceError::from))
            .collect()
    }

    /// Record that `site` holds `ids`.
    pub fn add_site_blobs(&self, site: &str, ids: &[Vec<u8>]) -> Result<(), ServiceError> {
        let mut c = self.conn()?;
        let tx = c.transaction()?;
        {
            let mut st =
                tx.prepare_cached("INSERT OR IGNORE INTO site_blobs(site, id) VALUES (?1, ?2)")?;
            for id in ids {
                st.execute(params![site, id])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// True when `tree`'s whole subtree was verified for `site`.
    pub fn tree_verified(&self, site: &str, tree: &[u8]) -> Result<bool, ServiceError> {
        let c = self.conn()?;
        let mut st = c.prepare_cached("SELECT 1 FROM site_trees WHERE site = ?1 AND id = ?2")?;
        Ok(st.exists(params![site, tree])?)
    }

    /// Record verified trees.
    pub fn add_verified_trees(&self, site: &str, trees: &[Vec<u8>]) -> Result<(), ServiceError> {
        let mut c = self.conn()?;
        let tx = c.transaction()?;
        {
            let mut st =
                tx.prepare_cached("INSERT OR IGNORE INTO site_trees(site, id) VALUES (?1, ?2)")?;
            for t in trees {
                st.execute(params![site, t])?;
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

    /// Remember a commit's result for retries.
    pub fn record_commit(
        &self,
        agent_id: &str,
        key: &[u8],
        snapshot: &[u8],
        time_ns: i64,
    ) -> Result<(), ServiceError> {
        self.conn()?.execute(
            "INSERT OR IGNORE INTO commits(agent_id, key, snapshot, time_ns) VALUES (?1, ?2, ?3, ?4)",
            params![agent_id, key, snapshot, time_ns],
        )?;
        Ok(())
    }

    /// Record an integrity or security event.
    pub fn event(&self, kind: &str, detail: &str) -> Result<(), ServiceError> {
        tracing::warn!(kind, "{detail}");
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
        self.conn()?.execute(
            "INSERT OR REPLACE INTO sources(agent_id, name, paths, excludes, schedule, realtime) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![agent_id, s.name, paths, excludes, s.schedule, s.realtime],
        )?;
        Ok(())
    }

    /// The sources of an agent.
    pub fn sources(&self, agent_id: &str) -> Result<Vec<proto::pb::Source>, ServiceError> {
        let c = self.conn()?;
        let mut st = c.prepare(
            "SELECT name, paths, excludes, schedule, realtime FROM sources WHERE agent_id = ?1 ORDER BY name",
        )?;
        let rows = st.query_map([agent_id], |r| {
            let paths: String = r.get(1)?;
            let excludes: String = r.get(2)?;
            Ok(proto::pb::Source {
                name: r.get(0)?,
                paths: serde_json::from_str(&paths).unwrap_or_default(),
                excludes: serde_json::from_str(&excludes).unwrap_or_default(),
                schedule: r.get(3)?,
                realtime: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
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
