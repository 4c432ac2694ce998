//! Marks that must land, and reach the ledger in order. A `finished` mark (the run happened:
//! its outcome must be counted) or a `missed` one the ledger could not take when it was made
//! (Redis away, a timeout) is kept in memory, per task, and sent again until it lands. A task's
//! missed marks coalesce into one count beyond [`KEPT_PER_TASK`] entries, so an outage at any
//! firing rate leaves a bounded backlog (`chronflow_ledger_marks_pending`) and no task per
//! instant.
//!
//! A task's claims and kept marks take turns: a claim is sent only after the missed marks kept
//! before it landed, and a claim the ledger could not answer leaves its instant's miss kept
//! here before the next claim of the task is sent. So a record in the ledger means every
//! earlier instant of its term is recorded too. Every kept mark is sent until the ledger answers,
//! whatever became of its term: a batch of claims in flight when the term ended may still land,
//! and the misses before it must land first. Once a newer term took the task over, the ledger
//! fences the old term's marks and claims, and the newer term counts their instants in the gap
//! after the newest record. A kept finished mark lands even then: the ledger takes the end of a
//! run its own term started.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::future::{BoxFuture, FutureExt, join_all};
use tokio::sync::{Notify, watch};
use tracing::{debug, info};

use super::{Counts, Ledger, LedgerError, Mark, Marked, TakeOver, Verdict};
use crate::run::{MissKind, Report, ReportSink, RunId, TaskId, TaskMap, Term};
use crate::shard::Terms;

/// Entries kept per task before its missed marks coalesce.
pub const KEPT_PER_TASK: usize = 64;

/// Tasks whose marks are sent at once in one round.
const ROUND: usize = 32;

/// The longest pause between two rounds while the ledger refuses.
const MAX_WAIT: Duration = Duration::from_secs(30);

/// A ledger whose failed `finished` and `missed` marks are kept and retried until they land, and
/// whose claims of a task wait for the task's kept missed marks; the counts the marks bring
/// back are reported to `sink`.
pub struct RetriedMarks {
    inner: Arc<dyn Ledger>,
    sink: Arc<dyn ReportSink>,
    tasks: Mutex<TaskMap<TaskId, TaskMarks>>,
    next_id: AtomicU64,
    wake: Notify,
}

#[derive(Default)]
struct TaskMarks {
    kept: VecDeque<Kept>,
    /// Held by whoever sends the task's claims or kept marks: one at a time, in the order they
    /// asked (a tokio mutex queues its waiters fairly).
    turn: Arc<tokio::sync::Mutex<()>>,
}

#[derive(Clone, Debug)]
struct Kept {
    id: u64,
    run: RunId,
    term: Term,
    mark: Mark,
}

impl RetriedMarks {
    /// Wraps `inner`; the retry loop runs on the current tokio runtime from now on.
    pub fn new(inner: Arc<dyn Ledger>, sink: Arc<dyn ReportSink>) -> Arc<Self> {
        let marks = Arc::new(Self {
            inner,
            sink,
            tasks: Mutex::default(),
            next_id: AtomicU64::new(0),
            wake: Notify::new(),
        });
        tokio::spawn(marks.clone().retry());
        marks
    }

    /// Marks kept, waiting to be sent again.
    pub fn pending(&self) -> usize {
        self.lock().values().map(|t| t.kept.len()).sum()
    }

    /// Keeps a missed mark at once and sends it in its task's turn: a claim of the task made
    /// from now on waits for it.
    pub fn missed(self: &Arc<Self>, run: &RunId, term: &Term, count: u64) {
        self.keep(run, term, Mark::Missed { count });
        let (marks, task) = (self.clone(), run.task_id().clone());
        tokio::spawn(async move {
            if let Err(error) = marks.in_turn(&task, marks.send_kept(&task)).await {
                debug!(%task, %error, "cannot record a missed run yet");
            }
        });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, TaskMap<TaskId, TaskMarks>> {
        self.tasks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn keep(&self, run: &RunId, term: &Term, mark: Mark) {
        let mut tasks = self.lock();
        let queue = &mut tasks.entry(run.task_id().clone()).or_default().kept;
        if let Mark::Missed { count } = mark {
            let missed = |k: &Kept| matches!(k.mark, Mark::Missed { .. }) && k.term == *term;
            // Never into the first entry: it may be on its way to the ledger.
            let full = queue.iter().filter(|k| missed(k)).count() >= KEPT_PER_TASK;
            if let Some(newest) = queue.iter_mut().skip(1).rev().find(|k| missed(k))
                && full
            {
                if let Mark::Missed { count: total } = &mut newest.mark {
                    *total += count;
                }
                if run.instant() > newest.run.instant() {
                    newest.run = run.clone();
                }
                return;
            }
        }
        queue.push_back(Kept {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            run: run.clone(),
            term: term.clone(),
            mark,
        });
        drop(tasks);
        self.wake.notify_one();
    }

    /// Runs `work` in `task`'s turn: after every claim and send of the task asked before.
    async fn in_turn<T>(&self, task: &TaskId, work: impl Future<Output = T>) -> T {
        let turn = self.lock().entry(task.clone()).or_default().turn.clone();
        let done = {
            let _turn = turn.lock().await;
            work.await
        };
        drop(turn);
        let mut tasks = self.lock();
        // Nobody holds or waits for the turn, and nothing is kept: the task is done with.
        if let Some(marks) = tasks.get(task)
            && marks.kept.is_empty()
            && Arc::strong_count(&marks.turn) == 1
        {
            tasks.remove(task);
        }
        done
    }

    /// Sends `task`'s kept marks, oldest first, until none is left or one is refused; call it
    /// in the task's turn.
    async fn send_kept(&self, task: &TaskId) -> Result<(), LedgerError> {
        loop {
            let head = match self.lock().get(task).and_then(|marks| marks.kept.front()) {
                Some(head) => head.clone(),
                None => return Ok(()),
            };
            let marked = self.inner.mark(&head.run, &head.term, head.mark).await?;
            debug!(run_id = %head.run, verdict = ?marked.verdict, "a kept mark landed");
            if let Some(counts) = marked.counts {
                self.sink.record(Report::Counts {
                    task: task.clone(),
                    counts,
                });
            }
            if let Some(marks) = self.lock().get_mut(task) {
                marks.kept.retain(|k| k.id != head.id);
            }
        }
    }

    /// Sends the kept marks of each task, round after round, pausing (with backoff) after a
    /// round the ledger refused.
    async fn retry(self: Arc<Self>) {
        let mut wait = Duration::from_secs(1);
        loop {
            let round: Vec<TaskId> = self
                .lock()
                .iter()
                .filter(|(_, marks)| !marks.kept.is_empty())
                .map(|(task, _)| task.clone())
                .take(ROUND)
                .collect();
            if round.is_empty() {
                self.wake.notified().await;
                continue;
            }
            let sent = join_all(
                round
                    .iter()
                    .map(|task| self.in_turn(task, self.send_kept(task))),
            );
            let refused = sent.await.iter().any(Result::is_err);
            if refused {
                debug!("kept marks are refused still");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(MAX_WAIT);
            } else {
                if wait > Duration::from_secs(1) {
                    info!("the ledger takes marks again; sending those kept meanwhile");
                }
                wait = Duration::from_secs(1);
            }
        }
    }
}

/// Records missed instants in the ledger, then hands every report on: each mark is kept at
/// once and sent in its task's turn (kept and sent again while Redis is away), so a claim of the
/// task made after the report waits for it. A miss because the ledger could not take the run's
/// claim or start ([`MissKind::Claim`]) was kept by [`RetriedMarks`] itself.
pub struct RecordMissed {
    /// Where missed runs are marked.
    pub ledger: Arc<RetriedMarks>,
    /// The terms missed runs are marked under: each in its shard's.
    pub leader: watch::Receiver<Terms>,
    /// Where every report goes on.
    pub inner: Arc<dyn ReportSink>,
}

impl ReportSink for RecordMissed {
    fn record(&self, report: Report) {
        if let Report::Missed {
            count, run, kind, ..
        } = &report
            && *kind != MissKind::Claim
            && let Some(term) = self.leader.borrow().task(&run.task_id().uid).cloned()
        {
            self.ledger.missed(run, &term, *count);
        }
        self.inner.record(report);
    }
}

impl Ledger for RetriedMarks {
    /// Sent in the task's turn, after the missed marks kept before it landed (refused with
    /// their error while they cannot). A claim of a scheduled instant that fails keeps the
    /// instant's miss: whoever reports the miss leaves the mark to this ledger
    /// ([`RecordMissed`]).
    fn claim<'a>(
        &'a self,
        run: &'a RunId,
        term: &'a Term,
    ) -> BoxFuture<'a, Result<Verdict, LedgerError>> {
        let claim = async move {
            let verdict = match self.send_kept(run.task_id()).await {
                Ok(()) => self.inner.claim(run, term).await,
                Err(error) => Err(error),
            };
            // A run-now request is asked again instead (its claim fixes no order).
            if verdict.is_err() && run.request().is_none() {
                self.keep(run, term, Mark::Missed { count: 1 });
            }
            verdict
        };
        self.in_turn(run.task_id(), claim).boxed()
    }

    /// Sent in the task's turn, after the missed marks kept before it landed. One that fails
    /// keeps nothing: a backfill asks again.
    fn claim_past<'a>(
        &'a self,
        run: &'a RunId,
        term: &'a Term,
    ) -> BoxFuture<'a, Result<Verdict, LedgerError>> {
        let claim = async move {
            self.send_kept(run.task_id()).await?;
            self.inner.claim_past(run, term).await
        };
        self.in_turn(run.task_id(), claim).boxed()
    }

    /// A `finished` mark that fails is kept and sent again until it lands; a start that fails
    /// keeps the run's miss (it will not start); a `missed` mark is sent in the task's turn
    /// and kept when it fails. The caller still learns of the failure.
    fn mark<'a>(
        &'a self,
        run: &'a RunId,
        term: &'a Term,
        mark: Mark,
    ) -> BoxFuture<'a, Result<Marked, LedgerError>> {
        let send = async move {
            let result = self.inner.mark(run, term, mark).await;
            match mark {
                _ if result.is_ok() => {}
                Mark::Started { .. } | Mark::StartedAlone { .. } => {
                    self.keep(run, term, Mark::Abandoned);
                }
                Mark::Finished { .. } | Mark::Missed { .. } | Mark::Abandoned => {
                    self.keep(run, term, mark)
                }
            }
            result
        };
        match mark {
            Mark::Missed { .. } | Mark::Abandoned => {
                let in_order = async move {
                    if let Err(error) = self.send_kept(run.task_id()).await {
                        self.keep(run, term, mark);
                        return Err(error);
                    }
                    send.await
                };
                self.in_turn(run.task_id(), in_order).boxed()
            }
            _ => send.boxed(),
        }
    }

    fn adopt<'a>(
        &'a self,
        run: &'a RunId,
        term: &'a Term,
    ) -> BoxFuture<'a, Result<Marked, LedgerError>> {
        self.inner.adopt(run, term)
    }

    fn take_over<'a>(
        &'a self,
        task: &'a TaskId,
        term: &'a Term,
        settle: &'a [RunId],
        seed: Option<Counts>,
    ) -> BoxFuture<'a, Result<TakeOver, LedgerError>> {
        self.inner.take_over(task, term, settle, seed)
    }

    fn next_epoch(&self, floor: u64) -> BoxFuture<'_, Result<u64, LedgerError>> {
        self.inner.next_epoch(floor)
    }

    fn holds<'a>(
        &'a self,
        task: &'a TaskId,
        term: &'a Term,
    ) -> BoxFuture<'a, Result<bool, LedgerError>> {
        self.inner.holds(task, term)
    }

    fn server_time(&self) -> BoxFuture<'_, Result<Option<DateTime<Utc>>, LedgerError>> {
        self.inner.server_time()
    }

    fn forget<'a>(
        &'a self,
        task: &'a TaskId,
        grace: Duration,
    ) -> BoxFuture<'a, Result<(), LedgerError>> {
        self.inner.forget(task, grace)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::run::TaskKey;
    use chrono::TimeZone;

    /// A ledger that logs what reaches it; the claim of instant 0 waits for `release`, then
    /// fails (Redis stalled, then timed out).
    #[derive(Default)]
    struct Stalled {
        log: Mutex<Vec<String>>,
        release: Notify,
        /// Marks fail while set, unlogged (Redis away).
        down: std::sync::atomic::AtomicBool,
    }

    impl Ledger for Stalled {
        fn claim<'a>(
            &'a self,
            run: &'a RunId,
            _: &'a Term,
        ) -> BoxFuture<'a, Result<Verdict, LedgerError>> {
            async move {
                self.log
                    .lock()
                    .unwrap()
                    .push(format!("claim {}", run.instant().timestamp()));
                if run.instant().timestamp() == 0 {
                    self.release.notified().await;
                    return Err(LedgerError("timed out".into()));
                }
                Ok(Verdict::Accepted)
            }
            .boxed()
        }

        fn claim_past<'a>(
            &'a self,
            run: &'a RunId,
            term: &'a Term,
        ) -> BoxFuture<'a, Result<Verdict, LedgerError>> {
            self.claim(run, term)
        }

        fn mark<'a>(
            &'a self,
            run: &'a RunId,
            _: &'a Term,
            mark: Mark,
        ) -> BoxFuture<'a, Result<Marked, LedgerError>> {
            if self.down.load(Ordering::SeqCst) {
                return async { Err(LedgerError("refused".into())) }.boxed();
            }
            let entry = format!("{mark:?} {}", run.instant().timestamp());
            self.log.lock().unwrap().push(entry);
            let marked = Marked {
                verdict: Verdict::Accepted,
                counts: None,
            };
            async move { Ok(marked) }.boxed()
        }

        fn adopt<'a>(
            &'a self,
            _: &'a RunId,
            _: &'a Term,
        ) -> BoxFuture<'a, Result<Marked, LedgerError>> {
            unimplemented!()
        }

        fn take_over<'a>(
            &'a self,
            _: &'a TaskId,
            _: &'a Term,
            _: &'a [RunId],
            _: Option<Counts>,
        ) -> BoxFuture<'a, Result<TakeOver, LedgerError>> {
            unimplemented!()
        }

        fn next_epoch(&self, _: u64) -> BoxFuture<'_, Result<u64, LedgerError>> {
            unimplemented!()
        }

        fn holds<'a>(
            &'a self,
            _: &'a TaskId,
            _: &'a Term,
        ) -> BoxFuture<'a, Result<bool, LedgerError>> {
            unimplemented!()
        }

        fn server_time(&self) -> BoxFuture<'_, Result<Option<DateTime<Utc>>, LedgerError>> {
            unimplemented!()
        }

        fn forget<'a>(
            &'a self,
            _: &'a TaskId,
            _: Duration,
        ) -> BoxFuture<'a, Result<(), LedgerError>> {
            unimplemented!()
        }
    }

    /// A [`RetriedMarks`] over a [`Stalled`] ledger, and where its reports go.
    fn stalled() -> (
        Arc<Stalled>,
        Arc<RetriedMarks>,
        tokio::sync::mpsc::UnboundedReceiver<Report>,
    ) {
        let inner = Arc::new(Stalled::default());
        let (reports, received) = tokio::sync::mpsc::unbounded_channel::<Report>();
        let marks = RetriedMarks::new(inner.clone(), Arc::new(reports));
        (inner, marks, received)
    }

    /// The run of task ns/t at `second`.
    fn run(second: i64) -> RunId {
        let task = TaskId::new(TaskKey::new("ns", "t"), "uid");
        RunId::new(&task, Utc.timestamp_opt(second, 0).unwrap())
    }

    /// A claim made while an earlier claim of the task hangs waits for it; the earlier one
    /// failing, its miss reaches the ledger before the later claim does.
    #[tokio::test]
    async fn a_claim_waits_for_an_earlier_one_and_for_its_miss() {
        let (inner, marks, _received) = stalled();
        let term = Term::single("a#1");

        let (first, second) = (run(0), run(1));
        let (earlier, later) = (marks.clone(), marks.clone());
        let (term_a, term_b) = (term.clone(), term.clone());
        let first = tokio::spawn(async move { earlier.claim(&first, &term_a).await });
        while inner.log.lock().unwrap().is_empty() {
            tokio::task::yield_now().await;
        }
        let second = tokio::spawn(async move { later.claim(&second, &term_b).await });
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        inner.release.notify_one();
        assert!(first.await.unwrap().is_err());
        assert_eq!(second.await.unwrap(), Ok(Verdict::Accepted));
        assert_eq!(
            *inner.log.lock().unwrap(),
            ["claim 0", "Missed { count: 1 } 0", "claim 1"],
        );
        assert_eq!(marks.pending(), 0);
    }

    /// A miss kept while the ledger refused reaches it before the task's next claim, even when
    /// that claim comes from a term that ended meanwhile (a batch in flight when the Lease
    /// went): a claim that lands never leaves an earlier instant neither run nor counted. When
    /// a newer term took the task over, the ledger fences both.
    #[tokio::test]
    async fn a_kept_miss_reaches_the_ledger_before_the_next_claim_whatever_its_term() {
        let (inner, marks, _received) = stalled();
        let term = Term::single("a#1");

        inner.down.store(true, Ordering::SeqCst);
        let (first, earlier, term_a) = (run(0), marks.clone(), term.clone());
        let first = tokio::spawn(async move { earlier.claim(&first, &term_a).await });
        while inner.log.lock().unwrap().is_empty() {
            tokio::task::yield_now().await;
        }
        inner.release.notify_one();
        assert!(first.await.unwrap().is_err());
        assert_eq!(marks.pending(), 1);
        inner.down.store(false, Ordering::SeqCst);
        assert_eq!(marks.claim(&run(1), &term).await, Ok(Verdict::Accepted));
        assert_eq!(
            *inner.log.lock().unwrap(),
            ["claim 0", "Missed { count: 1 } 0", "claim 1"],
        );
        assert_eq!(marks.pending(), 0);
    }
}
