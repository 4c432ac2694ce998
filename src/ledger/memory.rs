//! The in-process ledger, for one replica: per task, the newest instant claimed. The engine
//! claims a task's instants in ascending order, so "not newer than the newest claim" is exactly
//! "claimed before", and the memory used is one entry per task however often it runs. It keeps
//! no counts and no epochs (the status index counts; one replica has nothing to fence), so its
//! marks are accepted and a take-over learns nothing.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures::future::{BoxFuture, FutureExt};

use super::{Ledger, LedgerError, Mark, Marked, Record, RunState, TakeOver, Verdict};
use crate::leader::Term;
use crate::run::{RunId, TaskKey};

/// Remembers, per task, the newest claimed instant; a task unseen for `idle` is forgotten.
pub struct MemoryLedger {
    idle: Duration,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    newest: HashMap<TaskKey, Watermark>,
    last_prune: Option<Instant>,
}

struct Watermark {
    instant: DateTime<Utc>,
    used: Instant,
}

impl MemoryLedger {
    /// `idle`: how long a task's watermark is kept after its last claim. A task that fires
    /// less often than that could, after it is forgotten, claim an old instant again; the engine
    /// never asks for one, so `idle` only bounds memory for deleted tasks.
    pub fn new(idle: Duration) -> Self {
        Self {
            idle,
            state: Mutex::default(),
        }
    }

    fn claim_now(&self, run: &RunId, now: Instant) -> Verdict {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if state
            .last_prune
            .is_none_or(|at| now.duration_since(at) >= self.idle)
        {
            let idle = self.idle;
            state
                .newest
                .retain(|_, mark| now.duration_since(mark.used) < idle);
            state.last_prune = Some(now);
        }
        let mark = Watermark {
            instant: run.instant(),
            used: now,
        };
        match state.newest.get_mut(run.task()) {
            Some(newest) if newest.instant >= run.instant() => Verdict::Held(Record {
                state: RunState::Unknown,
                epoch: 0,
                holder: String::new(),
            }),
            Some(newest) => {
                *newest = mark;
                Verdict::Accepted
            }
            None => {
                state.newest.insert(run.task().clone(), mark);
                Verdict::Accepted
            }
        }
    }

    /// Tasks remembered.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.state.lock().unwrap().newest.len()
    }
}

impl Ledger for MemoryLedger {
    fn claim<'a>(
        &'a self,
        run: &'a RunId,
        _term: &'a Term,
    ) -> BoxFuture<'a, Result<Verdict, LedgerError>> {
        let verdict = self.claim_now(run, Instant::now());
        async move { Ok(verdict) }.boxed()
    }

    fn mark<'a>(
        &'a self,
        _run: &'a RunId,
        _term: &'a Term,
        _mark: Mark,
    ) -> BoxFuture<'a, Result<Marked, LedgerError>> {
        let marked = Marked {
            verdict: Verdict::Accepted,
            counts: None,
        };
        async move { Ok(marked) }.boxed()
    }

    fn take_over<'a>(
        &'a self,
        _task: &'a TaskKey,
        _term: &'a Term,
        _settle: bool,
    ) -> BoxFuture<'a, Result<TakeOver, LedgerError>> {
        async move { Ok(TakeOver::default()) }.boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    const DUPLICATE: Verdict = Verdict::Held(Record {
        state: RunState::Unknown,
        epoch: 0,
        holder: String::new(),
    });

    fn at(second: i64) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap() + chrono::Duration::seconds(second)
    }

    #[test]
    fn an_instant_is_claimed_once_and_older_ones_never_again() {
        let dedup = MemoryLedger::new(Duration::from_secs(3600));
        let task = TaskKey::new("ns", "t");
        let t0 = Instant::now();
        assert_eq!(
            dedup.claim_now(&RunId::new(&task, at(1)), t0),
            Verdict::Accepted
        );
        assert_eq!(dedup.claim_now(&RunId::new(&task, at(1)), t0), DUPLICATE);
        assert_eq!(
            dedup.claim_now(&RunId::new(&task, at(2)), t0),
            Verdict::Accepted
        );
        assert_eq!(dedup.claim_now(&RunId::new(&task, at(1)), t0), DUPLICATE);
        let other = TaskKey::new("ns", "other");
        assert_eq!(
            dedup.claim_now(&RunId::new(&other, at(1)), t0),
            Verdict::Accepted
        );
    }

    #[test]
    fn memory_is_one_entry_per_task_however_many_runs() {
        // An hour of a 1 s task: 3600 claims, one entry. The set of run ids it replaces held
        // all 3600 for a day (~257 B each).
        let dedup = MemoryLedger::new(Duration::from_secs(24 * 3600));
        let task = TaskKey::new("ns", "every-second");
        let t0 = Instant::now();
        for second in 0..3600 {
            let now = t0 + Duration::from_secs(second as u64);
            assert_eq!(
                dedup.claim_now(&RunId::new(&task, at(second)), now),
                Verdict::Accepted
            );
        }
        assert_eq!(dedup.len(), 1);
    }

    #[test]
    fn idle_tasks_are_forgotten() {
        let dedup = MemoryLedger::new(Duration::from_secs(60));
        let t0 = Instant::now();
        dedup.claim_now(&RunId::new(&TaskKey::new("ns", "gone"), at(0)), t0);
        let later = t0 + Duration::from_secs(61);
        dedup.claim_now(&RunId::new(&TaskKey::new("ns", "alive"), at(61)), later);
        assert_eq!(dedup.len(), 1);
    }
}
