//! Limits on blob reads in flight (`ReadBlobs`: an agent pulling what a
//! restore job needs), so that one agent cannot make the collector's memory
//! grow without bound by opening read streams and not reading them:
//!
//! - at most [`MAX_READ_STREAMS`] read streams open per agent; one more is
//!   refused with `RESOURCE_EXHAUSTED`. An agent's restore job keeps four
//!   open (`FETCH_IN_FLIGHT` in the agent's `pull`), so four jobs at once
//!   fit;
//! - a stream reads from the packs in steps of about [`STEP_BYTES`], and
//!   holds at most [`STREAM_BYTES`] read and not yet taken by the
//!   transport: a client that stops reading stops its own stream, and no
//!   other (the bytes are the stream's own, not taken from a shared pool a
//!   stalled client could hold).
//!
//! So an agent reading costs the collector at most `MAX_READ_STREAMS ×
//! (STEP_BYTES + STREAM_BYTES + 2 blobs)`: about 100 MiB with the default
//! 1 MiB chunks, 550 MiB in the worst case of blobs at the upload limit
//! (which only the agent's own site can have uploaded).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::error::ServiceError;

/// Read streams one agent may have open at once.
pub const MAX_READ_STREAMS: usize = 16;

/// Sealed bytes one stream reads from the packs per blocking step (at
/// least one blob).
pub const STEP_BYTES: usize = 2 * 1024 * 1024;

/// Sealed bytes one stream may hold read and not yet taken by the
/// transport (a larger blob takes all of it).
pub const STREAM_BYTES: usize = 4 * 1024 * 1024;

/// How many read streams each agent has open.
#[derive(Default)]
pub struct ReadSlots {
    agents: Mutex<HashMap<String, usize>>,
}

impl ReadSlots {
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

#[cfg(test)]
mod tests {
    use super::*;

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
