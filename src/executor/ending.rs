//! Runs' ends recorded in the ledger off the workers. A worker that ended a run hands its end
//! over and takes the next run: waiting for the ledger (a round trip to Redis) would hold a
//! worker that has nothing left to do for the run, and halve what a pool serves. The ends go
//! out as they come, all in flight at once; the task's counts the ledger answers are reported
//! as each lands. At shutdown, the ends of every run the workers ended are recorded before the
//! executor returns.

use std::sync::Arc;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::ledger::{Ledger, Mark};
use crate::run::{Report, ReportSink, RunId, TaskId, Term};

/// A run's end, to record.
pub(super) struct Ending {
    pub(super) task: TaskId,
    pub(super) run_id: RunId,
    pub(super) term: Term,
    pub(super) succeeded: bool,
}

/// Where workers hand ends over.
pub(super) type Endings = mpsc::UnboundedSender<Ending>;

/// Records the ends handed over until `done` (the workers have all returned), then those left.
pub(super) async fn record(
    mut endings: mpsc::UnboundedReceiver<Ending>,
    ledger: Arc<dyn Ledger>,
    sink: Arc<dyn ReportSink>,
    done: CancellationToken,
) {
    let mut pending = FuturesUnordered::new();
    loop {
        tokio::select! {
            ending = endings.recv() => match ending {
                Some(ending) => pending.push(mark(&*ledger, &*sink, ending)),
                None => break,
            },
            Some(()) = pending.next(), if !pending.is_empty() => {}
            _ = done.cancelled() => break,
        }
    }
    while let Ok(ending) = endings.try_recv() {
        pending.push(mark(&*ledger, &*sink, ending));
    }
    while pending.next().await.is_some() {}
}

async fn mark(ledger: &dyn Ledger, sink: &dyn ReportSink, ending: Ending) {
    let mark = Mark::Finished {
        succeeded: ending.succeeded,
    };
    match ledger.mark(&ending.run_id, &ending.term, mark).await {
        Ok(marked) => {
            if let Some(counts) = marked.counts {
                sink.record(Report::Counts {
                    task: ending.task,
                    counts,
                });
            }
        }
        // A shared ledger keeps the mark and sends it again until it lands (RetriedMarks).
        Err(error) => {
            warn!(run_id = %ending.run_id, %error, "cannot record the run's end in the ledger yet")
        }
    }
}
