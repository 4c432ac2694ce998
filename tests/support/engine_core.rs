//! The kube-free core (engine + executor + memory ledger) wired as standalone mode will run it,
//! for tests and benchmarks that call a loopback receiver without a cluster.

use std::sync::Arc;
use std::time::Duration;

use chronflow::clock::Clock;
use chronflow::engine::{Engine, EngineHandle, EngineParts};
use chronflow::executor::http::NoValues;
use chronflow::executor::{Executor, ExecutorConfig};
use chronflow::leader::Term;
use chronflow::ledger::{Ledger, MemoryLedger};
use chronflow::run::Report;
use tokio::sync::{mpsc, watch};
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
    #[allow(dead_code)] // the benchmark only drops its core
    pub fn stop(&self) {
        self.shutdown.cancel();
    }

    /// Starts a core that always leads, with the given worker and queue bounds.
    pub fn start(max_workers: usize, queue_size: usize) -> Core {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let (reports_tx, reports) = mpsc::unbounded_channel();
        let sink = Arc::new(reports_tx);
        let config = ExecutorConfig {
            max_workers,
            queue_size,
            log_success: false,
        };
        let ledger: Arc<dyn Ledger> = Arc::new(MemoryLedger::new(Duration::from_secs(3600)));
        let (executor, executor_task) = Executor::new(
            config,
            sink.clone(),
            Clock::System,
            chronflow::executor::http::client().expect("an HTTP client"),
            Arc::new(NoValues),
            ledger.clone(),
        );
        // The receiver keeps the last value.
        let (_leader_tx, leader) = watch::channel(Some(Term::single("standalone")));
        let (engine, handle) = Engine::new(EngineParts {
            executor,
            ledger,
            leader,
            sink,
            clock: Clock::System,
            backfill_per_second: 10,
        });
        let shutdown = CancellationToken::new();
        tokio::spawn(engine.run(shutdown.clone()));
        tokio::spawn(executor_task.run(shutdown.clone(), Duration::from_secs(1)));
        Core {
            engine: handle,
            reports,
            shutdown,
        }
    }
}
