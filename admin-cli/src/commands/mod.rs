//! One module per command group.

pub(crate) mod quickstart;
pub(crate) mod repo;
