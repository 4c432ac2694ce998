//! The executor: runs waiting for a worker (at most `queue_size`) and a bounded worker pool
//! (`max_workers`). Each task's concurrency policy is applied when a run is submitted, before
//! it takes a worker; workers are shared round-robin between tasks, and no task holds more than
//! half of them, so one slow task cannot starve the rest. Every run it accepts ends in exactly
//! one report: finished (succeeded, failed, or cancelled with the reason) or missed. Free of
//! `kube`.

pub mod address;
mod cancel;
mod dispatch;
mod ending;
pub mod exec;
pub mod http;
pub mod job;
mod queue;
pub mod retry;
mod worker;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::{Notify, Semaphore};
use tracing::{debug, warn};

use crate::clock::Clock;
use crate::ledger::Ledger;
use crate::policy::ConcurrencyPolicy;
use crate::run::Term;
use crate::run::{MissKind, Report, ReportSink, RunId, TaskId, Trigger};
use crate::telemetry::LogQuota;
use cancel::CancelReason;
pub use cancel::Retire;
pub use dispatch::ExecutorTask;
pub use http::{HttpAction, ValueSource};
pub use job::{JobAction, JobRunner};
use queue::{Shared, TaskRuns};
pub use retry::RetryPolicy;
use worker::WorkerContext;

/// What a run does.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// An HTTP request.
    Http(Box<HttpAction>),
    /// A command: standalone mode only.
    Exec(Box<exec::ExecAction>),
    /// A function of the embedding program (`crate::scheduler`).
    Call(CallAction),
    /// A Kubernetes Job per run: the operator only.
    Job(JobAction),
}

/// What a called action learns of its run.
#[derive(Clone, Debug)]
pub struct RunInfo {
    /// `<namespace>/<name>@<instant>` (`@manual:<request>` for a run-now request): the same for
    /// every attempt, so the work can be made idempotent.
    pub run_id: String,
    /// The instant the run was scheduled for.
    pub scheduled: DateTime<Utc>,
    /// 1 for the first attempt, 2 for the first retry, ...
    pub attempt: u32,
}

/// An async function run per attempt: `Ok(message)` succeeds, `Err(message)` fails (and is
/// retried per the task's retry policy).
pub type CallFn =
    dyn Fn(RunInfo) -> futures::future::BoxFuture<'static, Result<String, String>> + Send + Sync;

/// A function as an action; equal only to itself.
#[derive(Clone)]
pub struct CallAction(pub Arc<CallFn>);

impl std::fmt::Debug for CallAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CallAction")
    }
}

impl PartialEq for CallAction {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

/// How a task's runs are executed; shared by all runs of one task version.
#[derive(Clone, Debug, PartialEq)]
pub struct RunSpec {
    /// What a run does.
    pub action: Action,
    /// The time limit of each attempt.
    pub timeout: Duration,
    /// Retries of a failed attempt.
    pub retry: RetryPolicy,
    /// What happens to a run due while the previous one still runs.
    pub concurrency: ConcurrencyPolicy,
    /// With `Allow`: how many runs of the task may be in flight or waiting at once.
    pub max_concurrent_runs: u32,
    /// A run that cannot start this long after it was due is missed.
    pub starting_deadline: Option<Duration>,
}

impl RunSpec {
    /// The longest a run can take once started: every attempt's timeout and the waits between
    /// them. A run started longer ago than this is over, whatever became of its process.
    pub fn longest(&self) -> Duration {
        let attempts = self.retry.max_attempts();
        let waits = (1..attempts).map(|retry| self.retry.delay(retry));
        waits.fold(
            self.timeout.saturating_mul(attempts),
            Duration::saturating_add,
        )
    }
}

/// One scheduled run handed to the executor.
#[derive(Clone, Debug)]
pub struct RunRequest {
    /// The task and its incarnation.
    pub task: TaskId,
    /// The spec generation the run was scheduled under.
    pub generation: i64,
    /// The run's identity: the ledger key and `Idempotency-Key`.
    pub run_id: RunId,
    /// The run's instant (a run-now request: when it was seen).
    pub scheduled: DateTime<Utc>,
    /// When it was due to start: `scheduled` plus jitter. The starting deadline counts from here.
    pub due: DateTime<Utc>,
    /// How it runs and what it does.
    pub spec: Arc<RunSpec>,
    /// Part of a catch-up batch or a backfill: waits for the task's previous run, whatever the
    /// policy.
    pub sequential: bool,
    /// What started it.
    pub trigger: Trigger,
    /// The leadership term that claimed the run; its steps are recorded in the ledger under it.
    pub term: Term,
    /// An earlier leader or process started the run and its work lives on outside it (a Job):
    /// this term takes it over in the ledger ([`Ledger::adopt`]) and waits for its end.
    pub adopted: bool,
}

/// Sizes of the executor's bounds.
#[derive(Clone, Copy, Debug)]
pub struct ExecutorConfig {
    /// Size of the worker pool.
    pub max_workers: usize,
    /// Runs that may wait for a worker, over all tasks.
    pub queue_size: usize,
    /// Whether successful runs are logged at info level (`log.log_task_success`).
    pub log_success: bool,
}

/// Reads the load of an executor that may be gone.
#[derive(Clone)]
pub struct LoadGauge(std::sync::Weak<Shared>);

impl LoadGauge {
    /// The load now; `None` once the executor is gone.
    pub fn load(&self) -> Option<Load> {
        self.0.upgrade().map(|shared| shared.load())
    }
}

/// A snapshot of the executor's bounds and use (for `/metrics` and `/stats`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Load {
    /// Runs waiting for a worker.
    pub waiting: usize,
    /// The most runs that may wait.
    pub queue_size: usize,
    /// Workers running a run.
    pub busy_workers: usize,
    /// Size of the worker pool.
    pub max_workers: usize,
    /// Runs refused since start because the queue was full: `queue_size` is too small for
    /// the bursts the tasks make.
    pub refused: u64,
}

/// Handle for submitting runs; cheap to clone.
#[derive(Clone)]
pub struct Executor {
    shared: Arc<Shared>,
}

fn missed(run: &RunRequest, kind: MissKind, reason: String) -> Report {
    Report::Missed {
        task: run.task.clone(),
        count: 1,
        run: run.run_id.clone(),
        trigger: run.trigger,
        kind,
        reason,
    }
}

impl Executor {
    /// An executor and its worker side; drive the workers with [`ExecutorTask::run`].
    pub fn new(
        config: ExecutorConfig,
        sink: Arc<dyn ReportSink>,
        clock: Clock,
        http: http::HttpClient,
        values: Arc<dyn ValueSource>,
        jobs: Arc<dyn JobRunner>,
        ledger: Arc<dyn Ledger>,
    ) -> (Executor, ExecutorTask) {
        let max_workers = config.max_workers.max(1);
        let job_waits = Arc::new(AtomicUsize::new(0));
        let shared = Arc::new(Shared {
            state: Mutex::default(),
            changed: Notify::new(),
            left_queue: Notify::new(),
            queue_size: config.queue_size.max(1),
            refused: AtomicU64::new(0),
            per_task_workers: (max_workers / 2).max(1),
            per_namespace: AtomicUsize::new(0),
            namespace_workers: AtomicUsize::new(max_workers),
            max_workers,
            job_waits: job_waits.clone(),
            sink: sink.clone(),
            clock,
        });
        let (endings, ending) = tokio::sync::mpsc::unbounded_channel();
        let task = ExecutorTask {
            shared: shared.clone(),
            workers: Arc::new(Semaphore::new(max_workers)),
            context: Arc::new(WorkerContext {
                http,
                values,
                jobs,
                job_waits,
                ledger,
                log_success: config.log_success,
                sink,
                clock,
                endings,
            }),
            endings: ending,
        };
        (Executor { shared }, task)
    }

    /// Takes a run without waiting. The task's concurrency policy is applied here, before the
    /// run takes a worker; a run that cannot be taken is reported as missed, with the reason.
    pub fn submit(&self, run: RunRequest) {
        self.submit_all([run]);
    }

    /// [`submit`](Self::submit) for several runs, under one lock (an aligned burst).
    pub fn submit_all(&self, runs: impl IntoIterator<Item = RunRequest>) {
        let mut reports = Vec::new();
        let mut queued = false;
        {
            let mut state = self.shared.lock();
            for run in runs {
                queued |= self.queue(&mut state, run, &mut reports);
            }
        }
        if queued {
            // One worker; each one that takes a run wakes the next while runs wait.
            self.shared.changed.notify_one();
        }
        self.shared.publish(reports);
    }

    /// Queues `run` or reports it missed; whether it was queued.
    fn queue(&self, state: &mut queue::State, run: RunRequest, reports: &mut Vec<Report>) -> bool {
        // A new term adopts what this very process may still be waiting for.
        let known = |runs: &TaskRuns| {
            runs.active.iter().any(|(id, _)| *id == run.run_id)
                || runs.waiting.iter().any(|r| r.run_id == run.run_id)
        };
        if run.adopted && state.tasks.get(&run.task).is_some_and(known) {
            debug!(run_id = %run.run_id, "already in flight here; not adopted twice");
            return false;
        }
        if let Err((kind, reason)) = self.shared.admit(state, &run, reports) {
            // A full queue says so once a minute (`Shared::make_room`), not once per run.
            static MISSED: LogQuota = LogQuota::new("run missed");
            if kind != MissKind::QueueFull && MISSED.allow() {
                warn!(run_id = %run.run_id, %reason, "run missed");
            } else {
                debug!(run_id = %run.run_id, %reason, "run missed");
            }
            if state.tasks.get(&run.task).is_some_and(TaskRuns::is_idle) {
                state.tasks.remove(&run.task);
            }
            reports.push(missed(&run, kind, reason));
            return false;
        }
        let (id, holds_worker) = (run.task.clone(), queue::holds_worker(&run));
        state.waiting += 1;
        let runs = state.tasks.entry(id.clone()).or_default();
        runs.waiting.push_back(run);
        state.refusals.enlist(&id, runs);
        if !std::mem::replace(&mut runs.has_turn, true) {
            state.turns.push_back(id, holds_worker);
        }
        true
    }

    /// Returns once `task` has no run waiting for a worker: a backfill hands over its next run
    /// then, so it never fills the queue.
    pub async fn wait_for_room(&self, task: &TaskId) {
        loop {
            let left = self.shared.left_queue.notified();
            tokio::pin!(left);
            left.as_mut().enable();
            let waiting = {
                let state = self.shared.lock();
                state.tasks.get(task).map_or(0, |runs| runs.waiting.len())
            };
            if waiting == 0 {
                return;
            }
            left.await;
        }
    }

    /// Caps the runs of one namespace in flight or waiting (`limits.max_runs_per_namespace`);
    /// 0 lifts the cap. A run over it is missed, saying so.
    pub fn limit_runs_per_namespace(&self, most: usize) {
        let limit = &self.shared.per_namespace;
        limit.store(most, Ordering::Relaxed);
    }

    /// Caps the workers one namespace holds at once (`limits.max_workers_per_namespace`, at
    /// least 1): its other runs wait for one of its own to end.
    pub fn limit_workers_per_namespace(&self, most: usize) {
        let limit = &self.shared.namespace_workers;
        limit.store(most.max(1), Ordering::Relaxed);
    }

    /// Runs of `task` that a previous leader started and may still be running: `Forbid` skips
    /// while they may be, `Replace` too (they cannot be cancelled from here), `Allow` counts
    /// them against `maxConcurrentRuns`.
    pub fn hold_elsewhere(&self, task: &TaskId, runs: Vec<RunId>) {
        let mut state = self.shared.lock();
        state
            .tasks
            .entry(task.clone())
            .or_default()
            .elsewhere
            .extend(runs);
    }

    /// Those runs are over (or can no longer be running).
    pub fn release_elsewhere(&self, task: &TaskId, runs: &[RunId]) {
        {
            let mut state = self.shared.lock();
            if let Some(held) = state.tasks.get_mut(task) {
                held.elsewhere.retain(|run| !runs.contains(run));
                if held.is_idle() {
                    state.tasks.remove(task);
                }
            }
        }
        self.shared.changed.notify_one();
    }

    /// How many runs may wait for a worker (`queue_size`).
    pub fn queue_size(&self) -> usize {
        self.shared.queue_size
    }

    /// A handle that reads how busy the executor is without keeping it alive (what metrics
    /// hold: the executor's report sink may hold the metrics).
    pub fn gauge(&self) -> LoadGauge {
        LoadGauge(Arc::downgrade(&self.shared))
    }

    /// Withdraws a task's runs (see [`Retire`]); each one ends in a report.
    pub fn retire(&self, task: &TaskId, why: Retire) {
        let mut reports = Vec::new();
        {
            let mut state = self.shared.lock();
            let state = &mut *state;
            let Some(runs) = state.tasks.get_mut(task) else {
                return;
            };
            let dropped: Vec<RunRequest> = runs.waiting.drain(..).collect();
            state.refusals.enlist(task, runs);
            if matches!(why, Retire::Deleted) {
                state.refusals.forget(task);
            }
            let cancel = match &why {
                Retire::Deleted => Some(CancelReason::Deleted),
                Retire::Invalid(reason) => Some(CancelReason::Invalid(reason.clone())),
                Retire::Paused | Retire::Edited => None,
            };
            if let Some(reason) = cancel {
                for (run_id, handle) in &runs.active {
                    debug!(%run_id, %reason, "cancelling run in flight");
                    handle.cancel(reason.clone());
                }
            }
            if !dropped.is_empty() {
                runs.has_turn = false;
                state.turns.remove(task);
            }
            if state.tasks.get(task).is_some_and(TaskRuns::is_idle) {
                state.tasks.remove(task);
            }
            state.waiting -= dropped.len();
            self.shared.left_queue.notify_waiters();
            let reason = match &why {
                Retire::Deleted => "the task was deleted before the run started".to_string(),
                Retire::Paused => "the task was paused before the run started".to_string(),
                Retire::Invalid(why) => {
                    format!("the spec became invalid before the run started: {why}")
                }
                Retire::Edited => "the spec changed before the run started".to_string(),
            };
            reports.extend(
                dropped
                    .iter()
                    .map(|run| missed(run, MissKind::Withdrawn, reason.clone())),
            );
        }
        self.shared.publish(reports);
    }
}

/// Shared by the engine's and the executor's unit tests.
#[cfg(test)]
pub(crate) mod fixtures {
    use super::http::{NoValues, Target};
    use super::*;
    use crate::ledger::{Counts, LedgerError, Mark, Marked, TakeOver, Verdict};
    use crate::run::TaskKey;

    /// The single-replica ledger.
    pub fn memory_ledger() -> Arc<dyn Ledger> {
        Arc::new(crate::ledger::MemoryLedger::new(Duration::from_secs(3600)))
    }

    /// The memory ledger as a test watches it: claims logged in the order they reach it (the
    /// first may be made to take a while: Redis slow for a moment), and runs' ends counted as
    /// they land, held until the test lets them when it asks so.
    pub struct TestLedger {
        inner: Arc<dyn Ledger>,
        /// The instants claimed, in order.
        pub claimed: Mutex<Vec<DateTime<Utc>>>,
        first_claim_takes: Duration,
        /// Ends wait for a permit each (`holding_ends`).
        pub ends: Semaphore,
        hold_ends: bool,
        /// How many ends landed.
        pub landed: tokio::sync::watch::Sender<usize>,
    }

    impl TestLedger {
        pub fn new() -> Self {
            TestLedger {
                inner: memory_ledger(),
                claimed: Default::default(),
                first_claim_takes: Duration::ZERO,
                ends: Semaphore::new(0),
                hold_ends: false,
                landed: tokio::sync::watch::Sender::new(0),
            }
        }

        pub fn first_claim_takes(self, first_claim_takes: Duration) -> Self {
            TestLedger {
                first_claim_takes,
                ..self
            }
        }

        pub fn holding_ends(self) -> Self {
            TestLedger {
                hold_ends: true,
                ..self
            }
        }
    }

    type Answer<'a, T> = futures::future::BoxFuture<'a, Result<T, LedgerError>>;

    impl Ledger for TestLedger {
        fn claim<'a>(&'a self, run: &'a RunId, term: &'a Term) -> Answer<'a, Verdict> {
            Box::pin(async move {
                let first = self.claimed.lock().unwrap().is_empty();
                if first && !self.first_claim_takes.is_zero() {
                    tokio::time::sleep(self.first_claim_takes).await;
                }
                self.claimed.lock().unwrap().push(run.instant());
                self.inner.claim(run, term).await
            })
        }
        fn claim_past<'a>(&'a self, run: &'a RunId, term: &'a Term) -> Answer<'a, Verdict> {
            self.inner.claim_past(run, term)
        }
        fn mark<'a>(&'a self, run: &'a RunId, term: &'a Term, mark: Mark) -> Answer<'a, Marked> {
            Box::pin(async move {
                let end = matches!(mark, Mark::Finished { .. });
                if end && self.hold_ends {
                    self.ends.acquire().await.unwrap().forget();
                }
                let marked = self.inner.mark(run, term, mark).await;
                if end {
                    self.landed.send_modify(|landed| *landed += 1);
                }
                marked
            })
        }
        fn adopt<'a>(&'a self, run: &'a RunId, term: &'a Term) -> Answer<'a, Marked> {
            self.inner.adopt(run, term)
        }
        fn take_over<'a>(
            &'a self,
            task: &'a TaskId,
            term: &'a Term,
            settle: &'a [RunId],
            seed: Option<Counts>,
        ) -> Answer<'a, TakeOver> {
            self.inner.take_over(task, term, settle, seed)
        }
        fn next_epoch(&self, floor: u64) -> Answer<'_, u64> {
            self.inner.next_epoch(floor)
        }
        fn holds<'a>(&'a self, task: &'a TaskId, term: &'a Term) -> Answer<'a, bool> {
            self.inner.holds(task, term)
        }
        fn server_time(&self) -> Answer<'_, Option<DateTime<Utc>>> {
            self.inner.server_time()
        }
        fn forget<'a>(&'a self, task: &'a TaskId, grace: Duration) -> Answer<'a, ()> {
            self.inner.forget(task, grace)
        }
    }

    /// A `Forbid` POST to `url` with no retry.
    pub fn http_spec(url: &str, timeout: Duration, starting_deadline: Option<Duration>) -> RunSpec {
        RunSpec {
            action: Action::Http(Box::new(HttpAction {
                url: Target::Url(url.parse().unwrap()),
                method: reqwest::Method::POST,
                headers: Vec::new(),
                body: None,
                success_codes: http::SuccessCodes::parse(&[]).unwrap(),
                follow_redirects: crate::policy::FollowRedirects::Never,
                tls: http::Tls::default(),
            })),
            timeout,
            retry: RetryPolicy::default(),
            concurrency: ConcurrencyPolicy::Forbid,
            max_concurrent_runs: 1,
            starting_deadline,
        }
    }

    /// An executor (2 workers, 10 waiting runs) and its reports; its worker side is dropped.
    pub fn executor() -> (Executor, tokio::sync::mpsc::UnboundedReceiver<Report>) {
        executor_queueing(10)
    }

    /// An executor (2 workers) where `queue_size` runs may wait, and its reports; its worker
    /// side is dropped.
    pub fn executor_queueing(
        queue_size: usize,
    ) -> (Executor, tokio::sync::mpsc::UnboundedReceiver<Report>) {
        executor_with(2, queue_size)
    }

    /// An executor of `max_workers` where `queue_size` runs may wait, and its reports; its
    /// worker side is dropped.
    pub fn executor_with(
        max_workers: usize,
        queue_size: usize,
    ) -> (Executor, tokio::sync::mpsc::UnboundedReceiver<Report>) {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let (tx, reports) = tokio::sync::mpsc::unbounded_channel();
        let config = ExecutorConfig {
            max_workers,
            queue_size,
            log_success: false,
        };
        let (executor, _task) = Executor::new(
            config,
            Arc::new(tx),
            Clock::System,
            http::client().unwrap(),
            Arc::new(NoValues),
            Arc::new(job::NoJobs),
            memory_ledger(),
        );
        (executor, reports)
    }

    /// A `Forbid` run of task `ns/t` (uid `uid`) scheduled at `scheduled`, due at `due`.
    pub fn request(
        scheduled: DateTime<Utc>,
        due: DateTime<Utc>,
        starting_deadline: Option<Duration>,
    ) -> RunRequest {
        let task = TaskId::new(TaskKey::new("ns", "t"), "uid");
        RunRequest {
            run_id: RunId::new(&task, scheduled),
            task,
            generation: 1,
            scheduled,
            due,
            spec: Arc::new(http_spec(
                "http://127.0.0.1:9/",
                Duration::from_secs(1),
                starting_deadline,
            )),
            sequential: false,
            trigger: Trigger::Schedule,
            term: Term::single("test"),
            adopted: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::fixtures::http_spec;

    #[test]
    fn the_longest_run_counts_every_attempt_and_wait() {
        let mut spec = http_spec("http://127.0.0.1:9/", Duration::from_secs(10), None);
        assert_eq!(spec.longest(), Duration::from_secs(10));
        spec.retry.max_retries = 2; // waits 1 s, then 2 s
        assert_eq!(spec.longest(), Duration::from_secs(33));
    }
}
