//! The ChronTask controller: watches ChronTasks, validates each into a `ValidTask`, hands it to
//! the engine and tells the status index. Reconcile never waits for a run. Only spec changes
//! (a new `metadata.generation`) reconcile, so status writes cause no reconcile loop. Objects
//! are watched through `DeserializeGuard`: one that cannot be decoded is marked Invalid with
//! the decode error, and every other task keeps running.

pub mod validate;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono_tz::Tz;
use futures::{StreamExt, TryStreamExt, future::BoxFuture};
use k8s_openapi::api::core::v1::Secret;
use kube::core::DeserializeGuard;
use kube::core::{ApiResource, DynamicObject};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, predicates, watcher};
use kube::{Api, Client, Resource};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::ChronTask;
use crate::crd::ChronTaskStatus;
use crate::engine::EngineHandle;
use crate::executor::http::{Redacted, SecretSource};
use crate::metrics::Metrics;
use crate::run::{TaskId, TaskKey};
use crate::server::Health;
use crate::status::{Observed, StatusIndex};
use validate::{Invalid, ValidTask, validate};

/// How often a task whose Secret is missing is checked again.
const SECRET_RECHECK: Duration = Duration::from_secs(30);

/// Retry of a failed reconcile: this long after the first failure, doubling per failure of the
/// same object up to [`MAX_RETRY`], so a broken dependency is not hammered.
const FIRST_RETRY: Duration = Duration::from_secs(5);
const MAX_RETRY: Duration = Duration::from_secs(300);

/// What the controller watches: ChronTasks, decoded or not.
pub type GuardedTask = DeserializeGuard<ChronTask>;

/// What reconcile needs.
pub struct Context {
    pub client: Client,
    pub engine: EngineHandle,
    pub status: StatusIndex,
    pub default_timezone: Tz,
    /// The shortest gap between two instants a task may have (`limits.min_period`).
    pub min_period: Duration,
    pub metrics: Arc<Metrics>,
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

/// Failures that are worth retrying (the cluster did not answer); invalid specs are not errors.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("cannot read Secret {name}: {source}")]
    ReadSecret {
        name: String,
        #[source]
        source: kube::Error,
    },
}

impl ReconcileError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            ReconcileError::ReadSecret { .. } => "read_secret",
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

async fn reconcile(guarded: Arc<GuardedTask>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    let id = id_of(guarded.as_ref());
    let result = reconcile_task(&guarded, &ctx, id.clone()).await;
    if result.is_ok() {
        ctx.succeeded(&id.uid);
    }
    result
}

async fn reconcile_task(
    guarded: &GuardedTask,
    ctx: &Context,
    id: TaskId,
) -> Result<Action, ReconcileError> {
    let task = match &guarded.0 {
        Ok(task) => task,
        Err(undecodable) => {
            // The object is not what the schema promised (a field of the wrong type inside an
            // embedded template, say): report it; its stored status still seeds the counters.
            let status = stored_status(&ctx.client, &id).await;
            ctx.status.observe(Observed {
                task: id.clone(),
                reference: guarded.object_ref(&()),
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
        reference: task.object_ref(&()),
        generation: task.metadata.generation,
        status: task.status.clone(),
        history: task.spec.history.unwrap_or_default(),
    });

    let outcome = match validate(task, ctx.default_timezone).and_then(|v| within_limits(v, ctx)) {
        Ok(valid) => match check_secrets(&ctx.client, &id.key.namespace, &valid.secret_refs).await?
        {
            Ok(()) => Ok(valid),
            Err(invalid) => Err((invalid, Action::requeue(SECRET_RECHECK))),
        },
        Err(invalid) => Err((invalid, Action::await_change())),
    };
    match outcome {
        Ok(valid) => {
            info!(task = %id, schedule = %valid.schedule_text, paused = valid.engine.paused.is_some(), "task scheduled");
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

/// The operator's limits for tenants, on a task that is valid in itself.
fn within_limits(valid: ValidTask, ctx: &Context) -> Result<ValidTask, Invalid> {
    match valid.engine.schedule.min_gap() {
        Some(gap) if gap < ctx.min_period => Err(Invalid(format!(
            "spec.schedule: fires every {}, more often than this operator allows \
             (limits.min_period {})",
            crate::schedule::format_duration(gap),
            crate::schedule::format_duration(ctx.min_period)
        ))),
        _ => Ok(valid),
    }
}

/// The status of an object that does not decode as a ChronTask, read on its own.
async fn stored_status(client: &Client, id: &TaskId) -> Option<ChronTaskStatus> {
    let resource = ApiResource::erase::<ChronTask>(&());
    let api = Api::<DynamicObject>::namespaced_with(client.clone(), &id.key.namespace, &resource);
    let object = api.get(&id.key.name).await.ok()?;
    serde_json::from_value(object.data.get("status")?.clone()).ok()
}

/// `Ok(Err(..))`: a Secret is missing or lacks the key (the task is invalid until it appears);
/// `Err(..)`: the cluster did not answer (retry).
async fn check_secrets(
    client: &Client,
    namespace: &str,
    refs: &[(String, String)],
) -> Result<Result<(), Invalid>, ReconcileError> {
    let api = Api::<Secret>::namespaced(client.clone(), namespace);
    for (name, key) in refs {
        match api.get_opt(name).await {
            Ok(Some(secret)) if !opted_in(&secret) => return Ok(Err(Invalid(not_opted_in(name)))),
            Ok(Some(secret)) if has_key(&secret, key) => {}
            Ok(Some(_)) => return Ok(Err(Invalid(format!("Secret {name} has no key {key:?}")))),
            Ok(None) => {
                return Ok(Err(Invalid(format!(
                    "Secret {name} not found in namespace {namespace}"
                ))));
            }
            Err(kube::Error::Api(e)) if e.code == 403 => {
                return Ok(Err(Invalid(format!(
                    "Secret {name} is not readable by chronflow: {}",
                    e.message
                ))));
            }
            Err(source) => {
                return Err(ReconcileError::ReadSecret {
                    name: name.clone(),
                    source,
                });
            }
        }
    }
    Ok(Ok(()))
}

fn has_key(secret: &Secret, key: &str) -> bool {
    secret.data.as_ref().is_some_and(|d| d.contains_key(key))
        || secret
            .string_data
            .as_ref()
            .is_some_and(|d| d.contains_key(key))
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
    let events_ctx = ctx.clone();
    let events_store = store.clone();
    let scope = namespace.clone();
    let first_sync = Arc::new(std::sync::atomic::AtomicBool::new(true));
    // Deletions are handled here, from the watch events themselves: a generation filter would
    // hide them (a deleted object keeps its generation).
    let applied = watcher(api, watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .and_then(move |event| {
            let ctx = events_ctx.clone();
            let store = events_store.clone();
            let scope = scope.clone();
            let first_sync = first_sync.clone();
            async move {
                match &event {
                    watcher::Event::Delete(task) => forget(&ctx, id_of(task)).await,
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
        .predicate_filter(predicates::generation, Default::default());
    Controller::for_stream(applied, store)
        .graceful_shutdown_on(async move { shutdown.cancelled().await })
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(error) = result {
                warn!(%error, "controller");
            }
        })
        .await;
}

async fn forget(ctx: &Context, task: TaskId) {
    info!(%task, "task deleted");
    ctx.engine.remove(task.clone()).await;
    ctx.status.forget(&task);
}

/// After a (re-)list, forgets tasks deleted while the watch was down.
async fn prune(ctx: &Context, namespace: Option<String>, store: &Store<GuardedTask>) {
    let keep: HashSet<TaskKey> = store
        .state()
        .iter()
        .map(|t| id_of(t.as_ref()).key)
        .collect();
    ctx.status.retain(namespace.as_deref(), &keep);
    ctx.engine.retain(namespace, keep).await;
}

/// Reads header values from Secrets with the operator's own permissions.
/// The label a Secret must carry before a ChronTask may use it: whoever may create a
/// ChronTask may not be allowed to read every Secret of the namespace, and chronflow, which
/// reads them, must not be their way around it.
pub const USABLE_BY_TASKS: &str = "chronflow.io/usable-by-tasks";

/// Why a Secret without the opt-in label cannot be used, and how to opt in.
fn not_opted_in(name: &str) -> String {
    format!(
        "Secret {name} is not labeled {USABLE_BY_TASKS}=true; a ChronTask may only use Secrets \
         that opt in (kubectl label secret {name} {USABLE_BY_TASKS}=true)"
    )
}

fn opted_in(secret: &Secret) -> bool {
    secret
        .metadata
        .labels
        .as_ref()
        .and_then(|labels| labels.get(USABLE_BY_TASKS))
        .is_some_and(|value| value == "true")
}

/// How long one Secret read may take.
const SECRET_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Reads header values from Secrets by name (RBAC `get` only: never list or watch, so the
/// operator cannot enumerate them), each Secret kept for `cache_ttl` so a task firing every
/// second costs one read per lifetime, not one per attempt.
pub struct KubeSecrets {
    client: Client,
    cache_ttl: Duration,
    cache: std::sync::Mutex<SecretCache>,
}

/// (namespace, name) → when it was read, and what.
type SecretCache = HashMap<(String, String), (tokio::time::Instant, Arc<Secret>)>;

impl KubeSecrets {
    pub fn new(client: Client, cache_ttl: Duration) -> Self {
        Self {
            client,
            cache_ttl,
            cache: Default::default(),
        }
    }

    async fn secret(&self, namespace: &str, name: &str) -> Result<Arc<Secret>, String> {
        let id = (namespace.to_string(), name.to_string());
        let now = tokio::time::Instant::now();
        {
            let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            cache.retain(|_, (at, _)| now.duration_since(*at) < self.cache_ttl);
            if let Some((_, secret)) = cache.get(&id) {
                return Ok(secret.clone());
            }
        }
        let api = Api::<Secret>::namespaced(self.client.clone(), namespace);
        let secret = tokio::time::timeout(SECRET_READ_TIMEOUT, api.get(name))
            .await
            .map_err(|_| format!("cannot read Secret {name}: no answer within 5s"))?
            .map_err(|e| format!("cannot read Secret {name}: {e}"))?;
        let secret = Arc::new(secret);
        if !self.cache_ttl.is_zero() {
            let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            cache.insert(id, (now, secret.clone()));
        }
        Ok(secret)
    }
}

impl SecretSource for KubeSecrets {
    fn get<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
        key: &'a str,
    ) -> BoxFuture<'a, Result<Redacted, String>> {
        Box::pin(async move {
            let secret = self.secret(namespace, name).await?;
            // Checked at each use too: the label may have been removed since validation.
            if !opted_in(&secret) {
                return Err(not_opted_in(name));
            }
            let bytes = secret
                .data
                .as_ref()
                .and_then(|d| d.get(key))
                .ok_or_else(|| format!("Secret {name} has no key {key:?}"))?;
            String::from_utf8(bytes.0.clone())
                .map(Redacted)
                .map_err(|_| format!("Secret {name} key {key:?} is not UTF-8 text"))
        })
    }
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
    use crate::leader::Term;
    use http::{Request, Response};
    use kube::client::Body;
    use serde_json::json;
    use tokio::sync::{mpsc, watch};

    type ApiHandle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

    struct Harness {
        ctx: Arc<Context>,
        api: ApiHandle,
        stop: CancellationToken,
        _events: mpsc::Receiver<crate::status::events::EventRequest>,
        _leader: watch::Sender<Option<Term>>,
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
        let secrets = Arc::new(KubeSecrets::new(client.clone(), Duration::from_secs(10)));
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = crate::executor::http::client().unwrap();
        let ledger = memory_ledger();
        let (executor, _) =
            Executor::new(config, sink.clone(), clock, http, secrets, ledger.clone());
        let (leader_tx, leader) = watch::channel(Some(Term::single("test")));
        let (engine, handle) = Engine::new(EngineParts {
            executor,
            ledger,
            leader,
            sink,
            clock,
        });
        let stop = CancellationToken::new();
        tokio::spawn(engine.run(stop.clone()));
        let ctx = Arc::new(Context {
            client,
            engine: handle,
            status: index,
            default_timezone: Tz::UTC,
            min_period: Duration::from_millis(100),
            metrics: Arc::new(Metrics::new(true)),
            health: Arc::new(Health::new(1)),
            failures: Default::default(),
        });
        Harness {
            ctx,
            api,
            stop,
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
        let action = reconcile(task(spec), h.ctx.clone()).await.unwrap();
        assert_eq!(action, Action::await_change());
        let status = status_when(&h.ctx, |s| s.phase == Some(crate::crd::Phase::Scheduled)).await;
        assert!(status.next_run_time.is_some());
    }

    #[tokio::test]
    async fn a_missing_secret_makes_the_task_invalid_until_it_appears() {
        let mut h = harness();
        let pending = tokio::spawn(reconcile(with_secret_header(), h.ctx.clone()));
        answer(
            &mut h.api,
            "GET",
            "/api/v1/namespaces/ns/secrets/s",
            404,
            not_found(),
        )
        .await;
        let action = pending.await.unwrap().unwrap();
        assert_eq!(
            action,
            Action::requeue(SECRET_RECHECK),
            "checked again later"
        );
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
        let pending = tokio::spawn(reconcile(task, h.ctx.clone()));
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
        let pending = tokio::spawn(reconcile(guarded, h.ctx.clone()));
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
}
