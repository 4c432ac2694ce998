//! `chronflow run`: wires the controller, engine, executor and status writer together, runs
//! them until SIGINT/SIGTERM, then shuts down in order: stop firing, drain runs in flight
//! within `shutdown.grace_period`, write the last status, exit.

use std::sync::Arc;
use std::time::Duration;

use kube::api::ListParams;
use kube::{Api, Client};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::config::OperatorConfig;
use crate::controller::{self, Context, KubeSecrets};
use crate::dedup::MemoryDedup;
use crate::engine::Engine;
use crate::executor::{Executor, ExecutorConfig};
use crate::status::StatusWriter;
use crate::{ChronTask, Error, Result};

/// Capacity of the channels to the status writer; it only buffers in memory, so it keeps up.
const STATUS_CHANNEL: usize = 4096;

/// How long the memory dedup remembers a claimed run.
const MEMORY_DEDUP_TTL: Duration = Duration::from_secs(24 * 3600);

/// Runs the operator until `shutdown` is cancelled (by a signal in `chronflow run`).
pub async fn run(
    config: OperatorConfig,
    client: Client,
    shutdown: CancellationToken,
) -> Result<()> {
    // One TLS provider for the kube client and the HTTP action alike; a second install (tests
    // running several operators in one process) is a no-op.
    let _ = rustls::crypto::ring::default_provider().install_default();
    Api::<ChronTask>::all(client.clone())
        .list(&ListParams::default().limit(1))
        .await
        .map_err(|source| Error::CrdUnavailable { source })?;

    let (leader_tx, leader) = watch::channel(true); // a single replica always leads
    let (reports_tx, reports_rx) = mpsc::channel(STATUS_CHANNEL);
    let (status_tx, status_rx) = mpsc::channel(STATUS_CHANNEL);

    let http = reqwest::Client::builder()
        .user_agent(concat!("chronflow/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| Error::Startup(format!("cannot build the HTTP client: {e}")))?;
    let secrets = Arc::new(KubeSecrets {
        client: client.clone(),
    });
    let executor_config = ExecutorConfig {
        max_workers: config.max_workers,
        queue_size: config.queue_size,
        log_success: config.log.log_task_success,
    };
    let (executor, executor_task) =
        Executor::new(executor_config, reports_tx.clone(), http, secrets);
    let dedup = Arc::new(MemoryDedup::new(MEMORY_DEDUP_TTL));
    let (engine, engine_handle) = Engine::new(executor, dedup, leader.clone(), reports_tx);
    let writer = StatusWriter::new(
        client.clone(),
        status_rx,
        reports_rx,
        config.status.flush_interval,
        leader,
        std::env::var("POD_NAME").ok(),
    );
    let context = Arc::new(Context {
        client,
        engine: engine_handle,
        status: status_tx,
        default_timezone: config.timezone,
    });

    // Every task is supervised: if one ends before shutdown, all stop and we exit non-zero.
    let firing = shutdown.child_token();
    let mut tasks = JoinSet::new();
    tasks.spawn(engine.run(firing.clone()));
    tasks.spawn(executor_task.run(firing.clone(), config.shutdown.grace_period));
    let namespaces: Vec<Option<String>> = if config.watch_namespaces.is_empty() {
        vec![None]
    } else {
        config.watch_namespaces.iter().cloned().map(Some).collect()
    };
    for namespace in namespaces {
        tasks.spawn(controller::run(context.clone(), namespace, firing.clone()));
    }
    drop(context); // the controllers hold the only status senders now
    let status = tokio::spawn(writer.run());
    info!(
        max_workers = config.max_workers,
        queue_size = config.queue_size,
        "chronflow operator started"
    );

    let failure = tokio::select! {
        biased;
        _ = shutdown.cancelled() => None,
        Some(ended) = tasks.join_next() => match ended {
            // Components end on their own once shutdown has begun.
            _ if shutdown.is_cancelled() => None,
            Ok(()) => Some("a component stopped unexpectedly".to_string()),
            Err(e) => Some(format!("a component failed: {e}")),
        },
    };
    match &failure {
        None => info!("shutting down: no new runs; draining runs in flight"),
        Some(reason) => error!(%reason, "shutting down"),
    }
    firing.cancel();
    while tasks.join_next().await.is_some() {}
    drop(leader_tx);
    let _ = status.await;
    info!("chronflow operator stopped");
    match failure {
        Some(reason) => Err(Error::Startup(reason)),
        None => Ok(()),
    }
}

/// Resolves on the first SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = terminate => {},
    }
}
