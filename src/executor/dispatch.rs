//! The worker side: `max_workers` loops, each taking the next run in turn and running it, so a
//! burst costs no task per run and a worker that ends a run starts the next without a wake-up.
//! A Job run holds a worker only until its Job exists: it goes on in a task of its own. At
//! shutdown, runs still waiting are reported missed and runs in flight drain, then are
//! cancelled.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info_span, warn};

use super::cancel::CancelReason;
use super::ending::{self, Ending};
use super::queue::{Shared, holds_worker};
use super::worker::{RunGuard, WorkerContext, execute};
use super::{RunRequest, missed};
use crate::run::MissKind;

/// The executor's worker side; drive it with [`ExecutorTask::run`].
pub struct ExecutorTask {
    pub(super) shared: Arc<Shared>,
    pub(super) workers: Arc<Semaphore>,
    pub(super) context: Arc<WorkerContext>,
    /// The runs' ends the workers hand over.
    pub(super) endings: mpsc::UnboundedReceiver<Ending>,
}

impl ExecutorTask {
    /// Starts runs until `shutdown`. Then: runs still waiting are reported missed, runs in
    /// flight may finish within `grace`, and the rest are cancelled and reported; returns once
    /// the ends of the runs that ended are recorded.
    pub async fn run(self, shutdown: CancellationToken, grace: Duration) {
        let ExecutorTask {
            shared,
            workers,
            context,
            endings,
        } = self;
        let workers_done = CancellationToken::new();
        let recording = tokio::spawn(ending::record(
            endings,
            context.ledger.clone(),
            context.sink.clone(),
            workers_done.clone(),
        ));
        let this = Arc::new(Pool {
            shared,
            workers,
            context,
        });
        // The worker loops and the Job runs they hand off.
        let tracker = TaskTracker::new();
        for _ in 0..this.shared.max_workers {
            tracker.spawn(this.clone().work(shutdown.clone(), tracker.clone()));
        }
        shutdown.cancelled().await;
        this.stop(tracker, grace).await;
        workers_done.cancel();
        let _ = recording.await;
    }
}

/// The worker loops' shared part.
struct Pool {
    shared: Arc<Shared>,
    workers: Arc<Semaphore>,
    context: Arc<WorkerContext>,
}

impl Pool {
    /// One worker: takes the next run while a worker is free and runs it, until `shutdown`.
    async fn work(self: Arc<Self>, shutdown: CancellationToken, tracker: TaskTracker) {
        loop {
            // A worker of the pool: a Job run waiting for its Job gives its own back early.
            let permit = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return,
                permit = self.workers.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => return,
                },
            };
            let (run, cancel) = loop {
                let mut reports = Vec::new();
                let next = self.shared.next_run(&mut reports);
                self.shared.publish(reports);
                if let Some(next) = next {
                    break next;
                }
                tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => return,
                    _ = self.shared.changed.notified() => {}
                }
            };
            let context = self.context.clone();
            let outlives_worker = !holds_worker(&run);
            let guard = RunGuard {
                shared: self.shared.clone(),
                started: context.clock.now(),
                run,
                cancel: cancel.clone(),
                reported: false,
            };
            let span = info_span!("run", run_id = %guard.run.run_id);
            let running = async move {
                let mut guard = guard;
                execute(&context, &mut guard, &cancel, permit).await;
            }
            .instrument(span);
            if outlives_worker {
                tracker.spawn(running);
            } else if AssertUnwindSafe(running).catch_unwind().await.is_err() {
                // Its RunGuard reported it failed and freed its task; the worker goes on.
                debug!("a run's worker panicked");
            }
        }
    }

    async fn stop(&self, workers: TaskTracker, grace: Duration) {
        let dropped: Vec<RunRequest> = {
            let mut state = self.shared.lock();
            state.closed = true;
            state.waiting = 0;
            state.turns.clear();
            let state = &mut *state;
            state.refusals.relax(&mut state.tasks);
            let dropped = state
                .tasks
                .values_mut()
                .flat_map(|runs| runs.waiting.drain(..))
                .collect();
            state.tasks.retain(|_, runs| !runs.is_idle());
            dropped
        };
        let reason = "chronflow shut down before the run started";
        self.shared.publish(
            dropped
                .iter()
                .map(|run| missed(run, MissKind::Shutdown, reason.to_string()))
                .collect(),
        );
        // Jobs run on, and whoever leads next records their end: no need to wait for them.
        for runs in self.shared.lock().tasks.values() {
            for (_, cancel) in runs.active.iter().filter(|(_, c)| c.outlives_process) {
                cancel.cancel(CancelReason::Shutdown);
            }
        }
        workers.close();
        if tokio::time::timeout(grace, workers.wait()).await.is_err() {
            warn!(
                runs = workers.len(),
                "runs still in flight after the shutdown grace period; cancelling them"
            );
            for runs in self.shared.lock().tasks.values() {
                for (_, cancel) in &runs.active {
                    cancel.cancel(CancelReason::Shutdown);
                }
            }
            // Cancelled runs report and return at once; the bound only guards against a bug.
            if tokio::time::timeout(Duration::from_secs(2), workers.wait())
                .await
                .is_err()
            {
                warn!(runs = workers.len(), "runs did not end when cancelled");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use chrono::Utc;
    use tokio_util::sync::CancellationToken;

    use crate::clock::Clock;
    use crate::executor::fixtures::{TestLedger, memory_ledger, request};
    use crate::executor::http::{NoValues, client};
    use crate::executor::{Action, CallAction, Executor, ExecutorConfig, RunSpec, job};
    use crate::ledger::Ledger;
    use crate::run::{Outcome, Report, RunId, TaskId, TaskKey};

    /// `n` runs of `n` tasks due now, whose action panics for task `t0` and succeeds for the
    /// others.
    fn burst(n: usize) -> Vec<crate::executor::RunRequest> {
        let call = Action::Call(CallAction(Arc::new(|info| {
            Box::pin(async move {
                assert!(!info.run_id.starts_with("ns/t0@"), "a bug in an action");
                Ok(String::new())
            })
        })));
        let now = Utc::now();
        (0..n)
            .map(|i| {
                let mut run = request(now, now, None);
                run.task = TaskId::new(TaskKey::new("ns", format!("t{i}")), "uid");
                run.run_id = RunId::new(&run.task, now);
                run.spec = Arc::new(RunSpec {
                    action: call.clone(),
                    ..(*run.spec).clone()
                });
                run
            })
            .collect()
    }

    /// An executor of `max_workers` over `ledger`, running until the token is cancelled; its
    /// reports.
    fn start(
        max_workers: usize,
        ledger: Arc<dyn Ledger>,
    ) -> (
        Executor,
        tokio::sync::mpsc::UnboundedReceiver<Report>,
        CancellationToken,
        tokio::task::JoinHandle<()>,
    ) {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let (sink, reports) = tokio::sync::mpsc::unbounded_channel();
        let config = ExecutorConfig {
            max_workers,
            queue_size: 100,
            log_success: false,
        };
        let (executor, workers) = Executor::new(
            config,
            Arc::new(sink),
            Clock::System,
            client().unwrap(),
            Arc::new(NoValues),
            Arc::new(job::NoJobs),
            ledger,
        );
        let stop = CancellationToken::new();
        let running = tokio::spawn(workers.run(stop.clone(), Duration::from_secs(1)));
        (executor, reports, stop, running)
    }

    /// A worker hands a run's end to the ledger and takes the next run: one whose end is slow to
    /// land (a round trip to Redis) holds no worker. At shutdown the executor returns once the
    /// ends of the runs that ended are recorded.
    #[tokio::test]
    async fn a_run_s_end_is_recorded_off_its_worker_and_before_shutdown_returns() {
        let ledger = Arc::new(TestLedger::new().holding_ends());
        let ends_landed = ledger.landed.subscribe();
        let (executor, mut reports, stop, running) = start(1, ledger.clone());
        // t1 to t4 succeed (t0 is the one that panics).
        let mut runs = burst(5).into_iter().skip(1);
        executor.submit_all(runs.by_ref().take(3));
        let mut finished = 0;
        while finished < 3 {
            let report = tokio::time::timeout(Duration::from_secs(10), reports.recv())
                .await
                .expect("the one worker runs every run while no end has landed")
                .unwrap();
            if let Report::Finished { .. } = report {
                finished += 1;
            }
        }
        assert_eq!(*ends_landed.borrow(), 0);
        ledger.ends.add_permits(3);
        let mut watching = ends_landed.clone();
        tokio::time::timeout(Duration::from_secs(10), watching.wait_for(|n| *n == 3))
            .await
            .expect("the ends land once let")
            .unwrap();

        executor.submit_all(runs.take(1));
        loop {
            let report = tokio::time::timeout(Duration::from_secs(10), reports.recv())
                .await
                .expect("the last run ends")
                .unwrap();
            if let Report::Finished { .. } = report {
                break;
            }
        }
        stop.cancel();
        let let_it_land = async {
            tokio::time::sleep(Duration::from_millis(200)).await;
            ledger.ends.add_permits(1);
        };
        let (returned, ()) = tokio::join!(running, let_it_land);
        returned.unwrap();
        assert_eq!(
            *ends_landed.borrow(),
            4,
            "shutdown returned before the last end was recorded"
        );
    }

    #[tokio::test]
    async fn a_burst_larger_than_the_pool_runs_whole_and_a_panicking_run_costs_no_worker() {
        let (executor, mut reports, stop, running) = start(2, memory_ledger());
        // Each burst makes a worker's run panic: by the third, no worker would be left.
        for _ in 0..3 {
            for run in burst(50) {
                executor.submit(run);
            }
            let (mut succeeded, mut failed) = (0, 0);
            while succeeded + failed < 50 {
                let report = tokio::time::timeout(Duration::from_secs(10), reports.recv())
                    .await
                    .expect("every run of the burst ends")
                    .unwrap();
                if let Report::Finished { run, .. } = report {
                    match run.outcome {
                        Outcome::Succeeded => succeeded += 1,
                        _ => failed += 1,
                    }
                }
            }
            assert_eq!((succeeded, failed), (49, 1));
        }
        stop.cancel();
        running.await.unwrap();
    }
}
