//! The executor: runs waiting for a worker (at most `queue_size`) and a bounded worker pool
//! (`max_workers`). Each task's concurrency policy is applied when a run is submitted, before
//! it takes a worker; workers are shared round-robin between tasks, and no task holds more than
//! half of them, so one slow task cannot starve the rest. Every run it accepts ends in exactly
//! one report: finished (succeeded, failed, or cancelled with the reason) or missed. Free of
//! `kube`.

pub mod exec;
pub mod http;
pub mod job;
pub mod retry;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::clock::Clock;
use crate::ledger::{Ledger, Mark, Verdict};
use crate::policy::ConcurrencyPolicy;
use crate::run::Term;
use crate::run::{FinishedRun, MissKind, Outcome, Report, ReportSink, RunId, TaskId, Trigger};
pub use http::{HttpAction, ValueSource};
pub use job::{JobAction, JobRunner};
pub use retry::RetryPolicy;

/// What a run does.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// An HTTP request.
    Http(HttpAction),
    /// A command: standalone mode only.
    Exec(exec::ExecAction),
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
}

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
enum CancelReason {
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
struct Cancel {
    token: CancellationToken,
    reason: Arc<OnceLock<CancelReason>>,
    /// The run's work goes on without this process (a Job): a shutdown lets go of it at once.
    outlives_process: bool,
}

impl Cancel {
    fn cancel(&self, reason: CancelReason) {
        let _ = self.reason.set(reason);
        self.token.cancel();
    }
}

/// Handle for submitting runs; cheap to clone.
#[derive(Clone)]
pub struct Executor {
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    /// Wakes the dispatcher: a run was queued or a run finished.
    changed: Notify,
    /// Wakes whoever waits for a task's runs to leave the queue ([`Executor::wait_for_room`]).
    left_queue: Notify,
    queue_size: usize,
    /// The most runs one task may have in flight: half the workers, at least one.
    per_task_workers: usize,
    /// The most runs one namespace may have in flight or waiting (`limits`); 0: no cap.
    per_namespace: AtomicUsize,
    max_workers: usize,
    /// Job runs in flight that hold no worker (their Job was created).
    job_waits: Arc<AtomicUsize>,
    sink: Arc<dyn ReportSink>,
    clock: Clock,
}

#[derive(Default)]
struct State {
    tasks: HashMap<TaskId, TaskRuns>,
    /// Tasks with waiting runs, in turn order.
    turns: VecDeque<TaskId>,
    /// Runs waiting, over all tasks.
    waiting: usize,
    closed: bool,
}

#[derive(Default)]
struct TaskRuns {
    waiting: VecDeque<RunRequest>,
    active: Vec<(RunId, Cancel)>,
    /// Runs a previous leader started that may still be in flight in its process: they count
    /// for the concurrency policy until [`Executor::release_elsewhere`].
    elsewhere: Vec<RunId>,
    has_turn: bool,
}

impl TaskRuns {
    fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.active.is_empty() && self.elsewhere.is_empty()
    }
}

/// The executor's worker side; drive it with [`ExecutorTask::run`].
pub struct ExecutorTask {
    shared: Arc<Shared>,
    workers: Arc<Semaphore>,
    context: Arc<WorkerContext>,
}

struct WorkerContext {
    http: http::HttpClient,
    values: Arc<dyn ValueSource>,
    jobs: Arc<dyn JobRunner>,
    job_waits: Arc<AtomicUsize>,
    ledger: Arc<dyn Ledger>,
    log_success: bool,
    sink: Arc<dyn ReportSink>,
    clock: Clock,
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
            per_task_workers: (max_workers / 2).max(1),
            per_namespace: AtomicUsize::new(0),
            max_workers,
            job_waits: job_waits.clone(),
            sink: sink.clone(),
            clock,
        });
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
            }),
        };
        (Executor { shared }, task)
    }

    /// Takes a run without waiting. The task's concurrency policy is applied here, before the
    /// run takes a worker; a run that cannot be taken is reported as missed, with the reason.
    pub fn submit(&self, run: RunRequest) {
        let mut reports = Vec::new();
        {
            let mut state = self.shared.lock();
            // A new term adopts what this very process may still be waiting for.
            let known = |runs: &TaskRuns| {
                runs.active.iter().any(|(id, _)| *id == run.run_id)
                    || runs.waiting.iter().any(|r| r.run_id == run.run_id)
            };
            if run.adopted && state.tasks.get(&run.task).is_some_and(known) {
                debug!(run_id = %run.run_id, "already in flight here; not adopted twice");
                return;
            }
            if let Err((kind, reason)) = self.shared.admit(&mut state, &run, &mut reports) {
                warn!(run_id = %run.run_id, %reason, "run missed");
                reports.push(missed(&run, kind, reason));
            } else {
                let id = run.task.clone();
                state.waiting += 1;
                let runs = state.tasks.entry(id.clone()).or_default();
                runs.waiting.push_back(run);
                if !std::mem::replace(&mut runs.has_turn, true) {
                    state.turns.push_back(id);
                }
                self.shared.changed.notify_one();
            }
        }
        self.shared.publish(reports);
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
            let Some(runs) = state.tasks.get_mut(task) else {
                return;
            };
            let dropped: Vec<RunRequest> = runs.waiting.drain(..).collect();
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
                state.turns.retain(|id| id != task);
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

impl Shared {
    fn load(&self) -> Load {
        let state = self.lock();
        Load {
            waiting: state.waiting,
            queue_size: self.queue_size,
            busy_workers: state
                .tasks
                .values()
                .map(|runs| runs.active.len())
                .sum::<usize>()
                .saturating_sub(self.job_waits.load(Ordering::Relaxed)),
            max_workers: self.max_workers,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Reports outside the lock: the sink has a lock of its own.
    fn publish(&self, reports: Vec<Report>) {
        for report in reports {
            self.sink.record(report);
        }
    }

    /// The most runs of this task that may be in flight or waiting at once.
    fn task_limit(&self, spec: &RunSpec) -> usize {
        match spec.concurrency {
            // A Job run holds no worker while its Job runs.
            ConcurrencyPolicy::Allow if matches!(spec.action, Action::Job(_)) => {
                spec.max_concurrent_runs.max(1) as usize
            }
            ConcurrencyPolicy::Allow => {
                (spec.max_concurrent_runs.max(1) as usize).min(self.per_task_workers)
            }
            ConcurrencyPolicy::Forbid | ConcurrencyPolicy::Replace => 1,
        }
    }

    /// Applies the queue bound and the concurrency policy; `Err` is why the run is missed.
    fn admit(
        &self,
        state: &mut State,
        run: &RunRequest,
        reports: &mut Vec<Report>,
    ) -> Result<(), (MissKind, String)> {
        if state.closed {
            return Err((MissKind::Shutdown, "chronflow is shutting down".into()));
        }
        if state.waiting >= self.queue_size {
            let reason = format!(
                "the run queue is full ({} runs waiting for a worker)",
                state.waiting
            );
            return Err((MissKind::QueueFull, reason));
        }
        let most = self.per_namespace.load(Ordering::Relaxed);
        if most > 0 {
            let namespace = &run.task.key.namespace;
            let busy: usize = state
                .tasks
                .iter()
                .filter(|(id, _)| &id.key.namespace == namespace)
                .map(|(_, runs)| runs.active.len() + runs.waiting.len() + runs.elsewhere.len())
                .sum();
            if busy >= most {
                let reason = format!(
                    "namespace {namespace} has {busy} runs in flight or waiting (the most \
                     allowed: limits.max_runs_per_namespace {most})"
                );
                return Err((MissKind::Concurrency, reason));
            }
        }
        let runs = state.tasks.entry(run.task.clone()).or_default();
        // An adopted run is in flight already (its Job exists): no policy can refuse it.
        if run.sequential || run.adopted {
            return Ok(());
        }
        let busy = runs.active.len() + runs.waiting.len() + runs.elsewhere.len();
        if let (ConcurrencyPolicy::Replace, Some(held)) =
            (run.spec.concurrency, runs.elsewhere.first())
        {
            let reason = format!(
                "run {held}, started by the previous leader, may still be in flight and cannot \
                 be replaced from here (concurrencyPolicy Replace)"
            );
            return Err((MissKind::Concurrency, reason));
        }
        match run.spec.concurrency {
            ConcurrencyPolicy::Forbid if busy > 0 => {
                let previous = runs
                    .active
                    .first()
                    .map(|(id, _)| id)
                    .or(runs.elsewhere.first())
                    .or(runs.waiting.front().map(|r| &r.run_id));
                let previous = previous.map(ToString::to_string).unwrap_or_default();
                let reason =
                    format!("previous run {previous} still active (concurrencyPolicy Forbid)");
                Err((MissKind::Concurrency, reason))
            }
            ConcurrencyPolicy::Replace => {
                for (old, handle) in &runs.active {
                    info!(replaced = %old, by = %run.run_id, "replacing run still in flight");
                    handle.cancel(CancelReason::Replaced(run.run_id.clone()));
                }
                let dropped: Vec<RunRequest> = runs.waiting.drain(..).collect();
                state.waiting -= dropped.len();
                self.left_queue.notify_waiters();
                let reason = format!("replaced by {} before it started", run.run_id);
                reports.extend(
                    dropped
                        .iter()
                        .map(|old| missed(old, MissKind::Concurrency, reason.clone())),
                );
                Ok(())
            }
            ConcurrencyPolicy::Allow if busy >= self.task_limit(&run.spec) => {
                let reason = format!(
                    "{busy} runs of the task already in flight or waiting (the most allowed: {})",
                    self.task_limit(&run.spec)
                );
                Err((MissKind::Concurrency, reason))
            }
            _ => Ok(()),
        }
    }

    /// The next run to start, taking tasks in turn: the task's starting deadline is checked
    /// and its policy allows a start (a catch-up run waits for the previous one; `Forbid` and
    /// `Replace` wait for a cancelled run to leave).
    fn next_run(&self, reports: &mut Vec<Report>) -> Option<(RunRequest, Cancel)> {
        let now = self.clock.now();
        let mut state = self.lock();
        let state = &mut *state;
        for _ in 0..state.turns.len() {
            let id = state.turns.pop_front()?;
            let Some(runs) = state.tasks.get_mut(&id) else {
                continue;
            };
            while let Some(run) = runs.waiting.front() {
                let late = (now - run.due).to_std().unwrap_or_default();
                match run.spec.starting_deadline {
                    // An adopted run started long ago, in another process.
                    Some(deadline) if late > deadline && !run.adopted => {
                        let reason = format!(
                            "could not start within the starting deadline ({late:.1?} late)"
                        );
                        reports.push(missed(run, MissKind::Deadline, reason));
                        runs.waiting.pop_front();
                        state.waiting -= 1;
                        self.left_queue.notify_waiters();
                    }
                    _ => break,
                }
            }
            let Some(run) = runs.waiting.front() else {
                runs.has_turn = false;
                if runs.is_idle() {
                    state.tasks.remove(&id);
                }
                continue;
            };
            let limit = if run.adopted {
                self.per_task_workers
            } else if run.sequential {
                1
            } else {
                self.task_limit(&run.spec)
            };
            if runs.active.len() + runs.elsewhere.len() >= limit {
                state.turns.push_back(id);
                continue;
            }
            let run = runs.waiting.pop_front()?;
            state.waiting -= 1;
            self.left_queue.notify_waiters();
            let cancel = Cancel {
                outlives_process: matches!(run.spec.action, Action::Job(_)),
                ..Cancel::default()
            };
            runs.active.push((run.run_id.clone(), cancel.clone()));
            if runs.waiting.is_empty() {
                runs.has_turn = false;
            } else {
                state.turns.push_back(id);
            }
            return Some((run, cancel));
        }
        None
    }

    /// A run left the worker pool.
    fn finished(&self, task: &TaskId, run_id: &RunId) {
        {
            let mut state = self.lock();
            if let Some(runs) = state.tasks.get_mut(task) {
                runs.active.retain(|(id, _)| id != run_id);
                if runs.is_idle() {
                    state.tasks.remove(task);
                }
            }
        }
        self.changed.notify_one();
    }
}

/// Ends a run's stay in the pool however its worker ends, even by a panic: the task's runs in
/// flight must not keep a finished run (a `Forbid` task would miss every later run), and a run
/// whose worker panicked is reported as failed.
struct RunGuard {
    shared: Arc<Shared>,
    run: RunRequest,
    started: DateTime<Utc>,
    reported: bool,
}

impl Drop for RunGuard {
    fn drop(&mut self) {
        if !self.reported {
            error!(run_id = %self.run.run_id, "the run's worker panicked");
            let finished = self.shared.clock.now();
            self.shared.sink.record(finished_report(
                &self.run,
                self.started,
                finished,
                0,
                Err("internal error: the run's worker panicked (a chronflow bug)".into()),
            ));
        }
        self.shared.finished(&self.run.task, &self.run.run_id);
    }
}

impl ExecutorTask {
    /// Starts runs until `shutdown`. Then: runs still waiting are reported missed, runs in
    /// flight may finish within `grace`, and the rest are cancelled and reported.
    pub async fn run(self, shutdown: CancellationToken, grace: Duration) {
        let mut workers = JoinSet::new();
        'dispatch: loop {
            let permit = tokio::select! {
                _ = shutdown.cancelled() => break,
                permit = self.workers.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break,
                },
            };
            let (run, cancel) = loop {
                reap(&mut workers);
                let mut reports = Vec::new();
                let next = self.shared.next_run(&mut reports);
                self.shared.publish(reports);
                if let Some(next) = next {
                    break next;
                }
                tokio::select! {
                    _ = shutdown.cancelled() => break 'dispatch,
                    _ = self.shared.changed.notified() => {}
                }
            };
            let context = self.context.clone();
            let guard = RunGuard {
                shared: self.shared.clone(),
                started: context.clock.now(),
                run,
                reported: false,
            };
            let span = info_span!("run", run_id = %guard.run.run_id);
            workers.spawn(
                async move {
                    let mut guard = guard;
                    execute(&context, &mut guard, &cancel, permit).await;
                }
                .instrument(span),
            );
        }
        self.stop(workers, grace).await;
    }

    async fn stop(&self, mut workers: JoinSet<()>, grace: Duration) {
        let dropped: Vec<RunRequest> = {
            let mut state = self.shared.lock();
            state.closed = true;
            state.waiting = 0;
            state.turns.clear();
            let dropped = state
                .tasks
                .values_mut()
                .flat_map(|runs| runs.waiting.drain(..))
                .collect();
            state.tasks.retain(|_, runs| !runs.is_idle());
            dropped
        };
        let reason = "chronflow shut down before the run started";
        self.shared.publish(
            dropped
                .iter()
                .map(|run| missed(run, MissKind::Shutdown, reason.to_string()))
                .collect(),
        );
        // Jobs run on, and whoever leads next records their end: no need to wait for them.
        for runs in self.shared.lock().tasks.values() {
            for (_, cancel) in runs.active.iter().filter(|(_, c)| c.outlives_process) {
                cancel.cancel(CancelReason::Shutdown);
            }
        }
        let drained = tokio::time::timeout(grace, async {
            while workers.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            warn!(
                runs = workers.len(),
                "runs still in flight after the shutdown grace period; cancelling them"
            );
            for runs in self.shared.lock().tasks.values() {
                for (_, cancel) in &runs.active {
                    cancel.cancel(CancelReason::Shutdown);
                }
            }
            // Cancelled runs report and return at once; the bound only guards against a bug.
            let reported = tokio::time::timeout(Duration::from_secs(2), async {
                while workers.join_next().await.is_some() {}
            })
            .await;
            if reported.is_err() {
                workers.shutdown().await;
            }
        }
    }
}

/// Collects finished workers; a panic was already reported by its [`RunGuard`].
fn reap(workers: &mut JoinSet<()>) {
    while let Some(ended) = workers.try_join_next() {
        if let Err(error) = ended
            && error.is_panic()
        {
            debug!(%error, "a run's worker panicked");
        }
    }
}

fn finished_report(
    run: &RunRequest,
    started: DateTime<Utc>,
    finished: DateTime<Utc>,
    attempts: u32,
    result: Result<String, String>,
) -> Report {
    let (outcome, message) = match result {
        Ok(message) => (Outcome::Succeeded, message),
        Err(message) => (Outcome::Failed, message),
    };
    Report::Finished {
        task: run.task.clone(),
        run: FinishedRun {
            run_id: run.run_id.clone(),
            trigger: run.trigger,
            scheduled: run.scheduled,
            started,
            finished,
            outcome,
            attempts,
            message: Some(message),
        },
    }
}

/// Runs all attempts of one run and reports its start and finish, recording both in the
/// ledger: its start first, which the ledger refuses once a newer leader took the task over
/// (fencing), then its end, which carries the task's counts.
async fn execute(
    context: &WorkerContext,
    guard: &mut RunGuard,
    cancel: &Cancel,
    worker: OwnedSemaphorePermit,
) {
    let run = &guard.run;
    let starting = if run.adopted {
        context.ledger.adopt(&run.run_id, &run.term).await
    } else {
        context
            .ledger
            .mark(&run.run_id, &run.term, Mark::Started)
            .await
    };
    let refusal = match starting {
        Ok(marked) if marked.verdict == Verdict::Accepted => None,
        Ok(marked) => Some(format!(
            "the ledger refused its start ({:?})",
            marked.verdict
        )),
        Err(error) => {
            let reason = format!("cannot record the run's start: {error}");
            context
                .sink
                .record(missed(run, MissKind::Claim, reason.clone()));
            Some(reason)
        }
    };
    if let Some(reason) = refusal {
        warn!(%reason, "run not started");
        guard.reported = true;
        return;
    }
    let job = match &run.spec.action {
        Action::Job(action) => Some((job::job_name(&run.task, &run.run_id), action)),
        _ => None,
    };
    context.sink.record(Report::Started {
        task: run.task.clone(),
        run_id: run.run_id.clone(),
        trigger: run.trigger,
        scheduled: run.scheduled,
        due: run.due,
        started: guard.started,
        job: job.as_ref().map(|(name, _)| name.clone()),
    });
    let (attempts, result) = match job {
        Some((name, action)) => match run_job(context, run, &name, action, cancel, worker).await {
            Some(end) => end,
            None => {
                // Shut down with the Job running: it runs on, and whoever leads next finds it
                // by name and records its end (the run stays started in the ledger and in
                // status.active).
                info!(job = %name, "shutting down; the run's Job runs on and is adopted by the next leader");
                guard.reported = true;
                return;
            }
        },
        None => attempt_all(context, run, cancel).await,
    };
    let result = match cancel.reason.get() {
        Some(reason) => Err(reason.to_string()),
        None => result,
    };
    match &result {
        // Not `message`: that is the event's own field, and JSON logs would carry it twice.
        Ok(result) if context.log_success => info!(attempts, %result, "run succeeded"),
        Ok(_) => {}
        Err(error) => warn!(attempts, %error, "run failed"),
    }
    let finished = context.clock.now();
    let succeeded = result.is_ok();
    context.sink.record(finished_report(
        run,
        guard.started,
        finished,
        attempts,
        result,
    ));
    guard.reported = true;
    let mark = Mark::Finished { succeeded };
    match context.ledger.mark(&run.run_id, &run.term, mark).await {
        Ok(marked) => {
            if let Some(counts) = marked.counts {
                let task = run.task.clone();
                context.sink.record(Report::Counts { task, counts });
            }
        }
        // The record stays `started`: the next take-over counts it failed (outcome unknown).
        Err(error) => warn!(%error, "cannot record the run's end in the ledger"),
    }
}

/// Every attempt of a run, with the task's timeout on each and its retry policy between them.
async fn attempt_all(
    context: &WorkerContext,
    run: &RunRequest,
    cancel: &Cancel,
) -> (u32, Result<String, String>) {
    let spec = &run.spec;
    let mut attempts = 0;
    let result = loop {
        attempts += 1;
        let attempt = attempt_once(context, run, attempts);
        let result = tokio::select! {
            _ = cancel.token.cancelled() => break Err(String::new()),
            result = tokio::time::timeout(spec.timeout, attempt) => result
                .unwrap_or_else(|_| Err(format!("timed out after {}", crate::schedule::format_duration(spec.timeout)))),
        };
        match result {
            Ok(message) => break Ok(message),
            Err(message) if attempts >= spec.retry.max_attempts() => break Err(message),
            Err(message) => {
                let delay = spec.retry.delay(attempts);
                debug!(attempt = attempts, error = %message, ?delay, "attempt failed; retrying");
                tokio::select! {
                    _ = cancel.token.cancelled() => break Err(message),
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    };
    (attempts, result)
}

/// Counts a Job run that waits without a worker, for as long as it lives.
struct JobWait<'a>(&'a AtomicUsize);

impl<'a> JobWait<'a> {
    fn count(waits: &'a AtomicUsize) -> Self {
        waits.fetch_add(1, Ordering::Relaxed);
        JobWait(waits)
    }
}

impl Drop for JobWait<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A Job run: its Job is created (or found) and watched until it ends; Kubernetes retries and
/// times it out (`backoffLimit`, `activeDeadlineSeconds`). The worker is held only to create
/// the Job: waiting for it costs a watch, not a worker. Cancelled by Replace or an invalid
/// spec, the Job is deleted; by a shutdown, it runs on and `None` is returned.
async fn run_job(
    context: &WorkerContext,
    run: &RunRequest,
    name: &str,
    action: &JobAction,
    cancel: &Cancel,
    worker: OwnedSemaphorePermit,
) -> Option<(u32, Result<String, String>)> {
    let job = job::JobRun {
        task: &run.task,
        run_id: &run.run_id,
        scheduled: run.scheduled,
        name,
        action,
        adopted: run.adopted,
    };
    // The spec's timeout is the Job's deadline and a grace (`JobAction::deadline`).
    let run_job = async {
        if !run.adopted {
            context.jobs.create(job).await?;
        }
        drop(worker);
        let _counted = JobWait::count(&context.job_waits);
        Ok(context.jobs.wait(job).await)
    };
    let waited = tokio::select! {
        _ = cancel.token.cancelled() => None,
        end = tokio::time::timeout(run.spec.timeout, run_job) => Some(end),
    };
    match waited {
        Some(Ok(Ok(end))) => Some((end.attempts, end.result)),
        Some(Ok(Err(cannot_create))) => Some((1, Err(cannot_create))),
        Some(Err(_)) => Some((
            1,
            Err(format!(
                "Job {name} did not end within its activeDeadlineSeconds ({}) and {} more: is \
                 the cluster's Job controller running?",
                crate::schedule::format_duration(action.deadline),
                crate::schedule::format_duration(job::JOB_DEADLINE_GRACE)
            )),
        )),
        None => match cancel.reason.get() {
            Some(CancelReason::Shutdown) => None,
            _ => {
                context.jobs.stop(&run.task.key.namespace, name).await;
                Some((1, Err(String::new())))
            }
        },
    }
}

async fn attempt_once(
    context: &WorkerContext,
    run: &RunRequest,
    number: u32,
) -> Result<String, String> {
    let attempt = http::Attempt {
        namespace: &run.task.key.namespace,
        run_id: &run.run_id,
        scheduled: run.scheduled,
        number,
    };
    match &run.spec.action {
        Action::Http(action) => {
            http::attempt(&context.http, &context.values, action, attempt).await
        }
        Action::Exec(action) => exec::attempt(action, attempt).await,
        Action::Job(_) => Err("internal error: a Job run has no attempts of its own".into()),
        Action::Call(call) => {
            let info = RunInfo {
                run_id: run.run_id.to_string(),
                scheduled: run.scheduled,
                attempt: number,
            };
            (call.0)(info).await
        }
    }
}

/// Shared by the engine's and the executor's unit tests.
#[cfg(test)]
pub(crate) mod fixtures {
    use super::*;

    /// The single-replica ledger.
    pub fn memory_ledger() -> Arc<dyn Ledger> {
        Arc::new(crate::ledger::MemoryLedger::new(Duration::from_secs(3600)))
    }

    /// A `Forbid` POST to `url` with no retry.
    pub fn http_spec(url: &str, timeout: Duration, starting_deadline: Option<Duration>) -> RunSpec {
        RunSpec {
            action: Action::Http(HttpAction {
                url: url.parse().unwrap(),
                method: reqwest::Method::POST,
                headers: Vec::new(),
                body: None,
                success_codes: http::SuccessCodes::parse(&[]).unwrap(),
                follow_redirects: crate::policy::FollowRedirects::Never,
                tls: http::Tls::default(),
            }),
            timeout,
            retry: RetryPolicy::default(),
            concurrency: ConcurrencyPolicy::Forbid,
            max_concurrent_runs: 1,
            starting_deadline,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::http_spec;
    use super::http::NoValues;
    use super::*;
    use crate::run::TaskKey;
    use chrono::TimeZone;

    fn executor() -> (Executor, tokio::sync::mpsc::UnboundedReceiver<Report>) {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let (tx, reports) = tokio::sync::mpsc::unbounded_channel();
        let config = ExecutorConfig {
            max_workers: 2,
            queue_size: 10,
            log_success: false,
        };
        let (executor, _task) = Executor::new(
            config,
            Arc::new(tx),
            Clock::System,
            http::client().unwrap(),
            Arc::new(NoValues),
            Arc::new(job::NoJobs),
            fixtures::memory_ledger(),
        );
        (executor, reports)
    }

    fn request(
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

    #[tokio::test]
    async fn the_starting_deadline_counts_from_the_jittered_start() {
        let (executor, _reports) = executor();
        let now = Utc::now();
        let deadline = Some(Duration::from_secs(1));
        // Scheduled 10 s ago with a 10 s jitter: due now, so within its 1 s deadline.
        executor.submit(request(now - chrono::Duration::seconds(10), now, deadline));
        let mut missed = Vec::new();
        assert!(
            executor.shared.next_run(&mut missed).is_some(),
            "{missed:?}"
        );
    }

    #[tokio::test]
    async fn a_run_the_previous_leader_may_still_run_holds_forbid_until_released() {
        let (executor, mut reports) = executor();
        let now = Utc::now();
        let first = request(now, now, None); // Forbid
        let task = first.task.clone();
        let theirs = RunId::new(&task, now - chrono::Duration::seconds(1));
        executor.hold_elsewhere(&task, vec![theirs.clone()]);
        executor.submit(first);
        match reports.try_recv() {
            Ok(Report::Missed { reason, .. }) => {
                assert!(reason.contains(theirs.as_str()), "{reason}");
            }
            other => panic!("expected a miss, got {other:?}"),
        }
        executor.release_elsewhere(&task, &[theirs]);
        let later = now + chrono::Duration::seconds(1);
        executor.submit(request(later, later, None));
        assert!(
            reports.try_recv().is_err(),
            "admitted once the hold is released"
        );
        let mut missed = Vec::new();
        assert!(executor.shared.next_run(&mut missed).is_some());
    }

    #[test]
    fn the_longest_run_counts_every_attempt_and_wait() {
        let mut spec = http_spec("http://127.0.0.1:9/", Duration::from_secs(10), None);
        assert_eq!(spec.longest(), Duration::from_secs(10));
        spec.retry.max_retries = 2; // waits 1 s, then 2 s
        assert_eq!(spec.longest(), Duration::from_secs(33));
    }

    #[tokio::test]
    async fn a_run_past_its_starting_deadline_is_missed_not_started() {
        let (executor, _reports) = executor();
        let due = Utc::now() - chrono::Duration::seconds(5);
        executor.submit(request(due, due, Some(Duration::from_secs(1))));
        let mut missed = Vec::new();
        assert!(executor.shared.next_run(&mut missed).is_none());
        assert!(
            matches!(&missed[..], [Report::Missed { reason, .. }] if reason.contains("starting deadline")),
            "{missed:?}"
        );
    }

    #[tokio::test]
    async fn a_task_recreated_under_the_same_name_inherits_nothing() {
        let (executor, _reports) = executor();
        let now = Utc::now();
        let old = request(now, now, None);
        executor.submit(old.clone());
        let mut missed = Vec::new();
        assert!(executor.shared.next_run(&mut missed).is_some(), "in flight");
        let mut queued = request(now + chrono::Duration::seconds(1), now, None);
        queued.run_id = RunId::new(&old.task, queued.scheduled);
        // The old object is deleted while one of its runs is in flight; a new one of the same
        // name (another uid) is due at once. Forbid looks at its own runs only.
        executor.retire(&old.task, Retire::Deleted);
        let mut new = queued;
        new.task.uid = "uid-2".into();
        executor.submit(new);
        let (started, _) = executor.shared.next_run(&mut missed).expect("not blocked");
        assert_eq!(started.task.uid, "uid-2");
        assert!(missed.is_empty(), "{missed:?}");
    }

    #[tokio::test]
    async fn a_worker_that_panics_reports_a_failure_and_frees_its_task() {
        let (executor, mut reports) = executor();
        let at = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
        let task = TaskId::new(TaskKey::new("ns", "t"), "uid");
        let run = request(at, at, None);
        executor.submit(run);
        let mut dropped = Vec::new();
        let (run, _cancel) = executor.shared.next_run(&mut dropped).unwrap();
        let guard = RunGuard {
            shared: executor.shared.clone(),
            run: run.clone(),
            started: at,
            reported: false,
        };
        let worker = tokio::spawn(async move {
            let _guard = guard;
            panic!("a bug in an action");
        });
        assert!(worker.await.unwrap_err().is_panic());
        match reports.recv().await {
            Some(Report::Finished { run, .. }) => {
                assert_eq!(run.outcome, Outcome::Failed);
                assert!(run.message.unwrap().contains("panicked"));
            }
            other => panic!("expected a failed run, got {other:?}"),
        }
        assert!(executor.shared.lock().tasks.is_empty(), "the task is free");
        let mut next = run;
        next.run_id = RunId::new(&task, at + chrono::Duration::seconds(1));
        executor.submit(next);
        assert!(
            executor.shared.next_run(&mut dropped).is_some(),
            "a Forbid task's next run can start"
        );
    }
}
