//! The kube-free core (`chronflow::core`, with the memory ledger) as standalone mode runs it,
//! for tests and benchmarks that call a loopback receiver without a cluster.

use std::sync::Arc;
use std::time::Duration;

use chronflow::clock::Clock;
use chronflow::core::CoreParts;
use chronflow::engine::EngineHandle;
use chronflow::executor::ExecutorConfig;
use chronflow::executor::http::NoValues;
use chronflow::leader::{Term, Terms};
use chronflow::ledger::{Ledger, MemoryLedger};
use chronflow::run::Report;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// A running core; dropping it stops the engine and the executor.
pub struct Core {
    pub engine: EngineHandle,
    pub reports: mpsc::UnboundedReceiver<Report>,
    shutdown: CancellationToken,
}

impl Drop for Core {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl Core {
    /// Stops the engine and the executor (as SIGTERM does), keeping the reports.
    pub fn stop(&self) {
        self.shutdown.cancel();
    }

    /// Starts a core that always leads, with the given worker and queue bounds.
    pub fn start(max_workers: usize, queue_size: usize) -> Core {
        let ledger = Arc::new(MemoryLedger::new(Duration::from_secs(3600)));
        Core::start_with(max_workers, queue_size, ledger, Term::single("standalone"))
    }

    /// Starts a core that leads in `term` over `ledger`.
    pub fn start_with(
        max_workers: usize,
        queue_size: usize,
        ledger: Arc<dyn Ledger>,
        term: Term,
    ) -> Core {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let (reports_tx, reports) = mpsc::unbounded_channel();
        // The receiver keeps the last value.
        let (_leader_tx, leader) = watch::channel(Terms::all(term));
        let mut core = chronflow::core::Core::build(CoreParts {
            executor: ExecutorConfig {
                max_workers,
                queue_size,
                log_success: false,
            },
            max_runs_per_namespace: 0,
            max_workers_per_namespace: usize::MAX,
            backfill_per_second: 10,
            http: chronflow::executor::http::client().expect("an HTTP client"),
            values: Arc::new(NoValues),
            jobs: Arc::new(chronflow::executor::job::NoJobs),
            ledger,
            sink: Arc::new(reports_tx),
            leader,
            clock: Clock::System,
        });
        let shutdown = CancellationToken::new();
        let mut tasks = JoinSet::new();
        core.spawn(&mut tasks, &shutdown, Duration::from_secs(1));
        tasks.detach_all();
        Core {
            engine: core.engine,
            reports,
            shutdown,
        }
    }
}
