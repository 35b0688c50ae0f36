//! One module per command group.

pub(crate) mod quickstart;
pub(crate) mod remote;
pub(crate) mod repo;
