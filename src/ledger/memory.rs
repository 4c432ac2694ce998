//! The in-process ledger, for one replica. Per task: the newest instant claimed and the first
//! one this process claimed (the engine claims a task's instants in ascending order, so "not
//! newer than the newest claim" is exactly "claimed before"), plus the few runs that do not
//! follow that order: run-now requests and backfilled instants. Memory is a small entry per task
//! however often it runs. It keeps no counts and no epochs (the status index counts; one
//! replica has nothing to fence), so its marks are accepted and a take-over learns nothing. It
//! knows only this process's runs: across a restart, the status (the last handled run-now
//! request, a backfill's progress) keeps them from running again.

use std::collections::{BTreeSet, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures::future::{BoxFuture, FutureExt};

use super::{Counts, Ledger, LedgerError, Mark, Marked, Record, RunState, TakeOver, Verdict};
use crate::run::Term;
use crate::run::{RunId, TaskId, TaskMap};

/// Run-now requests remembered per task.
const REQUESTS_KEPT: usize = 32;

/// Remembers, per task, which runs were claimed; a task unseen for `idle` is forgotten.
pub struct MemoryLedger {
    idle: Duration,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    tasks: TaskMap<TaskId, Claims>,
    last_prune: Option<Instant>,
}

/// One task's claims.
struct Claims {
    /// The first and the newest scheduled instant claimed in order: every instant between was
    /// handled by this process.
    first: Option<DateTime<Utc>>,
    newest: Option<DateTime<Utc>>,
    /// Instants claimed by backfills outside `first..=newest`.
    backfilled: BTreeSet<DateTime<Utc>>,
    /// Run-now requests claimed, oldest first.
    requests: VecDeque<String>,
    used: Instant,
}

fn held() -> Verdict {
    Verdict::Held(Record {
        state: RunState::Unknown,
        epoch: 0,
        holder: String::new(),
    })
}

impl MemoryLedger {
    /// How long a task's claims are kept after its last claim, unless said otherwise: a day.
    pub const IDLE: Duration = Duration::from_secs(24 * 3600);

    /// `idle`: how long a task's claims are kept after its last claim. A task that fires less
    /// often than that could, after it is forgotten, claim an old instant again; the engine
    /// never asks for one, so `idle` only bounds memory for deleted tasks.
    pub fn new(idle: Duration) -> Self {
        Self {
            idle,
            state: Mutex::default(),
        }
    }

    fn claim_now(&self, run: &RunId, past: bool, now: Instant) -> Verdict {
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
                .tasks
                .retain(|_, claims| now.duration_since(claims.used) < idle);
            state.last_prune = Some(now);
        }
        let claims = state
            .tasks
            .entry(run.task_id().clone())
            .or_insert_with(|| Claims {
                first: None,
                newest: None,
                backfilled: BTreeSet::new(),
                requests: VecDeque::new(),
                used: now,
            });
        claims.used = now;
        let instant = run.instant();
        if let Some(request) = run.request() {
            if claims.requests.iter().any(|r| r == request) {
                return held();
            }
            if claims.requests.len() == REQUESTS_KEPT {
                claims.requests.pop_front();
            }
            claims.requests.push_back(request.to_string());
            return Verdict::Accepted;
        }
        let in_order = claims
            .first
            .zip(claims.newest)
            .is_some_and(|(first, newest)| first <= instant && instant <= newest);
        if in_order || claims.backfilled.contains(&instant) {
            return held();
        }
        if past {
            claims.backfilled.insert(instant);
            return Verdict::Accepted;
        }
        if claims.newest.is_some_and(|newest| newest >= instant) {
            return held();
        }
        claims.first.get_or_insert(instant);
        claims.newest = Some(instant);
        // What the order now covers needs no entry of its own.
        let first = claims.first.unwrap_or(instant);
        claims.backfilled.retain(|t| *t < first || *t > instant);
        Verdict::Accepted
    }

    /// Tasks remembered.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.state.lock().unwrap().tasks.len()
    }
}

impl Ledger for MemoryLedger {
    fn claim<'a>(
        &'a self,
        run: &'a RunId,
        _term: &'a Term,
    ) -> BoxFuture<'a, Result<Verdict, LedgerError>> {
        let verdict = self.claim_now(run, false, Instant::now());
        async move { Ok(verdict) }.boxed()
    }

    fn claim_past<'a>(
        &'a self,
        run: &'a RunId,
        _term: &'a Term,
    ) -> BoxFuture<'a, Result<Verdict, LedgerError>> {
        let verdict = self.claim_now(run, true, Instant::now());
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

    fn adopt<'a>(
        &'a self,
        run: &'a RunId,
        _term: &'a Term,
    ) -> BoxFuture<'a, Result<Marked, LedgerError>> {
        // A run this process never claimed: one a previous process started (status says so).
        let marked = Marked {
            verdict: self.claim_now(run, true, Instant::now()),
            counts: None,
        };
        async move { Ok(marked) }.boxed()
    }

    fn take_over<'a>(
        &'a self,
        _task: &'a TaskId,
        _term: &'a Term,
        _settle: &'a [RunId],
        _seed: Option<Counts>,
    ) -> BoxFuture<'a, Result<TakeOver, LedgerError>> {
        async move { Ok(TakeOver::default()) }.boxed()
    }

    /// One process: nobody else hands out epochs, so the Lease's count is enough.
    fn next_epoch(&self, floor: u64) -> BoxFuture<'_, Result<u64, LedgerError>> {
        async move { Ok(floor) }.boxed()
    }

    /// This process's clock is the only one.
    fn server_time(&self) -> BoxFuture<'_, Result<Option<DateTime<Utc>>, LedgerError>> {
        async move { Ok(None) }.boxed()
    }

    /// One process: no other term.
    fn holds<'a>(
        &'a self,
        _task: &'a TaskId,
        _term: &'a Term,
    ) -> BoxFuture<'a, Result<bool, LedgerError>> {
        async move { Ok(true) }.boxed()
    }

    fn forget<'a>(
        &'a self,
        task: &'a TaskId,
        _grace: Duration,
    ) -> BoxFuture<'a, Result<(), LedgerError>> {
        async move {
            let mut state = self
                .state
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            state.tasks.remove(task);
            Ok(())
        }
        .boxed()
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

    #[test]
    fn backfills_run_what_this_process_did_not_and_requests_run_once() {
        let dedup = MemoryLedger::new(Duration::from_secs(3600));
        let task = id("t");
        let t0 = Instant::now();
        let claim =
            |second: i64, past: bool| dedup.claim_now(&RunId::new(&task, at(second)), past, t0);
        for second in 10..=20 {
            assert_eq!(claim(second, false), Verdict::Accepted);
        }
        // Before this process's first claim: unknown here, so a backfill runs it, once.
        assert_eq!(claim(5, true), Verdict::Accepted);
        assert_eq!(claim(5, true), DUPLICATE);
        // This process ran 10..=20.
        assert_eq!(claim(15, true), DUPLICATE);
        // Not yet due: a backfill that reaches it first keeps the schedule from running it twice.
        assert_eq!(claim(22, true), Verdict::Accepted);
        assert_eq!(claim(21, false), Verdict::Accepted);
        assert_eq!(claim(22, false), DUPLICATE);
        assert_eq!(claim(23, false), Verdict::Accepted);

        let request = RunId::manual(&task, "2026-01-01T00:00:00Z", at(30));
        assert_eq!(dedup.claim_now(&request, false, t0), Verdict::Accepted);
        let again = RunId::manual(&task, "2026-01-01T00:00:00Z", at(40));
        assert_eq!(dedup.claim_now(&again, false, t0), DUPLICATE);
        assert_eq!(
            claim(24, false),
            Verdict::Accepted,
            "requests leave the order alone"
        );
    }

    fn id(name: &str) -> TaskId {
        TaskId::new(crate::run::TaskKey::new("ns", name), format!("uid-{name}"))
    }

    fn at(second: i64) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap() + chrono::Duration::seconds(second)
    }

    #[test]
    fn an_instant_is_claimed_once_and_older_ones_never_again() {
        let dedup = MemoryLedger::new(Duration::from_secs(3600));
        let task = id("t");
        let t0 = Instant::now();
        assert_eq!(
            dedup.claim_now(&RunId::new(&task, at(1)), false, t0),
            Verdict::Accepted
        );
        assert_eq!(
            dedup.claim_now(&RunId::new(&task, at(1)), false, t0),
            DUPLICATE
        );
        assert_eq!(
            dedup.claim_now(&RunId::new(&task, at(2)), false, t0),
            Verdict::Accepted
        );
        assert_eq!(
            dedup.claim_now(&RunId::new(&task, at(1)), false, t0),
            DUPLICATE
        );
        let other = id("other");
        assert_eq!(
            dedup.claim_now(&RunId::new(&other, at(1)), false, t0),
            Verdict::Accepted
        );
    }

    #[test]
    fn memory_is_one_entry_per_task_however_many_runs() {
        // An hour of a 1 s task: 3600 claims, one entry. The set of run ids it replaces held
        // all 3600 for a day (~257 B each).
        let dedup = MemoryLedger::new(Duration::from_secs(24 * 3600));
        let task = id("every-second");
        let t0 = Instant::now();
        for second in 0..3600 {
            let now = t0 + Duration::from_secs(second as u64);
            assert_eq!(
                dedup.claim_now(&RunId::new(&task, at(second)), false, now),
                Verdict::Accepted
            );
        }
        assert_eq!(dedup.len(), 1);
    }

    #[test]
    fn idle_tasks_are_forgotten() {
        let dedup = MemoryLedger::new(Duration::from_secs(60));
        let t0 = Instant::now();
        dedup.claim_now(&RunId::new(&id("gone"), at(0)), false, t0);
        let later = t0 + Duration::from_secs(61);
        dedup.claim_now(&RunId::new(&id("alive"), at(61)), false, later);
        assert_eq!(dedup.len(), 1);
    }

    #[test]
    fn a_task_created_again_under_its_name_starts_afresh() {
        let dedup = MemoryLedger::new(Duration::from_secs(60));
        let t0 = Instant::now();
        let old = id("t");
        let new = TaskId::new(old.key.clone(), "uid-again");
        assert_eq!(
            dedup.claim_now(&RunId::new(&old, at(5)), false, t0),
            Verdict::Accepted
        );
        assert_eq!(
            dedup.claim_now(&RunId::new(&new, at(3)), false, t0),
            Verdict::Accepted
        );
        assert_eq!(
            dedup.claim_now(&RunId::new(&old, at(4)), false, t0),
            DUPLICATE
        );
        futures::executor::block_on(dedup.forget(&old, Duration::ZERO)).unwrap();
        assert_eq!(dedup.len(), 1);
    }
}
