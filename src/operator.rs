//! `chronflow run`: wires the controller, engine, executor and status writer together, runs
//! them until SIGINT/SIGTERM, then shuts down in order: stop firing, drain runs in flight
//! within `shutdown.grace_period`, write the last status (retrying until the grace period
//! ends), exit. Every long-lived task is supervised: if one ends or panics before shutdown,
//! everything stops and the process exits non-zero.

use std::sync::Arc;
use std::time::Duration;

use kube::api::ListParams;
use kube::{Api, Client};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::clock::Clock;
use crate::config::OperatorConfig;
use crate::config::{BackendType, MetricsAuth};
use crate::controller::jobs::KubeJobs;
use crate::controller::{self, Context, JobRules, KubeValues, TenantLimits};
use crate::core::{Core, CoreParts};
use crate::handover::{Handover, Handovers};
use crate::leader::{Elector, Identity, Term, Terms, Timings};
use crate::ledger::{Ledger, MemoryLedger, RedisLedger, RedisSettings};
use crate::members::{Ack, Members, View};
use crate::metrics::{CountedClaims, Live, Metrics, Recording};
use crate::run::ReportSink;
use crate::server::access::Access;
use crate::server::{self, Endpoint, Health};
use crate::skew::ClockCheck;
use crate::status::{StatusIndex, StatusWriter, WriterConfig, events};
use crate::{ChronTask, Error, Result};

/// How long the Lease release at exit may take.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(5);

/// The final status flush gets at least this long, even with a short grace period.
const MIN_FINAL_FLUSH: Duration = Duration::from_secs(2);

/// Runs the operator until `shutdown` is cancelled (by a signal in `chronflow run`).
pub async fn run(
    config: OperatorConfig,
    client: Client,
    shutdown: CancellationToken,
) -> Result<()> {
    // One TLS provider for the kube client and the HTTP action alike; a second install (tests
    // running several operators in one process) is a no-op.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let namespaces: Vec<Option<String>> = if config.watch_namespaces.is_empty() {
        vec![None]
    } else {
        config
            .watch_namespaces
            .iter()
            .map(|ns| Some(ns.to_string()))
            .collect()
    };
    // A bad metrics.bind stops start-up, naming the key.
    let listener = tokio::net::TcpListener::bind(config.metrics.bind)
        .await
        .map_err(|e| {
            Error::Startup(format!(
                "config: metrics.bind: cannot listen on {}: {e}",
                config.metrics.bind
            ))
        })?;
    let health = Arc::new(Health::new(namespaces.len()));
    if config.leader_election.enabled {
        health.expect_lease();
    }

    let clock = Clock::System;
    let instance = identity();
    // Without leader election this replica leads, in one term, from start to exit.
    let election = config.leader_election.enabled;
    let holder = instance.to_string();
    let alone = (!election).then(|| Terms::all(Term::single(&holder)));
    let (term_tx, leader) = watch::channel(alone.unwrap_or_default());
    // Given to whoever decides the terms: the elector, or the handover when sharded.
    let mut term_tx = Some(term_tx);
    let (events_tx, events_rx) = mpsc::channel(events::EVENT_QUEUE);
    let index = StatusIndex::new(events_tx, clock);
    index.follow_leader(leader.clone());
    let selector = config.metrics.per_task_selector.clone();
    let metrics = Arc::new(Metrics::new(config.metrics.per_task, selector));
    let redis = match config.backend_type {
        BackendType::Memory => None,
        BackendType::Redis => Some(Arc::new(
            RedisLedger::new(&RedisSettings::from_config(&config.redis)?)
                .map_err(|e| Error::Startup(format!("config: redis: {e}")))?,
        )),
    };
    let counted: Arc<dyn Ledger> = Arc::new(CountedClaims {
        metrics: metrics.clone(),
        inner: match &redis {
            Some(redis) => redis.clone(),
            None => Arc::new(MemoryLedger::new(MemoryLedger::IDLE)),
        },
    });
    // With a shared ledger, run counts are the ledger's: every leader's runs, once each.
    let (ledger, recorder, kept_marks): (Arc<dyn Ledger>, Arc<dyn ReportSink>, _) =
        match config.backend_type {
            BackendType::Memory => (counted, Arc::new(index.clone()), None),
            BackendType::Redis => {
                let (ledger, recorder) = index.counting_from(counted, leader.clone());
                (ledger.clone(), recorder, Some(ledger))
            }
        };

    let values = Arc::new(KubeValues::new(client.clone(), config.secrets.cache_ttl));
    let sink: Arc<dyn ReportSink> = Arc::new(Recording {
        metrics: metrics.clone(),
        inner: recorder,
    });
    let mut parts = CoreParts::from_config(
        &config,
        values.clone(),
        ledger.clone(),
        sink,
        leader.clone(),
    )?;
    // Jobs are watched (and need RBAC) only when Job actions are enabled.
    let (jobs, job_informers) = match config.jobs.enabled {
        true => {
            let (jobs, informers) = KubeJobs::new(client.clone(), &namespaces);
            parts.jobs = jobs.clone();
            (Some(jobs), Some(informers))
        }
        false => (None, None),
    };
    let mut core = Core::build(parts);
    if let Some(redis) = &redis {
        tokio::spawn(warn_if_evicting(redis.clone()));
    }
    // Sharded, the replicas split the tasks (src/handover.rs) and no one Lease is elected.
    let sharding = election && config.leader_election.sharding;
    let mut clock_check =
        sharding.then(|| ClockCheck::new(ledger.clone(), config.leader_election.max_clock_skew));
    let elector = (election && !sharding).then(|| {
        let lease = &config.leader_election;
        let api = Api::namespaced(client.clone(), &lease.effective_lease_namespace());
        let timings = Timings::from(lease);
        let epochs = ledger.clone();
        Arc::new(Elector::new(
            api,
            &lease.lease_name,
            instance.clone(),
            timings,
            epochs,
        ))
    });
    // Each replica announces itself with a member Lease (sharded, the shards are spread over
    // the members); `kubectl get leases` and `/stats` show them.
    let members = election.then(|| {
        let lease = &config.leader_election;
        let api = Api::namespaced(client.clone(), &lease.effective_lease_namespace());
        let timings = Timings::from(lease);
        let members = Members::new(api, &lease.lease_name, instance.clone(), timings);
        (
            members,
            watch::channel(View::default()),
            watch::channel(Ack::default()),
        )
    });
    let view = members.as_ref().map(|(_, (_, view), _)| view.clone());
    let (handovers_tx, handovers) = watch::channel(Handovers::default());
    metrics.watch(Live {
        executor: core.load.clone(),
        status: index.clone(),
        leader: leader.clone(),
        redis,
        kept_marks,
        clock_skew: match (&elector, &clock_check) {
            (Some(elector), _) => Some(elector.clock_skew()),
            (None, check) => check.as_ref().map(ClockCheck::skew),
        },
        members: view.clone(),
        handovers: sharding.then(|| handovers.clone()),
    });
    let endpoint = Endpoint {
        metrics: metrics.clone(),
        status: index.clone(),
        executor: core.load.clone(),
        health: health.clone(),
        leader: leader.clone(),
        members: view.clone(),
        handovers: sharding.then_some(handovers),
        access: (config.metrics.auth == MetricsAuth::Kubernetes)
            .then(|| Arc::new(Access::new(client.clone(), "/metrics"))),
    };
    // The endpoint serves from here on: /healthz answers while the CRD check below waits.
    let writing = CancellationToken::new();
    let mut writing_tasks = JoinSet::new();
    writing_tasks.spawn(server::serve(listener, endpoint, writing.clone()));
    // Stopped while the apiserver is slow to answer: nothing has started yet.
    let started = tokio::select! {
        checked = check_crd(&client, &namespaces) => checked.map(|()| true),
        () = shutdown.cancelled() => Ok(false),
    };
    if !matches!(started, Ok(true)) {
        writing.cancel();
        while writing_tasks.join_next().await.is_some() {}
        return started.map(|_| info!("chronflow operator stopped before it started"));
    }
    health.crd_served();

    // The Lease is kept through the drain and the last status write (the writing stage), and
    // released after them, so a standby leads only once this replica stopped acting.
    if let (Some(elector), Some(term_tx)) = (&elector, term_tx.take_if(|_| !sharding)) {
        let (elector, stop, health) = (elector.clone(), writing.clone(), health.clone());
        let draining = shutdown.clone();
        writing_tasks.spawn(async move {
            let drain = async {
                draining.cancelled().await;
                elector.drain();
                std::future::pending::<()>().await
            };
            tokio::select! {
                () = elector.run(term_tx, stop, || health.lease_known()) => {}
                () = drain => {}
            }
        });
    }
    // Its Lease goes with the writing stage, as the leader's is released after it.
    if let Some((members, (view_tx, view), (ack_tx, ack))) = members {
        let stop = writing.clone();
        writing_tasks.spawn(async move { members.run(view_tx, ack, stop).await });
        // Sharded, SIGTERM makes it stand by: its shards go to the others as soon as they are
        // ready, while it drains its runs in flight (the last replica keeps them to the end).
        if let (Some(term_tx), Some(clock)) = (term_tx.take(), clock_check.take()) {
            let retry = config.leader_election.retry_period;
            let handover = Handover::new(instance.clone(), ledger.clone(), clock, retry);
            let stopping = (shutdown.clone(), writing.clone());
            let health = health.clone();
            let mut first_round = view.clone();
            writing_tasks.spawn(async move {
                let ready = async {
                    if first_round.wait_for(|view| view.renewed).await.is_ok() {
                        health.lease_known();
                    }
                    std::future::pending::<()>().await
                };
                tokio::select! {
                    () = handover.run(view, term_tx, ack_tx, handovers_tx, stopping) => {}
                    () = ready => {}
                }
            });
        }
    }
    let writer = StatusWriter::new(
        client.clone(),
        index.clone(),
        leader.clone(),
        WriterConfig {
            flush_interval: config.status.flush_interval,
            writes_per_second: config.status.max_writes_per_second,
        },
    );
    let context = Arc::new(Context {
        client: client.clone(),
        engine: core.engine.clone(),
        status: index,
        default_timezone: config.timezone,
        limits: TenantLimits {
            min_period: config.limits.min_period,
            max_tasks_per_namespace: config.limits.max_tasks_per_namespace,
            allow_insecure_skip_verify: config.http.allow_insecure_skip_verify,
            allow_exec: false,
            max_timeout: config.limits.max_timeout,
            jobs: config.jobs.enabled.then(|| JobRules {
                namespaces: config
                    .jobs
                    .namespaces
                    .iter()
                    .map(|n| n.to_string())
                    .collect(),
                service_accounts: config.jobs.allowed_service_accounts.clone(),
                own_namespace: std::env::var("POD_NAMESPACE")
                    .ok()
                    .filter(|namespace| !namespace.is_empty()),
            }),
        },
        values,
        jobs,
        metrics,
        health: health.clone(),
        failures: Default::default(),
    });

    // Two supervised groups, stopped in order: first what fires and runs, then what writes.
    let firing = shutdown.child_token();
    let mut firing_tasks = JoinSet::new();
    core.spawn(&mut firing_tasks, &firing, config.shutdown.grace_period);
    if let Some(informers) = job_informers {
        firing_tasks.spawn(informers.run(firing.clone()));
    }
    for namespace in namespaces {
        firing_tasks.spawn(controller::run(context.clone(), namespace, firing.clone()));
    }
    drop(context);
    let final_flush = config.shutdown.grace_period.max(MIN_FINAL_FLUSH);
    writing_tasks.spawn(writer.run(writing.clone(), final_flush));
    let publisher = events::publish(
        client,
        events_rx,
        leader,
        instance.name,
        clock,
        writing.clone(),
    );
    writing_tasks.spawn(publisher);
    info!(
        max_workers = config.max_workers,
        queue_size = config.queue_size,
        "chronflow operator started"
    );

    let stages = Stages {
        firing: (firing, firing_tasks),
        writing: (writing, writing_tasks),
    };
    let result = supervise(shutdown, stages, || health.stopping()).await;
    if let Some(elector) = elector {
        match tokio::time::timeout(RELEASE_TIMEOUT, elector.release()).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                warn!(%error, "could not release the lease; a standby leads once it expires")
            }
            Err(_) => warn!("releasing the lease timed out; a standby leads once it expires"),
        }
    }
    info!("chronflow operator stopped");
    result
}

/// Warns when the Redis ledger's server may evict keys under memory pressure: an evicted run
/// record or epoch lets an instant run twice. Asked once Redis answers; a server that refuses
/// `CONFIG` (managed services) is reported as unknown.
async fn warn_if_evicting(redis: Arc<RedisLedger>) {
    let mut wait = Duration::from_secs(1);
    for tries_left in (0..6).rev() {
        match redis.eviction_policy().await {
            Ok(policy) if policy == "noeviction" => return,
            Ok(policy) => {
                return warn!(
                    %policy,
                    "the Redis ledger's maxmemory-policy may evict its keys, and an evicted run \
                     record can let an instant run twice: set maxmemory-policy noeviction \
                     (docs/operations.md)"
                );
            }
            Err(error) if tries_left == 0 => {
                return warn!(
                    %error,
                    "cannot read the Redis ledger's maxmemory-policy; make sure it is noeviction \
                     (docs/operations.md)"
                );
            }
            // Redis may not be up yet.
            Err(_) => tokio::time::sleep(wait).await,
        }
        wait *= 4;
    }
}

/// This process among the replicas: `POD_NAME` (else a name made from the process id) and a
/// nonce drawn now, so a container restarted in place is another holder in the Lease and the
/// ledger than its earlier self.
pub(crate) fn identity() -> Identity {
    let name = std::env::var("POD_NAME")
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| format!("chronflow-{}", std::process::id()));
    Identity::new(&name)
}

/// Checks that ChronTasks can be listed where the operator will watch, with its own rights: a
/// namespaced install need not list them cluster-wide. Metadata only: one malformed ChronTask
/// must not stop start-up.
async fn check_crd(client: &Client, namespaces: &[Option<String>]) -> Result<()> {
    for namespace in namespaces {
        let api: Api<ChronTask> = match namespace {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        };
        api.list_metadata(&ListParams::default().limit(1))
            .await
            .map_err(|source| Error::CrdUnavailable { source })?;
    }
    Ok(())
}

/// The long-lived tasks in the order they stop: first what fires and runs, then what writes.
struct Stages {
    firing: (CancellationToken, JoinSet<()>),
    writing: (CancellationToken, JoinSet<()>),
}

/// Runs until `shutdown`, or until any task ends or panics on its own (then the result is an
/// error naming why). Either way the stages stop in order, each waited for completely.
async fn supervise(
    shutdown: CancellationToken,
    stages: Stages,
    on_stop: impl FnOnce(),
) -> Result<()> {
    let Stages {
        firing: (firing, mut firing_tasks),
        writing: (writing, mut writing_tasks),
    } = stages;
    let ended = |result: Option<std::result::Result<(), tokio::task::JoinError>>| match result {
        Some(Ok(())) | None => "a component stopped unexpectedly".to_string(),
        Some(Err(e)) => format!("a component failed: {e}"),
    };
    let failure = tokio::select! {
        biased;
        _ = shutdown.cancelled() => None,
        result = firing_tasks.join_next() => Some(ended(result)),
        result = writing_tasks.join_next() => Some(ended(result)),
    };
    on_stop();
    match &failure {
        None => info!("shutting down: no new runs; draining runs in flight"),
        Some(reason) => error!(%reason, "shutting down"),
    }
    firing.cancel();
    while firing_tasks.join_next().await.is_some() {}
    // Every run has reported by now; the writer's final flush writes the last outcomes.
    writing.cancel();
    while writing_tasks.join_next().await.is_some() {}
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A component that runs until its stage is stopped, then records that it stopped.
    async fn until_stopped(
        stop: CancellationToken,
        name: &'static str,
        log: Arc<Mutex<Vec<&'static str>>>,
    ) {
        stop.cancelled().await;
        log.lock().unwrap().push(name);
    }

    fn stages(log: &Arc<Mutex<Vec<&'static str>>>) -> (Stages, CancellationToken) {
        let shutdown = CancellationToken::new();
        let (firing, writing) = (shutdown.child_token(), CancellationToken::new());
        let mut firing_tasks = JoinSet::new();
        firing_tasks.spawn(until_stopped(firing.clone(), "engine", log.clone()));
        let mut writing_tasks = JoinSet::new();
        writing_tasks.spawn(until_stopped(writing.clone(), "writer", log.clone()));
        let stages = Stages {
            firing: (firing, firing_tasks),
            writing: (writing, writing_tasks),
        };
        (stages, shutdown)
    }

    #[tokio::test]
    async fn shutdown_stops_firing_first_then_writing_and_succeeds() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let (stages, shutdown) = stages(&log);
        shutdown.cancel();
        supervise(shutdown, stages, || {}).await.unwrap();
        assert_eq!(*log.lock().unwrap(), ["engine", "writer"]);
    }

    #[tokio::test]
    async fn a_component_that_stops_on_its_own_stops_everything_with_an_error() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let (mut stages, shutdown) = stages(&log);
        stages.writing.1.spawn(async {}); // e.g. the status writer returning early
        let error = supervise(shutdown, stages, || {}).await.unwrap_err();
        assert_eq!(error.to_string(), "a component stopped unexpectedly");
        assert_eq!(
            *log.lock().unwrap(),
            ["engine", "writer"],
            "the rest stopped in order"
        );
    }

    #[tokio::test]
    async fn a_component_that_panics_stops_everything_with_an_error() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let (mut stages, shutdown) = stages(&log);
        stages
            .firing
            .1
            .spawn(async { panic!("a bug in the engine") });
        let error = supervise(shutdown, stages, || {}).await.unwrap_err();
        assert!(error.to_string().contains("panicked"), "{error}");
        assert_eq!(*log.lock().unwrap(), ["engine", "writer"]);
    }
}
