//! The ChronTask controller: watches ChronTasks, validates each into a `ValidTask`, hands it to
//! the engine and tells the status writer. Reconcile never waits for a run. Only spec changes
//! (a new `metadata.generation`) reconcile, so status writes cause no reconcile loop.

pub mod validate;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use chrono_tz::Tz;
use futures::{StreamExt, TryStreamExt, future::BoxFuture};
use k8s_openapi::api::core::v1::Secret;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, predicates, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::ChronTask;
use crate::engine::EngineHandle;
use crate::executor::http::{Redacted, SecretSource};
use crate::run::TaskKey;
use crate::status::Update;
use validate::{Invalid, validate};

/// How often a task whose Secret is missing is checked again.
const SECRET_RECHECK: Duration = Duration::from_secs(30);

/// What reconcile needs.
pub struct Context {
    pub client: Client,
    pub engine: EngineHandle,
    pub status: mpsc::Sender<Update>,
    pub default_timezone: Tz,
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

fn key_of(task: &ChronTask) -> TaskKey {
    TaskKey::new(task.namespace().unwrap_or_default(), task.name_any())
}

async fn reconcile(task: Arc<ChronTask>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    let key = key_of(&task);
    let send = |update| async { ctx.status.send(update).await.ok() };
    send(Update::Observed {
        task: key.clone(),
        reference: task.object_ref(&()),
        generation: task.metadata.generation,
        status: task.status.clone().map(Box::new),
        history: task.spec.history.unwrap_or_default(),
    })
    .await;

    let outcome = match validate(&task, ctx.default_timezone) {
        Ok(valid) => match check_secrets(&ctx.client, &key.namespace, &valid.secret_refs).await? {
            Ok(()) => Ok(valid),
            Err(invalid) => Err((invalid, Action::requeue(SECRET_RECHECK))),
        },
        Err(invalid) => Err((invalid, Action::await_change())),
    };
    match outcome {
        Ok(valid) => {
            match &valid.paused {
                Some(_) => ctx.engine.pause(key.clone()).await,
                None => ctx.engine.upsert(valid.engine).await,
            }
            info!(task = %key, schedule = %valid.schedule_text, paused = valid.paused.is_some(), "task scheduled");
            send(Update::Valid {
                task: key,
                schedule: valid.schedule_text,
                paused: valid.paused,
            })
            .await;
            Ok(Action::await_change())
        }
        Err((Invalid(reason), action)) => {
            warn!(task = %key, %reason, "invalid task");
            ctx.engine.remove(key.clone()).await;
            send(Update::Invalid { task: key, reason }).await;
            Ok(action)
        }
    }
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

fn error_policy(task: Arc<ChronTask>, error: &ReconcileError, _ctx: Arc<Context>) -> Action {
    warn!(task = %key_of(&task), %error, label = error.metric_label(), "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(5))
}

/// Watches ChronTasks in `namespace` (all namespaces when `None`) until `shutdown`.
pub async fn run(ctx: Arc<Context>, namespace: Option<String>, shutdown: CancellationToken) {
    let api: Api<ChronTask> = match &namespace {
        Some(ns) => Api::namespaced(ctx.client.clone(), ns),
        None => Api::all(ctx.client.clone()),
    };
    let (store, writer) = reflector::store();
    let events_ctx = ctx.clone();
    let events_store = store.clone();
    let scope = namespace.clone();
    // Deletions are handled here, from the watch events themselves: a generation filter would
    // hide them (a deleted object keeps its generation).
    let applied = watcher(api, watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .and_then(move |event| {
            let ctx = events_ctx.clone();
            let store = events_store.clone();
            let scope = scope.clone();
            async move {
                match &event {
                    watcher::Event::Delete(task) => forget(&ctx, key_of(task)).await,
                    watcher::Event::InitDone => prune(&ctx, scope, &store).await,
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

async fn forget(ctx: &Context, key: TaskKey) {
    info!(task = %key, "task deleted");
    ctx.engine.remove(key.clone()).await;
    let _ = ctx.status.send(Update::Forget(key)).await;
}

/// After a (re-)list, forgets tasks deleted while the watch was down.
async fn prune(ctx: &Context, namespace: Option<String>, store: &Store<ChronTask>) {
    let keep: HashSet<TaskKey> = store.state().iter().map(|t| key_of(t)).collect();
    ctx.engine.retain(namespace.clone(), keep.clone()).await;
    let _ = ctx.status.send(Update::Retain { namespace, keep }).await;
}

/// Reads header values from Secrets with the operator's own permissions.
pub struct KubeSecrets {
    pub client: Client,
}

impl SecretSource for KubeSecrets {
    fn get<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
        key: &'a str,
    ) -> BoxFuture<'a, Result<Redacted, String>> {
        Box::pin(async move {
            let secret = Api::<Secret>::namespaced(self.client.clone(), namespace)
                .get(name)
                .await
                .map_err(|e| format!("cannot read Secret {name}: {e}"))?;
            let bytes = secret
                .data
                .and_then(|mut d| d.remove(key))
                .ok_or_else(|| format!("Secret {name} has no key {key:?}"))?;
            String::from_utf8(bytes.0)
                .map(Redacted)
                .map_err(|_| format!("Secret {name} key {key:?} is not UTF-8 text"))
        })
    }
}
