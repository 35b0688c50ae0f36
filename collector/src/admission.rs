//! Admission of established connections: how many each client may hold.
//!
//! Every connection can make the collector buffer up to its HTTP/2
//! connection window (`2 × server::WINDOW`, 16 MiB) of data the services
//! have not read yet, outside the upload byte budgets; without a cap, one
//! client opening connections could buffer without bound. So, after the TLS
//! handshake, each connection is counted against the identity in its client
//! certificate (the role URI: one agent, across certificate renewals, or the
//! admin), or against the shared pool of connections without one (only
//! enrollment works there). Over the cap it is closed at once; the count is
//! given back when the connection ends (the ticket rides in the
//! connection's [`crate::conn::BufferedTcp`]). The worst case a client can hold is
//! then its cap times 16 MiB (agents 16 × 16 MiB, anonymous 16 × 16 MiB in
//! all), whatever the number of connections it tries.
//!
//! The identity is read again from the same certificate by the interceptor
//! on every call, which is what authorises; this is only accounting.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::pki::Role;

/// Connections one agent identity may hold at once: its control stream, a
/// backup per source and restore pulls, with room for reconnects.
pub const MAX_PER_AGENT: usize = 16;
/// Connections the admin identity may hold at once (scripts run commands in parallel).
pub const MAX_PER_ADMIN: usize = 64;
/// Connections without a usable client certificate, all together (enrollment).
pub const MAX_ANONYMOUS: usize = 16;

/// Whose allowance a connection counts against.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Holder {
    /// An agent's certificate (its role URI, the same across renewals).
    Agent(String),
    /// An admin certificate (its role URI).
    Admin(String),
    /// No client certificate, or one without a hubvault identity.
    Anonymous,
}

impl Holder {
    /// The holder for a connection whose first peer certificate is `der`.
    pub fn of(der: Option<&[u8]>) -> Holder {
        match der.and_then(|d| crate::auth::caller_from_der(d).ok()) {
            Some(c) => match c.role {
                Role::Agent { .. } => Holder::Agent(c.role.uri()),
                Role::Admin { .. } => Holder::Admin(c.role.uri()),
            },
            None => Holder::Anonymous,
        }
    }

    fn cap(&self) -> usize {
        match self {
            Holder::Agent(_) => MAX_PER_AGENT,
            Holder::Admin(_) => MAX_PER_ADMIN,
            Holder::Anonymous => MAX_ANONYMOUS,
        }
    }
}

/// Open connections per holder.
#[derive(Debug, Default)]
pub struct Admission {
    open: Mutex<HashMap<Holder, usize>>,
}

impl Admission {
    /// Count one more connection for `holder`, or `None` if it holds its cap.
    pub fn admit(self: &Arc<Self>, holder: &Holder) -> Option<Ticket> {
        let mut open = self.open.lock().ok()?;
        let n = open.entry(holder.clone()).or_insert(0);
        if *n >= holder.cap() {
            return None;
        }
        *n += 1;
        Some(Ticket {
            admission: self.clone(),
            holder: holder.clone(),
        })
    }

    /// Connections `holder` holds now.
    #[cfg(test)]
    fn open(&self, holder: &Holder) -> usize {
        self.open
            .lock()
            .map(|o| o.get(holder).copied().unwrap_or(0))
            .unwrap_or(0)
    }
}

/// One admitted connection's place; given back on drop.
#[derive(Debug)]
pub struct Ticket {
    admission: Arc<Admission>,
    holder: Holder,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if let Ok(mut open) = self.admission.open.lock()
            && let Some(n) = open.get_mut(&self.holder)
        {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.holder);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_are_per_holder_and_tickets_give_places_back() {
        let a = Arc::new(Admission::default());
        let agent = Holder::Agent("urn:hubvault:agent:lyon:1".into());
        let other = Holder::Agent("urn:hubvault:agent:lyon:2".into());
        let mut held: Vec<Ticket> = (0..MAX_PER_AGENT)
            .map(|_| a.admit(&agent).expect("under the cap"))
            .collect();
        assert!(a.admit(&agent).is_none(), "over the cap");
        // Another identity and the anonymous pool are not affected.
        let o = a.admit(&other).expect("another agent");
        let anon: Vec<Ticket> = (0..MAX_ANONYMOUS)
            .map(|_| a.admit(&Holder::Anonymous).expect("anonymous"))
            .collect();
        assert!(a.admit(&Holder::Anonymous).is_none());
        held.pop();
        assert_eq!(a.open(&agent), MAX_PER_AGENT - 1);
        let again = a.admit(&agent).expect("a place came back");
        drop((held, again, o, anon));
        assert_eq!(a.open(&agent), 0);
        assert!(a.open.lock().expect("lock").is_empty());
    }

    #[test]
    fn a_connection_without_a_hubvault_certificate_is_anonymous() {
        assert_eq!(Holder::of(None), Holder::Anonymous);
        assert_eq!(Holder::of(Some(b"not a certificate")), Holder::Anonymous);
    }
}
