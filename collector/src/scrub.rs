//! Scrub: read every pack back and compare it with its name (an unkeyed
//! BLAKE3 of its bytes, so the content-blind collector can check data it
//! cannot open), and take damaged packs out of use.
//!
//! A damaged, truncated or missing pack is moved to `repo/damaged/` and
//! forgotten with its blobs (RELIABILITY.md scenario 5): from then on "does
//! the site have it?" answers no for those blobs, the sites that held them
//! get `lost` rows their agents read (`LostBlobs`) before their next backup,
//! and every commit re-verifies its trees, so no new snapshot can name a
//! lost blob until someone uploads it again. Snapshots that already name
//! one are listed with the affected paths: restoring those fails loudly
//! (a missing blob) until a backup re-uploads it, and then succeeds, since
//! the ids do not change.
//!
//! Only a damage the bytes prove (a short, long or differently hashed file,
//! a file that is gone, EIO on read) quarantines a pack; any other error
//! (permissions, too many open files) stops the scrub, changing nothing
//! more, because it says nothing about the pack.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use proto::pb;
use repo_format::pack::PackEntry;
use repo_format::pack::reader::verify_checksum;
use repo_format::{Id, Repository};

use crate::Ctx;
use crate::error::ServiceError;
use crate::state::now_ns;

/// Paths listed per affected snapshot; the count covers all of them.
const PATHS_LISTED: usize = 20;
/// Trees deeper than this are not walked for the affected-path report.
const MAX_DEPTH: usize = 4096;

/// Packs an upload's mismatch made us hash and found sound: see
/// [`set_aside_if_damaged`].
static SOUND: std::sync::Mutex<Option<HashSet<Id>>> = std::sync::Mutex::new(None);
/// At most this many are remembered (then the set starts again).
const SOUND_REMEMBERED: usize = 4096;

/// Progress is reported at most this often (the report ends the stream).
const PROGRESS_EVERY: Duration = Duration::from_millis(500);
/// Slowest accepted non-zero read rate: 1 MiB/s reads a 16 MiB pack in 16 s
/// and 1 TiB in 12 days; slower would hold the one-scrub slot for ever.
pub const MIN_BYTES_PER_SEC: u64 = 1 << 20;
/// A paced scrub sleeps in slices this long, to notice a cancel.
const SLEEP_SLICE: Duration = Duration::from_millis(250);

/// Refuse a read rate under [`MIN_BYTES_PER_SEC`] (0 = unlimited is fine).
pub fn validate_rate(bytes_per_sec: u64) -> Result<(), ServiceError> {
    if bytes_per_sec != 0 && bytes_per_sec < MIN_BYTES_PER_SEC {
        return Err(ServiceError::Invalid(format!(
            "scrub rate {bytes_per_sec} bytes/s is too slow: at least {MIN_BYTES_PER_SEC} \
             (1 MiB/s), or 0 for unlimited"
        )));
    }
    Ok(())
}

/// Who started a scrub; kept with its result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// An admin call (`hubvault scrub`).
    Admin,
    /// The collector's scrub schedule.
    Schedule,
}

impl Trigger {
    fn as_str(self) -> &'static str {
        match self {
            Trigger::Admin => "admin",
            Trigger::Schedule => "schedule",
        }
    }
}

/// How to scrub.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Report damage; change nothing.
    pub dry_run: bool,
    /// Read at most this many bytes per second (0 = unlimited).
    pub bytes_per_sec: u64,
    /// Who asked.
    pub trigger: Trigger,
}

/// A collector's scrub control: one scrub at a time, a way to stop it, and
/// a wake-up for the scheduler when the schedule changes (see
/// `scrub_schedule`).
#[derive(Debug, Default)]
pub struct Control {
    running: AtomicBool,
    cancel: AtomicBool,
    /// Notified when the schedule changes.
    pub changed: tokio::sync::Notify,
}

impl Control {
    /// True while a scrub runs.
    pub fn is_running(&self) -> bool {
        self.running.load(Ordering::Acquire)
    }

    /// Ask the running scrub to stop before its next pack (packs it set
    /// aside stay aside); false when none runs.
    pub fn cancel(&self) -> bool {
        self.cancel.store(true, Ordering::Release);
        self.is_running()
    }

    fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Acquire)
    }
}

/// The answer while another scrub runs (RESOURCE_EXHAUSTED).
pub fn busy() -> ServiceError {
    ServiceError::Exhausted("a scrub is already running; wait for it to finish".into())
}

/// Clears the running flag however the scrub ends.
struct Running<'a>(&'a AtomicBool);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// Check every catalogued pack; unless `dry_run`, quarantine the damaged.
/// `progress` is called now and then (not for every pack); the outcome is
/// kept in state.db whether the scrub finishes or stops on an error.
pub fn scrub(
    ctx: &Ctx,
    opts: Options,
    progress: &mut dyn FnMut(&pb::ScrubProgress),
) -> Result<pb::ScrubResponse, ServiceError> {
    if ctx.scrub.running.swap(true, Ordering::AcqRel) {
        return Err(busy());
    }
    let _running = Running(&ctx.scrub.running);
    ctx.scrub.cancel.store(false, Ordering::Release);
    let started_ns = now_ns();
    let mut resp = pb::ScrubResponse::default();
    let out = run(ctx, opts, progress, &mut resp);
    let kept = pb::ScrubRun {
        started_ns,
        finished_ns: now_ns(),
        dry_run: opts.dry_run,
        trigger: opts.trigger.as_str().into(),
        packs_checked: resp.packs_checked,
        bytes_checked: resp.bytes_checked,
        damaged: resp.damaged.len() as u64,
        error: match &out {
            Err(e) => e.to_string(),
            Ok(()) if resp.cancelled => "cancelled by an admin".into(),
            Ok(()) => String::new(),
        },
    };
    if let Err(e) = ctx.state.record_scrub(&kept) {
        tracing::warn!("keeping the scrub's result failed: {e}");
    }
    out.map(|()| resp)
}

/// How long to wait, `elapsed` into a scrub that has read `bytes`, to stay
/// at `bytes_per_sec` (0 = unlimited: never).
pub fn pace(elapsed: Duration, bytes: u64, bytes_per_sec: u64) -> Duration {
    if bytes_per_sec == 0 {
        return Duration::ZERO;
    }
    Duration::from_secs_f64(bytes as f64 / bytes_per_sec as f64).saturating_sub(elapsed)
}

fn run(
    ctx: &Ctx,
    opts: Options,
    progress: &mut dyn FnMut(&pb::ScrubProgress),
    resp: &mut pb::ScrubResponse,
) -> Result<(), ServiceError> {
    let dry_run = opts.dry_run;
    let started = Instant::now();
    let repo = &ctx.repo;
    let packs = repo.catalog()?.packs()?;
    let mut at = pb::ScrubProgress {
        packs_total: packs.len() as u64,
        bytes_total: packs.iter().map(|p| p.1).sum(),
        ..Default::default()
    };
    let mut reported = Instant::now();
    let mut read = 0u64;
    let mut lost: HashSet<Id> = HashSet::new();
    for (name, size, _) in packs {
        if reported.elapsed() >= PROGRESS_EVERY {
            at.packs_checked = resp.packs_checked;
            at.bytes_checked = read;
            at.damaged = resp.damaged.len() as u64;
            progress(&at);
            reported = Instant::now();
        }
        loop {
            let wait = pace(started.elapsed(), read, opts.bytes_per_sec);
            if wait.is_zero() || ctx.scrub.cancelled() {
                break;
            }
            std::thread::sleep(wait.min(SLEEP_SLICE));
        }
        if ctx.scrub.cancelled() {
            resp.cancelled = true;
            break;
        }
        resp.packs_checked += 1;
        read += size;
        let Some(reason) = damage(repo, &name, Some(size))? else {
            resp.bytes_checked += size;
            continue;
        };
        let entries = repo.pack_entries(&name)?;
        let sites = if dry_run {
            let ids: Vec<Vec<u8>> = entries.iter().map(|e| e.id.0.to_vec()).collect();
            ctx.state.holders(&ids)?
        } else {
            set_aside(ctx, &name, &entries, &format!("scrub: {reason}"))?
        };
        lost.extend(entries.iter().map(|e| e.id));
        resp.damaged.push(pb::DamagedPack {
            name: name.0.to_vec(),
            reason,
            blobs: entries.len() as u64,
            sites,
        });
    }
    if !lost.is_empty() {
        resp.affected = affected(repo, &lost)?;
    }
    resp.secs = started.elapsed().as_secs_f64();
    tracing::info!(
        packs = resp.packs_checked,
        damaged = resp.damaged.len(),
        affected = resp.affected.len(),
        dry_run,
        trigger = opts.trigger.as_str(),
        secs = resp.secs,
        "scrub done"
    );
    Ok(())
}

/// Set damaged pack `name` (holding `entries`) aside: the sites holding
/// its blobs lose them (and are told), then the file moves to `damaged/`
/// and the catalog forgets it. Returns those sites. `why` goes into the
/// integrity event.
fn set_aside(
    ctx: &Ctx,
    name: &Id,
    entries: &[PackEntry],
    why: &str,
) -> Result<Vec<String>, ServiceError> {
    let ids: Vec<Vec<u8>> = entries.iter().map(|e| e.id.0.to_vec()).collect();
    // No commit is between its check and its record of verified trees.
    let gate = ctx
        .commit_gate
        .write()
        .map_err(|_| ServiceError::Internal("commit gate poisoned".into()))?;
    // The sites first: a crash before the pack is set aside leaves it
    // catalogued, and the next scrub finds it again.
    let sites = ctx.state.lose_blobs(&ids)?;
    ctx.repo.quarantine_pack(name, entries)?;
    drop(gate);
    ctx.state.event(
        "integrity",
        &format!(
            "pack {name} is damaged ({why}); set aside with its {} blobs, held by sites \
             {sites:?}, whose agents will upload them again",
            entries.len()
        ),
    )?;
    Ok(sites)
}

/// For ingest: a stored copy that could not be read, or whose bytes differ
/// from an upload of the same id, may be the stored copy's fault. When its
/// pack is damaged, it is set aside as a scrub would and true is returned:
/// the upload is then stored as a new blob instead of being refused.
///
/// A pack found sound is remembered for the life of the process (up to
/// [`SOUND_REMEMBERED`] packs), so an agent sending forged copies of
/// stored ids cannot make the collector hash a whole pack per blob; a pack
/// damaged later is a scrub's to find.
pub fn set_aside_if_damaged(ctx: &Ctx, name: &Id) -> Result<bool, ServiceError> {
    let sound = || {
        SOUND
            .lock()
            .map_err(|_| ServiceError::Internal("sound-pack set poisoned".into()))
    };
    if sound()?.as_ref().is_some_and(|s| s.contains(name)) {
        return Ok(false);
    }
    let Some(reason) = damage(&ctx.repo, name, None)? else {
        let mut guard = sound()?;
        let s = guard.get_or_insert_with(HashSet::new);
        if s.len() >= SOUND_REMEMBERED {
            s.clear();
        }
        s.insert(*name);
        return Ok(false);
    };
    let entries = ctx.repo.pack_entries(name)?;
    set_aside(
        ctx,
        name,
        &entries,
        &format!("found by an upload: {reason}"),
    )?;
    Ok(true)
}

/// The error for a blob a caller's site held that a scrub set aside
/// (DATA_LOSS): what happened and how it comes back.
pub fn lost_blob(id: &Id) -> ServiceError {
    ServiceError::Lost(format!(
        "blob {id} is no longer in the repository (its pack was damaged and set \
         aside; `hubvault scrub --dry-run` lists what is affected). The next backup \
         of an office that still has the data uploads it again; then retry"
    ))
}

/// What is wrong with pack `name` (catalogued at `size` bytes, when
/// known), or `None`.
fn damage(repo: &Repository, name: &Id, size: Option<u64>) -> Result<Option<String>, ServiceError> {
    let store = repo.store();
    match (store.size(name), size) {
        (Ok(actual), Some(size)) if actual != size => {
            return Ok(Some(format!("size {actual}, catalogued {size}")));
        }
        (Ok(_), _) => {}
        (Err(e), _) if io_kind(&e) == Some(std::io::ErrorKind::NotFound) => {
            return Ok(Some("missing".into()));
        }
        (Err(e), _) => return Err(e.into()),
    }
    match verify_checksum(store.as_ref(), name) {
        Ok(()) => Ok(None),
        Err(e) if e.is_integrity() => Ok(Some("content hash differs from its name".into())),
        // EIO: the medium could not return the bytes.
        Err(e) if io_errno(&e) == Some(5) => Ok(Some(format!("unreadable: {e}"))),
        Err(e) => Err(e.into()),
    }
}

fn io_kind(e: &repo_format::Error) -> Option<std::io::ErrorKind> {
    match e {
        repo_format::Error::Io { source, .. } => Some(source.kind()),
        _ => None,
    }
}

fn io_errno(e: &repo_format::Error) -> Option<i32> {
    match e {
        repo_format::Error::Io { source, .. } => source.raw_os_error(),
        _ => None,
    }
}

/// Snapshots naming a blob of `lost`, with (up to [`PATHS_LISTED`]) paths.
///
/// Each distinct tree is read once: its count of affected entries and its
/// first paths (relative to it) are memoised, so shared subtrees (every
/// snapshot of one source shares most) cost one visit and still list their
/// paths in every snapshot, and a crafted snapshot naming one subtree many
/// times at every level cannot make the walk exponential.
fn affected(
    repo: &Repository,
    lost: &HashSet<Id>,
) -> Result<Vec<pb::AffectedSnapshot>, ServiceError> {
    let mut memo: HashMap<Id, Found> = HashMap::new();
    let mut out = Vec::new();
    for (id, snap) in repo.snapshots()? {
        let found = walk(repo, lost, &snap.tree, 0, &mut memo)?;
        if found.entries > 0 {
            out.push(pb::AffectedSnapshot {
                id: id.0.to_vec(),
                site: snap.site.unwrap_or_default(),
                source: snap.source.unwrap_or_default(),
                paths: found.paths,
                entries: found.entries,
            });
        }
    }
    Ok(out)
}

/// What a tree holds of the lost blobs.
#[derive(Clone, Default)]
struct Found {
    /// Entries below it with a lost chunk or tree.
    entries: u64,
    /// The first [`PATHS_LISTED`] of them, relative to the tree ("/a/b").
    paths: Vec<String>,
}

impl Found {
    fn note(&mut self, path: String) {
        if self.paths.len() < PATHS_LISTED {
            self.paths.push(path);
        }
    }
}

/// What `tree` holds of the lost blobs.
fn walk(
    repo: &Repository,
    lost: &HashSet<Id>,
    tree: &Id,
    depth: usize,
    memo: &mut HashMap<Id, Found>,
) -> Result<Found, ServiceError> {
    if let Some(f) = memo.get(tree) {
        return Ok(f.clone());
    }
    let mut found = Found::default();
    let one = |why: String| Found {
        entries: 1,
        paths: vec![why],
    };
    if lost.contains(tree) || depth > MAX_DEPTH {
        found = one("/".into());
    } else {
        match repo.read_tree(tree) {
            Err(e) => found = one(format!("/ (tree {tree}: {e})")),
            Ok(entries) => {
                for e in entries {
                    let path = format!("/{}", String::from_utf8_lossy(&e.name));
                    if e.chunks.iter().any(|c| lost.contains(c)) {
                        found.note(path.clone());
                        found.entries = found.entries.saturating_add(1);
                    }
                    if let Some(sub) = e.subtree {
                        let below = walk(repo, lost, &sub, depth + 1, memo)?;
                        found.entries = found.entries.saturating_add(below.entries);
                        for p in below.paths {
                            // "/" (the subtree itself) lists as "path/".
                            found.note(format!("{path}{p}"));
                        }
                    }
                }
            }
        }
    }
    memo.insert(*tree, found.clone());
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;
    use repo_format::keyring::KdfParams;

    /// A collector whose catalog lists two 64 MiB packs that are not there.
    fn collector_with_two_absent_packs() -> (tempfile::TempDir, std::sync::Arc<Ctx>) {
        let tmp = tempfile::tempdir().expect("tempdir");
        let data = tmp.path().join("data");
        crate::init::init(&data, &[], KdfParams::with_memory_kib(Some(64))).expect("init");
        let ctx = crate::server::load(&data).expect("load");
        {
            let mut cat = ctx.repo.catalog().expect("catalog");
            for n in [1u8, 2] {
                cat.insert_pack(&Id([n; 32]), 64 << 20, &[])
                    .expect("pack row");
            }
        }
        (tmp, ctx)
    }

    /// A scrub paced at 1 MiB/s waits a minute before the second 64 MiB
    /// pack; a cancel stops it within a sleep slice, the report says so and
    /// how far it got, and the kept run says "cancelled". The slot is free
    /// again at once.
    #[test]
    fn a_paced_scrub_stops_on_cancel_and_keeps_a_cancelled_run() {
        let (_tmp, ctx) = collector_with_two_absent_packs();
        let opts = Options {
            dry_run: true,
            bytes_per_sec: MIN_BYTES_PER_SEC,
            trigger: Trigger::Admin,
        };
        let runner = ctx.clone();
        let running = std::thread::spawn(move || scrub(&runner, opts, &mut |_| {}));
        while !ctx.scrub.is_running() {
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(300));
        assert!(ctx.scrub.cancel(), "a scrub was running");
        let report = running.join().expect("thread").expect("scrub");
        assert!(report.cancelled);
        assert_eq!(report.packs_checked, 1, "the first pack, not the second");
        assert_eq!(report.damaged.len(), 1, "the first pack is missing");
        let kept = ctx.state.last_scrub().expect("read").expect("kept");
        assert_eq!(kept.error, "cancelled by an admin");
        assert_eq!(kept.packs_checked, 1);
        assert!(!ctx.scrub.is_running());
        // The next scrub is not cancelled by the old request.
        let again = scrub(
            &ctx,
            Options {
                bytes_per_sec: 0,
                ..opts
            },
            &mut |_| {},
        )
        .expect("scrub");
        assert!(!again.cancelled);
        assert_eq!(again.packs_checked, 2);
    }

    #[test]
    fn rates_under_one_mib_per_second_are_refused() {
        assert!(validate_rate(0).is_ok());
        assert!(validate_rate(MIN_BYTES_PER_SEC).is_ok());
        let e = validate_rate(200).expect_err("200 B/s");
        assert!(e.to_string().contains("too slow"), "{e}");
    }
}
