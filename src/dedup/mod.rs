//! Exactly-once per scheduled instant: before a run starts, its `RunId` is claimed; only the
//! first claim of an id wins. The memory backend serves a single replica and standalone mode;
//! the Redis backend (HA) implements the same trait.

mod memory;

use futures::future::BoxFuture;

pub use memory::MemoryDedup;

use crate::run::RunId;

/// Whether this process may run an instant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Claim {
    /// This process holds the run; go ahead.
    Claimed,
    /// Someone already claimed it; do not run it again.
    Duplicate,
}

/// The dedup backend could not answer; the run is not started (and counted as missed).
#[derive(Debug, thiserror::Error)]
#[error("dedup backend unavailable: {0}")]
pub struct DedupError(pub String);

/// A store of claimed run ids. The engine claims a task's instants in ascending order.
pub trait Dedup: Send + Sync {
    fn claim<'a>(&'a self, run: &'a RunId) -> BoxFuture<'a, Result<Claim, DedupError>>;
}
