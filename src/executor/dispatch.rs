//! The worker side's loop: a free worker takes the next run in turn; at shutdown, runs still
//! waiting are reported missed and runs in flight drain, then are cancelled.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info_span, warn};

use super::cancel::CancelReason;
use super::queue::Shared;
use super::worker::{RunGuard, WorkerContext, execute};
use super::{RunRequest, missed};
use crate::run::MissKind;

/// The executor's worker side; drive it with [`ExecutorTask::run`].
pub struct ExecutorTask {
    pub(super) shared: Arc<Shared>,
    pub(super) workers: Arc<Semaphore>,
    pub(super) context: Arc<WorkerContext>,
}

impl ExecutorTask {
    /// Starts runs until `shutdown`. Then: runs still waiting are reported missed, runs in
    /// flight may finish within `grace`, and the rest are cancelled and reported.
    pub async fn run(self, shutdown: CancellationToken, grace: Duration) {
        let mut workers = JoinSet::new();
        'dispatch: loop {
            let permit = tokio::select! {
                _ = shutdown.cancelled() => break,
                permit = self.workers.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break,
                },
            };
            let (run, cancel) = loop {
                reap(&mut workers);
                let mut reports = Vec::new();
                let next = self.shared.next_run(&mut reports);
                self.shared.publish(reports);
                if let Some(next) = next {
                    break next;
                }
                tokio::select! {
                    _ = shutdown.cancelled() => break 'dispatch,
                    _ = self.shared.changed.notified() => {}
                }
            };
            let context = self.context.clone();
            let guard = RunGuard {
                shared: self.shared.clone(),
                started: context.clock.now(),
                run,
                reported: false,
            };
            let span = info_span!("run", run_id = %guard.run.run_id);
            workers.spawn(
                async move {
                    let mut guard = guard;
                    execute(&context, &mut guard, &cancel, permit).await;
                }
                .instrument(span),
            );
        }
        self.stop(workers, grace).await;
    }

    async fn stop(&self, mut workers: JoinSet<()>, grace: Duration) {
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
        let drained = tokio::time::timeout(grace, async {
            while workers.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
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
            let reported = tokio::time::timeout(Duration::from_secs(2), async {
                while workers.join_next().await.is_some() {}
            })
            .await;
            if reported.is_err() {
                workers.shutdown().await;
            }
        }
    }
}

/// Collects finished workers; a panic was already reported by its [`RunGuard`].
fn reap(workers: &mut JoinSet<()>) {
    while let Some(ended) = workers.try_join_next() {
        if let Err(error) = ended
            && error.is_panic()
        {
            debug!(%error, "a run's worker panicked");
        }
    }
}
