//! The status writer: writes changed tasks from the index to their status subresource with
//! server-side apply (one field manager, forced), under a global write budget that adapts to
//! the apiserver ([`super::budget`]) so that many tasks firing every second cannot flood it.
//! Urgent changes (phase, Ready) go first, then the stalest; each task is written at most once
//! per `flush_interval`. Writes run concurrently with a timeout each and never block whoever
//! records into the index.

use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use kube::api::{Patch, PatchParams};
use kube::core::Request;
use kube::{Api, Client};
use serde::Serialize;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::budget::{Answer, Budget};
use super::index::{Snapshot, StatusIndex, WriteResult};
use crate::ChronTask;
use crate::crd::ChronTaskStatus;
use crate::run::TaskId;
use crate::shard::Terms;
use crate::telemetry::LogQuota;

/// Field manager of every status write.
pub const FIELD_MANAGER: &str = "chronflow";

/// How long one status write may take before it counts as failed and is retried.
const PATCH_TIMEOUT: Duration = Duration::from_secs(10);

/// Status writes in flight at once.
const CONCURRENT_PATCHES: usize = 128;

/// How often the writer looks for work (and refills its budget).
const TICK: Duration = Duration::from_millis(50);

/// The longest wait before retrying a task whose write failed.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// The writer's bounds.
#[derive(Clone, Copy, Debug)]
pub struct WriterConfig {
    /// At most one write per task per this interval.
    pub flush_interval: Duration,
    /// The most status writes per second over all tasks (the adaptive budget's ceiling);
    /// bursts up to one second's worth.
    pub writes_per_second: u32,
}

/// Drive with [`StatusWriter::run`].
pub struct StatusWriter {
    client: Client,
    index: StatusIndex,
    leader: watch::Receiver<Terms>,
    config: WriterConfig,
}

/// A status write's body: the object's uid (a precondition) and its status.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct StatusApply<'a> {
    api_version: &'static str,
    kind: &'static str,
    metadata: Uid<'a>,
    status: &'a ChronTaskStatus,
}

#[derive(Serialize)]
struct Uid<'a> {
    uid: &'a str,
}

type Write = std::pin::Pin<Box<dyn Future<Output = (TaskId, WriteResult, Answer)> + Send>>;

impl StatusWriter {
    /// `leader` gates writes: a replica that holds no shard keeps its index but writes nothing,
    /// and the index gives only the tasks of the shards it holds.
    pub fn new(
        client: Client,
        index: StatusIndex,
        leader: watch::Receiver<Terms>,
        config: WriterConfig,
    ) -> Self {
        Self {
            client,
            index,
            leader,
            config,
        }
    }

    /// Writes until `stop`, then makes a final flush of everything still changed, retrying
    /// failed writes until `final_deadline` has passed since `stop`.
    pub async fn run(self, stop: CancellationToken, final_deadline: Duration) {
        let mut budget = Budget::new(self.config.writes_per_second, Instant::now());
        let mut writes: FuturesUnordered<Write> = FuturesUnordered::new();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut ticks: u64 = 0;
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                Some((task, result, answer)) = writes.next(), if !writes.is_empty() => {
                    budget.answered(answer);
                    self.done(&task, result);
                }
                _ = tick.tick() => {
                    ticks += 1;
                    if ticks.is_multiple_of(20) {
                        self.index.lock().release_events();
                    }
                    self.index.lock().follow();
                    if self.leader.borrow().is_empty() {
                        continue;
                    }
                    let room = CONCURRENT_PATCHES.saturating_sub(writes.len());
                    let limit = budget.available(Instant::now(), room);
                    let (batch, waiting) = {
                        let mut index = self.index.lock();
                        index.set_write_budget(budget.rate());
                        index.take(limit, self.config.flush_interval)
                    };
                    budget.spend(batch.len(), waiting);
                    writes.extend(batch.into_iter().map(|s| self.write(s)));
                }
            }
        }
        self.final_flush(writes, final_deadline).await;
    }

    fn done(&self, task: &TaskId, result: WriteResult) {
        static FAILED: LogQuota = LogQuota::new("status write failed");
        match &result {
            WriteResult::Failed(error) if FAILED.allow() => {
                warn!(%task, %error, "status write failed; retrying");
            }
            WriteResult::Throttled(error) => {
                debug!(%task, %error, "status write throttled; retrying");
            }
            _ => {}
        }
        self.index
            .lock()
            .written(task, result, self.config.flush_interval, MAX_BACKOFF);
    }

    /// Writes everything still changed, with no budget and no per-task interval (but at most
    /// [`CONCURRENT_PATCHES`] at once), retrying failures until the deadline: the last runs'
    /// outcomes must reach the cluster.
    async fn final_flush(&self, mut writes: FuturesUnordered<Write>, deadline: Duration) {
        if self.leader.borrow().is_empty() {
            return;
        }
        let deadline = Instant::now() + deadline;
        loop {
            // No budget, but no more writes at once than ever: thousands of connections at
            // once were refused, by an apiserver that answers them all the slower.
            let room = CONCURRENT_PATCHES.saturating_sub(writes.len());
            let (batch, _) = self.index.lock().take(room, Duration::ZERO);
            writes.extend(batch.into_iter().map(|s| self.write(s)));
            if writes.is_empty() {
                if self.index.lock().pending_writes() == 0 {
                    return;
                }
                // Only failed writes are left, waiting for their backoff.
                if tokio::time::timeout_at(deadline, tokio::time::sleep(TICK))
                    .await
                    .is_err()
                {
                    break;
                }
                continue;
            }
            match tokio::time::timeout_at(deadline, writes.next()).await {
                Ok(Some((task, result, _))) => self.index.lock().written(&task, result, TICK, TICK),
                Ok(None) => {}
                Err(_) => break,
            }
        }
        let left = self.index.lock().pending_writes();
        if left > 0 {
            warn!(
                tasks = left,
                "shutdown: some task statuses could not be written before the deadline"
            );
        } else {
            info!("shutdown: every task status written");
        }
    }

    fn write(&self, snapshot: Snapshot) -> Write {
        let client = self.client.clone();
        Box::pin(async move {
            let Snapshot { task, status } = snapshot;
            let api = Api::<ChronTask>::namespaced(client.clone(), &task.key.namespace);
            let params = PatchParams::apply(FIELD_MANAGER).force();
            let patch = Patch::Apply(StatusApply {
                api_version: "chronflow.io/v1alpha1",
                kind: "ChronTask",
                metadata: Uid { uid: &task.uid },
                status: &status,
            });
            // The answer is the whole object: read, not decoded (the watch brings it anyway).
            let call = async {
                let request = Request::new(api.resource_url())
                    .patch_subresource("status", &task.key.name, &params, &patch)
                    .map_err(kube::Error::BuildRequest)?;
                client.request_text(request).await
            };
            let sent = Instant::now();
            let answered = |result| (result, Answer::In(sent.elapsed()));
            let (result, answer) = match tokio::time::timeout(PATCH_TIMEOUT, call).await {
                Ok(Ok(_)) => answered(WriteResult::Written),
                // Deleted meanwhile (404), or re-created: the uid precondition failed (409).
                Ok(Err(kube::Error::Api(e))) if e.code == 404 || e.code == 409 => {
                    answered(WriteResult::Gone)
                }
                Ok(Err(kube::Error::Api(e))) if e.code == 422 || e.code == 400 => {
                    answered(WriteResult::Rejected(e.message))
                }
                Ok(Err(kube::Error::Api(e))) if e.code == 429 => {
                    (WriteResult::Throttled(e.message), Answer::Throttled)
                }
                Ok(Err(error)) => (WriteResult::Failed(error.to_string()), Answer::Failed),
                Err(_) => (
                    WriteResult::Failed(format!("no answer within {}s", PATCH_TIMEOUT.as_secs())),
                    Answer::Failed,
                ),
            };
            (task, result, answer)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Clock;
    use crate::crd::HistorySpec;
    use crate::run::Term;
    use crate::run::{Report, ReportSink, ScheduleState, TaskKey};
    use crate::status::index::Observed;
    use http::{Request, Response};
    use kube::client::Body;

    /// At a stop with many statuses unwritten (92 245 at 100 000 tasks), the final flush
    /// started one write per task at once: hundreds of connections refused, on an apiserver
    /// already busy.
    #[tokio::test]
    async fn the_final_flush_keeps_as_few_writes_in_flight_as_ever() {
        let (service, mut api) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(service, "default");
        let (events, _events) = tokio::sync::mpsc::channel(16);
        let index = StatusIndex::new(events, Clock::System);
        let term = Term {
            holder: "me".into(),
            epoch: 1,
        };
        let (_leading, leader) = watch::channel(Terms::all(term));
        index.follow_leader(leader.clone());
        for n in 0..CONCURRENT_PATCHES * 3 {
            let task = TaskId::new(TaskKey::new("ns", format!("t-{n}")), format!("uid-{n}"));
            index.observe(Observed {
                task: task.clone(),
                generation: Some(1),
                status: None,
                history: HistorySpec::default(),
            });
            index.record(Report::Schedule {
                task,
                state: ScheduleState::Scheduled {
                    schedule: "every 1s".into(),
                    next: None,
                    since: chrono::Utc::now(),
                },
            });
        }
        let config = WriterConfig {
            flush_interval: Duration::ZERO,
            writes_per_second: 1,
        };
        let stop = CancellationToken::new();
        stop.cancel();
        let writer = StatusWriter::new(client, index, leader, config);
        let _flush = tokio::spawn(writer.run(stop, Duration::from_secs(60)));
        // Nothing is answered: every write the flush started is still in flight.
        let mut in_flight = Vec::new();
        while let Ok(Some(call)) =
            tokio::time::timeout(Duration::from_millis(500), api.next_request()).await
        {
            in_flight.push(call);
        }
        assert_eq!(in_flight.len(), CONCURRENT_PATCHES);
        let (_, respond) = in_flight.pop().unwrap();
        respond.send_response(Response::builder().status(500).body(Body::empty()).unwrap());
        let next = tokio::time::timeout(Duration::from_secs(5), api.next_request()).await;
        assert!(
            matches!(next, Ok(Some(_))),
            "an answer makes room for the next"
        );
    }
}
