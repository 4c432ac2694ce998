//! This replica's clock against the run ledger's (Redis `TIME`): a replica fires by its own
//! clock, so one whose clock runs ahead claims instants before they are due (and every later
//! owner stays silent for the difference), one behind fires late. Beyond
//! `leader_election.max_clock_skew` it runs nothing: the elector does not lead, a sharded
//! replica stands by (`src/handover.rs`). The last measure is `chronflow_clock_skew_milliseconds`.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use crate::ledger::Ledger;

/// Measures the skew against `ledger`, within `bound`.
pub struct ClockCheck {
    ledger: Arc<dyn Ledger>,
    bound: Duration,
    skew: Arc<AtomicI64>,
}

impl ClockCheck {
    /// Checks against `ledger`'s clock; a zero `bound` turns the check off.
    pub fn new(ledger: Arc<dyn Ledger>, bound: Duration) -> Self {
        Self {
            ledger,
            bound,
            skew: Arc::default(),
        }
    }

    /// The local clock minus the ledger's, in milliseconds, as last measured (0 before).
    pub fn skew(&self) -> Arc<AtomicI64> {
        self.skew.clone()
    }

    /// `Err` says by how much the clock is off; a ledger without a clock of its own, or one
    /// that cannot answer now, passes.
    pub async fn check(&self) -> Result<(), String> {
        if self.bound.is_zero() {
            return Ok(());
        }
        let asked = chrono::Utc::now();
        let Ok(Some(theirs)) = self.ledger.server_time().await else {
            return Ok(());
        };
        let answered = chrono::Utc::now();
        let ours = asked + (answered - asked) / 2;
        let skew = ours - theirs;
        self.skew.store(skew.num_milliseconds(), Ordering::Relaxed);
        let limit = chrono::Duration::from_std(self.bound).unwrap_or(chrono::TimeDelta::MAX);
        if skew.abs() <= limit {
            return Ok(());
        }
        Err(format!(
            "this replica's clock is {} ms {} the Redis ledger's, more than \
             leader_election.max_clock_skew ({}): it runs nothing until they agree (check NTP \
             on its node)",
            skew.num_milliseconds().abs(),
            if skew > chrono::TimeDelta::zero() {
                "ahead of"
            } else {
                "behind"
            },
            crate::schedule::format_duration(self.bound)
        ))
    }
}
