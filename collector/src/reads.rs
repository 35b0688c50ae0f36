//! Blob reads (`ReadBlobs`: an agent pulling what a restore job needs, or
//! a master copy sent to every office), and the limits that keep them from
//! making the collector's memory grow without bound:
//!
//! - at most [`MAX_READ_STREAMS`] read streams open per agent; one more is
//!   refused with `RESOURCE_EXHAUSTED`. An agent's restore job keeps four
//!   open (`FETCH_IN_FLIGHT` in the agent's `pull`), so four jobs at once
//!   fit;
//! - a stream reads from the packs in batches of about [`STEP_BYTES`] (or
//!   one larger blob), and holds at most [`STREAM_BYTES`] read or being
//!   read and not yet taken by the transport: a client that stops reading
//!   stops its own stream;
//! - all streams of all agents together hold at most [`TOTAL_READ_BYTES`]
//!   (or what [`ReadSlots::with_total`] says). A batch takes its room in
//!   one step before it is read and gives it back when the transport has
//!   taken its last blob, so a stream never holds part of the room while
//!   waiting for the rest (no deadlock), and the wait is first come, first
//!   served. When two hundred offices pull one software build at once they
//!   take turns for memory, not the collector's RAM.
//!
//! So an agent reading costs the collector at most `MAX_READ_STREAMS ×
//! STREAM_BYTES` (64 MiB; more only with blobs over `STREAM_BYTES`, which
//! only the agent's own site can have uploaded), and all agents together at
//! most `TOTAL_READ_BYTES` plus one batch per stream for blobs over the
//! total. What is left: an enrolled agent that opens streams and never
//! reads them holds its 64 MiB of the total until its connection closes or
//! it is revoked; [`TOTAL_READ_BYTES`] is eight such agents.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use proto::pb;
use repo_format::Id;
use repo_format::catalog::BlobLocation;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use crate::Ctx;
use crate::error::ServiceError;

/// Read streams one agent may have open at once.
pub const MAX_READ_STREAMS: usize = 16;

/// Ids looked up in the catalog per blocking step.
const LOOKUP_IDS: usize = 64;

/// Sealed bytes one stream reads from the packs per blocking step (at
/// least one blob).
pub const STEP_BYTES: usize = 2 * 1024 * 1024;

/// Sealed bytes one stream may hold read, or being read, and not yet taken
/// by the transport (a larger blob takes all of it).
pub const STREAM_BYTES: usize = 4 * 1024 * 1024;

/// Sealed bytes all read streams together may hold read, or being read,
/// and not yet taken by the transport.
pub const TOTAL_READ_BYTES: usize = 512 * 1024 * 1024;

/// How many read streams each agent has open, and the room all streams
/// share.
pub struct ReadSlots {
    agents: Mutex<HashMap<String, usize>>,
    total: Arc<Semaphore>,
    total_bytes: usize,
}

impl Default for ReadSlots {
    fn default() -> Self {
        ReadSlots::with_total(TOTAL_READ_BYTES)
    }
}

impl ReadSlots {
    /// Read slots whose streams share `total_bytes` of room.
    pub fn with_total(total_bytes: usize) -> Self {
        // Room is taken in u32 units (tokio's `acquire_many`).
        let total_bytes = total_bytes.clamp(1, u32::MAX as usize);
        ReadSlots {
            agents: Mutex::default(),
            total: Arc::new(Semaphore::new(total_bytes)),
            total_bytes,
        }
    }

    /// Open one read stream for `agent`, or refuse it when the agent has
    /// [`MAX_READ_STREAMS`] open. The slot is freed when the returned value
    /// is dropped (when the stream's task ends).
    pub fn open(self: &Arc<Self>, agent: &str) -> Result<ReadSlot, ServiceError> {
        let mut all = self
            .agents
            .lock()
            .map_err(|_| ServiceError::Internal("read slots poisoned".into()))?;
        let n = all.entry(agent.to_string()).or_insert(0);
        if *n >= MAX_READ_STREAMS {
            return Err(ServiceError::Exhausted(format!(
                "agent {agent} has {MAX_READ_STREAMS} read streams open already; \
                 finish one before opening another"
            )));
        }
        *n += 1;
        Ok(ReadSlot {
            slots: self.clone(),
            agent: agent.to_string(),
        })
    }

    /// Room for `n` bytes in every stream's shared total, waiting for it
    /// first come, first served. `n` is clamped to the total, so one blob
    /// larger than it waits for all of it rather than forever.
    async fn room(&self, n: usize) -> Result<OwnedSemaphorePermit, ServiceError> {
        let n = n.clamp(1, self.total_bytes) as u32;
        self.total
            .clone()
            .acquire_many_owned(n)
            .await
            .map_err(|_| ServiceError::Internal("read room closed".into()))
    }
}

/// One open read stream's slot.
pub struct ReadSlot {
    slots: Arc<ReadSlots>,
    agent: String,
}

impl Drop for ReadSlot {
    fn drop(&mut self) {
        if let Ok(mut all) = self.slots.agents.lock()
            && let Some(n) = all.get_mut(&self.agent)
        {
            *n = n.saturating_sub(1);
            if *n == 0 {
                all.remove(&self.agent);
            }
        }
    }
}

/// The room one batch holds in its stream's budget and in the total,
/// given back when the transport has taken the batch's last blob.
pub struct Room {
    _stream: OwnedSemaphorePermit,
    _total: OwnedSemaphorePermit,
}

/// A blob read for a stream, with its batch's room.
pub type Held = (pb::BlobData, Arc<Room>);

/// Read the blobs `ids` for `site` in order into the returned channel, on
/// a task that holds `slot` until it ends; batches take room in the total
/// of the slots `slot` came from. The caller has checked nothing:
/// a blob the site does not hold ends the stream with NOT_FOUND (the same
/// answer for "another site's" and "nowhere": no oracle), one it holds
/// that a scrub set aside with DATA_LOSS.
pub fn serve(
    ctx: Arc<Ctx>,
    slot: ReadSlot,
    site: String,
    ids: Vec<Id>,
) -> mpsc::Receiver<Result<Held, ServiceError>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        // The slot is held until the task ends; its slots share the total room.
        let slots = slot.slots.clone();
        let _slot = slot;
        let stream = Arc::new(Semaphore::new(STREAM_BYTES));
        for group in ids.chunks(LOOKUP_IDS) {
            let group = group.to_vec();
            let site = site.clone();
            let found = match ctx.blocking(move |c| locate(c, &site, group)).await {
                Ok(f) => f,
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            };
            for batch in batches(found) {
                let bytes: usize = batch.iter().map(|(_, l)| l.length as usize).sum();
                let room = async {
                    let own = stream
                        .clone()
                        .acquire_many_owned(bytes.clamp(1, STREAM_BYTES) as u32)
                        .await
                        .map_err(|_| ServiceError::Internal("stream room closed".into()))?;
                    let total = slots.room(bytes).await?;
                    Ok::<_, ServiceError>(Arc::new(Room {
                        _stream: own,
                        _total: total,
                    }))
                };
                let res = match room.await {
                    Ok(room) => ctx
                        .blocking(move |c| read(c, batch))
                        .await
                        .map(|list| (list, room)),
                    Err(e) => Err(e),
                };
                match res {
                    Ok((list, room)) => {
                        for b in list {
                            if tx.send(Ok((b, room.clone()))).await.is_err() {
                                return;
                            }
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                }
            }
        }
    });
    rx
}

/// Where each of `ids` is, checking that `site` holds it.
fn locate(c: &Ctx, site: &str, ids: Vec<Id>) -> Result<Vec<(Id, BlobLocation)>, ServiceError> {
    let raw: Vec<Vec<u8>> = ids.iter().map(|i| i.0.to_vec()).collect();
    let held = c.state.site_has(site, &raw)?;
    let catalog = c.repo.catalog()?;
    let mut out = Vec::with_capacity(ids.len());
    for (id, held) in ids.into_iter().zip(held) {
        if !held {
            return Err(ServiceError::NotFound(format!("blob {id}")));
        }
        // Held but not catalogued: set aside by a scrub (the site may know
        // it is gone), or dropped by a prune. Only a blob the site holds
        // gets here, so telling it the collector lost it is no oracle.
        let Some(loc) = catalog.lookup(&id)? else {
            return Err(if c.state.was_lost(&id.0)? {
                crate::scrub::lost_blob(&id)
            } else {
                ServiceError::NotFound(format!("blob {id}"))
            });
        };
        out.push((id, loc));
    }
    Ok(out)
}

/// `found` in batches of at most [`STEP_BYTES`] sealed bytes, or one
/// larger blob.
fn batches(found: Vec<(Id, BlobLocation)>) -> Vec<Vec<(Id, BlobLocation)>> {
    let mut out: Vec<Vec<(Id, BlobLocation)>> = Vec::new();
    let mut bytes = 0usize;
    for (id, loc) in found {
        let n = loc.length as usize;
        match out.last_mut() {
            Some(b) if bytes + n <= STEP_BYTES => {
                bytes += n;
                b.push((id, loc));
            }
            _ => {
                bytes = n;
                out.push(vec![(id, loc)]);
            }
        }
    }
    out
}

/// Read one batch's sealed bytes from the packs.
fn read(c: &Ctx, batch: Vec<(Id, BlobLocation)>) -> Result<Vec<pb::BlobData>, ServiceError> {
    let store = c.repo.store();
    batch
        .into_iter()
        .map(|(id, loc)| {
            let mut sealed = vec![0u8; loc.length as usize];
            store.read_at(&loc.pack, loc.offset, &mut sealed)?;
            Ok(pb::BlobData {
                id: id.0.to_vec(),
                kind: loc.kind as u32,
                sealed,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    use repo_format::blob::BlobKind;
    use repo_format::keyring::KdfParams;

    use crate::ingest::{Incoming, ingest};

    /// Two agents' streams share a 3 MiB total: the second one's 2 MiB
    /// batch waits until the transport has taken the first one's whole
    /// batch, then reads; all room comes back when the streams end.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn read_streams_wait_for_room_in_the_shared_total() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let data = tmp.path().join("data");
        crate::init::init(&data, &[], KdfParams::with_memory_kib(Some(64))).expect("init");
        let ctx = crate::server::load(&data).expect("load");
        ctx.state.add_site("s").expect("site");
        const MIB: usize = 1 << 20;
        let blobs: Vec<Incoming> = (1..=4u8)
            .map(|n| Incoming {
                kind: BlobKind::Data,
                id: Id([n; 32]),
                sealed: vec![n; MIB],
                raw_len: MIB as u32,
            })
            .collect();
        let ids: Vec<Id> = blobs.iter().map(|b| b.id).collect();
        let c = ctx.clone();
        tokio::task::spawn_blocking(move || ingest(&c, "s", blobs))
            .await
            .expect("task")
            .expect("ingest");

        let slots = Arc::new(ReadSlots::with_total(3 * MIB));
        let open = |agent: &str, ids: &[Id]| {
            let slot = slots.open(agent).expect("slot");
            serve(ctx.clone(), slot, "s".into(), ids.to_vec())
        };
        let mut a = open("a1", &ids[..2]);
        let first = a.recv().await.expect("a blob").expect("read");
        let mut b = open("a2", &ids[2..]);
        let wait = |ms| Duration::from_millis(ms);
        assert!(
            tokio::time::timeout(wait(300), b.recv()).await.is_err(),
            "2 MiB of 3 are held: the second stream waits"
        );
        drop(first);
        assert!(
            tokio::time::timeout(wait(200), b.recv()).await.is_err(),
            "the first batch still has a blob queued: its room is held"
        );
        let second = a.recv().await.expect("a blob").expect("read");
        assert_eq!(second.0.sealed, vec![2u8; MIB]);
        drop(second);
        let third = tokio::time::timeout(wait(10_000), b.recv())
            .await
            .expect("room was given back")
            .expect("a blob")
            .expect("read");
        assert_eq!(third.0.sealed, vec![3u8; MIB]);
        assert!(a.recv().await.is_none(), "the first stream is done");
        drop(third);
        let fourth = b.recv().await.expect("a blob").expect("read");
        assert_eq!(fourth.0.id, ids[3].0.to_vec());
        drop(fourth);
        assert!(b.recv().await.is_none(), "the second stream is done");
        assert_eq!(slots.total.available_permits(), 3 * MIB, "all room is back");
        assert!(slots.agents.lock().expect("lock").is_empty(), "slots freed");
    }

    #[test]
    fn read_streams_are_capped_per_agent() {
        let s = Arc::new(ReadSlots::default());
        let mut open: Vec<ReadSlot> = (0..MAX_READ_STREAMS)
            .map(|_| s.open("a1").expect("under the cap"))
            .collect();
        let err = s.open("a1").err().expect("over the cap");
        assert!(err.to_string().contains("read streams open"), "{err}");
        let _other = s.open("a2").expect("another agent is not affected");
        open.pop();
        let _again = s.open("a1").expect("a slot was freed");
        drop(open);
        assert_eq!(s.agents.lock().expect("lock").get("a1"), Some(&1));
    }
}
