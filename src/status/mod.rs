//! The status writer: the only place that writes ChronTask status. It keeps each task's status
//! in memory, applies what the controller concludes and what the engine and executor report,
//! and writes each changed task at most once per `status.flush_interval`, with server-side
//! apply to the status subresource under one field manager. It also publishes the Events.

pub mod conditions;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::StreamExt;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Api, Client};
use serde_json::json;
use tokio::sync::{mpsc, watch};
use tracing::{debug, warn};

use crate::crd::{ActiveRun, ChronTaskStatus, HistorySpec, RunOutcome, RunRecord};
use crate::run::{Outcome, Report, RunId, TaskKey};
use conditions::{PhaseInputs, SpecState};

/// Field manager of every status write.
pub const FIELD_MANAGER: &str = "chronflow";

/// Patches in flight at once during a flush.
const CONCURRENT_PATCHES: usize = 16;

/// What the controller tells the status writer.
#[derive(Debug)]
pub enum Update {
    /// Reconcile saw the task. The first time, the status read from the cluster seeds the
    /// counters, so they survive an operator restart.
    Observed {
        task: TaskKey,
        reference: ObjectReference,
        generation: Option<i64>,
        status: Option<Box<ChronTaskStatus>>,
        history: HistorySpec,
    },
    /// The spec is valid and scheduled (or paused, with its reason).
    Valid {
        task: TaskKey,
        schedule: String,
        paused: Option<String>,
    },
    /// The spec cannot be run.
    Invalid { task: TaskKey, reason: String },
    /// The task is gone; drop what is buffered.
    Forget(TaskKey),
    /// After a re-list: every task of `namespace` (all: `None`) not in `keep` is gone.
    Retain {
        namespace: Option<String>,
        keep: HashSet<TaskKey>,
    },
}

/// Event reasons, stable for alerting and `kubectl get events --field-selector reason=...`.
pub mod reasons {
    pub const INVALID_SPEC: &str = "InvalidSpec";
    pub const PAUSED: &str = "Paused";
    pub const RESUMED: &str = "Resumed";
    pub const RUN_FAILED: &str = "RunFailed";
    pub const RUN_MISSED: &str = "RunMissed";
}

struct TaskState {
    reference: ObjectReference,
    generation: Option<i64>,
    history: HistorySpec,
    spec: SpecState,
    schedule: Option<String>,
    /// `None` until the engine reports; `Some(None)` when nothing is due any more.
    next_run: Option<Option<DateTime<Utc>>>,
    active: BTreeMap<RunId, ActiveRun>,
    status: ChronTaskStatus,
    dirty: bool,
}

/// Drive with [`StatusWriter::run`].
pub struct StatusWriter {
    client: Client,
    updates: mpsc::Receiver<Update>,
    reports: mpsc::Receiver<Report>,
    flush_interval: Duration,
    leader: watch::Receiver<bool>,
    recorder: Recorder,
    tasks: HashMap<TaskKey, TaskState>,
}

impl StatusWriter {
    /// `leader` gates writes: a replica that is not leader keeps its state but writes nothing.
    pub fn new(
        client: Client,
        updates: mpsc::Receiver<Update>,
        reports: mpsc::Receiver<Report>,
        flush_interval: Duration,
        leader: watch::Receiver<bool>,
        instance: Option<String>,
    ) -> Self {
        let reporter = Reporter {
            controller: "chronflow".into(),
            instance,
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            updates,
            reports,
            flush_interval,
            leader,
            tasks: HashMap::new(),
        }
    }

    /// Runs until both inputs are closed (the controller, engine and executor have stopped),
    /// then writes what is still buffered.
    pub async fn run(mut self) {
        let mut tick = tokio::time::interval(self.flush_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let (mut updates_open, mut reports_open) = (true, true);
        while updates_open || reports_open {
            tokio::select! {
                update = self.updates.recv(), if updates_open => match update {
                    Some(update) => self.apply(update).await,
                    None => updates_open = false,
                },
                report = self.reports.recv(), if reports_open => match report {
                    Some(report) => self.record(report).await,
                    None => reports_open = false,
                },
                _ = tick.tick() => self.flush().await,
            }
        }
        self.flush().await;
    }

    async fn apply(&mut self, update: Update) {
        match update {
            Update::Observed {
                task,
                reference,
                generation,
                status,
                history,
            } => {
                let state = self.tasks.entry(task).or_insert_with(|| TaskState {
                    reference: reference.clone(),
                    generation,
                    history,
                    spec: SpecState::Pending,
                    schedule: None,
                    next_run: None,
                    active: BTreeMap::new(),
                    status: seed(status.map(|s| *s).unwrap_or_default()),
                    dirty: true,
                });
                if state.reference.uid != reference.uid {
                    // Deleted and re-created under the same name while we looked away.
                    state.status = ChronTaskStatus::default();
                    state.active.clear();
                    state.next_run = None;
                }
                state.reference = reference;
                state.generation = generation;
                state.history = history;
                state.dirty = true;
            }
            Update::Valid {
                task,
                schedule,
                paused,
            } => {
                let Some(state) = self.tasks.get_mut(&task) else {
                    return;
                };
                let was_paused = matches!(&state.spec, SpecState::Valid { paused: Some(_) });
                let event = match (&paused, was_paused) {
                    (Some(reason), false) => {
                        Some((reasons::PAUSED, format!("paused: {}", or_none(reason))))
                    }
                    (None, true) => Some((
                        reasons::RESUMED,
                        "resumed; the paused period is not replayed".into(),
                    )),
                    _ => None,
                };
                if paused.is_some() {
                    state.next_run = None;
                }
                state.schedule = Some(schedule);
                state.spec = SpecState::Valid { paused };
                state.dirty = true;
                if let Some((reason, note)) = event {
                    let reference = state.reference.clone();
                    self.publish(&reference, EventType::Normal, reason, note)
                        .await;
                }
            }
            Update::Invalid { task, reason } => {
                let Some(state) = self.tasks.get_mut(&task) else {
                    return;
                };
                let changed = state.spec
                    != SpecState::Invalid {
                        reason: reason.clone(),
                    };
                state.spec = SpecState::Invalid {
                    reason: reason.clone(),
                };
                state.schedule = None;
                state.next_run = None;
                state.dirty = true;
                if changed {
                    let reference = state.reference.clone();
                    self.publish(
                        &reference,
                        EventType::Warning,
                        reasons::INVALID_SPEC,
                        reason,
                    )
                    .await;
                }
            }
            Update::Forget(task) => {
                self.tasks.remove(&task);
            }
            Update::Retain { namespace, keep } => {
                self.tasks
                    .retain(|key, _| !key.is_in(namespace.as_deref()) || keep.contains(key));
            }
        }
    }

    async fn record(&mut self, report: Report) {
        let Some(state) = self.tasks.get_mut(report.task()) else {
            debug!(task = %report.task(), "report for a task no longer known");
            return;
        };
        state.dirty = true;
        let status = &mut state.status;
        let event = match report {
            Report::NextRun { next, .. } => {
                if matches!(state.spec, SpecState::Valid { paused: None }) {
                    state.next_run = Some(next);
                }
                None
            }
            Report::Started {
                run_id,
                scheduled,
                started,
                ..
            } => {
                status.last_schedule_time = status.last_schedule_time.max(Some(scheduled));
                let active = ActiveRun {
                    run_id: run_id.to_string(),
                    scheduled_time: scheduled,
                    start_time: Some(started),
                    job_name: None,
                };
                state.active.insert(run_id, active);
                None
            }
            Report::Finished { run, .. } => {
                state.active.remove(&run.run_id);
                status.last_schedule_time = status.last_schedule_time.max(Some(run.scheduled));
                status.total_runs += 1;
                let outcome = match run.outcome {
                    Outcome::Succeeded => {
                        status.successful_runs += 1;
                        status.last_successful_time = Some(run.finished);
                        RunOutcome::Succeeded
                    }
                    Outcome::Failed => {
                        status.failed_runs += 1;
                        status.last_failure_time = Some(run.finished);
                        RunOutcome::Failed
                    }
                };
                let record = RunRecord {
                    run_id: run.run_id.to_string(),
                    scheduled_time: run.scheduled,
                    start_time: Some(run.started),
                    finish_time: Some(run.finished),
                    duration: Some(format_seconds(run.finished - run.started)),
                    outcome,
                    attempts: run.attempts,
                    message: run.message.clone(),
                };
                status.last_run = Some(record.clone());
                conditions::push_recent(&mut status.recent_runs, record, &state.history);
                (outcome == RunOutcome::Failed).then(|| {
                    let message = run.message.unwrap_or_default();
                    let note = format!(
                        "run {} failed after {} attempt(s): {message}",
                        run.run_id, run.attempts
                    );
                    (reasons::RUN_FAILED, note)
                })
            }
            Report::Missed {
                task,
                count,
                latest,
                reason,
            } => {
                status.missed_runs += count;
                status.last_schedule_time = status.last_schedule_time.max(Some(latest));
                let run_id = RunId::new(&task, latest).to_string();
                let message = if count == 1 {
                    reason.clone()
                } else {
                    format!("{count} instants missed: {reason}")
                };
                let record = RunRecord {
                    run_id: run_id.clone(),
                    scheduled_time: latest,
                    start_time: None,
                    finish_time: None,
                    duration: None,
                    outcome: RunOutcome::Missed,
                    attempts: 0,
                    message: Some(message.clone()),
                };
                conditions::push_recent(&mut status.recent_runs, record, &state.history);
                Some((reasons::RUN_MISSED, format!("{run_id}: {message}")))
            }
        };
        if let Some((reason, note)) = event {
            let reference = state.reference.clone();
            self.publish(&reference, EventType::Warning, reason, note)
                .await;
        }
    }

    /// Writes every changed task, a bounded number at a time.
    async fn flush(&mut self) {
        if !*self.leader.borrow() {
            return;
        }
        let now = Utc::now();
        let patches: Vec<(TaskKey, serde_json::Value)> = self
            .tasks
            .iter_mut()
            .filter(|(_, state)| state.dirty)
            .map(|(key, state)| {
                state.dirty = false;
                (
                    key.clone(),
                    json!({
                        "apiVersion": "chronflow.io/v1alpha1",
                        "kind": "ChronTask",
                        "status": render(state, now),
                    }),
                )
            })
            .collect();
        let client = &self.client;
        let failed: Vec<TaskKey> = futures::stream::iter(patches)
            .map(|(key, patch)| async move {
                let api = Api::<crate::ChronTask>::namespaced(client.clone(), &key.namespace);
                let params = PatchParams::apply(FIELD_MANAGER).force();
                match api.patch_status(&key.name, &params, &Patch::Apply(&patch)).await {
                    Ok(_) => None,
                    Err(kube::Error::Api(e)) if e.code == 404 => None, // deleted meanwhile
                    Err(error) => {
                        warn!(task = %key, %error, "status write failed; retrying at the next flush");
                        Some(key)
                    }
                }
            })
            .buffer_unordered(CONCURRENT_PATCHES)
            .filter_map(|failed| async move { failed })
            .collect()
            .await;
        for key in failed {
            if let Some(state) = self.tasks.get_mut(&key) {
                state.dirty = true;
            }
        }
    }

    async fn publish(
        &self,
        reference: &ObjectReference,
        type_: EventType,
        reason: &str,
        note: String,
    ) {
        if !*self.leader.borrow() {
            return;
        }
        let event = Event {
            type_,
            reason: reason.into(),
            // The Events API limits a note to 1 kB.
            note: Some(note.chars().take(1000).collect()),
            action: "Schedule".into(),
            secondary: None,
        };
        if let Err(error) = self.recorder.publish(&event, reference).await {
            warn!(%error, reason, "cannot publish event");
        }
    }
}

/// Keeps what survives a restart (counters, times, history); recomputes the rest.
fn seed(status: ChronTaskStatus) -> ChronTaskStatus {
    ChronTaskStatus {
        active: Vec::new(),
        ..status
    }
}

/// The status to write: what is stored plus what is derived from the task's state.
fn render(state: &TaskState, now: DateTime<Utc>) -> ChronTaskStatus {
    let mut status = state.status.clone();
    let last_outcome = status.last_run.as_ref().map(|r| r.outcome);
    let (phase, ready, reason, message) = conditions::phase(&PhaseInputs {
        spec: &state.spec,
        running: !state.active.is_empty(),
        has_next_run: state.next_run != Some(None),
        last_outcome,
    });
    status.phase = Some(phase);
    status.message = message.clone();
    status.schedule = state.schedule.clone();
    status.next_run_time = state.next_run.flatten();
    status.active = state.active.values().cloned().collect();
    status.success_rate = conditions::success_rate(status.successful_runs, status.failed_runs);
    status.observed_generation = state.generation;
    conditions::set_ready(
        &mut status.conditions,
        ready,
        reason,
        message.as_deref(),
        state.generation,
        now,
    );
    status
}

fn format_seconds(duration: chrono::Duration) -> String {
    format!("{:.3}s", duration.num_milliseconds().max(0) as f64 / 1000.0)
}

fn or_none(reason: &str) -> &str {
    if reason.is_empty() {
        "no reason given"
    } else {
        reason
    }
}
