//! # edge-agent: `hubvault-agent`
//!
//! Runs at a remote office. Today: enrollment ([`enroll`]) and the
//! long-lived control stream with heartbeats and reconnection
//! ([`control`]), with its identity and keys in a state directory
//! ([`state`]). Watching, the upload pipeline and restores arrive with the
//! data path of issue 3 and with issue 4.

pub mod control;
pub mod enroll;
pub mod state;

/// Name the collector's certificate is verified against.
pub const SERVER_NAME: &str = "hubvault-collector";
