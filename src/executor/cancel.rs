//! Why runs stop early: a task's runs withdrawn (`Retire`), and the cancel handle of a run in
//! flight, which remembers why it was cancelled.

use std::sync::{Arc, OnceLock};

use tokio_util::sync::CancellationToken;

use crate::run::RunId;

/// Why a task's runs are withdrawn.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Retire {
    /// The task was deleted (or replaced by a new object of the same name): waiting runs are
    /// dropped, runs in flight cancelled.
    Deleted,
    /// Paused: waiting runs are dropped; runs in flight finish.
    Paused,
    /// The spec became invalid: waiting runs are dropped, runs in flight cancelled.
    Invalid(String),
    /// The spec changed: runs waiting under the old spec are dropped; runs in flight finish.
    Edited,
}

/// Why a run in flight was stopped; it is reported as failed with this in its message.
#[derive(Clone, Debug)]
pub(super) enum CancelReason {
    Replaced(RunId),
    Deleted,
    Invalid(String),
    Shutdown,
}

impl std::fmt::Display for CancelReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CancelReason::Replaced(by) => write!(f, "cancelled: replaced by {by}"),
            CancelReason::Deleted => f.write_str("cancelled: the task was deleted"),
            CancelReason::Invalid(why) => write!(f, "cancelled: the spec became invalid: {why}"),
            CancelReason::Shutdown => f.write_str(
                "cancelled: chronflow shut down and the run outlasted the shutdown grace period",
            ),
        }
    }
}

/// Cancels a run in flight, remembering why.
#[derive(Clone, Default)]
pub(super) struct Cancel {
    pub(super) token: CancellationToken,
    pub(super) reason: Arc<OnceLock<CancelReason>>,
    /// The run's work goes on without this process (a Job): a shutdown lets go of it at once,
    /// and it holds none of its namespace's share of workers.
    pub(super) outlives_process: bool,
}

impl Cancel {
    pub(super) fn cancel(&self, reason: CancelReason) {
        let _ = self.reason.set(reason);
        self.token.cancel();
    }

    /// The same run's handle (clones of one handle are the same).
    pub(super) fn same(&self, other: &Cancel) -> bool {
        Arc::ptr_eq(&self.reason, &other.reason)
    }
}
