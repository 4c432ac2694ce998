//! The run ledger: per task and scheduled instant, who claimed the run, in which leader epoch,
//! and how far it got (claimed → started → succeeded | failed, or missed), with the task's
//! counts updated in the same step. It is what makes "each instant runs once and is counted
//! once" hold across replicas and failovers; see `docs/operations.md`.

mod memory;
pub mod redis;
mod retry;

use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;

pub use self::memory::MemoryLedger;
pub use self::redis::{RedisLedger, RedisSettings};
pub use self::retry::{KEPT_PER_TASK, RecordMissed, RetriedMarks};
use crate::run::Term;
use crate::run::{RunId, TaskId};

/// Where runs are claimed and their steps recorded. The engine claims; the executor marks a run
/// started before its action and finished after it; missed instants are marked missed.
pub trait Ledger: Send + Sync {
    /// Claims `run` for `term`: [`Verdict::Accepted`] means run it. A task's scheduled
    /// instants are claimed in ascending order; run-now requests by their request.
    fn claim<'a>(
        &'a self,
        run: &'a RunId,
        term: &'a Term,
    ) -> BoxFuture<'a, Result<Verdict, LedgerError>>;

    /// Claims a past instant for a backfill, in any order: accepted when the instant has not
    /// run (no record, or missed when it was due), held when it ran or is claimed.
    fn claim_past<'a>(
        &'a self,
        run: &'a RunId,
        term: &'a Term,
    ) -> BoxFuture<'a, Result<Verdict, LedgerError>>;

    /// Records a step of `run`, made in `term`.
    fn mark<'a>(
        &'a self,
        run: &'a RunId,
        term: &'a Term,
        mark: Mark,
    ) -> BoxFuture<'a, Result<Marked, LedgerError>>;

    /// Takes over a run an earlier leader or process started whose work lives on outside it (a
    /// Job): accepted, it is this term's started run and its end is recorded by this term;
    /// held when it is over or already this term's.
    fn adopt<'a>(
        &'a self,
        run: &'a RunId,
        term: &'a Term,
    ) -> BoxFuture<'a, Result<Marked, LedgerError>>;

    /// A new leader takes `task` over: older epochs are fenced from now on. Runs an older epoch
    /// (or, without leader election, another process) started are reported in flight; `settle`
    /// lists those an earlier take-over reported that cannot be running any more: they are
    /// counted failed, their outcome unknown (a run started since, by a process still alive,
    /// is left alone). `seed`: the counts the task's stored status shows, which a ledger with
    /// no counts of the task starts from (records keyed another way by an older release, a
    /// flushed or evicted Redis); a new task has none.
    fn take_over<'a>(
        &'a self,
        task: &'a TaskId,
        term: &'a Term,
        settle: &'a [RunId],
        seed: Option<Counts>,
    ) -> BoxFuture<'a, Result<TakeOver, LedgerError>>;

    /// The fencing epoch of a new term: higher than every epoch this ledger handed out, and at
    /// least `floor`. A ledger shared by replicas is the authority for epochs, so they only go up
    /// whatever happens to the Lease (deleted, moved to another namespace, re-created).
    fn next_epoch(&self, floor: u64) -> BoxFuture<'_, Result<u64, LedgerError>>;

    /// Whether `term` may still act on `task`: no newer term took it over (nor was it forgotten).
    /// Asked before each retry and before a Job is created (the first attempt follows the
    /// start, which fenced it), so a leader frozen after a run's start and woken after a
    /// take-over sends nothing.
    fn holds<'a>(
        &'a self,
        task: &'a TaskId,
        term: &'a Term,
    ) -> BoxFuture<'a, Result<bool, LedgerError>>;

    /// The ledger's clock (Redis `TIME`), when it has one of its own: a leader compares its
    /// clock with it before it leads.
    fn server_time(&self) -> BoxFuture<'_, Result<Option<DateTime<Utc>>, LedgerError>>;

    /// Forgets a deleted task: claims of its runs are refused from now on, and its records are
    /// dropped after `grace` (a replica that has not seen the deletion yet is fenced meanwhile).
    fn forget<'a>(
        &'a self,
        task: &'a TaskId,
        grace: Duration,
    ) -> BoxFuture<'a, Result<(), LedgerError>>;
}

/// The result of a mark, with the task's counts afterwards when the ledger keeps them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Marked {
    /// Whether the step was recorded.
    pub verdict: Verdict,
    /// The task's counts after it, when the ledger keeps them.
    pub counts: Option<Counts>,
}

/// What a new leader learns about a task.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TakeOver {
    /// The newest instant on record: the previous leaders handled it, and those before it
    /// they had reached. `None` when the ledger has none (or keeps none: memory).
    pub newest: Option<DateTime<Utc>>,
    /// Instants an earlier leader claimed and never started, now claimed by this one: run them.
    pub unstarted: Vec<RunId>,
    /// Runs an older epoch started and has not finished: its process may still be running
    /// them (frozen, cut off), so the concurrency policy counts them until they must be over,
    /// then they are settled.
    pub in_flight: Vec<RunId>,
    /// How much longer the runs in flight may last, by the windows their starts recorded;
    /// `None` when one recorded none (an older release started it): the task's current
    /// [`crate::executor::RunSpec::longest`] stands in.
    pub in_flight_for: Option<Duration>,
    /// The task's counts, when the ledger keeps them.
    pub counts: Option<Counts>,
}

/// The ledger's answer to a claim or a mark.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Done: the run is this leader's (claim), or the step is recorded (mark).
    Accepted,
    /// Refused: the run's record does not allow it (another claim holds it, or it is over).
    Held(Record),
    /// Refused: a leader of a newer epoch has acted on this task; this one must stop.
    /// Fenced at this epoch.
    Fenced {
        /// The newer epoch.
        epoch: u64,
    },
    /// Refused ([`Mark::StartedAlone`]): another process's run of the task is in flight.
    Busy(Record),
}

impl Verdict {
    /// The answer to a claim asked again after an error: a record this very term claimed and
    /// has not started is its own claim, whose first answer was lost (Redis applied it, then
    /// `WAIT` or the timeout failed), so it is accepted. Only for a retry: a term never claims
    /// one instant twice otherwise.
    pub fn asked_again(self, term: &Term) -> Verdict {
        match self {
            Verdict::Held(record)
                if record.state == RunState::Claimed
                    && record.epoch == term.epoch
                    && *record.holder == *term.holder =>
            {
                Verdict::Accepted
            }
            other => other,
        }
    }
}

/// A step of a run, recorded with [`Ledger::mark`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mark {
    /// The action is about to start and is over within `window` (its attempts, their timeouts
    /// and the waits between them): refused (fenced) once a newer leader took the task over.
    /// A later leader that finds it in flight waits out what is left of `window` before it
    /// settles the run, whatever the task's spec says by then.
    Started {
        /// How long the run may last.
        window: Duration,
    },
    /// As [`Mark::Started`], for a task that runs alone (`Forbid`): refused as
    /// [`Verdict::Busy`] while a run of the task that another process (or term) started is in
    /// flight. This process's own runs are kept apart by its executor.
    StartedAlone {
        /// How long the run may last.
        window: Duration,
    },
    /// The action ended; counted in `runs` and `succeeded` or `failed`.
    Finished {
        /// Whether it succeeded.
        succeeded: bool,
    },
    /// The instant could not run (with `count` > 1: a catch-up skipped that many, this run's
    /// instant the newest); counted in `missed`, and never run afterwards (but by a backfill).
    Missed {
        /// How many instants.
        count: u64,
    },
    /// The run's start was asked and no answer came (a lost reply, `redis.wait_replicas` timed
    /// out): this process never began the action and never will. Counted missed as
    /// [`Mark::Missed`], and it also lands over the start should the start have landed: only
    /// this process, in this term, can have made it (a term starts a run once), so no run that
    /// did happen is undone.
    Abandoned,
}

/// One run's record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// How far the run got.
    pub state: RunState,
    /// The epoch of the leader that made the last step.
    pub epoch: u64,
    /// That leader's identity.
    pub holder: String,
}

/// How far a run got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunState {
    /// Claimed by a leader, not started.
    Claimed,
    /// Its action started.
    Started,
    /// It finished and succeeded.
    Succeeded,
    /// It finished and failed (or its outcome is unknown).
    Failed,
    /// It did not run.
    Missed,
    /// Older than the retention horizon: handled long ago, its record pruned.
    Unknown,
}

/// A task's counts, as the ledger's marks made them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Finished runs (succeeded + failed).
    pub runs: u64,
    /// Finished runs that succeeded.
    pub succeeded: u64,
    /// Finished runs that failed.
    pub failed: u64,
    /// Instants that did not run.
    pub missed: u64,
    /// Finished runs that run-now requests started (part of `runs`).
    pub manual: u64,
    /// Goes up with every change of the counts (0: the ledger numbers none): the newest counts
    /// win, even where a number went down (a backfilled instant is no longer missed).
    pub revision: u64,
}

/// The ledger could not answer (unreachable, timed out, or a reply it did not expect).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct LedgerError(pub String);
