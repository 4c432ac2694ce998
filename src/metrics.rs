//! Prometheus metrics with prometheus-client, served as OpenMetrics on `/metrics`: one registry
//! (prefix `chronflow`), a struct per concern with `register()`. Runs are counted from the
//! reports the engine and executor send ([`Recording`] sits in front of the status index, so
//! the two can never disagree); bounds and backlogs are read when scraped ([`Live`]).
//!
//! Cardinality: only `runs` and `missed_runs` carry per-task labels (`namespace`, `task`), one
//! series per task and outcome or reason, removed when the task is deleted;
//! `metrics.per_task_selector` limits them to the tasks whose labels match, and
//! `metrics.per_task: false` leaves them empty for very large installations. Every other label
//! has a fixed, small set of values.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};
use tokio::sync::watch;

use crate::config::TaskSelector;
use crate::executor::LoadGauge;
use crate::handover::Handovers;
use crate::leader::Term;
use crate::ledger::{
    Counts, Ledger, LedgerError, Mark, Marked, RedisLedger, RetriedMarks, TakeOver, Verdict,
};
use crate::members::View;
use crate::run::{MissKind, Outcome, Report, ReportSink, RunId, TaskId, TaskKey};
use crate::shard::Terms;
use crate::status::StatusIndex;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RunLabels {
    namespace: String,
    task: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MissLabels {
    namespace: String,
    task: String,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

/// The operator's metrics.
pub struct Metrics {
    registry: Registry,
    live: Arc<OnceLock<Live>>,
    /// Runs by outcome, start lag, durations, retries, missed runs.
    pub runs: RunMetrics,
    /// Claims by result.
    pub claims: ClaimMetrics,
    /// Reconcile errors by reason.
    pub reconcile: ReconcileMetrics,
}

impl Metrics {
    /// `per_task`: whether run and miss counts carry the task's namespace and name; `selector`:
    /// only those of the tasks it selects ([`Metrics::labels`]).
    pub fn new(per_task: bool, selector: Option<TaskSelector>) -> Self {
        let per_task = match per_task {
            false => PerTask::Nobody,
            true => PerTask::Live(selector, Mutex::default()),
        };
        let mut registry = Registry::with_prefix("chronflow");
        let runs = RunMetrics::register(&mut registry, per_task);
        let claims = ClaimMetrics::register(&mut registry);
        let reconcile = ReconcileMetrics::register(&mut registry);
        let live = Arc::new(OnceLock::new());
        registry.register_collector(Box::new(LiveSlot(live.clone())));
        Self {
            registry,
            live,
            runs,
            claims,
            reconcile,
        }
    }

    /// Adds the metrics read at scrape time (once the executor and index exist; the first call
    /// wins).
    pub fn watch(&self, live: Live) {
        let _ = self.live.set(live);
    }

    /// A task as applied, with its labels: its runs carry its namespace and name from now on
    /// when `metrics.per_task_selector` selects it (or there is none); a task no longer
    /// selected loses its series.
    pub fn labels(&self, task: &TaskKey, labels: &BTreeMap<String, String>) {
        if let PerTask::Live(selector, live) = &self.runs.per_task {
            let mut live = live.lock().unwrap_or_else(|p| p.into_inner());
            if selector.as_ref().is_none_or(|s| s.matches(labels)) {
                live.insert(task.clone());
            } else if live.remove(task) {
                self.runs.remove(task);
            }
        }
    }

    /// The task was deleted: its series go, and reports that arrive late (a run cancelled by
    /// the deletion) are counted in the series with empty labels.
    pub fn forget(&self, task: &TaskKey) {
        if let PerTask::Live(_, live) = &self.runs.per_task {
            live.lock().unwrap_or_else(|p| p.into_inner()).remove(task);
        }
        self.runs.remove(task);
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

/// Which tasks' run and miss counts carry their namespace and name.
enum PerTask {
    Nobody,
    /// The tasks applied and not deleted that the selector (if any) matched when last applied.
    Live(Option<TaskSelector>, Mutex<HashSet<TaskKey>>),
}

/// Runs, their duration, start lag, retries and misses.
pub struct RunMetrics {
    per_task: PerTask,
    runs: Family<RunLabels, Counter>,
    missed: Family<MissLabels, Counter>,
    duration: Histogram,
    start_lag: Histogram,
    retries: Counter,
}

impl RunMetrics {
    fn register(registry: &mut Registry, per_task: PerTask) -> Self {
        let metrics = Self {
            per_task,
            runs: Family::default(),
            missed: Family::default(),
            // 1 ms to about 9 h.
            duration: Histogram::new(exponential_buckets(0.001, 4.0, 13)),
            // 1 ms to about 65 s.
            start_lag: Histogram::new(exponential_buckets(0.001, 2.0, 17)),
            retries: Counter::default(),
        };
        registry.register(
            "runs",
            "Finished runs by outcome (succeeded, failed)",
            metrics.runs.clone(),
        );
        registry.register(
            "missed_runs",
            "Due instants not run, by reason (catch_up, deadline, queue_full, concurrency, withdrawn, shutdown, claim)",
            metrics.missed.clone(),
        );
        registry.register_with_unit(
            "run_duration",
            "From a run's first attempt to its end",
            Unit::Seconds,
            metrics.duration.clone(),
        );
        registry.register_with_unit(
            "start_lag",
            "From when a run was due (scheduled instant plus jitter) to its start",
            Unit::Seconds,
            metrics.start_lag.clone(),
        );
        registry.register(
            "retries",
            "Attempts after the first",
            metrics.retries.clone(),
        );
        metrics
    }

    fn task_labels(&self, task: &TaskId) -> (String, String) {
        let labelled = match &self.per_task {
            PerTask::Nobody => false,
            PerTask::Live(_, live) => live
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(&task.key),
        };
        if labelled {
            (task.key.namespace.clone(), task.key.name.clone())
        } else {
            (String::new(), String::new())
        }
    }

    /// Removes `task`'s series.
    fn remove(&self, task: &TaskKey) {
        let (namespace, name) = (&task.namespace, &task.name);
        for outcome in ["succeeded", "failed"] {
            self.runs.remove(&RunLabels {
                namespace: namespace.clone(),
                task: name.clone(),
                outcome,
            });
        }
        for kind in MissKind::ALL {
            self.missed.remove(&MissLabels {
                namespace: namespace.clone(),
                task: name.clone(),
                reason: kind.label(),
            });
        }
    }

    fn observe(&self, report: &Report) {
        match report {
            Report::Started { due, started, .. } => {
                let lag = (*started - *due).num_microseconds().unwrap_or(0).max(0);
                self.start_lag.observe(lag as f64 / 1e6);
            }
            Report::Finished { task, run } => {
                let (namespace, task) = self.task_labels(task);
                let outcome = match run.outcome {
                    Outcome::Succeeded => "succeeded",
                    Outcome::Failed => "failed",
                };
                self.runs
                    .get_or_create(&RunLabels {
                        namespace,
                        task,
                        outcome,
                    })
                    .inc();
                let took = (run.finished - run.started).num_microseconds().unwrap_or(0);
                self.duration.observe(took.max(0) as f64 / 1e6);
                self.retries
                    .inc_by(u64::from(run.attempts.saturating_sub(1)));
            }
            Report::Missed {
                task, count, kind, ..
            } => {
                let (namespace, task) = self.task_labels(task);
                let labels = MissLabels {
                    namespace,
                    task,
                    reason: kind.label(),
                };
                self.missed.get_or_create(&labels).inc_by(*count);
            }
            Report::Schedule { .. }
            | Report::Counts { .. }
            | Report::RequestHandled { .. }
            | Report::Backfill { .. } => {}
        }
    }
}

/// Claims of runs: claimed, duplicate (someone had it), error (the backend did not answer).
pub struct ClaimMetrics {
    claims: Family<ResultLabel, Counter>,
}

impl ClaimMetrics {
    fn register(registry: &mut Registry) -> Self {
        let claims = Family::default();
        registry.register("claims", "Run claims by result", claims.clone());
        Self { claims }
    }
}

/// Reconcile failures worth retrying, by reason.
pub struct ReconcileMetrics {
    errors: Family<ReasonLabel, Counter>,
}

impl ReconcileMetrics {
    fn register(registry: &mut Registry) -> Self {
        let errors = Family::default();
        registry.register(
            "reconcile_errors",
            "Reconcile failures by reason",
            errors.clone(),
        );
        Self { errors }
    }

    /// Counts a reconcile error of `reason`.
    pub fn error(&self, reason: &'static str) {
        self.errors.get_or_create(&ReasonLabel { reason }).inc();
    }
}

/// A [`ReportSink`] that counts each report, then hands it on.
pub struct Recording {
    /// Where runs are counted.
    pub metrics: Arc<Metrics>,
    /// Where every report goes on.
    pub inner: Arc<dyn ReportSink>,
}

impl ReportSink for Recording {
    fn record(&self, report: Report) {
        self.metrics.runs.observe(&report);
        self.inner.record(report);
    }
}

/// A [`Ledger`] that counts each claim's result.
pub struct CountedClaims {
    /// Where claims are counted.
    pub metrics: Arc<Metrics>,
    /// The ledger that answers them.
    pub inner: Arc<dyn Ledger>,
}

impl CountedClaims {
    fn counted<'a>(
        &'a self,
        claim: BoxFuture<'a, Result<Verdict, LedgerError>>,
    ) -> BoxFuture<'a, Result<Verdict, LedgerError>> {
        Box::pin(async move {
            let result = claim.await;
            let label = match &result {
                Ok(Verdict::Accepted) => "claimed",
                Ok(Verdict::Held(_) | Verdict::Busy(_)) => "duplicate",
                Ok(Verdict::Fenced { .. }) => "fenced",
                Err(_) => "error",
            };
            let labels = ResultLabel { result: label };
            self.metrics.claims.claims.get_or_create(&labels).inc();
            result
        })
    }
}

impl Ledger for CountedClaims {
    fn claim<'a>(
        &'a self,
        run: &'a RunId,
        term: &'a Term,
    ) -> BoxFuture<'a, Result<Verdict, LedgerError>> {
        self.counted(self.inner.claim(run, term))
    }

    fn claim_past<'a>(
        &'a self,
        run: &'a RunId,
        term: &'a Term,
    ) -> BoxFuture<'a, Result<Verdict, LedgerError>> {
        self.counted(self.inner.claim_past(run, term))
    }

    fn mark<'a>(
        &'a self,
        run: &'a RunId,
        term: &'a Term,
        mark: Mark,
    ) -> BoxFuture<'a, Result<Marked, LedgerError>> {
        self.inner.mark(run, term, mark)
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

/// What is read when scraped: the executor's queue and workers, the status writer's backlog
/// and results, leadership.
pub struct Live {
    /// The executor's load.
    pub executor: LoadGauge,
    /// Tasks by phase, status writes.
    pub status: StatusIndex,
    /// The terms of the shards this replica holds.
    pub leader: watch::Receiver<Terms>,
    /// The Redis ledger, when there is one.
    pub redis: Option<Arc<RedisLedger>>,
    /// Marks the shared ledger refused, kept to be sent again.
    pub kept_marks: Option<Arc<RetriedMarks>>,
    /// The local clock minus the ledger's, in ms, as the elector last measured it.
    pub clock_skew: Option<Arc<std::sync::atomic::AtomicI64>>,
    /// The live replicas (`src/members.rs`), with leader election.
    pub members: Option<watch::Receiver<View>>,
    /// The shards taken and let go (`src/handover.rs`), when sharded.
    pub handovers: Option<watch::Receiver<Handovers>>,
}

impl std::fmt::Debug for Live {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Live")
    }
}

/// Where [`Live`] goes once it exists: the registry is built before the executor it reads.
#[derive(Debug)]
struct LiveSlot(Arc<OnceLock<Live>>);

impl Collector for LiveSlot {
    fn encode(&self, encoder: DescriptorEncoder) -> std::fmt::Result {
        match self.0.get() {
            Some(live) => live.encode(encoder),
            None => Ok(()),
        }
    }
}

/// Counts one thing in progress on a gauge's counter for as long as it lives (a Job run waiting
/// without a worker, a Redis operation waiting for its answer), however it ends.
pub(crate) struct InProgress<'a>(&'a AtomicUsize);

impl<'a> InProgress<'a> {
    pub(crate) fn count(counter: &'a AtomicUsize) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        Self(counter)
    }
}

impl Drop for InProgress<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

fn counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: u64,
) -> std::fmt::Result {
    let counter = ConstCounter::new(value);
    counter.encode(encoder.encode_descriptor(name, help, None, counter.metric_type())?)
}

fn gauge(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: i64) -> std::fmt::Result {
    let gauge = ConstGauge::new(value);
    gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)
}

impl Collector for Live {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let Some(load) = self.executor.load() else {
            return Ok(());
        };
        let (counts, owned, backlog, staleness, budget, written_after) = {
            let index = self.status.lock();
            (
                index.counts(),
                index.owned_tasks(),
                index.pending_writes(),
                index.staleness(),
                index.write_budget(),
                index.staleness_histogram().clone(),
            )
        };
        let as_i64 = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        gauge(
            &mut encoder,
            "owned_tasks",
            "ChronTasks this replica runs and writes the status of: those of the shards it holds",
            as_i64(owned),
        )?;
        gauge(
            &mut encoder,
            "queue_depth",
            "Runs waiting for a worker",
            as_i64(load.waiting),
        )?;
        gauge(
            &mut encoder,
            "queue_capacity",
            "queue_size: the most runs that may wait",
            as_i64(load.queue_size),
        )?;
        let refused = ConstCounter::new(load.refused);
        refused.encode(encoder.encode_descriptor(
            "queue_refused",
            "Runs refused because the run queue was full, in turn between tasks: queue_size is \
             too small for the bursts",
            None,
            refused.metric_type(),
        )?)?;
        gauge(
            &mut encoder,
            "workers_busy",
            "Workers running a run",
            as_i64(load.busy_workers),
        )?;
        gauge(
            &mut encoder,
            "workers",
            "max_workers: the size of the worker pool",
            as_i64(load.max_workers),
        )?;
        let terms = self.leader.borrow().clone();
        gauge(
            &mut encoder,
            "leader",
            "1 while this replica leads (fires and writes status)",
            i64::from(!terms.is_empty()),
        )?;
        gauge(
            &mut encoder,
            "leader_epoch",
            "The epoch of this replica's newest term (0 without leader election or while not leading)",
            terms
                .newest()
                .map_or(0, |term| i64::try_from(term.epoch).unwrap_or(i64::MAX)),
        )?;
        gauge(
            &mut encoder,
            "shards",
            "The shards (of 256) whose tasks this replica runs",
            as_i64(terms.held()),
        )?;
        if let Some(redis) = &self.redis {
            gauge(
                &mut encoder,
                "redis_connections",
                "redis.max_connections: the multiplexed connections the ledger uses",
                as_i64(redis.connection_count()),
            )?;
            gauge(
                &mut encoder,
                "redis_operations_in_flight",
                "Ledger operations sent to Redis and not answered yet",
                as_i64(redis.in_flight()),
            )?;
        }
        if let Some(skew) = &self.clock_skew {
            gauge(
                &mut encoder,
                "clock_skew_milliseconds",
                "This replica's clock minus the Redis ledger's; beyond leader_election.max_clock_skew it does not lead",
                skew.load(std::sync::atomic::Ordering::Relaxed),
            )?;
        }
        if let Some(handovers) = &self.handovers {
            let handovers = handovers.borrow().clone();
            counter(
                &mut encoder,
                "shards_taken",
                "Shards this replica took from the ring since it started, each in a new term",
                handovers.taken,
            )?;
            counter(
                &mut encoder,
                "shards_released",
                "Shards this replica let go since it started (the ring gave them to others, it left or could not renew)",
                handovers.released,
            )?;
            gauge(
                &mut encoder,
                "last_handover_milliseconds",
                "From the ring's change to the shards taken, the last time this replica took shards",
                handovers
                    .last_duration
                    .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
            )?;
        }
        if let Some(view) = &self.members {
            let members = view.borrow().ring.members().len();
            gauge(
                &mut encoder,
                "members",
                "Live replicas: member Leases renewed within their duration, this one included",
                as_i64(members),
            )?;
        }
        if let Some(kept) = &self.kept_marks {
            gauge(
                &mut encoder,
                "ledger_marks_pending",
                "Finished and missed marks the ledger refused, kept and sent again until they land",
                as_i64(kept.pending()),
            )?;
        }
        gauge(
            &mut encoder,
            "status_write_backlog",
            "Tasks whose status changed and is not written yet",
            as_i64(backlog),
        )?;
        let staleness = ConstGauge::new(staleness.as_secs_f64());
        staleness.encode(encoder.encode_descriptor(
            "status_staleness_seconds",
            "How long the oldest status change not yet written has waited",
            None,
            staleness.metric_type(),
        )?)?;
        written_after.encode(encoder.encode_descriptor(
            "status_write_staleness_seconds",
            "For each status write that landed, how long the oldest change it carried had waited",
            None,
            written_after.metric_type(),
        )?)?;
        let budget = ConstGauge::new(budget);
        budget.encode(encoder.encode_descriptor(
            "status_write_budget",
            "Status writes per second the writer allows now: grows while the apiserver answers \
             quickly, halves on throttling or slow answers, at most status.max_writes_per_second",
            None,
            budget.metric_type(),
        )?)?;
        let writes = [
            ("written", counts.written),
            ("failed", counts.failed),
            ("throttled", counts.throttled),
            ("rejected", counts.rejected),
            ("gone", counts.gone),
        ];
        let family = ConstCounter::new(0u64);
        let mut metric = encoder.encode_descriptor(
            "status_writes",
            "Status writes by result (written, failed and retried, throttled by the apiserver and retried, rejected by the apiserver, gone)",
            None,
            family.metric_type(),
        )?;
        for (result, count) in writes {
            let labels = ResultLabel { result };
            ConstCounter::new(count).encode(metric.encode_family(&labels)?)?;
        }
        let counter = |encoder: &mut DescriptorEncoder, name: &str, help: &str, value: u64| {
            let counter = ConstCounter::new(value);
            counter.encode(encoder.encode_descriptor(name, help, None, counter.metric_type())?)
        };
        counter(
            &mut encoder,
            "events_dropped",
            "Events not sent because their queue was full",
            counts.events_dropped,
        )?;
        counter(
            &mut encoder,
            "stale_reports",
            "Reports about tasks already deleted or re-created",
            counts.stale_reports,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::run::Trigger;

    fn missed(task: &TaskId) -> Report {
        Report::Missed {
            task: task.clone(),
            count: 1,
            run: RunId::new(task, Utc::now()),
            trigger: Trigger::Schedule,
            kind: MissKind::Deadline,
            reason: "late".into(),
        }
    }

    /// A deleted task's series go, and what it reports late (a run the deletion cancelled) does
    /// not bring them back: series never grow with churn.
    #[test]
    fn a_deleted_task_s_series_go_and_stay_gone() {
        let metrics = Metrics::new(true, None);
        let task = TaskId::new(TaskKey::new("ns", "t"), "uid");
        metrics.labels(&task.key, &BTreeMap::new());
        metrics.runs.observe(&missed(&task));
        assert!(metrics.encode().contains("task=\"t\""));
        metrics.forget(&task.key);
        metrics.runs.observe(&missed(&task));
        let text = metrics.encode();
        assert!(!text.contains("task=\"t\""), "{text}");
        assert!(
            text.contains(
                "chronflow_missed_runs_total{namespace=\"\",task=\"\",reason=\"deadline\"} 1"
            ),
            "{text}"
        );
    }
}
