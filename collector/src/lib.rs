//! The collector (`hubvault-collector`): gRPC server over mTLS, enrollment
//! and PKI, ingest, snapshot commit, jobs, retention and status.
//!
//! Not built yet: this crate is filled by issue 3 (the network). It exists
//! now so the workspace has its final shape; it exports nothing.
