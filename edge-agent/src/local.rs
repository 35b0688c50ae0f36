//! Restore from the agent's own files. Before a restore job pulls chunks
//! from the collector, it looks for them in the files the agent itself
//! backed up: the spool keeps the trees of the agent's snapshots, so the
//! latest snapshot of each source says which live file held which chunks.
//! A file that listed a needed chunk is read again and re-chunked, each
//! chunk's id is re-derived with the repository's keyed hash, and only a
//! chunk whose id is still needed is sealed (and checked to open) into the
//! spool. A file changed since its backup yields fewer matches, the rest is
//! pulled; nothing read here is trusted beyond its keyed hash.
//!
//! The ids a job still needs live in a temporary on-disk SQLite database,
//! not in RAM: a restore of millions of chunks stays bounded in memory.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::mpsc::{Receiver, SyncSender};

use anyhow::{Context, Result};
use repo_format::blob::{BlobKind, Sealer};
use repo_format::chunker::{Chunker, ChunkerSetup};
use repo_format::pack::writer::PackWriter;
use repo_format::tree::{Entry, EntryKind};
use repo_format::{Id, Repository};
use rusqlite::Connection;

use crate::acked::Acked;

/// The chunk ids a restore job needs and does not have yet.
pub struct Needed {
    conn: Connection,
}

impl Needed {
    /// An empty set in a private temporary database (SQLite deletes it on close).
    pub fn new() -> Result<Needed> {
        let conn = Connection::open("").context("creating the restore's temporary id set")?;
        conn.execute_batch(
            "PRAGMA journal_mode = MEMORY;
             PRAGMA synchronous = OFF;
             CREATE TABLE need (id BLOB PRIMARY KEY) WITHOUT ROWID;",
        )
        .context("creating the restore's temporary id set")?;
        Ok(Needed { conn })
    }

    /// Add `ids` (duplicates are ignored).
    pub fn add(&mut self, ids: &[Id]) -> Result<()> {
        let tx = self.conn.transaction()?;
        {
            let mut st = tx.prepare_cached("INSERT OR IGNORE INTO need (id) VALUES (?1)")?;
            for id in ids {
                st.execute([&id.0[..]])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// How many ids are still needed.
    pub fn len(&self) -> Result<u64> {
        let n: i64 = self
            .conn
            .query_row("SELECT count(*) FROM need", [], |r| r.get(0))?;
        Ok(n as u64)
    }

    /// True when nothing is needed.
    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }

    /// How many of `ids` are needed.
    pub fn count_of(&self, ids: &[Id]) -> Result<usize> {
        let mut st = self
            .conn
            .prepare_cached("SELECT 1 FROM need WHERE id = ?1")?;
        let mut n = 0;
        for id in ids {
            if st.exists([&id.0[..]])? {
                n += 1;
            }
        }
        Ok(n)
    }

    /// Remove `id`; true when it was needed.
    pub fn take(&self, id: &Id) -> Result<bool> {
        let mut st = self.conn.prepare_cached("DELETE FROM need WHERE id = ?1")?;
        Ok(st.execute([&id.0[..]])? > 0)
    }

    /// Up to `n` needed ids greater than `after`, in id order: how the rest
    /// is walked in batches without holding it in memory.
    pub fn batch_after(&self, after: Option<&Id>, n: usize) -> Result<Vec<Id>> {
        let mut st = self
            .conn
            .prepare_cached("SELECT id FROM need WHERE id > ?1 ORDER BY id LIMIT ?2")?;
        let start: &[u8] = after.map(|a| &a.0[..]).unwrap_or(&[]);
        let rows = st.query_map(rusqlite::params![start, n as i64], |r| {
            r.get::<_, Vec<u8>>(0)
        })?;
        let mut out = Vec::with_capacity(n);
        for r in rows {
            let raw = r?;
            out.push(Id::from_slice(&raw).context("malformed id in the restore's id set")?);
        }
        Ok(out)
    }
}

/// What [`take_from_files`] found.
#[derive(Debug, Default, Clone, Copy)]
pub struct Taken {
    /// Files read again.
    pub files: u64,
    /// Chunks found, verified and stored in the spool.
    pub chunks: u64,
    /// Their plaintext bytes.
    pub bytes: u64,
}

/// Look for the chunks in `need` in the live files of the latest spool
/// snapshot of each source; store those found in the spool and remove them
/// from `need`. Files that cannot be read are skipped (the chunks are then
/// pulled); only a failure to store in the spool is an error.
///
/// One thread walks the trees and hands files that list a needed chunk to a
/// worker per core, which re-chunks, hashes and seals (sealing is the cost:
/// zstd, as the backup does, since sealing must stay deterministic).
pub fn take_from_files(repo: &Repository, acked: &Acked, need: &mut Needed) -> Result<Taken> {
    if need.is_empty()? {
        return Ok(Taken::default());
    }
    let content = repo.keys().content()?;
    let setup = ChunkerSetup::new(repo.config().chunker, content.gear_seed());
    let shared = Shared {
        setup: &setup,
        keys: content,
        need: Mutex::new(need),
        out: Mutex::new(SpoolWriter::new(repo, acked)),
        taken: Mutex::new(Taken::default()),
        failed: Mutex::new(None),
    };
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get().min(4));
    let (tx, rx) = std::sync::mpsc::sync_channel::<(PathBuf, usize)>(threads * 2);
    let rx = Mutex::new(rx);
    let walked = std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| shared.work(&rx, repo.config().zstd_level));
        }
        let walked = shared.walk(repo, &tx);
        drop(tx);
        walked
    });
    if let Some(e) = lock(&shared.failed)?.take() {
        return Err(e);
    }
    walked?;
    shared.out.into_inner().map_err(|_| poisoned())?.finish()?;
    let taken = *lock(&shared.taken)?;
    Ok(taken)
}

fn poisoned() -> anyhow::Error {
    anyhow::anyhow!("a local-reuse worker panicked")
}

fn lock<T>(m: &Mutex<T>) -> Result<std::sync::MutexGuard<'_, T>> {
    m.lock().map_err(|_| poisoned())
}

/// What the walker and the workers of [`take_from_files`] share.
struct Shared<'a, 'r> {
    setup: &'a ChunkerSetup,
    /// The content keys: chunk ids and sealing.
    keys: &'a repo_format::crypto::KeySet,
    need: Mutex<&'a mut Needed>,
    out: Mutex<SpoolWriter<'r>>,
    taken: Mutex<Taken>,
    /// The first worker error; the others then only drain the queue.
    failed: Mutex<Option<anyhow::Error>>,
}

impl Shared<'_, '_> {
    /// Walk the latest snapshot of each source, queueing files that list a
    /// needed chunk, until nothing is needed or a worker failed.
    fn walk(&self, repo: &Repository, tx: &SyncSender<(PathBuf, usize)>) -> Result<()> {
        for (paths, root) in latest_per_source(repo)? {
            let mut stack: Vec<(Id, Option<PathBuf>)> = vec![(root, None)];
            while let Some((tree, dir)) = stack.pop() {
                let entries = match repo.read_tree(&tree) {
                    Ok(e) => e,
                    Err(e) => {
                        tracing::debug!("local reuse: tree {tree} unreadable in the spool: {e}");
                        continue;
                    }
                };
                for e in entries {
                    let Some(path) = entry_path(&paths, dir.as_deref(), &e) else {
                        continue;
                    };
                    match (e.kind, e.subtree) {
                        (EntryKind::Dir, Some(sub)) => stack.push((sub, Some(path))),
                        (EntryKind::File, _) if !e.chunks.is_empty() => {
                            let want = {
                                let need = lock(&self.need)?;
                                if need.is_empty()? {
                                    return Ok(());
                                }
                                need.count_of(&e.chunks)?
                            };
                            if want == 0 {
                                continue;
                            }
                            if lock(&self.failed)?.is_some() || tx.send((path, want)).is_err() {
                                return Ok(());
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
        Ok(())
    }

    /// A worker: take files off the queue until it closes.
    fn work(&self, rx: &Mutex<Receiver<(PathBuf, usize)>>, level: i32) {
        let mut sealer = match Sealer::new(level) {
            Ok(s) => Some(s),
            Err(e) => {
                self.fail(e.into());
                None
            }
        };
        let mut buf = Vec::new();
        loop {
            let job = match rx.lock() {
                Ok(r) => r.recv(),
                Err(_) => return,
            };
            let Ok((path, want)) = job else { return };
            let Some(sealer) = sealer.as_mut() else {
                continue; // failed: drain
            };
            match self.read(sealer, &path, want, std::mem::take(&mut buf)) {
                Ok(b) => buf = b,
                Err(e) => self.fail(e),
            }
        }
    }

    fn fail(&self, e: anyhow::Error) {
        if let Ok(mut f) = self.failed.lock() {
            f.get_or_insert(e);
        }
    }

    /// Chunk `path`, storing needed chunks, until `want` of them were found
    /// or the file ends. Returns the read buffer for the next file.
    fn read(
        &self,
        sealer: &mut Sealer,
        path: &Path,
        mut want: usize,
        buf: Vec<u8>,
    ) -> Result<Vec<u8>> {
        let file = match File::options()
            .read(true)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(path)
        {
            Ok(f) if f.metadata().map(|m| m.is_file()).unwrap_or(false) => f,
            Ok(_) => return Ok(buf),
            Err(e) => {
                tracing::debug!("local reuse: {} unreadable: {e}", path.display());
                return Ok(buf);
            }
        };
        let keys = self.keys;
        lock(&self.taken)?.files += 1;
        let mut ch = Chunker::new(file, self.setup, buf);
        while want > 0 {
            let chunk = match ch.next_chunk() {
                Ok(Some(c)) => c,
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!("local reuse: reading {}: {e}", path.display());
                    break;
                }
            };
            let id = keys.id_of(&chunk);
            if !lock(&self.need)?.take(&id)? {
                continue;
            }
            want -= 1;
            let sealed = sealer
                .seal_verified(keys, BlobKind::Data, &id, &chunk)
                .with_context(|| format!("sealing chunk {id} of {}", path.display()))?;
            lock(&self.out)?.add(id, &sealed, chunk.len() as u32)?;
            let mut t = lock(&self.taken)?;
            t.chunks += 1;
            t.bytes += chunk.len() as u64;
        }
        Ok(ch.into_buffer())
    }
}

/// A source's backed-up paths by the name of their root-tree entry.
type SourcePaths = HashMap<Vec<u8>, PathBuf>;

/// The root tree of the newest spool snapshot of each source (or of each
/// set of paths, for snapshots without a source), with its paths.
fn latest_per_source(repo: &Repository) -> Result<Vec<(SourcePaths, Id)>> {
    let mut latest: HashMap<String, (i64, repo_format::snapshot::Snapshot)> = HashMap::new();
    for (_, s) in repo.snapshots()? {
        let key = s.source.clone().unwrap_or_else(|| s.paths.join("\0"));
        match latest.get(&key) {
            Some((t, _)) if *t >= s.time_ns => {}
            _ => {
                latest.insert(key, (s.time_ns, s));
            }
        }
    }
    Ok(latest
        .into_values()
        .map(|(_, s)| {
            let names = s
                .paths
                .iter()
                .filter_map(|p| {
                    let p = PathBuf::from(p);
                    Some((p.file_name()?.as_bytes().to_vec(), p.clone()))
                })
                .collect();
            (names, s.tree)
        })
        .collect())
}

/// Where entry `e` of directory `dir` lives on this machine (`dir` is None
/// for the root tree, whose entries are the source's paths). Names that
/// could leave the directory are skipped.
fn entry_path(paths: &HashMap<Vec<u8>, PathBuf>, dir: Option<&Path>, e: &Entry) -> Option<PathBuf> {
    let n = e.name.as_slice();
    if n.is_empty() || n == b"." || n == b".." || n.contains(&b'/') || n.contains(&0) {
        return None;
    }
    match dir {
        None => paths.get(n).cloned(),
        Some(d) => Some(d.join(OsStr::from_bytes(n))),
    }
}

/// Packs of found chunks, written and catalogued as they fill.
struct SpoolWriter<'r> {
    repo: &'r Repository,
    acked: &'r Acked,
    w: Option<PackWriter>,
}

impl<'r> SpoolWriter<'r> {
    fn new(repo: &'r Repository, acked: &'r Acked) -> Self {
        SpoolWriter {
            repo,
            acked,
            w: None,
        }
    }

    fn add(&mut self, id: Id, sealed: &[u8], raw: u32) -> Result<()> {
        let store = self.repo.store().as_ref();
        let w = match &mut self.w {
            Some(w) => w,
            None => self.w.insert(PackWriter::new(store)?),
        };
        w.add(BlobKind::Data, id, sealed, raw)?;
        if w.size() >= self.repo.config().pack_target {
            self.finish()?;
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<()> {
        let Some(w) = self.w.take() else {
            return Ok(());
        };
        if w.is_empty() {
            return Ok(());
        }
        let fp = w.finish(self.repo.store().as_ref(), &self.repo.keys().metadata)?;
        self.repo
            .catalog()?
            .insert_pack(&fp.name, fp.size, &fp.entries)
            .context("cataloguing a pack of chunks taken from local files")?;
        // Chunks of a restore job's snapshot: the collector holds them for
        // this site, so a later trim may drop them from the spool again.
        let ids: Vec<Id> = fp.entries.iter().map(|e| e.id).collect();
        self.acked.insert(&ids)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn needed_adds_counts_takes_and_pages() {
        let mut n = Needed::new().expect("set");
        let ids: Vec<Id> = (0u8..10).map(|i| Id([i; 32])).collect();
        n.add(&ids).expect("add");
        n.add(&ids[..3]).expect("add again");
        assert_eq!(n.len().expect("len"), 10);
        assert_eq!(
            n.count_of(&[ids[1], Id([99; 32]), ids[2]]).expect("count"),
            2
        );
        assert!(n.take(&ids[1]).expect("take"));
        assert!(!n.take(&ids[1]).expect("take twice"));
        let first = n.batch_after(None, 4).expect("page");
        assert_eq!(first, vec![ids[0], ids[2], ids[3], ids[4]]);
        let rest = n.batch_after(first.last(), 100).expect("page");
        assert_eq!(rest, ids[5..].to_vec());
    }
}
