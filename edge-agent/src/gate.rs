//! The upload gate: one upload at a time per agent, and when several
//! sources wait, the one with the highest priority goes first (ties in
//! arrival order). Local backups run in parallel; the link is what is shared.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

struct Waiter {
    priority: i32,
    seq: u64,
    wake: oneshot::Sender<()>,
}

impl PartialEq for Waiter {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Waiter {}
impl PartialOrd for Waiter {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Waiter {
    /// Higher priority first, then earlier arrival.
    fn cmp(&self, o: &Self) -> Ordering {
        self.priority
            .cmp(&o.priority)
            .then_with(|| o.seq.cmp(&self.seq))
    }
}

#[derive(Default)]
struct Inner {
    busy: bool,
    seq: u64,
    waiting: BinaryHeap<Waiter>,
}

/// A priority mutex over uploads.
#[derive(Default, Clone)]
pub struct PriorityGate {
    inner: Arc<Mutex<Inner>>,
}

/// Held while uploading; the next waiter goes when it drops.
pub struct Permit {
    inner: Arc<Mutex<Inner>>,
}

impl PriorityGate {
    /// A free gate.
    pub fn new() -> Self {
        Self::default()
    }

    /// Wait for the gate with `priority`.
    pub async fn acquire(&self, priority: i32) -> Permit {
        let rx = {
            let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            if !g.busy {
                g.busy = true;
                None
            } else {
                let (tx, rx) = oneshot::channel();
                g.seq += 1;
                let seq = g.seq;
                g.waiting.push(Waiter {
                    priority,
                    seq,
                    wake: tx,
                });
                Some(rx)
            }
        };
        if let Some(rx) = rx {
            // The gate is handed over by the previous holder (busy stays true).
            let mut w = Waiting {
                rx: Some(rx),
                inner: self.inner.clone(),
            };
            if let Some(rx) = w.rx.as_mut() {
                let _ = rx.await;
            }
            w.rx = None;
        }
        Permit {
            inner: self.inner.clone(),
        }
    }
}

/// A waiter being cancelled after the gate was handed to it must pass the
/// gate on, or it stays busy forever.
struct Waiting {
    rx: Option<oneshot::Receiver<()>>,
    inner: Arc<Mutex<Inner>>,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if let Some(mut rx) = self.rx.take() {
            rx.close();
            if rx.try_recv().is_ok() {
                drop(Permit {
                    inner: self.inner.clone(),
                });
            }
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        // Hand over to the best waiter still waiting (a cancelled one is skipped).
        while let Some(w) = g.waiting.pop() {
            if w.wake.send(()).is_ok() {
                return;
            }
        }
        g.busy = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn higher_priority_goes_first() {
        let gate = PriorityGate::new();
        let held = gate.acquire(0).await;
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for (name, prio) in [("low", 1), ("high", 9), ("mid", 5), ("high2", 9)] {
            let (g, o) = (gate.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let _p = g.acquire(prio).await;
                o.lock().expect("lock").push(name);
            }));
            // Arrival order matters for ties.
            tokio::task::yield_now().await;
        }
        drop(held);
        for t in tasks {
            t.await.expect("task");
        }
        assert_eq!(
            *order.lock().expect("lock"),
            vec!["high", "high2", "mid", "low"]
        );
    }

    #[tokio::test]
    async fn a_waiter_cancelled_after_the_hand_over_passes_the_gate_on() {
        let gate = PriorityGate::new();
        let held = gate.acquire(0).await;
        let g = gate.clone();
        let waiting = tokio::spawn(async move {
            let _p = g.acquire(5).await;
        });
        tokio::task::yield_now().await;
        // Hand over, then cancel the waiter before it runs (one thread).
        drop(held);
        waiting.abort();
        let _ = waiting.await;
        let _again = tokio::time::timeout(std::time::Duration::from_secs(5), gate.acquire(0))
            .await
            .expect("gate free again");
    }

    #[tokio::test]
    async fn a_cancelled_waiter_does_not_keep_the_gate() {
        let gate = PriorityGate::new();
        let held = gate.acquire(0).await;
        let g = gate.clone();
        let waiting = tokio::spawn(async move {
            let _p = g.acquire(5).await;
        });
        tokio::task::yield_now().await;
        waiting.abort();
        let _ = waiting.await;
        drop(held);
        let _again = tokio::time::timeout(std::time::Duration::from_secs(5), gate.acquire(0))
            .await
            .expect("gate free again");
    }
}
