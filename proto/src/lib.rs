//! hubvault's wire protocol: the `.proto` files and their generated tonic
//! code, and the one validated conversion layer to `repo-format` types.
//!
//! Not built yet: this crate is filled by issue 3 (the network). It exists
//! now so the workspace has its final shape; it exports nothing.
