//! Limits on uploads in flight, so that neither one agent (a hostile one,
//! or many sources of one office backing up at once) nor many agents at
//! once can make the collector's memory grow without bound:
//!
//! - at most [`MAX_STREAMS`] upload streams open per agent; one more is
//!   refused with `RESOURCE_EXHAUSTED` and a message saying why;
//! - at most [`AGENT_BYTES`] of sealed bytes received and not yet durable
//!   across all of an agent's streams, and at most [`TOTAL_BYTES`] across
//!   every agent's. A stream over either budget first makes what it holds
//!   durable, then waits for room: HTTP/2 flow control then holds the agent
//!   back. An agent over its own budget does not slow other agents; when
//!   the collector as a whole is full, every stream waits its turn.
//!
//! So an agent costs the collector at most `AGENT_BYTES` plus one decoded
//! message per open stream (see `proto::limits::MAX_MESSAGE`), and all
//! agents together at most `TOTAL_BYTES` plus those messages.
//!
//! No deadlock: a stream waits for room only while it holds none for bytes
//! not yet on their way to disk, and room is given back when an ingest
//! (which waits on nothing) finishes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::ServiceError;

/// Upload streams one agent may have open at once. The agent opens one per
/// running backup (its uploads take turns through one gate), so only an
/// office with this many sources backing up at the same moment meets it.
pub const MAX_STREAMS: usize = 16;

/// Sealed bytes one agent may have received and not yet made durable:
/// two batches being made durable and one being received, with room.
pub const AGENT_BYTES: usize = 96 * 1024 * 1024;

/// Sealed bytes all agents together may have received and not yet made
/// durable: five agents at full budget. More agents uploading at once share
/// it (the disk is the limit then, not memory).
pub const TOTAL_BYTES: usize = 512 * 1024 * 1024;

/// The budgets of every agent with an upload stream open, and the total.
pub struct Budgets {
    agents: Mutex<HashMap<String, Agent>>,
    total: Arc<Semaphore>,
    agent_bytes: usize,
    total_bytes: usize,
}

impl Default for Budgets {
    fn default() -> Self {
        Budgets::with_limits(AGENT_BYTES, TOTAL_BYTES)
    }
}

struct Agent {
    streams: usize,
    bytes: Arc<Semaphore>,
}

impl Budgets {
    /// Budgets of `agent_bytes` per agent and `total_bytes` in all (tests
    /// use small ones; the collector uses [`Budgets::default`]).
    pub fn with_limits(agent_bytes: usize, total_bytes: usize) -> Budgets {
        Budgets {
            agents: Mutex::new(HashMap::new()),
            total: Arc::new(Semaphore::new(total_bytes)),
            agent_bytes,
            total_bytes,
        }
    }

    /// Open one upload stream for `agent`, or refuse it when the agent has
    /// [`MAX_STREAMS`] open. The stream's slot is freed when the returned
    /// value is dropped.
    pub fn open_stream(self: &Arc<Self>, agent: &str) -> Result<StreamBudget, ServiceError> {
        let mut all = self
            .agents
            .lock()
            .map_err(|_| ServiceError::Internal("upload budgets poisoned".into()))?;
        let a = all.entry(agent.to_string()).or_insert_with(|| Agent {
            streams: 0,
            bytes: Arc::new(Semaphore::new(self.agent_bytes)),
        });
        if a.streams >= MAX_STREAMS {
            return Err(ServiceError::Exhausted(format!(
                "agent {agent} has {MAX_STREAMS} upload streams open already; \
                 finish one before opening another"
            )));
        }
        a.streams += 1;
        Ok(StreamBudget {
            budgets: self.clone(),
            agent: agent.to_string(),
            bytes: a.bytes.clone(),
        })
    }
}

/// One open upload stream's share of its agent's budget and of the total.
pub struct StreamBudget {
    budgets: Arc<Budgets>,
    agent: String,
    bytes: Arc<Semaphore>,
}

/// Room for bytes received and not yet durable, in the agent's budget and
/// in the total; given back when dropped.
pub struct Room {
    agent: OwnedSemaphorePermit,
    total: OwnedSemaphorePermit,
}

impl Room {
    /// Join `other` into this room (one batch, taken a message at a time).
    pub fn merge(&mut self, other: Room) {
        self.agent.merge(other.agent);
        self.total.merge(other.total);
    }
}

impl StreamBudget {
    /// Room for `n` received bytes now, if both budgets have it.
    pub fn try_take(&self, n: usize) -> Option<Room> {
        let agent = self
            .bytes
            .clone()
            .try_acquire_many_owned(self.permits(n))
            .ok()?;
        let total = self
            .budgets
            .total
            .clone()
            .try_acquire_many_owned(self.permits(n))
            .ok()?;
        Some(Room { agent, total })
    }

    /// Room for `n` received bytes, waiting until other batches (of the
    /// agent, then of anyone) are durable. Call only while holding no room
    /// for an unflushed batch of this stream (which would wait on itself).
    pub async fn take(&self, n: usize) -> Result<Room, ServiceError> {
        let closed = |_| ServiceError::Internal("upload budget closed".into());
        let agent = self
            .bytes
            .clone()
            .acquire_many_owned(self.permits(n))
            .await
            .map_err(closed)?;
        let total = self
            .budgets
            .total
            .clone()
            .acquire_many_owned(self.permits(n))
            .await
            .map_err(closed)?;
        Ok(Room { agent, total })
    }

    /// Permits for `n` bytes (a message is at most `MAX_MESSAGE`, far below
    /// either budget; capped so that one never waits forever).
    fn permits(&self, n: usize) -> u32 {
        let b = &self.budgets;
        n.min(b.agent_bytes.min(b.total_bytes)) as u32
    }
}

impl Drop for StreamBudget {
    fn drop(&mut self) {
        if let Ok(mut all) = self.budgets.agents.lock()
            && let Some(a) = all.get_mut(&self.agent)
        {
            a.streams = a.streams.saturating_sub(1);
            if a.streams == 0 {
                all.remove(&self.agent);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn streams_are_capped_per_agent_and_bytes_shared() {
        let b = Arc::new(Budgets::default());
        let mut open: Vec<StreamBudget> = (0..MAX_STREAMS)
            .map(|_| b.open_stream("a1").expect("under the cap"))
            .collect();
        let err = b.open_stream("a1").err().expect("over the cap");
        assert!(err.to_string().contains("upload streams open"), "{err}");
        // Another agent is not affected.
        let other = b.open_stream("a2").expect("another agent");
        open.pop();
        let again = b.open_stream("a1").expect("a slot was freed");

        // Bytes: one agent's streams share the budget; another's is its own.
        let big = again.try_take(AGENT_BYTES - 10).expect("room");
        assert!(open[0].try_take(11).is_none(), "over the agent's budget");
        assert!(other.try_take(AGENT_BYTES).is_some(), "own budget");
        let waiter = open[0].take(11);
        drop(big);
        let _room = waiter.await.expect("room once the first batch is durable");
        drop(open);
        drop(again);
        drop(other);
        assert!(b.agents.lock().expect("lock").is_empty(), "entries go");
    }

    #[tokio::test]
    async fn all_agents_together_share_the_total() {
        let b = Arc::new(Budgets::with_limits(100, 150));
        let (a1, a2) = (
            b.open_stream("a1").expect("a1"),
            b.open_stream("a2").expect("a2"),
        );
        let first = a1.try_take(100).expect("a1's whole budget");
        // a2 is within its own budget but the collector is nearly full.
        assert!(a2.try_take(60).is_none(), "over the total");
        let mut second = a2.try_take(30).expect("what is left of the total");
        second.merge(a2.try_take(20).expect("the rest"));
        assert!(a2.try_take(1).is_none(), "the total is spent");
        // A waiter gets room once another agent's batch is durable.
        let waiter = a2.take(40);
        drop(first);
        let room = waiter.await.expect("room after a1's batch");
        drop((room, second));
        let all = a1.try_take(100).expect("everything given back");
        drop(all);
    }
}
