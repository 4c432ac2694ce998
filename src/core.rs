//! The run path's core, assembled in one place: the engine (timers, claims, run-now,
//! backfills) and the executor (the bounded worker pool and the actions) over a ledger. The
//! operator, standalone mode and the tests build it here and differ only in what they feed it
//! (tasks from the watch or from files) and where its reports go. Free of `kube`.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::Error;
use crate::clock::Clock;
use crate::config::OperatorConfig;
use crate::engine::{Engine, EngineHandle, EngineParts};
use crate::executor::http::{AddressPolicy, HttpClient, ValueSource};
use crate::executor::job::{JobRunner, NoJobs};
use crate::executor::{Executor, ExecutorConfig, ExecutorTask, LoadGauge};
use crate::ledger::Ledger;
use crate::run::ReportSink;
use crate::shard::Terms;

/// What a core is made of.
pub struct CoreParts {
    /// The worker pool's and the queue's sizes.
    pub executor: ExecutorConfig,
    /// `limits.max_runs_per_namespace` (0: no cap).
    pub max_runs_per_namespace: usize,
    /// `limits.max_workers_per_namespace`: the most workers one namespace holds at once.
    pub max_workers_per_namespace: usize,
    /// `limits.backfill_runs_per_second`.
    pub backfill_per_second: u32,
    /// The client HTTP actions are sent with (its address policy included).
    pub http: HttpClient,
    /// Where header values and CA bundles come from.
    pub values: Arc<dyn ValueSource>,
    /// Creates and watches the Jobs of Job actions (the operator's; elsewhere [`NoJobs`]).
    pub jobs: Arc<dyn JobRunner>,
    /// Where runs are claimed and their steps recorded.
    pub ledger: Arc<dyn Ledger>,
    /// Where every report goes (the status index, history, a channel in tests).
    pub sink: Arc<dyn ReportSink>,
    /// The terms of the shards this replica holds; every shard from start to end where no
    /// election runs.
    pub leader: watch::Receiver<Terms>,
    /// The time source (paused tokio time in tests).
    pub clock: Clock,
}

impl CoreParts {
    /// The parts the configuration sets (workers, queue, limits, where HTTP actions may
    /// connect), around the host's values, ledger, sink and leadership.
    pub fn from_config(
        config: &OperatorConfig,
        values: Arc<dyn ValueSource>,
        ledger: Arc<dyn Ledger>,
        sink: Arc<dyn ReportSink>,
        leader: watch::Receiver<Terms>,
    ) -> Result<CoreParts, Error> {
        let policy = AddressPolicy {
            deny: config.http.deny_cidrs.clone(),
            allow: config.http.allow_cidrs.clone(),
        };
        let http = HttpClient::new(policy, config.http.reqwest_proxy())
            .map_err(|e| Error::Startup(format!("cannot build the HTTP client: {e}")))?;
        Ok(CoreParts {
            executor: ExecutorConfig {
                max_workers: config.max_workers,
                queue_size: config.queue_size,
                log_success: config.log.log_task_success,
            },
            max_runs_per_namespace: config.limits.max_runs_per_namespace,
            max_workers_per_namespace: config.limits.workers_per_namespace(config.max_workers),
            backfill_per_second: config.limits.backfill_runs_per_second,
            http,
            values,
            jobs: Arc::new(NoJobs),
            ledger,
            sink,
            leader,
            clock: Clock::System,
        })
    }
}

/// A built core: feed it through [`Core::engine`], start it with [`Core::spawn`].
pub struct Core {
    /// Adds, changes, pauses and removes tasks.
    pub engine: EngineHandle,
    /// How busy the worker pool is (for metrics and `/stats`).
    pub load: LoadGauge,
    parts: Option<(Engine, ExecutorTask)>,
}

impl Core {
    /// Builds the engine and the executor; nothing runs before [`Core::spawn`].
    pub fn build(parts: CoreParts) -> Core {
        let (executor, executor_task) = Executor::new(
            parts.executor,
            parts.sink.clone(),
            parts.clock,
            parts.http,
            parts.values,
            parts.jobs,
            parts.ledger.clone(),
        );
        executor.limit_runs_per_namespace(parts.max_runs_per_namespace);
        executor.limit_workers_per_namespace(parts.max_workers_per_namespace);
        let load = executor.gauge();
        let (engine, handle) = Engine::new(EngineParts {
            executor,
            ledger: parts.ledger,
            leader: parts.leader,
            sink: parts.sink,
            clock: parts.clock,
            backfill_per_second: parts.backfill_per_second,
        });
        Core {
            engine: handle,
            load,
            parts: Some((engine, executor_task)),
        }
    }

    /// Starts the engine and the workers in `tasks`. On `stop` they stop firing; runs in flight
    /// may finish within `grace`, then are cancelled; every run ends in a report.
    pub fn spawn(&mut self, tasks: &mut JoinSet<()>, stop: &CancellationToken, grace: Duration) {
        if let Some((engine, executor_task)) = self.parts.take() {
            tasks.spawn(engine.run(stop.clone()));
            tasks.spawn(executor_task.run(stop.clone(), grace));
        }
    }
}
