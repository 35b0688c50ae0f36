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
//! Connections without a certificate exist only to enroll, one short call.
//! So that one host cannot hold the whole anonymous pool (and with it every
//! office's enrollment), each source address may hold
//! [`MAX_ANONYMOUS_PER_ADDRESS`] of them, and each lives at most
//! [`ANONYMOUS_MAX_AGE`] (the server closes it then, see
//! [`crate::conn::BufferedTcp::close_after`]) instead of the general
//! connection age of five minutes.
//!
//! The identity is read again from the same certificate by the interceptor
//! on every call, which is what authorises; this is only accounting.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::pki::Role;

/// Connections one agent identity may hold at once: its control stream, a
/// backup per source and restore pulls, with room for reconnects.
pub const MAX_PER_AGENT: usize = 16;
/// Connections the admin identity may hold at once (scripts run commands in parallel).
pub const MAX_PER_ADMIN: usize = 64;
/// Connections without a usable client certificate, all together (enrollment).
pub const MAX_ANONYMOUS: usize = 16;
/// Connections without a usable client certificate from one source address.
pub const MAX_ANONYMOUS_PER_ADDRESS: usize = 4;
/// How long a connection without a client certificate may stay open: an
/// enrollment is one call of a few milliseconds.
pub const ANONYMOUS_MAX_AGE: Duration = Duration::from_secs(30);

/// Whose allowance a connection counts against.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Holder {
    /// An agent's certificate (its role URI, the same across renewals).
    Agent(String),
    /// An admin certificate (its role URI).
    Admin(String),
    /// No client certificate, or one without a hubvault identity.
    Anonymous,
    /// The same, counted per source address (on top of [`Holder::Anonymous`]).
    AnonymousFrom(IpAddr),
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
            Holder::AnonymousFrom(_) => MAX_ANONYMOUS_PER_ADDRESS,
        }
    }
}

/// Open connections per holder.
#[derive(Debug, Default)]
pub struct Admission {
    open: Mutex<HashMap<Holder, usize>>,
}

impl Admission {
    /// Count one more connection for `holder`, coming from `peer`, or
    /// `None` if it holds its cap (an anonymous one: also if `peer` holds
    /// its per-address cap).
    pub fn admit(self: &Arc<Self>, holder: &Holder, peer: IpAddr) -> Option<Ticket> {
        let mut holders = vec![holder.clone()];
        if *holder == Holder::Anonymous {
            holders.push(Holder::AnonymousFrom(peer));
        }
        let mut open = self.open.lock().ok()?;
        if holders
            .iter()
            .any(|h| open.get(h).copied().unwrap_or(0) >= h.cap())
        {
            return None;
        }
        for h in &holders {
            *open.entry(h.clone()).or_insert(0) += 1;
        }
        Some(Ticket {
            admission: self.clone(),
            holders,
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
    /// Every count this connection took a place in.
    holders: Vec<Holder>,
}

impl Ticket {
    /// How long the connection may stay open, where shorter than the
    /// server's general connection age.
    pub fn max_age(&self) -> Option<Duration> {
        (self.holders.first() == Some(&Holder::Anonymous)).then_some(ANONYMOUS_MAX_AGE)
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let Ok(mut open) = self.admission.open.lock() else {
            return;
        };
        for h in &self.holders {
            if let Some(n) = open.get_mut(h) {
                *n -= 1;
                if *n == 0 {
                    open.remove(h);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOME: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    /// The `i`th of many source addresses.
    fn address(i: usize) -> IpAddr {
        IpAddr::V4(std::net::Ipv4Addr::new(
            10,
            0,
            (i / 256) as u8,
            (i % 256) as u8,
        ))
    }

    #[test]
    fn caps_are_per_holder_and_tickets_give_places_back() {
        let a = Arc::new(Admission::default());
        let agent = Holder::Agent("urn:hubvault:agent:lyon:1".into());
        let other = Holder::Agent("urn:hubvault:agent:lyon:2".into());
        let mut held: Vec<Ticket> = (0..MAX_PER_AGENT)
            .map(|_| a.admit(&agent, HOME).expect("under the cap"))
            .collect();
        assert!(a.admit(&agent, HOME).is_none(), "over the cap");
        // Another identity and the anonymous pool are not affected.
        let o = a.admit(&other, HOME).expect("another agent");
        let anon: Vec<Ticket> = (0..MAX_ANONYMOUS)
            .map(|i| a.admit(&Holder::Anonymous, address(i)).expect("anonymous"))
            .collect();
        assert!(
            a.admit(&Holder::Anonymous, address(MAX_ANONYMOUS))
                .is_none()
        );
        assert_eq!(anon[0].max_age(), Some(ANONYMOUS_MAX_AGE));
        assert_eq!(o.max_age(), None);
        held.pop();
        assert_eq!(a.open(&agent), MAX_PER_AGENT - 1);
        let again = a.admit(&agent, HOME).expect("a place came back");
        drop((held, again, o, anon));
        assert_eq!(a.open(&agent), 0);
        assert!(a.open.lock().expect("lock").is_empty());
    }

    #[test]
    fn one_address_holds_only_its_share_of_the_anonymous_pool() {
        let a = Arc::new(Admission::default());
        let mine: Vec<Ticket> = (0..MAX_ANONYMOUS_PER_ADDRESS)
            .map(|_| a.admit(&Holder::Anonymous, HOME).expect("under the cap"))
            .collect();
        assert!(
            a.admit(&Holder::Anonymous, HOME).is_none(),
            "over the address's cap"
        );
        // A refused connection took no place anywhere.
        assert_eq!(a.open(&Holder::Anonymous), MAX_ANONYMOUS_PER_ADDRESS);
        // Other addresses, and agents from this one, are not affected.
        let other = a
            .admit(&Holder::Anonymous, address(1))
            .expect("another address");
        let agent = Holder::Agent("urn:hubvault:agent:lyon:1".into());
        let t = a.admit(&agent, HOME).expect("an agent");
        drop((mine, other, t));
        assert!(a.open.lock().expect("lock").is_empty());
    }

    #[test]
    fn a_connection_without_a_hubvault_certificate_is_anonymous() {
        assert_eq!(Holder::of(None), Holder::Anonymous);
        assert_eq!(Holder::of(Some(b"not a certificate")), Holder::Anonymous);
    }
}
