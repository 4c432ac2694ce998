//! The executor: a bounded run queue (`queue_size`) drained by a bounded worker pool
//! (`max_workers`). It applies each task's concurrency policy, runs the action with a timeout
//! per attempt and retries with backoff, and reports every start and finish. Free of `kube`.

pub mod http;
pub mod retry;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::policy::ConcurrencyPolicy;
use crate::run::{FinishedRun, Outcome, Report, RunId, TaskKey};
pub use http::{HttpAction, SecretSource};
pub use retry::RetryPolicy;

/// What a run does.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    Http(HttpAction),
}

/// How a task's runs are executed; shared by all runs of one task version.
#[derive(Clone, Debug, PartialEq)]
pub struct RunSpec {
    pub action: Action,
    pub timeout: Duration,
    pub retry: RetryPolicy,
    pub concurrency: ConcurrencyPolicy,
    /// A run that cannot start this long after its instant is missed.
    pub starting_deadline: Option<Duration>,
}

/// One scheduled run handed to the executor.
#[derive(Clone, Debug)]
pub struct RunRequest {
    pub task: TaskKey,
    pub run_id: RunId,
    pub scheduled: DateTime<Utc>,
    pub spec: Arc<RunSpec>,
}

/// Sizes of the executor's bounds.
#[derive(Clone, Copy, Debug)]
pub struct ExecutorConfig {
    pub max_workers: usize,
    pub queue_size: usize,
    /// Whether successful runs are logged at info level (`log.log_task_success`).
    pub log_success: bool,
}

/// Why a run was not accepted.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    #[error("run queue is full ({0} runs waiting)")]
    QueueFull(usize),
    #[error("executor is shutting down")]
    Closed,
}

/// Runs in flight, per task: what concurrency policies look at and what deletion cancels.
type ActiveRuns = Arc<Mutex<HashMap<TaskKey, Vec<ActiveRun>>>>;

struct ActiveRun {
    run_id: RunId,
    cancel: Cancel,
}

/// Why a run in flight was stopped.
#[derive(Clone, Debug)]
enum CancelReason {
    /// concurrencyPolicy Replace: a newer run of the task started; this one counts as failed.
    Replaced(RunId),
    /// The task was deleted: nothing is reported.
    TaskDeleted,
}

/// Cancels a run in flight, remembering why.
#[derive(Clone, Default)]
struct Cancel {
    token: CancellationToken,
    reason: Arc<std::sync::OnceLock<CancelReason>>,
}

impl Cancel {
    fn cancel(&self, reason: CancelReason) {
        let _ = self.reason.set(reason);
        self.token.cancel();
    }

    fn reason(&self) -> Option<&CancelReason> {
        self.reason.get()
    }
}

/// Handle for submitting runs; cheap to clone.
#[derive(Clone)]
pub struct Executor {
    queue: mpsc::Sender<RunRequest>,
    queue_size: usize,
    active: ActiveRuns,
}

/// The executor's worker side; drive it with [`ExecutorTask::run`].
pub struct ExecutorTask {
    queue: mpsc::Receiver<RunRequest>,
    workers: Arc<Semaphore>,
    active: ActiveRuns,
    context: Arc<WorkerContext>,
}

struct WorkerContext {
    reports: mpsc::Sender<Report>,
    http: reqwest::Client,
    secrets: Arc<dyn SecretSource>,
    log_success: bool,
}

impl Executor {
    pub fn new(
        config: ExecutorConfig,
        reports: mpsc::Sender<Report>,
        http: reqwest::Client,
        secrets: Arc<dyn SecretSource>,
    ) -> (Executor, ExecutorTask) {
        let (queue_tx, queue_rx) = mpsc::channel(config.queue_size.max(1));
        let active = ActiveRuns::default();
        let executor = Executor {
            queue: queue_tx,
            queue_size: config.queue_size,
            active: active.clone(),
        };
        let task = ExecutorTask {
            queue: queue_rx,
            workers: Arc::new(Semaphore::new(config.max_workers.max(1))),
            active,
            context: Arc::new(WorkerContext {
                reports,
                http,
                secrets,
                log_success: config.log_success,
            }),
        };
        (executor, task)
    }

    /// Queues a run without waiting: a full queue is back-pressure the caller must count.
    pub fn submit(&self, run: RunRequest) -> Result<(), SubmitError> {
        self.queue.try_send(run).map_err(|error| match error {
            mpsc::error::TrySendError::Full(_) => SubmitError::QueueFull(self.queue_size),
            mpsc::error::TrySendError::Closed(_) => SubmitError::Closed,
        })
    }

    /// Cancels the runs in flight of a task that was deleted; they report nothing.
    pub fn cancel_task(&self, task: &TaskKey) {
        let runs = lock(&self.active).remove(task).unwrap_or_default();
        for run in runs {
            debug!(run_id = %run.run_id, "cancelling run of deleted task");
            run.cancel.cancel(CancelReason::TaskDeleted);
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl ExecutorTask {
    /// Starts queued runs until `shutdown`, then lets runs in flight finish for up to `grace`
    /// and cancels the rest.
    pub async fn run(mut self, shutdown: CancellationToken, grace: Duration) {
        let mut workers = JoinSet::new();
        loop {
            let run = tokio::select! {
                _ = shutdown.cancelled() => break,
                Some(Ok(())) = workers.join_next(), if !workers.is_empty() => continue,
                run = self.queue.recv() => match run {
                    Some(run) => run,
                    None => break,
                },
            };
            // FIFO: a run waits here for a free worker, so the oldest due run starts first.
            let permit = tokio::select! {
                _ = shutdown.cancelled() => break,
                permit = self.workers.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break,
                },
            };
            if let Some(cancel) = self.admit(&run).await {
                let context = self.context.clone();
                let active = self.active.clone();
                let span = info_span!("run", run_id = %run.run_id);
                workers.spawn(
                    async move {
                        execute(&context, &run, &cancel).await;
                        finish(&active, &run);
                        drop(permit);
                    }
                    .instrument(span),
                );
            }
        }
        self.queue.close();
        if tokio::time::timeout(grace, async {
            while workers.join_next().await.is_some() {}
        })
        .await
        .is_err()
        {
            warn!(
                runs = workers.len(),
                "runs still in flight after the shutdown grace period; cancelling them"
            );
            workers.shutdown().await;
        }
    }

    /// Applies the starting deadline and the task's concurrency policy; returns the run's
    /// cancel handle when it may start. Decided under one lock, so two runs of a task can
    /// never both see "nothing active".
    async fn admit(&self, run: &RunRequest) -> Option<Cancel> {
        if let Some(deadline) = run.spec.starting_deadline {
            let late = (Utc::now() - run.scheduled).to_std().unwrap_or_default();
            if late > deadline {
                let reason =
                    format!("could not start within the starting deadline ({late:.1?} late)");
                self.missed(run, reason).await;
                return None;
            }
        }
        let forbidden_by = {
            let mut active = lock(&self.active);
            let in_flight = active.entry(run.task.clone()).or_default();
            match run.spec.concurrency {
                ConcurrencyPolicy::Forbid if !in_flight.is_empty() => {
                    Some(in_flight[0].run_id.clone())
                }
                policy => {
                    if policy == ConcurrencyPolicy::Replace {
                        for old in in_flight.drain(..) {
                            info!(replaced = %old.run_id, by = %run.run_id, "replacing run still in flight");
                            old.cancel
                                .cancel(CancelReason::Replaced(run.run_id.clone()));
                        }
                    }
                    let cancel = Cancel::default();
                    in_flight.push(ActiveRun {
                        run_id: run.run_id.clone(),
                        cancel: cancel.clone(),
                    });
                    return Some(cancel);
                }
            }
        };
        if let Some(previous) = forbidden_by {
            let reason = format!("previous run {previous} still active (concurrencyPolicy Forbid)");
            self.missed(run, reason).await;
        }
        None
    }

    async fn missed(&self, run: &RunRequest, reason: String) {
        warn!(run_id = %run.run_id, %reason, "run missed");
        let report = Report::Missed {
            task: run.task.clone(),
            count: 1,
            latest: run.scheduled,
            reason,
        };
        let _ = self.context.reports.send(report).await;
    }
}

/// Removes a finished run from the active set (unless a Replace or a deletion already did).
fn finish(active: &ActiveRuns, run: &RunRequest) {
    let mut active = lock(active);
    if let Some(runs) = active.get_mut(&run.task) {
        runs.retain(|r| r.run_id != run.run_id);
        if runs.is_empty() {
            active.remove(&run.task);
        }
    }
}

/// Runs all attempts of one run and reports its start and finish.
async fn execute(context: &WorkerContext, run: &RunRequest, cancel: &Cancel) {
    let started = Utc::now();
    let _ = context
        .reports
        .send(Report::Started {
            task: run.task.clone(),
            run_id: run.run_id.clone(),
            scheduled: run.scheduled,
            started,
        })
        .await;
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
                debug!(attempt = attempts, %message, ?delay, "attempt failed; retrying");
                tokio::select! {
                    _ = cancel.token.cancelled() => break Err(message),
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    };
    let result = match cancel.reason() {
        None => result,
        Some(CancelReason::TaskDeleted) => return,
        Some(CancelReason::Replaced(by)) => Err(format!("cancelled: replaced by {by}")),
    };
    let finished = Utc::now();
    let (outcome, message) = match result {
        Ok(message) => {
            if context.log_success {
                info!(attempts, %message, "run succeeded");
            }
            (Outcome::Succeeded, message)
        }
        Err(message) => {
            warn!(attempts, %message, "run failed");
            (Outcome::Failed, message)
        }
    };
    let report = Report::Finished {
        task: run.task.clone(),
        run: FinishedRun {
            run_id: run.run_id.clone(),
            scheduled: run.scheduled,
            started,
            finished,
            outcome,
            attempts,
            message: Some(message),
        },
    };
    let _ = context.reports.send(report).await;
}

async fn attempt_once(
    context: &WorkerContext,
    run: &RunRequest,
    number: u32,
) -> Result<String, String> {
    match &run.spec.action {
        Action::Http(action) => {
            let attempt = http::Attempt {
                namespace: &run.task.namespace,
                run_id: &run.run_id,
                scheduled: run.scheduled,
                number,
            };
            http::attempt(&context.http, &context.secrets, action, attempt).await
        }
    }
}
