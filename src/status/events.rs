//! Kubernetes Events about ChronTasks, published by one task from a bounded queue, so the
//! status index never waits for the apiserver. Each Event is a new `events.k8s.io/v1` object
//! carrying its own note: kube's `Recorder` merges repeats into a series that keeps the first
//! note, which would show an old run id. Rate limiting happens in the index.

use chrono::{DateTime, Utc};
use futures::StreamExt;
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::PostParams;
use kube::{Api, Client};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::clock::Clock;
use crate::shard::Terms;

/// Capacity of the Event queue; past it Events are dropped and counted.
pub const EVENT_QUEUE: usize = 1024;

/// The reporting controller named in every Event.
pub const REPORTING_CONTROLLER: &str = "chronflow.io/operator";

/// Event reasons, stable for alerting and `kubectl get events --field-selector reason=...`.
pub mod reasons {
    /// The spec became invalid.
    pub const INVALID_SPEC: &str = "InvalidSpec";
    /// The task was paused.
    pub const PAUSED: &str = "Paused";
    /// The task was resumed.
    pub const RESUMED: &str = "Resumed";
    /// A run failed after all its attempts.
    pub const RUN_FAILED: &str = "RunFailed";
    /// A due instant was not run.
    pub const RUN_MISSED: &str = "RunMissed";
    /// The apiserver refused the task's status.
    pub const STATUS_REJECTED: &str = "StatusRejected";
}

/// An Event's type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Severity {
    /// `Normal`.
    Normal,
    /// `Warning`.
    Warning,
}

/// One Event to publish.
#[derive(Debug)]
pub struct EventRequest {
    /// The ChronTask it is about.
    pub reference: ObjectReference,
    /// Its type.
    pub severity: Severity,
    /// Its reason (one of [`reasons`]).
    pub reason: &'static str,
    /// What happened.
    pub note: String,
}

/// Events created at once: a slow apiserver must not turn the queue into a backlog.
const CONCURRENT_EVENTS: usize = 16;

/// Publishes queued Events of the tasks whose shards this replica holds, until `stop`; then
/// what is already queued (the last runs' failures) still goes out.
pub async fn publish(
    client: Client,
    mut queue: mpsc::Receiver<EventRequest>,
    leader: watch::Receiver<Terms>,
    instance: String,
    clock: Clock,
    stop: CancellationToken,
) {
    let send = |request: EventRequest| {
        let (client, instance) = (client.clone(), instance.clone());
        let uid = request.reference.uid.as_deref().unwrap_or_default();
        let leading = leader.borrow().task(uid).is_some();
        async move {
            if leading {
                create(client, request, instance, clock.now()).await;
            }
        }
    };
    futures::stream::poll_fn(|cx| queue.poll_recv(cx))
        .take_until(stop.cancelled())
        .for_each_concurrent(CONCURRENT_EVENTS, send)
        .await;
    let queued: Vec<EventRequest> = std::iter::from_fn(|| queue.try_recv().ok()).collect();
    futures::stream::iter(queued)
        .for_each_concurrent(CONCURRENT_EVENTS, send)
        .await;
}

async fn create(client: Client, request: EventRequest, instance: String, now: DateTime<Utc>) {
    let namespace = request.reference.namespace.clone().unwrap_or_default();
    let nanos = now.timestamp_nanos_opt().unwrap_or_default();
    let name = request.reference.name.clone().unwrap_or_default();
    let event = Event {
        metadata: ObjectMeta {
            name: Some(format!("{name}.{nanos:x}")),
            namespace: Some(namespace.clone()),
            ..ObjectMeta::default()
        },
        action: Some("Schedule".into()),
        reason: Some(request.reason.into()),
        // The Events API limits a note to 1 kB.
        note: Some(request.note.chars().take(1000).collect()),
        type_: Some(
            match request.severity {
                Severity::Normal => "Normal",
                Severity::Warning => "Warning",
            }
            .into(),
        ),
        event_time: Some(MicroTime(
            k8s_openapi::jiff::Timestamp::from_nanosecond(i128::from(nanos)).unwrap_or_default(),
        )),
        regarding: Some(request.reference),
        reporting_controller: Some(REPORTING_CONTROLLER.into()),
        reporting_instance: Some(instance),
        ..Event::default()
    };
    let api = Api::<Event>::namespaced(client, &namespace);
    if let Err(error) = api.create(&PostParams::default(), &event).await {
        warn!(%error, reason = request.reason, "cannot publish event");
    }
}
