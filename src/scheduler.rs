//! Embedding chronflow in a Rust service: the same core as the operator and standalone mode
//! (seconds-precision cron, intervals, one-shots, time zones, retries, timeouts, concurrency
//! policies, a bounded worker pool), fed from code.
//!
//! ```no_run
//! use std::time::Duration;
//! use chronflow::scheduler::{Scheduler, Task};
//!
//! # async fn example() -> Result<(), chronflow::scheduler::SchedulerError> {
//! let scheduler = Scheduler::builder().max_workers(4).start()?;
//! scheduler
//!     .add(Task::every("heartbeat", Duration::from_secs(5))?.run(|run| async move {
//!         println!("{} (attempt {})", run.run_id, run.attempt);
//!         Ok("sent".to_string())
//!     }))
//!     .await?;
//! scheduler.pause("heartbeat").await?;
//! scheduler.resume("heartbeat").await?;
//! for task in scheduler.tasks() {
//!     println!("{}: {} runs, {:?}", task.name, task.runs, task.success_rate);
//! }
//! scheduler.shutdown().await;
//! # Ok(())
//! # }
//! ```
//!
//! Tasks can also come from the ChronTask manifests the operator takes
//! ([`Scheduler::add_manifest`]), validated the same way.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::core::{Core, CoreParts};
use crate::crd::ChronTask;
pub use crate::crd::Phase;
use crate::engine::{EngineHandle, EngineTask};
use crate::executor::http::{HttpClient, NoValues};
use crate::executor::{Action, CallAction, ExecutorConfig, LoadGauge, RunSpec};
pub use crate::executor::{RetryPolicy, RunInfo};
use crate::leader::{Term, Terms};
use crate::ledger::MemoryLedger;
use crate::policy::CatchUpPolicy;
pub use crate::policy::{Backoff, ConcurrencyPolicy};
use crate::run::{TaskId, TaskKey};
use crate::schedule::{IntervalAnchor, Schedule};
use crate::status::{Observed, StatusIndex, events};

/// The namespace of embedded tasks (run ids read `embedded/<name>@<instant>`).
pub const NAMESPACE: &str = "embedded";

/// What went wrong, naming the task or the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SchedulerError(pub String);

impl From<crate::schedule::ScheduleError> for SchedulerError {
    fn from(error: crate::schedule::ScheduleError) -> Self {
        SchedulerError(error.to_string())
    }
}

/// A task to add: a name, a schedule, how its runs go, and what they do.
pub struct Task {
    name: String,
    schedule: Schedule,
    action: Option<Action>,
    timeout: Duration,
    retry: RetryPolicy,
    concurrency: ConcurrencyPolicy,
    max_concurrent_runs: u32,
}

impl Task {
    /// Due at every instant of a cron expression (6 fields with seconds, or 5), in UTC.
    pub fn cron(name: &str, expr: &str) -> Result<Task, SchedulerError> {
        Task::cron_in(name, expr, "UTC")
    }

    /// Due at every instant of a cron expression read in an IANA time zone.
    pub fn cron_in(name: &str, expr: &str, timezone: &str) -> Result<Task, SchedulerError> {
        let tz: Tz = crate::schedule::parse_timezone(timezone)?;
        Ok(Task::new(name, Schedule::cron(expr, tz)?))
    }

    /// Due every `period`, on a grid anchored at the Unix epoch (5 s: :00, :05, ...).
    pub fn every(name: &str, period: Duration) -> Result<Task, SchedulerError> {
        let anchor = IntervalAnchor::Start(DateTime::UNIX_EPOCH);
        Ok(Task::new(name, Schedule::interval(period, anchor)?))
    }

    /// Due once, at `instant`.
    pub fn at(name: &str, instant: DateTime<Utc>) -> Task {
        Task::new(name, Schedule::at(instant))
    }

    fn new(name: &str, schedule: Schedule) -> Task {
        Task {
            name: name.to_string(),
            schedule,
            action: None,
            timeout: Duration::from_secs(30),
            retry: RetryPolicy::default(),
            concurrency: ConcurrencyPolicy::Forbid,
            max_concurrent_runs: 10,
        }
    }

    /// Time limit of each attempt (default 30 s); the attempt's future is dropped after it.
    pub fn timeout(mut self, timeout: Duration) -> Task {
        self.timeout = timeout;
        self
    }

    /// Retries of a failed attempt, with their backoff (default: none).
    pub fn retry(mut self, retry: RetryPolicy) -> Task {
        self.retry = retry;
        self
    }

    /// What happens when a run is due while the previous one still runs (default `Forbid`).
    pub fn concurrency(mut self, policy: ConcurrencyPolicy) -> Task {
        self.concurrency = policy;
        self
    }

    /// What a run does: `f` is called per attempt; `Ok(message)` succeeds, `Err(message)`
    /// fails.
    pub fn run<F, Fut>(mut self, f: F) -> Task
    where
        F: Fn(RunInfo) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<String, String>> + Send + 'static,
    {
        let call =
            move |info: RunInfo| -> futures::future::BoxFuture<'static, _> { Box::pin(f(info)) };
        self.action = Some(Action::Call(CallAction(Arc::new(call))));
        self
    }
}

/// A task as the scheduler reports it.
#[derive(Clone, Debug, PartialEq)]
pub struct TaskStats {
    /// The task's name.
    pub name: String,
    /// Its schedule, e.g. `every 5s` or `*/5 * * * * * (UTC)`.
    pub schedule: Option<String>,
    /// Scheduled, Running, Failed, Paused, Completed or Invalid.
    pub phase: Option<Phase>,
    /// The next instant it is due.
    pub next_run: Option<DateTime<Utc>>,
    /// Finished runs (successful + failed).
    pub runs: u64,
    /// Runs that succeeded.
    pub successful: u64,
    /// Runs that failed after all their attempts.
    pub failed: u64,
    /// Due instants not run (concurrency policy, queue full, deadline).
    pub missed: u64,
    /// successful / (successful + failed), e.g. `98.5%`.
    pub success_rate: Option<String>,
}

/// How busy the scheduler is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stats {
    /// Tasks registered.
    pub tasks: usize,
    /// Runs waiting for a worker.
    pub waiting: usize,
    /// Workers running a run.
    pub busy_workers: usize,
    /// The worker pool's size.
    pub max_workers: usize,
}

/// Sizes of a scheduler; [`SchedulerBuilder::start`] starts it.
pub struct SchedulerBuilder {
    max_workers: usize,
    queue_size: usize,
    grace: Duration,
}

impl SchedulerBuilder {
    /// Size of the worker pool (default 10).
    pub fn max_workers(mut self, workers: usize) -> Self {
        self.max_workers = workers.max(1);
        self
    }

    /// Runs that may wait for a worker (default 100 000, about 0.7 KB each): a bound on memory.
    /// When it is full a due run is counted missed, in turn between tasks.
    pub fn queue_size(mut self, size: usize) -> Self {
        self.queue_size = size.max(1);
        self
    }

    /// How long runs in flight may finish at [`Scheduler::shutdown`] (default 25 s).
    pub fn shutdown_grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// Starts the scheduler on the current tokio runtime.
    pub fn start(self) -> Result<Scheduler, SchedulerError> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let clock = Clock::System;
        let (_term, leader) = watch::channel(Terms::all(Term::single("embedded")));
        let (events_tx, _events) = mpsc::channel(events::EVENT_QUEUE);
        let index = StatusIndex::new(events_tx, clock);
        let http = HttpClient::new(Default::default(), None)
            .map_err(|e| SchedulerError(format!("cannot build the HTTP client: {e}")))?;
        let mut core = Core::build(CoreParts {
            executor: ExecutorConfig {
                max_workers: self.max_workers,
                queue_size: self.queue_size,
                log_success: false,
            },
            max_runs_per_namespace: 0,
            max_workers_per_namespace: usize::MAX,
            backfill_per_second: 10,
            http,
            values: Arc::new(NoValues),
            jobs: Arc::new(crate::executor::job::NoJobs),
            ledger: Arc::new(MemoryLedger::new(MemoryLedger::IDLE)),
            sink: Arc::new(index.clone()),
            leader,
            clock,
        });
        let stop = CancellationToken::new();
        let mut tasks = JoinSet::new();
        core.spawn(&mut tasks, &stop, self.grace);
        Ok(Scheduler {
            engine: core.engine,
            load: core.load,
            index,
            stop,
            running: Mutex::new(tasks),
            registered: Mutex::new(HashMap::new()),
        })
    }
}

/// A running scheduler. Dropping it stops firing; [`Scheduler::shutdown`] also waits for runs
/// in flight.
pub struct Scheduler {
    engine: EngineHandle,
    load: LoadGauge,
    index: StatusIndex,
    stop: CancellationToken,
    running: Mutex<JoinSet<()>>,
    /// Registered tasks by name, as last given to the engine.
    registered: Mutex<HashMap<String, EngineTask>>,
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Scheduler {
    /// A scheduler's sizes, then [`SchedulerBuilder::start`].
    pub fn builder() -> SchedulerBuilder {
        SchedulerBuilder {
            max_workers: 10,
            queue_size: 100_000,
            grace: Duration::from_secs(25),
        }
    }

    /// Adds `task`, or replaces the task of that name.
    pub async fn add(&self, task: Task) -> Result<(), SchedulerError> {
        let action = task
            .action
            .ok_or_else(|| SchedulerError(format!("task {}: no action (call .run)", task.name)))?;
        let key = TaskKey::new(NAMESPACE, task.name.clone());
        let engine_task = EngineTask {
            id: TaskId::new(key, task.name.clone()),
            generation: 1,
            schedule: task.schedule,
            jitter: None,
            catch_up: CatchUpPolicy::Skip,
            catch_up_from: None,
            paused: None,
            run: Arc::new(RunSpec {
                action,
                timeout: task.timeout,
                retry: task.retry,
                concurrency: task.concurrency,
                max_concurrent_runs: task.max_concurrent_runs,
                starting_deadline: None,
            }),
            run_now: None,
            backfills: Vec::new(),
            adopt: Vec::new(),
            counts: None,
        };
        self.upsert(engine_task).await;
        Ok(())
    }

    /// Adds the tasks of ChronTask manifests (YAML, several documents allowed; `http` and
    /// `exec` actions), validated as the operator validates them.
    pub async fn add_manifest(&self, yaml: &str) -> Result<(), SchedulerError> {
        use serde::Deserialize;
        for document in serde_yaml::Deserializer::from_str(yaml) {
            let mut task = ChronTask::deserialize(document)
                .map_err(|e| SchedulerError(format!("manifest: {e}")))?;
            let name = task.metadata.name.clone().unwrap_or_default();
            task.metadata.namespace = Some(NAMESPACE.into());
            task.metadata.uid = Some(name.clone());
            task.metadata.generation = Some(1);
            task.metadata.creation_timestamp =
                Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
                ));
            let mut valid = crate::controller::validate::validate(&task, Tz::UTC)
                .map_err(|invalid| SchedulerError(format!("{name}: {invalid}")))?;
            valid.engine.catch_up_from = None;
            self.upsert(valid.engine).await;
        }
        Ok(())
    }

    async fn upsert(&self, mut task: EngineTask) {
        let name = task.id.key.name.clone();
        if let Some(known) = self.registered().get(&name) {
            task.generation = known.generation + 1;
        }
        self.index.observe(Observed {
            task: task.id.clone(),
            generation: Some(task.generation),
            status: None,
            history: Default::default(),
        });
        self.registered().insert(name, task.clone());
        self.engine.upsert(task).await;
    }

    fn registered(&self) -> std::sync::MutexGuard<'_, HashMap<String, EngineTask>> {
        self.registered.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn task(&self, name: &str) -> Result<EngineTask, SchedulerError> {
        self.registered()
            .get(name)
            .cloned()
            .ok_or_else(|| SchedulerError(format!("no task named {name:?}")))
    }

    /// Stops firing the task until [`Scheduler::resume`]; runs in flight finish.
    pub async fn pause(&self, name: &str) -> Result<(), SchedulerError> {
        let mut task = self.task(name)?;
        task.paused = Some(String::new());
        self.upsert(task).await;
        Ok(())
    }

    /// Fires the task again, from now on (the paused period is not replayed).
    pub async fn resume(&self, name: &str) -> Result<(), SchedulerError> {
        let mut task = self.task(name)?;
        task.paused = None;
        self.upsert(task).await;
        Ok(())
    }

    /// Removes the task; its runs in flight are cancelled.
    pub async fn remove(&self, name: &str) -> Result<(), SchedulerError> {
        let task = self.task(name)?;
        self.registered().remove(name);
        self.engine.remove(task.id.clone()).await;
        self.index.forget(&task.id);
        Ok(())
    }

    /// Every task with its statistics, by name.
    pub fn tasks(&self) -> Vec<TaskStats> {
        let mut names: Vec<String> = self.registered().keys().cloned().collect();
        names.sort();
        let mut index = self.index.lock();
        names
            .into_iter()
            .map(|name| {
                let status = index
                    .status(&TaskKey::new(NAMESPACE, name.clone()))
                    .unwrap_or_default();
                TaskStats {
                    name,
                    schedule: status.schedule,
                    phase: status.phase,
                    next_run: status.next_run_time,
                    runs: status.total_runs,
                    successful: status.successful_runs,
                    failed: status.failed_runs,
                    missed: status.missed_runs,
                    success_rate: status.success_rate,
                }
            })
            .collect()
    }

    /// How busy the scheduler is.
    pub fn stats(&self) -> Stats {
        let load = self.load.load();
        Stats {
            tasks: self.registered().len(),
            waiting: load.map_or(0, |l| l.waiting),
            busy_workers: load.map_or(0, |l| l.busy_workers),
            max_workers: load.map_or(0, |l| l.max_workers),
        }
    }

    /// Stops firing, lets runs in flight finish within the shutdown grace (then cancels them),
    /// and returns once everything has stopped.
    pub async fn shutdown(self) {
        self.stop.cancel();
        let mut running =
            std::mem::take(&mut *self.running.lock().unwrap_or_else(|p| p.into_inner()));
        while running.join_next().await.is_some() {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test]
    async fn a_closure_runs_on_schedule_pauses_resumes_and_is_counted() {
        let scheduler = Scheduler::builder().max_workers(2).start().unwrap();
        let calls = Arc::new(AtomicU32::new(0));
        let counter = calls.clone();
        let task = Task::every("count", Duration::from_millis(200))
            .unwrap()
            .run(move |run| {
                let counter = counter.clone();
                async move {
                    counter.fetch_add(1, Ordering::SeqCst);
                    assert!(run.run_id.starts_with("embedded/count@"));
                    Ok("counted".to_string())
                }
            });
        scheduler.add(task).await.unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while scheduler.tasks()[0].runs < 3 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{:?}",
                scheduler.tasks()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let stats = &scheduler.tasks()[0];
        assert_eq!(stats.successful, stats.runs);
        assert_eq!(stats.success_rate.as_deref(), Some("100.0%"));
        scheduler.pause("count").await.unwrap();
        while scheduler.tasks()[0].phase != Some(Phase::Paused) {
            assert!(tokio::time::Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(scheduler.stats().tasks, 1);
        assert!(scheduler.pause("missing").await.is_err());
        scheduler.shutdown().await;
        assert!(calls.load(Ordering::SeqCst) >= 3);
    }

    #[tokio::test]
    async fn a_manifest_is_validated_as_the_operator_does() {
        let scheduler = Scheduler::builder().start().unwrap();
        let bad = "apiVersion: chronflow.io/v1alpha1\nkind: ChronTask\nmetadata: {name: bad}\n\
                   spec: {schedule: {cron: '61 * * * * *'}, action: {http: {url: 'http://x/'}}}\n";
        let error = scheduler.add_manifest(bad).await.unwrap_err();
        assert!(error.0.contains("spec.schedule.cron"), "{error}");
        let task = Task::every("no-action", Duration::from_secs(1)).unwrap();
        assert!(scheduler.add(task).await.is_err());
    }
}
