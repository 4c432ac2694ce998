//! Marks that must land. A `finished` mark (the run happened: its outcome must be counted) or a
//! `missed` one that the ledger could not take when it was made (Redis away, a timeout) is kept
//! in memory, per task, and sent again by one loop until it lands. A task's missed marks
//! coalesce into one count beyond [`KEPT_PER_TASK`] entries, so an outage at any firing rate
//! leaves a bounded backlog (`chronflow_ledger_marks_pending`) and no task per instant.
//!
//! A kept missed mark is dropped once its term ends: the next leader counts what fell due in the
//! gap when it takes the task over. A kept finished mark is sent whatever the term: the ledger
//! takes the end of a run its own term started even after a newer term fenced the task.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::future::{BoxFuture, FutureExt, join_all};
use tokio::sync::{Notify, watch};
use tracing::{debug, info};

use super::{Counts, Ledger, LedgerError, Mark, Marked, TakeOver, Verdict};
use crate::run::{Report, ReportSink, RunId, TaskId, Term};

/// Entries kept per task before its missed marks coalesce.
pub const KEPT_PER_TASK: usize = 64;

/// Tasks whose marks are sent at once in one round.
const ROUND: usize = 32;

/// The longest pause between two rounds while the ledger refuses.
const MAX_WAIT: Duration = Duration::from_secs(30);

/// A ledger whose failed `finished` and `missed` marks are kept and retried until they land;
/// the counts they bring back are reported to `sink`.
pub struct RetriedMarks {
    inner: Arc<dyn Ledger>,
    leader: watch::Receiver<Option<Term>>,
    sink: Arc<dyn ReportSink>,
    kept: Mutex<HashMap<TaskId, VecDeque<Kept>>>,
    wake: Notify,
}

#[derive(Clone, Debug)]
struct Kept {
    run: RunId,
    term: Term,
    mark: Mark,
}

impl RetriedMarks {
    /// Wraps `inner`; the retry loop runs on the current tokio runtime from now on.
    pub fn new(
        inner: Arc<dyn Ledger>,
        leader: watch::Receiver<Option<Term>>,
        sink: Arc<dyn ReportSink>,
    ) -> Arc<Self> {
        let marks = Arc::new(Self {
            inner,
            leader,
            sink,
            kept: Mutex::default(),
            wake: Notify::new(),
        });
        tokio::spawn(marks.clone().retry());
        marks
    }

    /// Marks kept, waiting to be sent again.
    pub fn pending(&self) -> usize {
        self.lock().values().map(VecDeque::len).sum()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<TaskId, VecDeque<Kept>>> {
        self.kept
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn keep(&self, run: &RunId, term: &Term, mark: Mark) {
        let mut kept = self.lock();
        let queue = kept.entry(run.task_id().clone()).or_default();
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
            run: run.clone(),
            term: term.clone(),
            mark,
        });
        drop(kept);
        self.wake.notify_one();
    }

    /// Sends the first kept mark of each task, round after round, pausing (with backoff) after
    /// a round the ledger refused.
    async fn retry(self: Arc<Self>) {
        let mut wait = Duration::from_secs(1);
        loop {
            let heads: Vec<Kept> = {
                let mut kept = self.lock();
                let term = self.leader.borrow().clone();
                for queue in kept.values_mut() {
                    // A missed mark of a term that ended: the next one counts the gap itself.
                    queue.retain(|k| {
                        !matches!(k.mark, Mark::Missed { .. }) || Some(&k.term) == term.as_ref()
                    });
                }
                kept.retain(|_, queue| !queue.is_empty());
                kept.values()
                    .filter_map(|queue| queue.front().cloned())
                    .take(ROUND)
                    .collect()
            };
            if heads.is_empty() {
                self.wake.notified().await;
                continue;
            }
            let sent = join_all(
                heads
                    .iter()
                    .map(|k| self.inner.mark(&k.run, &k.term, k.mark)),
            );
            let mut refused = false;
            for (head, result) in heads.iter().zip(sent.await) {
                match result {
                    Ok(marked) => {
                        debug!(run_id = %head.run, verdict = ?marked.verdict, "a kept mark landed");
                        if let Some(counts) = marked.counts {
                            let task = head.run.task_id().clone();
                            self.sink.record(Report::Counts { task, counts });
                        }
                        let mut kept = self.lock();
                        if let Some(queue) = kept.get_mut(head.run.task_id()) {
                            queue.pop_front();
                        }
                    }
                    Err(error) => {
                        debug!(run_id = %head.run, %error, "a kept mark is refused still");
                        refused = true;
                    }
                }
            }
            if refused {
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

impl Ledger for RetriedMarks {
    fn claim<'a>(
        &'a self,
        run: &'a RunId,
        term: &'a Term,
    ) -> BoxFuture<'a, Result<Verdict, LedgerError>> {
        self.inner.claim(run, term)
    }

    fn claim_past<'a>(
        &'a self,
        run: &'a RunId,
        term: &'a Term,
    ) -> BoxFuture<'a, Result<Verdict, LedgerError>> {
        self.inner.claim_past(run, term)
    }

    /// A `finished` or `missed` mark that fails is kept and sent again until it lands; the
    /// caller still learns of the failure.
    fn mark<'a>(
        &'a self,
        run: &'a RunId,
        term: &'a Term,
        mark: Mark,
    ) -> BoxFuture<'a, Result<Marked, LedgerError>> {
        async move {
            let result = self.inner.mark(run, term, mark).await;
            let lasting = matches!(mark, Mark::Finished { .. } | Mark::Missed { .. });
            if result.is_err() && lasting {
                self.keep(run, term, mark);
            }
            result
        }
        .boxed()
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
