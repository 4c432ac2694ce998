//! `chronflow standalone -f PATH`: the ChronTask manifests users apply to a cluster, run in the
//! foreground without one, with the operator's semantics: the same validation, the same core
//! (`crate::core`: engine, executor, the in-process ledger), the same status bookkeeping and,
//! with `--listen`, the same `/metrics`, `/stats`, `/healthz` and `/readyz`. Edits to the files
//! are picked up while running; an invalid manifest is reported with its file and field and
//! does not stop the others; SIGINT/SIGTERM drains runs in flight and exits 0.

pub mod history;
mod manifests;
mod values;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::clock::Clock;
use crate::config::{MetricsAuth, OperatorConfig};
use crate::core::{Core, CoreParts};
use crate::leader::{Term, Terms};
use crate::metrics::{CountedClaims, Live, Metrics, Recording};
use crate::server::{self, Endpoint, Health};
use crate::status::{StatusIndex, events};
use crate::{Error, Result};
pub use history::HistoryKind;
pub use manifests::Manifests;
pub use values::LocalValues;

/// How often the manifests are read again for changes.
pub const RELOAD_EVERY: Duration = Duration::from_secs(1);

/// Arguments of `chronflow standalone`.
#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct StandaloneArgs {
    /// `chronflow standalone status`, instead of running.
    #[command(subcommand)]
    pub command: Option<StandaloneCommand>,

    /// A ChronTask manifest, or a directory of them (`*.yaml`, `*.yml`; several documents per
    /// file allowed), read again every second.
    #[arg(short = 'f', long = "file", value_name = "PATH", required = true)]
    pub path: Option<PathBuf>,

    /// Where runs are recorded: `memory` (nothing survives a restart), `sqlite:PATH` (every
    /// run, counters and catch-up survive restarts), or a `redis://` URL (the run ledger shared
    /// by several standalone processes: each instant runs once among them).
    #[arg(long, value_name = "HISTORY", default_value = "memory")]
    pub history: HistoryKind,

    /// The operator configuration file (workers, queue, time zone, limits, log, shutdown grace);
    /// `SCHEDULER__…` variables override it, as for `chronflow run`.
    #[arg(short = 'c', long = "config", env = "CHRONFLOW_CONFIG")]
    pub config: Option<PathBuf>,

    /// Serve /metrics, /stats, /healthz and /readyz on this address (e.g. 127.0.0.1:8080).
    #[arg(long, value_name = "ADDRESS")]
    pub listen: Option<SocketAddr>,

    /// Where header values from `secretKeyRef` are read when no environment variable has them:
    /// the file `DIR/<secret name>/<key>`, as a Secret mounted in a Pod.
    #[arg(long, value_name = "DIR", env = "CHRONFLOW_SECRETS_DIR")]
    pub secrets_dir: Option<PathBuf>,
}

/// `chronflow standalone status`.
#[derive(Debug, clap::Subcommand)]
pub enum StandaloneCommand {
    /// Print the tasks a history holds, as `kubectl get ct` does: schedule, phase, next run,
    /// runs, success rate, last outcome.
    Status {
        /// The history to read (`sqlite:PATH`).
        #[arg(long, value_name = "HISTORY")]
        history: HistoryKind,
    },
}

/// Runs the manifests under `args.path` until `shutdown`.
pub async fn run(
    args: &StandaloneArgs,
    config: OperatorConfig,
    shutdown: CancellationToken,
) -> Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let path = args.path.clone().unwrap_or_default();
    let clock = Clock::System;
    // It always leads; under a name of its own, since with a shared Redis ledger others lead too.
    let (_term, leader) = watch::channel(Terms::all(Term::single(
        &crate::operator::identity().to_string(),
    )));
    // Events have no one to go to here: what they say is logged already.
    let (events_tx, _events) = mpsc::channel(events::EVENT_QUEUE);
    let index = StatusIndex::new(events_tx, clock);
    if config.metrics.auth != MetricsAuth::None {
        return Err(Error::Startup(
            "metrics.auth: kubernetes needs a cluster to ask; standalone serves --listen to \
             whoever reaches it (bind it to 127.0.0.1)"
                .into(),
        ));
    }
    let selector = config.metrics.per_task_selector.clone();
    let metrics = Arc::new(Metrics::new(config.metrics.per_task, selector));
    let history::Opened {
        ledger,
        recorder,
        stored,
        redis,
        kept_marks,
    } = history::open_history(&args.history, &config, &index, &leader)?;
    let values = Arc::new(LocalValues::new(args.secrets_dir.clone()));
    // Claims counted in /metrics, as the operator counts them.
    let ledger = Arc::new(CountedClaims {
        metrics: metrics.clone(),
        inner: ledger,
    });
    let sink = Arc::new(Recording {
        metrics: metrics.clone(),
        inner: recorder,
    });
    let parts = CoreParts::from_config(&config, values.clone(), ledger, sink, leader.clone())?;
    let mut core = Core::build(parts);
    let health = Arc::new(Health::new(0));
    health.crd_served();
    let firing = CancellationToken::new();
    let mut tasks = JoinSet::new();
    core.spawn(&mut tasks, &firing, config.shutdown.grace_period);
    if let Some(address) = args.listen {
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .map_err(|e| Error::Startup(format!("--listen: cannot listen on {address}: {e}")))?;
        metrics.watch(Live {
            executor: core.load.clone(),
            status: index.clone(),
            leader: leader.clone(),
            redis,
            kept_marks,
            clock_skew: None,
            members: None,
            handovers: None,
        });
        let endpoint = Endpoint {
            metrics: metrics.clone(),
            status: index.clone(),
            executor: core.load.clone(),
            health: health.clone(),
            leader,
            members: None,
            handovers: None,
            access: None,
        };
        tasks.spawn(server::serve(listener, endpoint, firing.clone()));
    }
    let engine = core.engine.clone();
    let mut manifests = Manifests::new(
        path.clone(),
        &config,
        index,
        engine,
        values,
        metrics,
        stored,
    );
    info!(path = %path.display(), history = ?args.history, "chronflow standalone started");
    loop {
        manifests.reload().await;
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(RELOAD_EVERY) => {}
        }
    }
    health.stopping();
    info!("shutting down: no new runs; draining runs in flight");
    firing.cancel();
    while tasks.join_next().await.is_some() {}
    info!("chronflow standalone stopped");
    Ok(())
}
