//! Per-agent limits on uploads in flight, so that one agent (a hostile one,
//! or many sources of one office backing up at once) cannot make the
//! collector's memory grow without bound:
//!
//! - at most [`MAX_STREAMS`] upload streams open per agent; one more is
//!   refused with `RESOURCE_EXHAUSTED` and a message saying why;
//! - at most [`AGENT_BYTES`] of sealed bytes received and not yet durable
//!   across all of an agent's streams. A stream over the budget first makes
//!   what it holds durable, then waits for room: HTTP/2 flow control then
//!   holds the agent back. Streams of other agents are not affected.
//!
//! So an agent costs the collector at most `AGENT_BYTES` plus one decoded
//! message per open stream (see `proto::limits::MAX_MESSAGE`).

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

/// The budgets of every agent with an upload stream open.
#[derive(Default)]
pub struct Budgets {
    agents: Mutex<HashMap<String, Agent>>,
}

struct Agent {
    streams: usize,
    bytes: Arc<Semaphore>,
}

impl Budgets {
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
            bytes: Arc::new(Semaphore::new(AGENT_BYTES)),
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

/// One open upload stream's share of its agent's budget.
pub struct StreamBudget {
    budgets: Arc<Budgets>,
    agent: String,
    bytes: Arc<Semaphore>,
}

impl StreamBudget {
    /// Room for `n` received bytes now, if the agent's budget has it.
    pub fn try_take(&self, n: usize) -> Option<OwnedSemaphorePermit> {
        self.bytes.clone().try_acquire_many_owned(permits(n)).ok()
    }

    /// Room for `n` received bytes, waiting until other batches of the
    /// agent are durable. Call only while holding no room for an unflushed
    /// batch of this stream (which would wait on itself).
    pub async fn take(&self, n: usize) -> Result<OwnedSemaphorePermit, ServiceError> {
        self.bytes
            .clone()
            .acquire_many_owned(permits(n))
            .await
            .map_err(|_| ServiceError::Internal("upload budget closed".into()))
    }
}

/// Permits for `n` bytes (a message is at most `MAX_MESSAGE`, far below the budget).
fn permits(n: usize) -> u32 {
    n.min(AGENT_BYTES) as u32
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
}
