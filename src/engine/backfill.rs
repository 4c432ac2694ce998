//! Backfills: the scheduled instants of a past range, run oldest first, one after another, at
//! most `limits.backfill_runs_per_second`, each claimed in the ledger like a scheduled run (the
//! same run id), so an instant that already ran is not run again. A driver runs while its
//! replica leads; progress survives a restart of the driver (and, through status, of the
//! process).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{Backfilling, EngineTask, State};
use crate::clock::Clock;
use crate::executor::{Executor, RunRequest};
use crate::ledger::redis::RETENTION;
use crate::ledger::{Ledger, Verdict};
use crate::run::Term;
use crate::run::{BackfillPhase, BackfillProgress, Report, ReportSink, RunId, TaskKey, Trigger};
use crate::shard::Terms;

/// The most instants one backfill range may hold.
pub const MAX_BACKFILL: usize = 10_000;

/// A range of `spec.backfill`, with where it stood when the task was read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackfillRequest {
    /// The backfill's `id` in `spec.backfill`.
    pub id: String,
    /// The first instant of the range (inclusive).
    pub start: DateTime<Utc>,
    /// The last instant of the range (inclusive).
    pub end: DateTime<Utc>,
    /// Instants already handled (from status): the driver resumes after them.
    pub done: u64,
    /// Complete or refused already (from status): nothing to do.
    pub over: bool,
}

/// A driver's progress, kept by the engine across restarts of the driver.
#[derive(Default)]
pub(super) struct Progress {
    pub done: AtomicU64,
    /// Complete or refused.
    pub over: AtomicBool,
}

/// What a driver needs.
pub(super) struct Driver {
    pub ledger: Arc<dyn Ledger>,
    pub executor: Executor,
    pub sink: Arc<dyn ReportSink>,
    pub leader: watch::Receiver<Terms>,
    pub clock: Clock,
    pub task: EngineTask,
    pub generation: i64,
    pub term: Term,
    pub request: BackfillRequest,
    pub progress: Arc<Progress>,
    pub per_second: u32,
    pub cancel: CancellationToken,
}

/// How long a claim the ledger could not answer waits before it is tried again.
const CLAIM_RETRY: Duration = Duration::from_secs(1);

impl Driver {
    pub async fn run(self) {
        let instants = match self.instants() {
            Ok(instants) => instants,
            Err(reason) => {
                warn!(task = %self.task.id, backfill = %self.request.id, %reason, "backfill refused");
                self.progress.over.store(true, Ordering::SeqCst);
                self.report(BackfillPhase::Refused, 0, 0, Some(reason));
                return;
            }
        };
        let total = instants.len() as u64;
        let mut done = self.progress.done.load(Ordering::SeqCst).min(total);
        info!(task = %self.task.id, backfill = %self.request.id, done, total, "backfill running");
        let pace = Duration::from_secs(1) / self.per_second.max(1);
        let mut slot = tokio::time::Instant::now();
        for instant in instants.into_iter().skip(done as usize) {
            self.report(BackfillPhase::Running, done, total, None);
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = tokio::time::sleep_until(slot) => {}
            }
            // One run waiting at most: the next is handed over once the previous has a worker.
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = self.executor.wait_for_room(&self.task.id) => {}
            }
            slot = tokio::time::Instant::now() + pace;
            if !self.claim_and_submit(instant).await {
                return;
            }
            done += 1;
            self.progress.done.store(done, Ordering::SeqCst);
        }
        self.progress.over.store(true, Ordering::SeqCst);
        info!(task = %self.task.id, backfill = %self.request.id, total, "backfill complete");
        self.report(BackfillPhase::Complete, done, total, None);
    }

    /// The range's instants, or why the range is refused.
    fn instants(&self) -> Result<Vec<DateTime<Utc>>, String> {
        let BackfillRequest { id, start, end, .. } = &self.request;
        let now = self.clock.now();
        let rfc = |t: &DateTime<Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true);
        if *end > now {
            return Err(format!(
                "backfill {id}: end {} is in the future; only past instants are backfilled",
                rfc(end)
            ));
        }
        let retention = chrono::Duration::from_std(RETENTION).unwrap_or_default();
        if *start < now - retention {
            return Err(format!(
                "backfill {id}: start {} is more than 7 days ago, older than the run ledger's \
                 records: chronflow cannot tell which of those instants ran",
                rfc(start)
            ));
        }
        self.task
            .schedule
            .between(*start, *end, MAX_BACKFILL)
            .map_err(|limit| {
                format!(
                    "backfill {id}: the range holds more than {limit} instants of the schedule; \
                     split it into smaller ranges"
                )
            })
    }

    /// Claims `instant` for this term and hands it to the executor if it has not run; `false`
    /// when the driver must stop (cancelled, or no longer leading).
    async fn claim_and_submit(&self, instant: DateTime<Utc>) -> bool {
        let run_id = RunId::new(&self.task.id, instant);
        let (mut wait, mut again) = (CLAIM_RETRY, false);
        loop {
            let uid = &self.task.id.uid;
            if !self.leader.borrow().holds(uid, &self.term) || self.cancel.is_cancelled() {
                return false;
            }
            let verdict = self.ledger.claim_past(&run_id, &self.term).await;
            let verdict = verdict.map(|v| if again { v.asked_again(&self.term) } else { v });
            match verdict {
                Ok(Verdict::Accepted) => {
                    let now = self.clock.now();
                    self.executor.submit(RunRequest {
                        task: self.task.id.clone(),
                        generation: self.generation,
                        run_id,
                        scheduled: instant,
                        // Its starting deadline counts from when it is handed over.
                        due: now,
                        spec: self.task.run.clone(),
                        sequential: true,
                        trigger: Trigger::Backfill,
                        term: self.term.clone(),
                        adopted: false,
                    });
                    return true;
                }
                Ok(Verdict::Held(_) | Verdict::Busy(_)) => return true,
                Ok(Verdict::Fenced { .. }) => return false,
                Err(error) => {
                    warn!(run_id = %run_id, %error, ?wait, "cannot claim a backfill run yet");
                    again = true;
                }
            }
            tokio::select! {
                _ = self.cancel.cancelled() => return false,
                _ = tokio::time::sleep(wait) => wait = (wait * 2).min(Duration::from_secs(30)),
            }
        }
    }

    fn report(&self, phase: BackfillPhase, done: u64, total: u64, message: Option<String>) {
        self.sink.record(Report::Backfill {
            task: self.task.id.clone(),
            progress: BackfillProgress {
                id: self.request.id.clone(),
                done,
                total,
                phase,
                message,
            },
        });
    }
}

impl super::Engine {
    /// Starts, keeps or stops the task's backfill drivers: they run while this replica leads a
    /// scheduled task that is not being taken over, each from where it stopped.
    pub(super) fn sync_backfills(&mut self, key: &TaskKey) {
        let Some(uid) = self.tasks.get(key).map(|entry| entry.uid.clone()) else {
            return;
        };
        let term = self.leading(&uid);
        let shutdown = self.shutdown.clone();
        let Some(entry) = self.tasks.get_mut(key) else {
            return;
        };
        let (task, term) = match (&entry.state, term) {
            (State::Scheduled { task, .. }, Some(term)) if !entry.taking_over => (task, term),
            _ => return entry.extras.stop_backfills(),
        };
        let generation = entry.generation;
        if task.backfills.is_empty() && entry.extras.rare.is_none() {
            return;
        }
        let backfills = &mut entry.extras.rare().backfills;
        backfills.retain(|id, backfill| {
            let wanted = task.backfills.iter().any(|b| &b.id == id);
            if !wanted {
                backfill.cancel.cancel();
            }
            wanted
        });
        for request in &task.backfills {
            let progress = match backfills.get(&request.id) {
                None if request.over => continue,
                None => Arc::new(Progress::default()),
                Some(known)
                    if known
                        .progress
                        .over
                        .load(std::sync::atomic::Ordering::SeqCst) =>
                {
                    continue;
                }
                Some(running)
                    if running.generation == generation
                        && running.term == term
                        && !running.cancel.is_cancelled() =>
                {
                    continue;
                }
                Some(stopped) => {
                    stopped.cancel.cancel();
                    stopped.progress.clone()
                }
            };
            progress
                .done
                .fetch_max(request.done, std::sync::atomic::Ordering::SeqCst);
            let cancel = shutdown.child_token();
            let driver = Driver {
                ledger: self.parts.ledger.clone(),
                executor: self.parts.executor.clone(),
                sink: self.parts.sink.clone(),
                leader: self.parts.leader.clone(),
                clock: self.parts.clock,
                task: (**task).clone(),
                generation,
                term: term.clone(),
                request: request.clone(),
                progress: progress.clone(),
                per_second: self.parts.backfill_per_second,
                cancel: cancel.clone(),
            };
            tokio::spawn(driver.run());
            let backfill = Backfilling {
                cancel,
                generation,
                term: term.clone(),
                progress,
            };
            backfills.insert(request.id.clone(), backfill);
        }
    }
}
