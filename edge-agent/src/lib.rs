//! # edge-agent: `hubvault-agent`
//!
//! Runs at a remote office: enrollment ([`enroll`]); backups into a local
//! spool repository, uploaded to the collector ([`upload`], with the
//! acknowledged set in [`acked`]); the long-lived control stream with
//! heartbeats, reconnection and restore jobs ([`control`], [`pull`], taking what it can from its own
//! files through [`local`]); its
//! identity, keys and spool in a state directory ([`state`]).
//!
//! Why a spool: the agent runs the same tested backup engine as offline
//! repositories, with local dedup and parent snapshots, and an upload cut at
//! any point resumes from durable local packs. Once uploaded, data packs are
//! dropped from it ([`trim`]): it keeps trees and what is not yet uploaded.

pub mod acked;
pub mod backup;
pub mod control;
pub mod enroll;
pub mod gate;
pub mod history;
pub mod local;
pub mod lost;
pub mod pull;
pub mod schedule;
pub mod sources;
pub mod state;
pub mod throttle;
pub mod trim;
pub mod upload;
pub mod watch;

/// Name the collector's certificate is verified against.
pub const SERVER_NAME: &str = "hubvault-collector";
