//! The run ledger: per task and scheduled instant, who claimed the run, in which leader epoch,
//! and how far it got (claimed → started → succeeded | failed, or missed), with the task's
//! counts updated in the same step. It is what makes "each instant runs once and is counted
//! once" hold across replicas and failovers; see `docs/operations.md`.

pub mod redis;

pub use self::redis::{RedisLedger, RedisSettings};

/// The ledger's answer to a claim or a mark.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Done: the run is this leader's (claim), or the step is recorded (mark).
    Accepted,
    /// Refused: the run's record does not allow it (another claim holds it, or it is over).
    Held(Record),
    /// Refused: a leader of a newer epoch has acted on this task; this one must stop.
    Fenced { epoch: u64 },
}

/// A step of a run, recorded with [`RedisLedger::mark`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mark {
    /// The action is about to start: refused (fenced) once a newer leader took the task over.
    Started,
    /// The action ended; counted in `runs` and `succeeded` or `failed`.
    Finished { succeeded: bool },
    /// The instant could not run; counted in `missed`, and never run afterwards.
    Missed,
}

/// One run's record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub state: RunState,
    /// The epoch of the leader that made the last step.
    pub epoch: u64,
    /// That leader's identity.
    pub holder: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunState {
    Claimed,
    Started,
    Succeeded,
    Failed,
    Missed,
    /// Older than the retention horizon: handled long ago, its record pruned.
    Unknown,
}

/// A task's counts, as the ledger's marks made them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Finished runs (succeeded + failed).
    pub runs: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub missed: u64,
}

/// The ledger could not answer (unreachable, timed out, or a reply it did not expect).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct LedgerError(pub String);
