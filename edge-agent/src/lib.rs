//! The edge agent (`hubvault-agent`): watching, scanning, the upload
//! pipeline, local state, restores and master copies.
//!
//! Not built yet: this crate is filled by issues 3 and 4. It exists now so
//! the workspace has its final shape; it exports nothing.
