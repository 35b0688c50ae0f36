//! Which blobs this backup stores, and catalog lookups without a lock per
//! query.
//!
//! A worker that meets a chunk asks two questions: is it catalogued, and has
//! another worker of this backup already claimed it? [`Claims`] answers the
//! second and [`SnapshotReader`] the first.
//!
//! SQLite takes and drops a file lock (and reads the WAL index) around every
//! statement run outside a transaction; on 200 000 small files that costs
//! more than the lookups themselves. A [`SnapshotReader`] therefore looks up
//! inside a read transaction that it renews per batch of files. A snapshot
//! does not see packs catalogued after it began, so a catalogued id stays in
//! the claim set until every open snapshot is at least as new as the pack
//! commit that catalogued it: no chunk is stored twice, and the claim set
//! holds only what is in flight plus the last few packs.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::catalog::Catalog;
use crate::error::{Error, Result};
use crate::id::Id;

/// Generation of a claimed id that is not catalogued yet.
const IN_FLIGHT: u64 = u64::MAX;
/// Generation of a reader that holds no snapshot.
const IDLE: u64 = u64::MAX;
/// Lookups after which a reader renews its snapshot even inside one batch
/// (a single large file), so that catalogued ids can leave the claim set.
const RENEW_AFTER: u32 = 1024;

/// The ids this backup claimed, and how new each reader's snapshot is.
#[derive(Default)]
pub(crate) struct Claims {
    /// Claimed ids: [`IN_FLIGHT`] until catalogued, then the generation of
    /// the pack commit that catalogued them.
    ids: Mutex<HashMap<Id, u64>>,
    /// Pack commits made by this backup so far.
    generation: AtomicU64,
    /// Per snapshot reader: every commit up to this generation is visible
    /// in its snapshot ([`IDLE`] when it holds none).
    readers: Mutex<Vec<u64>>,
}

fn poisoned<T>(_: T) -> Error {
    Error::Pipeline("claim set poisoned (a backup thread panicked)".into())
}

impl Claims {
    /// True when this backup claimed `id` (stored or about to be).
    pub(crate) fn is_claimed(&self, id: &Id) -> Result<bool> {
        Ok(self.ids.lock().map_err(poisoned)?.contains_key(id))
    }

    /// Claim `id`; false when someone else claimed it first.
    pub(crate) fn try_claim(&self, id: &Id) -> Result<bool> {
        let mut ids = self.ids.lock().map_err(poisoned)?;
        if ids.contains_key(id) {
            return Ok(false);
        }
        ids.insert(*id, IN_FLIGHT);
        Ok(true)
    }

    /// Record that `ids` were catalogued by one committed pack, and drop
    /// the ids every open snapshot can now see.
    pub(crate) fn catalogued(&self, ids: impl Iterator<Item = Id>) {
        let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        let oldest = self
            .readers
            .lock()
            .map(|r| r.iter().copied().min().unwrap_or(IDLE))
            .unwrap_or(0);
        if let Ok(mut map) = self.ids.lock() {
            for id in ids {
                map.insert(id, generation);
            }
            map.retain(|_, g| *g == IN_FLIGHT || *g > oldest);
        }
    }

    /// A new reader slot, idle.
    fn register(&self) -> Result<usize> {
        let mut r = self.readers.lock().map_err(poisoned)?;
        r.push(IDLE);
        Ok(r.len() - 1)
    }

    fn set_reader(&self, slot: usize, generation: u64) -> Result<()> {
        let mut r = self.readers.lock().map_err(poisoned)?;
        if let Some(g) = r.get_mut(slot) {
            *g = generation;
        }
        Ok(())
    }

    /// Number of ids held (in flight or waiting for old snapshots).
    #[cfg(test)]
    fn held(&self) -> usize {
        self.ids.lock().map(|m| m.len()).unwrap_or(0)
    }
}

/// A catalog reader whose lookups run in a read snapshot, renewed by
/// [`SnapshotReader::begin`] and every [`RENEW_AFTER`] lookups.
pub(crate) struct SnapshotReader<'c> {
    cat: Catalog,
    claims: &'c Claims,
    slot: usize,
    open: bool,
    lookups: u32,
}

impl<'c> SnapshotReader<'c> {
    /// Wrap `cat` (a reader connection of its own) under `claims`.
    pub(crate) fn new(cat: Catalog, claims: &'c Claims) -> Result<Self> {
        let slot = claims.register()?;
        Ok(SnapshotReader {
            cat,
            claims,
            slot,
            open: false,
            lookups: 0,
        })
    }

    /// Start a new snapshot (ending the current one).
    pub(crate) fn begin(&mut self) -> Result<()> {
        self.end()?;
        // Publish the generation before the snapshot exists: it then holds
        // at least every commit up to it (SQLite takes the snapshot at the
        // first read, which comes later).
        let generation = self.claims.generation.load(Ordering::SeqCst);
        self.claims.set_reader(self.slot, generation)?;
        self.cat.begin_read()?;
        self.open = true;
        self.lookups = 0;
        Ok(())
    }

    /// End the snapshot, if any (an idle reader holds nothing back).
    pub(crate) fn end(&mut self) -> Result<()> {
        if self.open {
            self.open = false;
            self.cat.end_read()?;
            self.claims.set_reader(self.slot, IDLE)?;
        }
        Ok(())
    }

    /// True when `id` is catalogued (as of this reader's snapshot).
    pub(crate) fn contains(&mut self, id: &Id) -> Result<bool> {
        if !self.open || self.lookups >= RENEW_AFTER {
            self.begin()?;
        }
        self.lookups += 1;
        self.cat.contains(id)
    }
}

impl Drop for SnapshotReader<'_> {
    fn drop(&mut self) {
        let _ = self.end();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blob::BlobKind;
    use crate::pack::PackEntry;

    fn entry(id: Id) -> PackEntry {
        PackEntry {
            kind: BlobKind::Data,
            id,
            offset: 0,
            length: 1,
            raw_length: 1,
        }
    }

    /// The race this module exists for: a blob catalogued after a reader's
    /// snapshot began is invisible to that snapshot, so it must stay claimed
    /// until the reader renews.
    #[test]
    fn an_id_catalogued_after_a_snapshot_stays_claimed_until_the_snapshot_renews() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog.db");
        let mut writer = Catalog::create(&path).unwrap();
        let claims = Claims::default();
        let mut reader =
            SnapshotReader::new(Catalog::open_reader(&path).unwrap(), &claims).unwrap();
        let id = Id([9; 32]);

        reader.begin().unwrap();
        assert!(!reader.contains(&Id([1; 32])).unwrap(), "snapshot taken");
        assert!(claims.try_claim(&id).unwrap());
        writer.insert_pack(&Id([2; 32]), 10, &[entry(id)]).unwrap();
        claims.catalogued([id].into_iter());

        // The old snapshot does not see the row, but the claim set still has it.
        assert!(!reader.contains(&id).unwrap());
        assert!(claims.is_claimed(&id).unwrap());
        assert!(!claims.try_claim(&id).unwrap());

        // A renewed snapshot sees the row; the next commit drops the claim.
        reader.begin().unwrap();
        assert!(reader.contains(&id).unwrap());
        claims.catalogued(std::iter::empty());
        assert_eq!(claims.held(), 0);
    }

    #[test]
    fn idle_readers_hold_nothing_back_and_in_flight_ids_stay() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog.db");
        let _writer = Catalog::create(&path).unwrap();
        let claims = Claims::default();
        let mut reader =
            SnapshotReader::new(Catalog::open_reader(&path).unwrap(), &claims).unwrap();
        reader.begin().unwrap();
        reader.end().unwrap();
        assert!(claims.try_claim(&Id([1; 32])).unwrap());
        assert!(claims.try_claim(&Id([2; 32])).unwrap());
        claims.catalogued([Id([1; 32])].into_iter());
        assert!(!claims.is_claimed(&Id([1; 32])).unwrap());
        assert!(claims.is_claimed(&Id([2; 32])).unwrap(), "still in flight");
    }
}
