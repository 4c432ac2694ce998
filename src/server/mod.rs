//! The operator's HTTP endpoint (`metrics.bind`): `/metrics` (OpenMetrics; with
//! `metrics.auth: kubernetes` only for whom the apiserver allows, see [`access`]), `/stats`
//! (JSON, the Python library's `get_stats()`), `/healthz` (alive) and `/readyz` (able to do the
//! job).

pub mod access;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::executor::LoadGauge;
use crate::handover::Handovers;
use crate::members::View;
use crate::metrics::Metrics;
use crate::shard::Terms;
use crate::status::StatusIndex;

/// What readiness waits for: the ChronTask CRD served, the first watch sync of every watched
/// namespace, and every supervised component alive. (The configuration is loaded before the
/// server exists.)
#[derive(Debug, Default)]
pub struct Health {
    crd_served: AtomicBool,
    namespaces: AtomicUsize,
    synced: AtomicUsize,
    stopping: AtomicBool,
    /// With leader election: the elector has not yet finished a round.
    awaiting_lease: AtomicBool,
}

impl Health {
    /// Health of an operator watching `namespaces` namespaces (0 for standalone mode).
    pub fn new(namespaces: usize) -> Self {
        Self {
            namespaces: AtomicUsize::new(namespaces),
            ..Self::default()
        }
    }

    /// Leader election is on: not ready until the elector has read (or won) the Lease once.
    pub fn expect_lease(&self) {
        self.awaiting_lease.store(true, Ordering::SeqCst);
    }

    /// The elector finished a round: it runs, leading or standing by.
    pub fn lease_known(&self) {
        self.awaiting_lease.store(false, Ordering::SeqCst);
    }

    /// The ChronTask CRD answered a list.
    pub fn crd_served(&self) {
        self.crd_served.store(true, Ordering::SeqCst);
    }

    /// One watched namespace finished its first list (call once per namespace).
    pub fn synced(&self) {
        self.synced.fetch_add(1, Ordering::SeqCst);
    }

    /// Shutting down, or a component died: no longer able to do the job.
    pub fn stopping(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }

    /// `Ok` when ready, else what is missing.
    pub fn ready(&self) -> Result<(), &'static str> {
        if self.stopping.load(Ordering::SeqCst) {
            Err("stopping")
        } else if !self.crd_served.load(Ordering::SeqCst) {
            Err("waiting for the ChronTask CRD")
        } else if self.synced.load(Ordering::SeqCst) < self.namespaces.load(Ordering::SeqCst) {
            Err("waiting for the first sync of the ChronTask watch")
        } else if self.awaiting_lease.load(Ordering::SeqCst) {
            Err("waiting for the leader election's first round")
        } else {
            Ok(())
        }
    }
}

/// What the endpoints read.
#[derive(Clone)]
pub struct Endpoint {
    /// What `/metrics` serves.
    pub metrics: Arc<Metrics>,
    /// Tasks by phase, for `/stats`.
    pub status: StatusIndex,
    /// The executor's load, for `/stats`.
    pub executor: LoadGauge,
    /// What `/healthz` and `/readyz` answer.
    pub health: Arc<Health>,
    /// The terms of the shards this replica holds, for `/stats`.
    pub leader: watch::Receiver<Terms>,
    /// The live replicas (`src/members.rs`), for `/stats`; `None` without leader election.
    pub members: Option<watch::Receiver<View>>,
    /// The shards taken and let go (`src/handover.rs`), for `/stats`; `None` unless sharded.
    pub handovers: Option<watch::Receiver<Handovers>>,
    /// Who may read `/metrics`: `None`, whoever reaches the port.
    pub access: Option<Arc<access::Access>>,
}

/// The routes of the endpoint.
pub fn router(endpoint: Endpoint) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/stats", get(stats))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(endpoint)
}

/// Serves until `stop`; the listener is bound by the caller, so a bad `metrics.bind` stops
/// start-up.
pub async fn serve(listener: tokio::net::TcpListener, endpoint: Endpoint, stop: CancellationToken) {
    let app = router(endpoint);
    if let Err(error) = axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
    {
        tracing::error!(%error, "the metrics endpoint stopped");
    }
}

async fn metrics(State(endpoint): State<Endpoint>, headers: HeaderMap) -> Response {
    if let Some(access) = &endpoint.access
        && let Some(refusal) = access::refusal(access, &headers).await
    {
        return refusal.into_response();
    }
    let content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8";
    (
        [(header::CONTENT_TYPE, content_type)],
        endpoint.metrics.encode(),
    )
        .into_response()
}

async fn stats(State(endpoint): State<Endpoint>) -> Response {
    let Some(load) = endpoint.executor.load() else {
        return (StatusCode::SERVICE_UNAVAILABLE, "stopped").into_response();
    };
    let (tasks, owned, phases, status) = {
        let index = endpoint.status.lock();
        let phases = index.phases();
        let owned = index.owned_tasks();
        let status = json!({
            "backlog": index.pending_writes(),
            "staleness_seconds": index.staleness().as_secs_f64(),
            "writes_per_second": index.write_budget(),
        });
        (phases.values().sum::<usize>(), owned, phases, status)
    };
    let phases: serde_json::Map<String, serde_json::Value> = phases
        .into_iter()
        .map(|(phase, count)| (format!("{phase:?}"), json!(count)))
        .collect();
    let body = json!({
        "running": endpoint.health.ready().is_ok(),
        "total_tasks": tasks,
        "owned_tasks": owned,
        "queue_size": load.waiting,
        "queue_capacity": load.queue_size,
        "queue_refused": load.refused,
        "active_workers": load.busy_workers,
        "max_workers": load.max_workers,
        "leader": !endpoint.leader.borrow().is_empty(),
        "epoch": endpoint.leader.borrow().newest().map(|term| term.epoch),
        "shards": endpoint.leader.borrow().held(),
        "handovers": endpoint.handovers.as_ref().map(|handovers| {
            let handovers = handovers.borrow();
            json!({
                "taken": handovers.taken,
                "released": handovers.released,
                "last_ms": handovers.last_duration.map(|d| d.as_millis() as u64),
            })
        }),
        "members": endpoint.members.as_ref().map(|view| {
            let ring = &view.borrow().ring;
            ring.members().iter().map(ToString::to_string).collect::<Vec<_>>()
        }),
        "version": env!("CARGO_PKG_VERSION"),
        "tasks_by_phase": phases,
        "status_writes": status,
    });
    (
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

async fn readyz(State(endpoint): State<Endpoint>) -> Response {
    match endpoint.health.ready() {
        Ok(()) => (StatusCode::OK, "ready").into_response(),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, why).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_with_the_crd_served_every_namespace_synced_and_not_stopping() {
        let health = Health::new(2);
        assert_eq!(health.ready(), Err("waiting for the ChronTask CRD"));
        health.crd_served();
        health.synced();
        assert_eq!(
            health.ready(),
            Err("waiting for the first sync of the ChronTask watch"),
            "one namespace of two"
        );
        health.synced();
        assert_eq!(health.ready(), Ok(()));
        health.stopping();
        assert_eq!(health.ready(), Err("stopping"));
    }

    #[test]
    fn with_leader_election_ready_only_once_the_elector_ran_a_round() {
        let health = Health::new(1);
        health.expect_lease();
        health.crd_served();
        health.synced();
        let waiting = Err("waiting for the leader election's first round");
        assert_eq!(health.ready(), waiting);
        health.lease_known();
        assert_eq!(health.ready(), Ok(()), "a standby is ready too");
    }
}
