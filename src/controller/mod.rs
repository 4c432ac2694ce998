//! The ChronTask controller: watches ChronTasks, validates each into a `ValidTask`, hands it to
//! the engine and tells the status index. Reconcile never waits for a run. Only spec changes
//! (a new `metadata.generation`) reconcile, so status writes cause no reconcile loop. Objects
//! are watched through `DeserializeGuard`: one that cannot be decoded is marked Invalid with
//! the decode error, and every other task keeps running.

pub mod jobs;
pub mod references;
pub mod validate;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use chrono_tz::Tz;
use futures::{FutureExt, StreamExt, TryStreamExt};
use kube::core::DeserializeGuard;
use kube::core::{ApiResource, DynamicObject};
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, predicates, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::ChronTask;
use crate::crd::{
    BackfillPhase, ChronTaskStatus, RUN_NOW_ANNOTATION, RUN_NOW_WHILE_PAUSED_ANNOTATION,
};
use crate::engine::EngineHandle;
use crate::executor::Action as RunAction;
use crate::executor::http::{RefKind, Tls, ValueRef};
use crate::metrics::Metrics;
use crate::run::{RunId, TaskId, TaskKey};
use crate::server::Health;
use crate::status::{Observed, StatusIndex};
use references::ReadError;
pub use references::{KubeValues, USABLE_BY_TASKS};
use validate::{Invalid, ValidTask, validate};

/// How often a task that waits for something outside its spec (a missing Secret, older tasks
/// of its namespace to go) is checked again.
const RECHECK: Duration = Duration::from_secs(30);

/// Retry of a failed reconcile: this long after the first failure, doubling per failure of the
/// same object up to [`MAX_RETRY`], so a broken dependency is not hammered.
const FIRST_RETRY: Duration = Duration::from_secs(5);
const MAX_RETRY: Duration = Duration::from_secs(300);

/// Reconciles in flight at once. Unbounded, kube's runner starts one per task at the first list
/// and its table of them keeps that size (about 0.7 KB per task at 10 000); a reconcile is quick
/// (its reads are cached), so a few dozen keep up with any number of tasks.
const RECONCILES_AT_ONCE: u16 = 32;

/// `kubectl apply`'s copy of the object it applied last.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// What the controller watches: ChronTasks, decoded or not.
pub type GuardedTask = DeserializeGuard<ChronTask>;

/// What reconcile needs.
pub struct Context {
    /// The client the controller watches and reads with.
    pub client: Client,
    /// Where valid tasks go.
    pub engine: EngineHandle,
    /// What the controller observes goes here.
    pub status: StatusIndex,
    /// The zone of cron schedules that name none (`timezone`).
    pub default_timezone: Tz,
    /// What tenants' tasks may ask for.
    pub limits: TenantLimits,
    /// Reads the Secrets and ConfigMaps tasks refer to.
    pub values: Arc<KubeValues>,
    /// The Job action's runner, with `jobs.enabled`.
    pub jobs: Option<Arc<jobs::KubeJobs>>,
    /// Reconcile errors are counted here.
    pub metrics: Arc<Metrics>,
    /// Readiness: the first list of each watched namespace.
    pub health: Arc<Health>,
    /// Consecutive failed reconciles per object uid, for the retry backoff.
    pub failures: std::sync::Mutex<std::collections::HashMap<String, u32>>,
}

impl Context {
    /// The wait before retrying `uid`, one failure more.
    fn retry_after_failure(&self, uid: &str) -> Duration {
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let count = failures.entry(uid.to_string()).or_default();
        *count = count.saturating_add(1);
        FIRST_RETRY
            .saturating_mul(2u32.saturating_pow((*count - 1).min(16)))
            .min(MAX_RETRY)
    }

    /// A reconcile of `uid` got through: its next failure starts the backoff afresh.
    fn succeeded(&self, uid: &str) {
        self.failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(uid);
    }
}

/// What the operator allows tenants' tasks (the `limits` and `http` settings).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantLimits {
    /// The shortest gap between two instants a task may have (`limits.min_period`).
    pub min_period: Duration,
    /// The most tasks of one namespace that run, the oldest (`limits.max_tasks_per_namespace`,
    /// 0: no cap).
    pub max_tasks_per_namespace: usize,
    /// `http.allow_insecure_skip_verify`.
    pub allow_insecure_skip_verify: bool,
    /// Whether `action.exec` may run: only in standalone mode, never in the operator.
    pub allow_exec: bool,
    /// Where and as whom `action.job` may run: the operator with `jobs.enabled` (and its
    /// RBAC); `None`: nowhere.
    pub jobs: Option<JobRules>,
    /// The longest a run may last, every attempt and wait included (a Job: its deadline)
    /// (`limits.max_timeout`).
    pub max_timeout: Duration,
}

/// Where the Job action may run, and as whom: a Job runs with a ServiceAccount of its
/// namespace, so these keep a ChronTask author from running a Pod with more rights than their
/// own (the chart's admission policy checks the author's own rights).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobRules {
    /// `jobs.namespaces`: empty, every watched namespace.
    pub namespaces: Vec<String>,
    /// `jobs.allowed_service_accounts`: the ServiceAccounts a Job's Pods may run as.
    pub service_accounts: Vec<String>,
    /// The operator's own namespace (`POD_NAMESPACE`), never allowed: its ServiceAccount and
    /// credentials live there.
    pub own_namespace: Option<String>,
}

impl JobRules {
    /// `Err` says why a Job task of `namespace` with `template` may not run here.
    fn check(&self, namespace: &str, template: &serde_json::Value) -> Result<(), Invalid> {
        if self.own_namespace.as_deref() == Some(namespace) {
            return Err(Invalid(format!(
                "spec.action.job: Job actions may not run in {namespace}, chronflow's own \
                 namespace: its Pods could run as chronflow's ServiceAccount"
            )));
        }
        if !self.namespaces.is_empty() && !self.namespaces.iter().any(|n| n == namespace) {
            return Err(Invalid(format!(
                "spec.action.job: Job actions may run only in {} (jobs.namespaces), not in \
                 {namespace}",
                self.namespaces.join(", ")
            )));
        }
        let pod = &template["spec"]["template"]["spec"];
        let (field, account) = match (&pod["serviceAccountName"], &pod["serviceAccount"]) {
            (serde_json::Value::String(name), _) => ("serviceAccountName", name.as_str()),
            (_, serde_json::Value::String(name)) => ("serviceAccount", name.as_str()),
            _ => ("serviceAccountName", "default"),
        };
        if !self
            .service_accounts
            .iter()
            .any(|allowed| allowed == account)
        {
            return Err(Invalid(format!(
                "spec.action.job.template.spec.template.spec.{field}: the ServiceAccount \
                 {account:?} is not among those Job actions may use ({}; \
                 jobs.allowed_service_accounts)",
                self.service_accounts.join(", ")
            )));
        }
        Ok(())
    }
}

/// Failures that are worth retrying (the cluster did not answer); invalid specs are not errors.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// A Secret or ConfigMap a task names could not be read.
    #[error("{message}")]
    Read {
        /// A Secret or a ConfigMap.
        kind: RefKind,
        /// What went wrong, naming the object.
        message: String,
    },
}

impl ReconcileError {
    /// A short, stable label for `chronflow_reconcile_errors_total`.
    pub fn metric_label(&self) -> &'static str {
        match self {
            ReconcileError::Read {
                kind: RefKind::Secret,
                ..
            } => "read_secret",
            ReconcileError::Read {
                kind: RefKind::ConfigMap,
                ..
            } => "read_config_map",
        }
    }
}

fn id_of(task: &impl Resource) -> TaskId {
    let meta = task.meta();
    TaskId::new(
        TaskKey::new(
            meta.namespace.clone().unwrap_or_default(),
            meta.name.clone().unwrap_or_default(),
        ),
        meta.uid.clone().unwrap_or_default(),
    )
}

async fn reconcile(
    guarded: Arc<GuardedTask>,
    ctx: Arc<Context>,
    tasks: Store<GuardedTask>,
) -> Result<Action, ReconcileError> {
    let id = id_of(guarded.as_ref());
    let result = reconcile_task(&guarded, &ctx, &tasks, id.clone()).await;
    if result.is_ok() {
        ctx.succeeded(&id.uid);
    }
    result
}

async fn reconcile_task(
    guarded: &GuardedTask,
    ctx: &Context,
    tasks: &Store<GuardedTask>,
    id: TaskId,
) -> Result<Action, ReconcileError> {
    ctx.metrics.labels(&id.key, guarded.labels());
    let task = match &guarded.0 {
        Ok(task) => task,
        Err(undecodable) => {
            // The object is not what the schema promised (a field of the wrong type inside an
            // embedded template, say): report it; its stored status still seeds the counters.
            let status = stored_status(&ctx.client, &id).await;
            ctx.status.observe(Observed {
                task: id.clone(),
                generation: undecodable.metadata.generation,
                status,
                history: Default::default(),
            });
            let reason = format!("cannot decode the ChronTask: {}", undecodable.error);
            warn!(task = %id, %reason, "invalid task");
            ctx.engine.invalidate(id, reason).await;
            return Ok(Action::await_change());
        }
    };
    ctx.status.observe(Observed {
        task: id.clone(),
        generation: task.metadata.generation,
        // The watch brought it to the index.
        status: None,
        history: task.spec.history.unwrap_or_default(),
    });

    let namespace = &id.key.namespace;
    let outcome = match validate(task, ctx.default_timezone).and_then(|v| ctx.limits.allow(v)) {
        Ok(valid) => match within_task_cap(guarded, tasks, &ctx.limits).await {
            Err(invalid) => Err((invalid, Action::requeue(RECHECK))),
            Ok(()) => match check_references(&ctx.values, namespace, &valid.references).await? {
                Ok(()) => match refused_job(&ctx.client, &valid).await {
                    None => Ok(valid),
                    Some(invalid) => Err((invalid, Action::await_change())),
                },
                Err(invalid) => Err((invalid, Action::requeue(RECHECK))),
            },
        },
        Err(invalid) => Err((invalid, Action::await_change())),
    };
    match outcome {
        Ok(mut valid) => {
            info!(task = %id, schedule = %valid.schedule_text, paused = valid.engine.paused.is_some(), "task scheduled");
            if let Some(status) = ctx.status.lock().status(&id.key) {
                resume_from(&mut valid, &status);
            }
            adopt_jobs(&mut valid, task.status.as_ref(), ctx.jobs.as_deref()).await;
            ctx.engine.upsert(valid.engine).await;
            Ok(Action::await_change())
        }
        Err((Invalid(reason), action)) => {
            warn!(task = %id, %reason, "invalid task");
            ctx.engine.invalidate(id, reason).await;
            Ok(action)
        }
    }
}

/// What status says was done already: the run-now request handled last is not run again, and
/// each backfill resumes where it stood.
pub(crate) fn resume_from(valid: &mut ValidTask, status: &ChronTaskStatus) {
    let engine = &mut valid.engine;
    if engine.run_now.as_ref().map(|r| &r.request) == status.last_run_now.as_ref() {
        engine.run_now = None;
    }
    for request in &mut engine.backfills {
        if let Some(known) = status.backfill.iter().find(|b| b.id == request.id) {
            request.done = known.done;
            request.over = known.phase != BackfillPhase::Running;
        }
    }
}

/// The runs of a Job action in flight: those the stored status shows, and those whose Jobs
/// exist and have not ended. Whoever leads waits for their Jobs and records how they ended (a
/// restart mid-run neither loses nor repeats them).
async fn adopt_jobs(
    valid: &mut ValidTask,
    stored: Option<&ChronTaskStatus>,
    jobs: Option<&jobs::KubeJobs>,
) {
    let engine = &mut valid.engine;
    let (RunAction::Job(_), Some(jobs)) = (&engine.run.action, jobs) else {
        return;
    };
    let active = stored
        .map(|status| status.active.as_slice())
        .unwrap_or_default();
    let mut runs: Vec<RunId> = active
        .iter()
        .filter(|run| run.job_name.is_some())
        .filter_map(|run| RunId::parse(&engine.id, &run.run_id, run.scheduled_time))
        .collect();
    for run in jobs.in_flight(&engine.id).await {
        if !runs.contains(&run) {
            runs.push(run);
        }
    }
    engine.adopt = runs;
}

impl TenantLimits {
    /// The operator's limits for tenants, on a task that is valid in itself.
    pub fn allow(&self, valid: ValidTask) -> Result<ValidTask, Invalid> {
        if let Some(gap) = valid.engine.schedule.min_gap()
            && gap < self.min_period
        {
            return Err(Invalid(format!(
                "spec.schedule: fires every {}, more often than this operator allows \
                 (limits.min_period {})",
                crate::schedule::format_duration(gap),
                crate::schedule::format_duration(self.min_period)
            )));
        }
        let action = &valid.engine.run.action;
        let (longest, what) = match action {
            RunAction::Job(job) => (job.deadline, "the Job's deadline"),
            _ => (
                valid.engine.run.longest(),
                "every attempt's timeout and the waits between them",
            ),
        };
        if longest > self.max_timeout {
            return Err(Invalid(format!(
                "spec.timeout: a run may last {} ({what}), longer than this operator allows \
                 (limits.max_timeout {})",
                crate::schedule::format_duration(longest),
                crate::schedule::format_duration(self.max_timeout)
            )));
        }
        if matches!(action, RunAction::Exec(_)) && !self.allow_exec {
            return Err(Invalid(
                "spec.action.exec: commands run only in chronflow standalone; in a cluster a \
                 command would run inside the operator's Pod with its identity (use http, or \
                 job for a container)"
                    .into(),
            ));
        }
        if let RunAction::Job(job) = action {
            let Some(rules) = &self.jobs else {
                return Err(Invalid(
                    "spec.action.job: Job actions are not enabled here: the operator runs them \
                     with jobs.enabled true (the Helm chart's config.jobs.enabled, which also \
                     grants the rights on Jobs); chronflow standalone has no cluster to run them \
                     in"
                    .into(),
                ));
            };
            rules.check(&valid.engine.id.key.namespace, &job.template)?;
        }
        if let RunAction::Http(http) = action
            && http.tls == Tls::InsecureSkipVerify
            && !self.allow_insecure_skip_verify
        {
            return Err(Invalid(
                "spec.action.http.tls.insecureSkipVerify: this operator verifies every \
                 certificate (http.allow_insecure_skip_verify is false); use tls.caBundle for \
                 a private CA"
                    .into(),
            ));
        }
        Ok(valid)
    }
}

/// Whether `task` is among the `limits.max_tasks_per_namespace` oldest of its namespace (by
/// creation time, then name): a newer task never displaces one that runs.
async fn within_task_cap(
    task: &GuardedTask,
    tasks: &Store<GuardedTask>,
    limits: &TenantLimits,
) -> Result<(), Invalid> {
    let cap = limits.max_tasks_per_namespace;
    if cap == 0 {
        return Ok(());
    }
    // Counted on the whole namespace, not the part listed so far.
    if tasks.wait_until_ready().await.is_err() {
        return Ok(());
    }
    let meta = task.meta();
    let own = age(meta);
    let older = tasks
        .state()
        .iter()
        .filter(|other| other.meta().namespace == meta.namespace && age(other.meta()) < own)
        .count();
    if older < cap {
        return Ok(());
    }
    Err(Invalid(format!(
        "namespace {} has more than {cap} ChronTasks and this one is not among the {cap} oldest \
         (limits.max_tasks_per_namespace {cap}); it runs once older ones are deleted",
        meta.namespace.as_deref().unwrap_or_default()
    )))
}

/// What the informer keeps of a status, the few fields reconcile reads (the status index holds
/// the whole): the counters and where catch-up starts (`validate`), the runs in flight (those
/// of a Job action are adopted) and the run-now request handled last (a standby reconciles when
/// it changes, see [`spec_or_request`]). Not the history, the conditions, the messages.
fn cached_status(status: &ChronTaskStatus) -> ChronTaskStatus {
    ChronTaskStatus {
        phase: status.phase,
        schedulable_since: status.schedulable_since,
        last_schedule_time: status.last_schedule_time,
        total_runs: status.total_runs,
        successful_runs: status.successful_runs,
        failed_runs: status.failed_runs,
        missed_runs: status.missed_runs,
        manual_runs: status.manual_runs,
        last_run_now: status.last_run_now.clone(),
        active: status.active.clone(),
        ..ChronTaskStatus::default()
    }
}

/// What a reconcile acts on: the spec (its generation), the run-now annotations, the labels
/// (`metrics.per_task_selector`) and the request last handled (`status.lastRunNow`, so standbys
/// forget it); other status writes and metadata changes pass by.
fn spec_or_request(task: &GuardedTask) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let meta = task.meta();
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    predicates::generation(task).hash(&mut hasher);
    meta.labels.hash(&mut hasher);
    for name in [RUN_NOW_ANNOTATION, RUN_NOW_WHILE_PAUSED_ANNOTATION] {
        meta.annotations
            .as_ref()
            .and_then(|a| a.get(name))
            .hash(&mut hasher);
    }
    // A request the leader handled: standbys drop it from their engines.
    let handled = task.0.as_ref().ok().and_then(|t| t.status.as_ref());
    handled
        .and_then(|s| s.last_run_now.as_deref())
        .hash(&mut hasher);
    Some(hasher.finish())
}

/// The order of tasks under `limits.max_tasks_per_namespace`: creation time, then name.
fn age(meta: &kube::core::ObjectMeta) -> (Option<k8s_openapi::jiff::Timestamp>, Option<String>) {
    let created = meta.creation_timestamp.as_ref().map(|t| t.0);
    (created, meta.name.clone())
}

/// The tasks of `deleted`'s namespace that came after it: one of them may now be under
/// `limits.max_tasks_per_namespace`.
fn newer_than(deleted: &GuardedTask, tasks: &Store<GuardedTask>) -> Vec<ObjectRef<GuardedTask>> {
    let meta = deleted.meta();
    let own = age(meta);
    tasks
        .state()
        .iter()
        .filter(|other| other.meta().namespace == meta.namespace && age(other.meta()) > own)
        .map(|other| ObjectRef::from_obj(other.as_ref()))
        .collect()
}

/// The status of an object that does not decode as a ChronTask, read on its own.
async fn stored_status(client: &Client, id: &TaskId) -> Option<ChronTaskStatus> {
    let resource = ApiResource::erase::<ChronTask>(&());
    let api = Api::<DynamicObject>::namespaced_with(client.clone(), &id.key.namespace, &resource);
    let object = api.get(&id.key.name).await.ok()?;
    serde_json::from_value(object.data.get("status")?.clone()).ok()
}

/// Why the apiserver would refuse a Job action's Jobs, if it would.
async fn refused_job(client: &Client, valid: &ValidTask) -> Option<Invalid> {
    let RunAction::Job(action) = &valid.engine.run.action else {
        return None;
    };
    jobs::refused_template(client, &valid.engine.id, action)
        .await
        .map(Invalid)
}

/// `Ok(Err(..))`: a referenced Secret or ConfigMap is missing, not opted in or lacks the key
/// (the task is invalid until that changes); `Err(..)`: the cluster did not answer (retry).
async fn check_references(
    values: &KubeValues,
    namespace: &str,
    references: &[ValueRef],
) -> Result<Result<(), Invalid>, ReconcileError> {
    for reference in references {
        match values.read(namespace, reference).await {
            Ok(_) => {}
            Err(ReadError::Unusable(reason)) => return Ok(Err(Invalid(reason))),
            Err(ReadError::Unavailable(message)) => {
                return Err(ReconcileError::Read {
                    kind: reference.kind,
                    message,
                });
            }
        }
    }
    Ok(Ok(()))
}

fn error_policy(task: Arc<GuardedTask>, error: &ReconcileError, ctx: Arc<Context>) -> Action {
    ctx.metrics.reconcile.error(error.metric_label());
    let id = id_of(task.as_ref());
    let wait = ctx.retry_after_failure(&id.uid);
    warn!(task = %id, %error, label = error.metric_label(), retry_in = ?wait, "reconcile failed; retrying");
    Action::requeue(wait)
}

/// Watches ChronTasks in `namespace` (all namespaces when `None`) until `shutdown`.
pub async fn run(ctx: Arc<Context>, namespace: Option<String>, shutdown: CancellationToken) {
    let api: Api<GuardedTask> = match &namespace {
        Some(ns) => Api::namespaced(ctx.client.clone(), ns),
        None => Api::all(ctx.client.clone()),
    };
    let (store, writer) = reflector::store();
    let index = ctx.status.clone();
    let events_ctx = ctx.clone();
    let events_store = store.clone();
    let scope = namespace.clone();
    let first_sync = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let (recheck, rechecks) = futures::channel::mpsc::unbounded();
    // Deletions are handled here, from the watch events themselves: a generation filter would
    // hide them (a deleted object keeps its generation).
    let applied = watcher(api, watcher::Config::default())
        .default_backoff()
        // managedFields are most of an object's size and nothing here reads them, nor kubectl's
        // copy of the whole object it applied last. The status goes to the status index, which
        // keeps the one copy of it.
        .modify(move |task| {
            task.managed_fields_mut().clear();
            task.annotations_mut().remove(LAST_APPLIED);
            let id = id_of(task);
            if let Ok(task) = &mut task.0
                && let Some(status) = task.status.take()
            {
                task.status = Some(cached_status(&status));
                index.stored(&id, status);
            }
        })
        .reflect(writer)
        .and_then(move |event| {
            let ctx = events_ctx.clone();
            let store = events_store.clone();
            let scope = scope.clone();
            let first_sync = first_sync.clone();
            let recheck = recheck.clone();
            async move {
                match &event {
                    watcher::Event::Delete(task) => {
                        forget(&ctx, id_of(task)).await;
                        if ctx.limits.max_tasks_per_namespace > 0 {
                            for newer in newer_than(task, &store) {
                                let _ = recheck.unbounded_send(newer);
                            }
                        }
                    }
                    watcher::Event::InitDone => {
                        prune(&ctx, scope, &store).await;
                        if first_sync.swap(false, std::sync::atomic::Ordering::SeqCst) {
                            ctx.health.synced();
                        }
                    }
                    _ => {}
                }
                Ok(event)
            }
        })
        .applied_objects()
        .predicate_filter(spec_or_request, Default::default());
    let (tasks, listed) = (store.clone(), store.clone());
    let stop = shutdown.clone();
    let controller = Controller::for_stream(applied, store)
        .with_config(controller::Config::default().concurrency(RECONCILES_AT_ONCE))
        .reconcile_on(rechecks)
        .graceful_shutdown_on(async move { stop.cancelled().await })
        .run(
            move |task, ctx| reconcile(task, ctx, tasks.clone()),
            error_policy,
            ctx,
        )
        .for_each(|result| async move {
            if let Err(error) = result {
                warn!(%error, "controller");
            }
        });
    // On shutdown kube's controller lets the reconciles in flight finish, and before the first
    // list came back it waits for that list, which it no longer reads: it would never return.
    // No reconcile starts before that list, so there is nothing to wait for.
    let before_first_list = async {
        shutdown.cancelled().await;
        if listed.wait_until_ready().now_or_never().is_some() {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        () = controller => {}
        () = before_first_list => debug!("stopped before the first list of ChronTasks"),
    }
}

async fn forget(ctx: &Context, task: TaskId) {
    info!(%task, "task deleted");
    ctx.engine.remove(task.clone()).await;
    ctx.status.forget(&task);
    ctx.metrics.forget(&task.key);
}

/// After a (re-)list, forgets tasks deleted while the watch was down.
async fn prune(ctx: &Context, namespace: Option<String>, store: &Store<GuardedTask>) {
    let keep: HashSet<TaskKey> = store
        .state()
        .iter()
        .map(|t| id_of(t.as_ref()).key)
        .collect();
    for gone in ctx.status.retain(namespace.as_deref(), &keep) {
        ctx.metrics.forget(&gone);
    }
    ctx.engine.retain(namespace, keep).await;
}

/// Reconcile against a scripted apiserver (kube's `tower-test` mock): each test answers the
/// calls it expects, in order; the engine and the status index are the real ones.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Clock;
    use crate::engine::{Engine, EngineParts};
    use crate::executor::fixtures::memory_ledger;
    use crate::executor::{Executor, ExecutorConfig};
    use crate::leader::{Term, Terms};
    use http::{Request, Response};
    use kube::client::Body;
    use serde_json::json;
    use tokio::sync::{mpsc, watch};

    type ApiHandle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

    struct Harness {
        ctx: Arc<Context>,
        api: ApiHandle,
        stop: CancellationToken,
        tasks: Store<GuardedTask>,
        _events: mpsc::Receiver<crate::status::events::EventRequest>,
        _leader: watch::Sender<Terms>,
    }

    impl Drop for Harness {
        fn drop(&mut self) {
            self.stop.cancel();
        }
    }

    fn harness() -> Harness {
        let (service, api) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(service, "default");
        let (events_tx, events) = mpsc::channel(16);
        let clock = Clock::System;
        let index = StatusIndex::new(events_tx, clock);
        let sink = Arc::new(index.clone());
        let config = ExecutorConfig {
            max_workers: 1,
            queue_size: 1,
            log_success: false,
        };
        let values = Arc::new(KubeValues::new(client.clone(), Duration::from_secs(10)));
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = crate::executor::http::client().unwrap();
        let ledger = memory_ledger();
        let (executor, _) = Executor::new(
            config,
            sink.clone(),
            clock,
            http,
            values.clone(),
            Arc::new(crate::executor::job::NoJobs),
            ledger.clone(),
        );
        let (leader_tx, leader) = watch::channel(Terms::all(Term::single("test")));
        let (engine, handle) = Engine::new(EngineParts {
            executor,
            ledger,
            leader,
            sink,
            clock,
            backfill_per_second: 10,
        });
        let stop = CancellationToken::new();
        tokio::spawn(engine.run(stop.clone()));
        let ctx = Arc::new(Context {
            client,
            engine: handle,
            status: index,
            default_timezone: Tz::UTC,
            limits: TenantLimits {
                min_period: Duration::from_millis(100),
                max_tasks_per_namespace: 0,
                allow_insecure_skip_verify: false,
                allow_exec: false,
                jobs: None,
                max_timeout: Duration::from_secs(3600),
            },
            values,
            jobs: None,
            metrics: Arc::new(Metrics::new(true, None)),
            health: Arc::new(Health::new(1)),
            failures: Default::default(),
        });
        Harness {
            ctx,
            api,
            stop,
            tasks: reflector::store().0,
            _events: events,
            _leader: leader_tx,
        }
    }

    fn task(spec: serde_json::Value) -> Arc<GuardedTask> {
        let task: ChronTask = serde_json::from_value(json!({
            "apiVersion": "chronflow.io/v1alpha1",
            "kind": "ChronTask",
            "metadata": {"name": "t", "namespace": "ns", "uid": "u-1", "generation": 1,
                         "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": spec,
        }))
        .unwrap();
        Arc::new(DeserializeGuard(Ok(task)))
    }

    fn with_secret_header() -> Arc<GuardedTask> {
        task(json!({"schedule": {"cron": "@hourly"}, "action": {"http": {
            "url": "http://127.0.0.1:9/", "headers": [
                {"name": "Authorization", "valueFrom": {"secretKeyRef": {"name": "s", "key": "token"}}}]}}}))
    }

    /// Answers the next call, after checking its method and path.
    async fn answer(
        api: &mut ApiHandle,
        method: &str,
        path: &str,
        code: u16,
        body: serde_json::Value,
    ) {
        let (request, respond) = tokio::time::timeout(Duration::from_secs(1), api.next_request())
            .await
            .expect("the expected call within 1 s")
            .expect("the client is alive");
        assert_eq!(
            (request.method().as_str(), request.uri().path()),
            (method, path)
        );
        let body = Body::from(serde_json::to_vec(&body).unwrap());
        respond.send_response(Response::builder().status(code).body(body).unwrap());
    }

    /// The task's status once the engine's fact reached the index.
    async fn status_when(
        ctx: &Context,
        check: impl Fn(&crate::crd::ChronTaskStatus) -> bool,
    ) -> crate::crd::ChronTaskStatus {
        let key = TaskKey::new("ns", "t");
        for _ in 0..100 {
            if let Some(status) = ctx.status.lock().status(&key).filter(|s| check(s)) {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("status never matched: {:?}", ctx.status.lock().status(&key));
    }

    fn server_error() -> serde_json::Value {
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
               "message": "etcdserver: request timed out", "code": 500})
    }

    fn not_found() -> serde_json::Value {
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
               "message": "secrets \"s\" not found", "reason": "NotFound", "code": 404})
    }

    #[tokio::test]
    async fn a_valid_task_is_scheduled_without_calling_the_apiserver() {
        let h = harness();
        let spec = json!({"schedule": {"cron": "@yearly"}, "action": {"http": {"url": "http://127.0.0.1:9/"}}});
        let action = reconcile(task(spec), h.ctx.clone(), h.tasks.clone())
            .await
            .unwrap();
        assert_eq!(action, Action::await_change());
        let status = status_when(&h.ctx, |s| s.phase == Some(crate::crd::Phase::Scheduled)).await;
        assert!(status.next_run_time.is_some());
    }

    #[tokio::test]
    async fn a_missing_secret_makes_the_task_invalid_until_it_appears() {
        let mut h = harness();
        let pending = tokio::spawn(reconcile(
            with_secret_header(),
            h.ctx.clone(),
            h.tasks.clone(),
        ));
        answer(
            &mut h.api,
            "GET",
            "/api/v1/namespaces/ns/secrets/s",
            404,
            not_found(),
        )
        .await;
        let action = pending.await.unwrap().unwrap();
        assert_eq!(action, Action::requeue(RECHECK), "checked again later");
        let status = status_when(&h.ctx, |s| s.phase == Some(crate::crd::Phase::Invalid)).await;
        assert_eq!(
            status.message.as_deref(),
            Some("Secret s not found in namespace ns")
        );
    }

    /// Reconciles `task` while the apiserver fails to read its Secret.
    async fn reconcile_failing_secret_read(
        h: &mut Harness,
        task: Arc<GuardedTask>,
    ) -> ReconcileError {
        let pending = tokio::spawn(reconcile(task, h.ctx.clone(), h.tasks.clone()));
        let path = "/api/v1/namespaces/ns/secrets/s";
        answer(&mut h.api, "GET", path, 500, server_error()).await;
        pending.await.unwrap().unwrap_err()
    }

    #[tokio::test]
    async fn an_apiserver_error_reading_a_secret_is_retried_not_invalid() {
        let mut h = harness();
        let error = reconcile_failing_secret_read(&mut h, with_secret_header()).await;
        assert_eq!(error.metric_label(), "read_secret");
        let status = h
            .ctx
            .status
            .lock()
            .status(&TaskKey::new("ns", "t"))
            .unwrap();
        assert_eq!(
            status.phase,
            Some(crate::crd::Phase::Pending),
            "not Invalid"
        );
    }

    #[tokio::test]
    async fn failed_reconciles_back_off_per_object_and_reset_on_success() {
        let mut h = harness();
        let waits: Vec<u64> = (0..8)
            .map(|_| h.ctx.retry_after_failure("u-1").as_secs())
            .collect();
        assert_eq!(waits, [5, 10, 20, 40, 80, 160, 300, 300]);
        assert_eq!(h.ctx.retry_after_failure("u-2").as_secs(), 5, "per object");
        h.ctx.succeeded("u-1");
        assert_eq!(h.ctx.retry_after_failure("u-1").as_secs(), 5, "afresh");
        let task = with_secret_header();
        let error = reconcile_failing_secret_read(&mut h, task.clone()).await;
        // u-1 failed once already: the error policy doubles the wait.
        assert_eq!(
            error_policy(task, &error, h.ctx.clone()),
            Action::requeue(Duration::from_secs(10))
        );
    }

    #[tokio::test]
    async fn an_undecodable_task_is_invalid_and_keeps_its_counters() {
        let mut h = harness();
        let metadata = serde_json::from_value(json!({
            "name": "t", "namespace": "ns", "uid": "u-1", "generation": 2}))
        .unwrap();
        let guarded = Arc::new(DeserializeGuard(Err(
            kube::core::error_boundary::InvalidObject {
                error: "invalid type: string \"x\", expected i32".into(),
                metadata,
            },
        )));
        let pending = tokio::spawn(reconcile(guarded, h.ctx.clone(), h.tasks.clone()));
        let stored = json!({"apiVersion": "chronflow.io/v1alpha1", "kind": "ChronTask",
            "metadata": {"name": "t", "namespace": "ns", "uid": "u-1"},
            "spec": {"action": {"job": {"template": {"spec": {"parallelism": "x"}}}}},
            "status": {"totalRuns": 7, "successfulRuns": 7, "phase": "Scheduled"}});
        let path = "/apis/chronflow.io/v1alpha1/namespaces/ns/chrontasks/t";
        answer(&mut h.api, "GET", path, 200, stored).await;
        assert_eq!(pending.await.unwrap().unwrap(), Action::await_change());
        let status = status_when(&h.ctx, |s| s.phase == Some(crate::crd::Phase::Invalid)).await;
        assert_eq!(status.total_runs, 7, "the counters survive");
        assert!(
            status
                .message
                .unwrap()
                .contains("cannot decode the ChronTask")
        );
    }

    #[test]
    fn job_tasks_run_only_where_and_as_whom_the_operator_allows() {
        let rules = JobRules {
            namespaces: vec!["shop".into(), "ops".into()],
            service_accounts: vec!["default".into(), "batch".into()],
            own_namespace: Some("chronflow-system".into()),
        };
        let pod = |spec: serde_json::Value| json!({"spec": {"template": {"spec": spec}}});
        let plain = pod(json!({"containers": [{"name": "c"}]}));
        assert_eq!(rules.check("shop", &plain), Ok(()));
        assert_eq!(
            rules.check("ops", &pod(json!({"serviceAccountName": "batch"}))),
            Ok(())
        );
        let reason = |namespace, template: serde_json::Value| {
            rules.check(namespace, &template).unwrap_err().0
        };
        assert_eq!(
            reason("chronflow-system", plain.clone()),
            "spec.action.job: Job actions may not run in chronflow-system, chronflow's own \
             namespace: its Pods could run as chronflow's ServiceAccount"
        );
        assert_eq!(
            reason("billing", plain.clone()),
            "spec.action.job: Job actions may run only in shop, ops (jobs.namespaces), not in billing"
        );
        assert_eq!(
            reason("shop", pod(json!({"serviceAccountName": "admin"}))),
            "spec.action.job.template.spec.template.spec.serviceAccountName: the ServiceAccount \
             \"admin\" is not among those Job actions may use (default, batch; \
             jobs.allowed_service_accounts)"
        );
        // The deprecated field names the account when the current one is absent.
        assert!(reason("shop", pod(json!({"serviceAccount": "admin"}))).starts_with(
            "spec.action.job.template.spec.template.spec.serviceAccount: the ServiceAccount \"admin\""
        ));
        // No namespace list: every namespace but the operator's own.
        let anywhere = JobRules {
            namespaces: Vec::new(),
            ..rules.clone()
        };
        assert_eq!(anywhere.check("billing", &plain), Ok(()));
        assert!(anywhere.check("chronflow-system", &plain).is_err());
    }

    #[test]
    fn runs_longer_than_limits_max_timeout_are_invalid() {
        let limits = TenantLimits {
            min_period: Duration::from_millis(100),
            max_tasks_per_namespace: 0,
            allow_insecure_skip_verify: false,
            allow_exec: false,
            jobs: Some(JobRules {
                service_accounts: vec!["default".into()],
                ..JobRules::default()
            }),
            max_timeout: Duration::from_secs(3600),
        };
        let allow = |spec: serde_json::Value| {
            let task: ChronTask = serde_json::from_value(json!({
                "apiVersion": "chronflow.io/v1alpha1", "kind": "ChronTask",
                "metadata": {"name": "t", "namespace": "ns", "uid": "u"}, "spec": spec}))
            .unwrap();
            validate(&task, Tz::UTC)
                .and_then(|valid| limits.allow(valid))
                .map(|_| ())
        };
        let http = |timeout: &str, retries: u32| {
            json!({"schedule": {"cron": "@daily"}, "timeout": timeout,
                   "retry": {"maxRetries": retries},
                   "action": {"http": {"url": "http://x.example/"}}})
        };
        assert_eq!(allow(http("1h", 0)), Ok(()));
        assert_eq!(
            allow(http("30m", 2)).unwrap_err().0,
            "spec.timeout: a run may last 1h30m3s (every attempt's timeout and the waits between \
             them), longer than this operator allows (limits.max_timeout 1h)"
        );
        assert!(allow(http("24h", 0)).is_err());
        // A Job's deadline is its timeout; its retries run within it.
        let job = json!({"schedule": {"cron": "@daily"}, "timeout": "1h",
                         "retry": {"maxRetries": 3}, "action": {"job": {"template": {"spec": {
                         "template": {"spec": {"containers": [{"name": "c"}]}}}}}}});
        assert_eq!(allow(job), Ok(()));
    }
}
