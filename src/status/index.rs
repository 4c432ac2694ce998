//! The status index: every task's status in memory, updated synchronously by what the
//! controller observes and what the engine and executor report. Pure: no I/O, so recording a
//! report never waits and the firing path never stalls on the apiserver. The writer
//! ([`super::writer`]) takes snapshots of changed tasks under its budget; Events leave through a
//! bounded queue, rate-limited per task and reason.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use k8s_openapi::api::core::v1::ObjectReference;
use kube::Resource;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{debug, warn};

use super::conditions::{self, PhaseInputs, SpecState};
use super::events::{EventRequest, Severity, reasons};
use crate::ChronTask;
use crate::clock::Clock;
use crate::crd::{
    ActiveRun, BackfillStatus, ChronTaskStatus, HistorySpec, Phase, RunOutcome, RunRecord,
};
use crate::ledger::{Ledger, RecordMissed, RetriedMarks};
use crate::run::{Outcome, Report, ReportSink, ScheduleState, TaskId, TaskKey, TaskMap};
use crate::shard::{Shard, Terms};

/// At most one Event per task and reason in this window; the ones in between are counted and
/// summed up in the next.
pub const EVENT_WINDOW: Duration = Duration::from_secs(60);

/// What reconcile saw of a task.
#[derive(Debug)]
pub struct Observed {
    /// The task and its incarnation.
    pub task: TaskId,
    /// The spec's generation.
    pub generation: Option<i64>,
    /// The status stored in the cluster, when the watch could not bring it (an object that does
    /// not decode): the first time, it seeds the counters, so they survive an operator restart.
    /// Otherwise the seed is what the watch brought ([`StatusIndex::stored`]).
    pub status: Option<ChronTaskStatus>,
    /// How many runs `status.recentRuns` keeps.
    pub history: HistorySpec,
}

/// Phase, Ready, reason and message: a change of any is written before counters (urgent).
type PhaseKey = (Phase, bool, &'static str, Option<String>);

struct TaskState {
    uid: Arc<str>,
    generation: Option<i64>,
    history: HistorySpec,
    /// The engine's latest fact; `None` until it reports.
    schedule: Option<ScheduleState>,
    /// The phase and message stored in the cluster when first seen, so that state Events
    /// (Paused, InvalidSpec) are not sent again after an operator restart.
    stored_phase: Option<(Phase, Option<String>)>,
    /// Counters, history, conditions (as last rendered, so lastTransitionTime only moves on
    /// change) and the runs in flight (by id; no allocation while there is none).
    status: ChronTaskStatus,
    /// The revision of the ledger's counts applied last ([`crate::ledger::Counts::revision`]).
    counts_revision: u64,
    write: WriteState,
    /// Windows of the rate-limited Event reasons ([`THROTTLED`]) while one is open (most tasks
    /// have none).
    events: Option<Box<EventWindows>>,
}

/// How long a new task's status waits for the engine's first fact before it is written Pending.
const PENDING_GRACE: Duration = Duration::from_secs(5);

/// How long a new leader's writes of a task wait for the ledger's counts of it.
const COUNTS_GRACE: Duration = Duration::from_secs(10);

#[derive(Default)]
struct WriteState {
    dirty: bool,
    /// The first change not yet written, and that of the write in flight: how stale the stored
    /// status is.
    changed_since: Option<Instant>,
    sending_since: Option<Instant>,
    /// When the task was first seen: until the engine's first fact, or [`PENDING_GRACE`], its
    /// status is not written (a Pending write would only be followed by the Scheduled one).
    observed: Option<Instant>,
    /// With counts from the shared ledger: since when this term waits for the task's counts
    /// (its take-over). Until they come, or [`COUNTS_GRACE`], the status is not written: this
    /// replica's counts may be older than the stored ones, and a write would set them back.
    counts_awaited: Option<Instant>,
    in_flight: bool,
    last_write: Option<Instant>,
    written_phase: Option<PhaseKey>,
    sending_phase: Option<PhaseKey>,
    failures: u32,
    retry_at: Option<Instant>,
}

impl WriteState {
    fn changed(&mut self, now: Instant) {
        self.dirty = true;
        self.changed_since.get_or_insert(now);
    }
}

/// The Event reasons sent at most once per task and [`EVENT_WINDOW`].
const THROTTLED: [&str; 2] = [reasons::RUN_FAILED, reasons::RUN_MISSED];

type EventWindows = [EventWindow; THROTTLED.len()];

#[derive(Default)]
struct EventWindow {
    last_sent: Option<Instant>,
    suppressed: u32,
    pending: Option<(Severity, String)>,
}

/// One status to write.
pub struct Snapshot {
    /// The task.
    pub task: TaskId,
    /// Its status to write.
    pub status: ChronTaskStatus,
}

/// How a status write ended.
#[derive(Debug)]
pub enum WriteResult {
    /// Written.
    Written,
    /// The object is gone.
    Gone,
    /// The apiserver refused the status (422): not retried until it changes.
    Rejected(String),
    /// Retried with backoff.
    Failed(String),
    /// The apiserver's priority and fairness refused it (429): retried with backoff.
    Throttled(String),
}

/// What the index has counted since it started, for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Reports about a task (or an incarnation of it) the index does not know.
    pub stale_reports: u64,
    /// Events not queued because the Event queue was full.
    pub events_dropped: u64,
    /// Status writes by how they ended.
    pub written: u64,
    /// Writes that failed and will be retried.
    pub failed: u64,
    /// Writes the apiserver refused (422).
    pub rejected: u64,
    /// Writes to an object that was gone.
    pub gone: u64,
    /// Writes the apiserver throttled (429), retried.
    pub throttled: u64,
}

/// The index; share it as a [`StatusIndex`].
pub struct Index {
    /// Boxed: a task's state is about a kilobyte, and the table keeps up to twice as many
    /// slots as tasks.
    tasks: TaskMap<TaskKey, Box<TaskState>>,
    /// Stored statuses of tasks the controller has not observed yet, with their uid: the seeds
    /// of their first observation.
    seeds: TaskMap<TaskKey, (Arc<str>, ChronTaskStatus)>,
    /// The terms of the shards this replica holds, followed (see [`StatusIndex::follow_leader`]),
    /// and the ones seen last. Only the tasks of its shards are written.
    leader: Option<watch::Receiver<Terms>>,
    terms: Terms,
    events: mpsc::Sender<EventRequest>,
    clock: Clock,
    counts: Counts,
    /// Run counters come from the shared ledger ([`Report::Counts`]), not from counting reports.
    ledger_counts: bool,
    /// Seconds from a task's first unwritten change until a write of it landed.
    staleness: Histogram,
    /// The writer's budget now, writes per second.
    write_budget: f64,
}

/// The index behind a lock: the controller, engine and executor record into it; the writer
/// takes snapshots. Never held across an await.
#[derive(Clone)]
pub struct StatusIndex(Arc<Mutex<Index>>);

impl StatusIndex {
    /// An empty index that queues Events on `events`.
    pub fn new(events: mpsc::Sender<EventRequest>, clock: Clock) -> Self {
        Self(Arc::new(Mutex::new(Index {
            tasks: TaskMap::default(),
            seeds: TaskMap::default(),
            leader: None,
            terms: Terms::default(),
            events,
            clock,
            counts: Counts::default(),
            ledger_counts: false,
            staleness: Histogram::new(exponential_buckets(0.25, 2.0, 12)),
            write_budget: 0.0,
        })))
    }

    /// A task's status as stored in the cluster, each time the watch brings it: the index keeps
    /// the one copy (the informer caches the object without it). It seeds a task not observed
    /// yet; a replica that does not lead takes in what the leader wrote, so that once it leads
    /// its writes set nothing back and drop nothing; a leader's own writes coming back change
    /// nothing.
    pub fn stored(&self, task: &TaskId, status: ChronTaskStatus) {
        self.lock().take_in(task, status);
    }

    /// Follows the terms of the shards this replica holds: a task is written only while its
    /// shard is held, and the first report or write of a task in a new term of its shard is
    /// preceded by the term's start, whoever acts first (the engine's take-over answers can
    /// come before the writer's next tick).
    pub fn follow_leader(&self, leader: watch::Receiver<Terms>) {
        let mut index = self.lock();
        index.leader = Some(leader);
        index.follow();
    }

    /// This replica leads every task in a new term (it took in what other leaders wrote while
    /// it did not lead: [`StatusIndex::stored`]). With counts from the shared ledger, no task's
    /// status is written before its counts came from the ledger (its take-over), or for a while.
    pub fn new_term(&self) {
        self.lock().begin_term(|_| true);
    }

    /// Run counters are taken from the shared ledger's [`Report::Counts`] from now on: with
    /// several replicas, only the ledger counts every leader's runs exactly once.
    pub fn count_from_ledger(&self) {
        self.lock().ledger_counts = true;
    }

    /// For a shared `ledger`: the ledger to run on (its failed `finished` and `missed` marks
    /// kept and sent again until they land, see [`RetriedMarks`]), and the sink of reports:
    /// counts come from the ledger, and missed runs are marked in it (under the current `leader`
    /// term) before they reach this index.
    pub fn counting_from(
        &self,
        ledger: Arc<dyn Ledger>,
        leader: watch::Receiver<Terms>,
    ) -> (Arc<RetriedMarks>, Arc<dyn ReportSink>) {
        self.count_from_ledger();
        let index: Arc<dyn ReportSink> = Arc::new(self.clone());
        let ledger = RetriedMarks::new(ledger, index.clone());
        let sink = Arc::new(RecordMissed {
            ledger: ledger.clone(),
            leader,
            inner: index,
        });
        (ledger, sink)
    }

    /// The index, for a moment (never held across an await).
    pub fn lock(&self) -> std::sync::MutexGuard<'_, Index> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The controller saw the task (created, edited, or at a re-list).
    pub fn observe(&self, observed: Observed) {
        self.lock().observe(observed);
    }

    /// The task was deleted.
    pub fn forget(&self, task: &TaskId) {
        let mut index = self.lock();
        if index
            .tasks
            .get(&task.key)
            .is_some_and(|s| s.uid == task.uid)
        {
            index.tasks.remove(&task.key);
        }
        if index
            .seeds
            .get(&task.key)
            .is_some_and(|(uid, _)| *uid == task.uid)
        {
            index.seeds.remove(&task.key);
        }
    }

    /// After a re-list: every task of `namespace` (all: `None`) not in `keep` is gone; returns
    /// those it forgot.
    pub fn retain(&self, namespace: Option<&str>, keep: &HashSet<TaskKey>) -> Vec<TaskKey> {
        let mut gone = Vec::new();
        let stays = |key: &TaskKey| !key.is_in(namespace) || keep.contains(key);
        let mut index = self.lock();
        index.tasks.retain(|key, _| {
            if !stays(key) {
                gone.push(key.clone());
            }
            stays(key)
        });
        index.seeds.retain(|key, _| stays(key));
        gone
    }
}

impl ReportSink for StatusIndex {
    fn record(&self, report: Report) {
        self.lock().record(report);
    }
}

impl Index {
    /// Begins a new term for the tasks of every shard held anew (or in a new term) since the
    /// index last looked.
    pub fn follow(&mut self) {
        let Some(leader) = &self.leader else {
            return;
        };
        let now = leader.borrow().clone();
        if now == self.terms {
            return;
        }
        let old = std::mem::replace(&mut self.terms, now);
        let fresh = self.terms.taken_since(&old);
        if fresh.iter().any(Option::is_some) {
            self.begin_term(|uid| fresh[Shard::of(uid).index()].is_some());
        }
    }

    /// Whether this replica writes the status of the task whose uid is `uid`: it holds its
    /// shard, or it follows no terms (one replica alone, or a test).
    fn writes(&self, uid: &str) -> bool {
        self.leader.is_none() || self.terms.task(uid).is_some()
    }

    fn begin_term(&mut self, fresh: impl Fn(&str) -> bool) {
        let now = Instant::now();
        for state in self.tasks.values_mut().filter(|state| fresh(&state.uid)) {
            // The take-over's counts come first in a term, whatever revision the ledger is at
            // (it restarts from 1 when the ledger lost a task's counts).
            state.counts_revision = 0;
            if self.ledger_counts {
                state.write.counts_awaited = Some(now);
            }
        }
    }

    fn take_in(&mut self, task: &TaskId, stored: ChronTaskStatus) {
        self.follow();
        let leading = self.terms.task(&task.uid).is_some();
        match self.tasks.get_mut(&task.key) {
            Some(state) if state.uid == task.uid => {
                if !leading {
                    conditions::merge_stored(&mut state.status, stored, &state.history);
                    state.write.changed(Instant::now());
                }
            }
            _ => {
                self.seeds
                    .insert(task.key.clone(), (task.uid.clone(), stored));
            }
        }
    }

    fn observe(&mut self, observed: Observed) {
        let Observed {
            task,
            generation,
            status,
            history,
        } = observed;
        let seed = match self.seeds.remove(&task.key) {
            Some((uid, seed)) if uid == task.uid => Some(seed),
            _ => None,
        };
        if self.seeds.is_empty() {
            // The first list seeds every task at once: its table would stay that large.
            self.seeds = TaskMap::default();
        }
        let status = status.or(seed);
        let fresh = |status: Option<ChronTaskStatus>| {
            let status = status.unwrap_or_default();
            TaskState {
                uid: task.uid.clone(),
                generation,
                history,
                schedule: None,
                stored_phase: status.phase.map(|p| (p, status.message.clone())),
                // Runs in flight and derived fields are recomputed; counters and history stay.
                status: ChronTaskStatus {
                    active: Vec::new(),
                    ..status
                },
                counts_revision: 0,
                write: WriteState {
                    dirty: true,
                    changed_since: Some(Instant::now()),
                    observed: Some(Instant::now()),
                    ..WriteState::default()
                },
                events: None,
            }
        };
        match self.tasks.get_mut(&task.key) {
            Some(state) if state.uid == task.uid => {
                state.generation = generation;
                state.history = history;
                state.write.changed(Instant::now());
            }
            // New, or deleted and re-created under the same name while we looked away: nothing
            // of the old one carries over.
            _ => {
                self.tasks.insert(task.key.clone(), Box::new(fresh(status)));
            }
        }
    }

    fn record(&mut self, report: Report) {
        self.follow();
        let id = report.task().clone();
        let now = Instant::now();
        let Some(state) = self
            .tasks
            .get_mut(&id.key)
            .filter(|state| state.uid == id.uid)
        else {
            debug!(task = %id, "report about a task no longer known");
            self.counts.stale_reports += 1;
            return;
        };
        state.write.changed(now);
        let mut events: Vec<(&'static str, Severity, String)> = Vec::new();
        let status = &mut state.status;
        if let Some(request) = report.handled_request() {
            status.last_run_now = Some(request.to_string());
        }
        let counting = !self.ledger_counts;
        match report {
            Report::Schedule { state: fact, .. } => {
                events.extend(state_event(
                    state.schedule.as_ref(),
                    &state.stored_phase,
                    &fact,
                ));
                state.schedule = Some(fact);
            }
            Report::Started {
                run_id,
                scheduled,
                started,
                job,
                ..
            } => {
                // A run-now request's time is not an instant of the schedule: catch-up after a
                // restart counts from lastScheduleTime.
                if run_id.request().is_none() {
                    status.last_schedule_time = status.last_schedule_time.max(Some(scheduled));
                }
                let active = ActiveRun {
                    run_id: run_id.to_string(),
                    scheduled_time: scheduled,
                    start_time: Some(started),
                    job_name: job,
                };
                let runs = &mut status.active;
                match runs.binary_search_by(|run| run.run_id.as_str().cmp(run_id.as_str())) {
                    Ok(at) => runs[at] = active,
                    Err(at) => runs.insert(at, active),
                }
            }
            Report::Finished { run, .. } => {
                status
                    .active
                    .retain(|active| active.run_id != run.run_id.as_str());
                if status.active.is_empty() {
                    status.active = Vec::new();
                }
                if run.run_id.request().is_none() {
                    status.last_schedule_time = status.last_schedule_time.max(Some(run.scheduled));
                }
                status.total_runs += u64::from(counting);
                if run.run_id.request().is_some() {
                    status.manual_runs += u64::from(counting);
                }
                let outcome = match run.outcome {
                    Outcome::Succeeded => {
                        status.successful_runs += u64::from(counting);
                        status.last_successful_time = Some(run.finished);
                        RunOutcome::Succeeded
                    }
                    Outcome::Failed => {
                        status.failed_runs += u64::from(counting);
                        status.last_failure_time = Some(run.finished);
                        RunOutcome::Failed
                    }
                };
                let record = RunRecord {
                    run_id: run.run_id.to_string(),
                    trigger: run.trigger,
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
                if outcome == RunOutcome::Failed {
                    let message = run.message.unwrap_or_default();
                    let note = format!(
                        "run {} failed after {} attempt(s): {message}",
                        run.run_id, run.attempts
                    );
                    events.push((reasons::RUN_FAILED, Severity::Warning, note));
                }
            }
            Report::Missed {
                count,
                run,
                trigger,
                reason,
                ..
            } => {
                if counting {
                    status.missed_runs += count;
                }
                let latest = run.instant();
                // With a shared ledger, where the schedule resumes is the ledger's newest
                // record: a miss whose mark never landed (Redis away, then this replica died)
                // must not move the catch-up anchor past instants nobody counted.
                if run.request().is_none() && counting {
                    status.last_schedule_time = status.last_schedule_time.max(Some(latest));
                }
                let run_id = run.to_string();
                let message = if count == 1 {
                    reason
                } else {
                    format!("{count} instants missed: {reason}")
                };
                let record = RunRecord {
                    run_id: run_id.clone(),
                    trigger,
                    scheduled_time: latest,
                    start_time: None,
                    finish_time: None,
                    duration: None,
                    outcome: RunOutcome::Missed,
                    attempts: 0,
                    message: Some(message.clone()),
                };
                conditions::push_recent(&mut status.recent_runs, record, &state.history);
                let note = format!("{run_id}: {message}");
                events.push((reasons::RUN_MISSED, Severity::Warning, note));
            }
            // The newest revision wins as it is (a backfilled instant is no longer missed); a
            // late answer with an older revision is dropped. Counts without a revision never
            // set a number back.
            Report::Counts { counts, .. } => {
                state.write.counts_awaited = None;
                if counts.revision > 0 && counts.revision >= state.counts_revision {
                    state.counts_revision = counts.revision;
                    status.total_runs = counts.runs;
                    status.successful_runs = counts.succeeded;
                    status.failed_runs = counts.failed;
                    status.missed_runs = counts.missed;
                    status.manual_runs = counts.manual;
                } else if counts.revision == 0 {
                    status.total_runs = status.total_runs.max(counts.runs);
                    status.successful_runs = status.successful_runs.max(counts.succeeded);
                    status.failed_runs = status.failed_runs.max(counts.failed);
                    status.missed_runs = status.missed_runs.max(counts.missed);
                    status.manual_runs = status.manual_runs.max(counts.manual);
                }
            }
            Report::RequestHandled { .. } => {}
            Report::Backfill { progress, .. } => {
                let entry = BackfillStatus {
                    id: progress.id,
                    phase: progress.phase,
                    done: progress.done,
                    total: progress.total,
                    message: progress.message,
                };
                match status.backfill.iter_mut().find(|b| b.id == entry.id) {
                    Some(known) => *known = entry,
                    None => status.backfill.push(entry),
                }
            }
        }
        for (reason, severity, note) in events {
            self.emit(&id.key, reason, severity, note, now);
        }
    }

    /// Queues an Event, at most one per task and reason per [`EVENT_WINDOW`]; state Events
    /// (Paused, Resumed, InvalidSpec) only happen on a change, so they pass unthrottled.
    fn emit(
        &mut self,
        key: &TaskKey,
        reason: &'static str,
        severity: Severity,
        note: String,
        now: Instant,
    ) {
        let Some(state) = self.tasks.get_mut(key) else {
            return;
        };
        let mut suppressed = 0;
        if let Some(slot) = THROTTLED.iter().position(|throttled| *throttled == reason) {
            let window = &mut state.events.get_or_insert_default()[slot];
            if window.last_sent.is_some_and(|at| now - at < EVENT_WINDOW) {
                window.suppressed += 1;
                window.pending = Some((severity, note));
                return;
            }
            suppressed = std::mem::take(&mut window.suppressed);
            window.last_sent = Some(now);
            window.pending = None;
        }
        let request = EventRequest {
            reference: object_reference(key, &state.uid),
            severity,
            reason,
            note: with_suppressed(note, reason, suppressed),
        };
        if self.events.try_send(request).is_err() {
            self.counts.events_dropped += 1;
        }
    }

    /// Sends the Events held back by the rate limit whose window has passed.
    pub fn release_events(&mut self) {
        let now = Instant::now();
        let mut due = Vec::new();
        for (key, state) in &mut self.tasks {
            let Some(windows) = &state.events else {
                continue;
            };
            let mut open = false;
            for (slot, window) in windows.iter().enumerate() {
                let passed = window.last_sent.is_none_or(|at| now - at >= EVENT_WINDOW);
                if window.pending.is_some() && passed {
                    due.push((key.clone(), slot));
                }
                open |= window.pending.is_some() || !passed;
            }
            // Windows that passed with nothing held back are forgotten: the next Event goes
            // out at once, as it would have.
            if !open {
                state.events = None;
            }
        }
        for (key, slot) in due {
            let pending = self
                .tasks
                .get_mut(&key)
                .and_then(|s| s.events.as_mut())
                .and_then(|windows| {
                    let window = &mut windows[slot];
                    window.suppressed = window.suppressed.saturating_sub(1);
                    window.pending.take()
                });
            if let Some((severity, note)) = pending {
                self.emit(&key, THROTTLED[slot], severity, note, now);
            }
        }
    }

    /// Up to `limit` statuses to write now, urgent ones first (phase or Ready changed), then
    /// the longest unwritten. A task is written at most once per `min_interval` and never twice
    /// at once; one whose write failed waits for its backoff. Also says whether more were due
    /// than `limit` let through.
    pub fn take(&mut self, limit: usize, min_interval: Duration) -> (Vec<Snapshot>, bool) {
        if limit == 0 {
            return (Vec::new(), false);
        }
        let now = Instant::now();
        let mut candidates: Vec<(bool, Option<Instant>, &TaskKey)> = self
            .tasks
            .iter()
            .filter(|(_, s)| {
                let w = &s.write;
                w.dirty
                    && !w.in_flight
                    && self.writes(&s.uid)
                    && (s.schedule.is_some()
                        || w.observed.is_none_or(|at| now - at >= PENDING_GRACE))
                    && w.counts_awaited.is_none_or(|at| now - at >= COUNTS_GRACE)
                    && w.retry_at.is_none_or(|at| at <= now)
                    && w.last_write.is_none_or(|at| now - at >= min_interval)
            })
            .map(|(key, s)| {
                let urgent = s.write.written_phase.as_ref() != Some(&phase_key(s));
                (!urgent, s.write.last_write, key)
            })
            .collect();
        let held_back = candidates.len() > limit;
        if held_back {
            candidates.select_nth_unstable(limit - 1);
            candidates.truncate(limit);
        }
        // Only the chosen keys are copied: the index may hold tens of thousands of tasks.
        let chosen: Vec<TaskKey> = candidates
            .into_iter()
            .map(|(_, _, key)| key.clone())
            .collect();
        let now_utc = self.clock.now();
        let replica = self.replica();
        let batch = chosen
            .into_iter()
            .filter_map(|key| {
                let state = self.tasks.get_mut(&key)?;
                state.write.dirty = false;
                state.write.in_flight = true;
                state.write.sending_since = state.write.changed_since.take();
                state.write.sending_phase = Some(phase_key(state));
                Some(Snapshot {
                    task: TaskId::new(key, state.uid.clone()),
                    status: render(state, now_utc, replica.as_deref()),
                })
            })
            .collect();
        (batch, held_back)
    }

    /// Records how a write from [`Index::take`] ended. `backoff` is the wait before a failed
    /// write is retried (doubling per failure up to `max_backoff`).
    pub fn written(
        &mut self,
        task: &TaskId,
        result: WriteResult,
        backoff: Duration,
        max_backoff: Duration,
    ) {
        let now = Instant::now();
        let Some(state) = self.tasks.get_mut(&task.key).filter(|s| s.uid == task.uid) else {
            return;
        };
        let write = &mut state.write;
        write.in_flight = false;
        let counts = &mut self.counts;
        match result {
            WriteResult::Written => {
                counts.written += 1;
                if let Some(since) = write.sending_since.take() {
                    self.staleness.observe((now - since).as_secs_f64());
                }
                write.last_write = Some(now);
                write.written_phase = write.sending_phase.take();
                write.failures = 0;
                write.retry_at = None;
            }
            WriteResult::Gone => {
                counts.gone += 1;
                write.sending_since = None;
            }
            WriteResult::Failed(_) | WriteResult::Throttled(_) => {
                if matches!(result, WriteResult::Throttled(_)) {
                    counts.throttled += 1;
                } else {
                    counts.failed += 1;
                }
                // Still unwritten since then.
                write.dirty = true;
                write.changed_since = write.sending_since.take().or(write.changed_since);
                write.failures += 1;
                let factor = 2u32.saturating_pow(write.failures.saturating_sub(1).min(16));
                write.retry_at = Some(now + backoff.saturating_mul(factor).min(max_backoff));
            }
            WriteResult::Rejected(message) => {
                counts.rejected += 1;
                // Not retried until it changes: that change is what waits then.
                write.sending_since = None;
                warn!(task = %task, error = %message, "the apiserver rejected the task's status; not retrying until it changes");
                let note = format!("chronflow cannot write this task's status: {message}");
                self.emit(
                    &task.key,
                    reasons::STATUS_REJECTED,
                    Severity::Warning,
                    note,
                    now,
                );
            }
        }
    }

    /// Whether any task has a status to write or a write in flight (for the final flush).
    pub fn pending_writes(&self) -> usize {
        self.tasks
            .values()
            .filter(|s| s.write.dirty || s.write.in_flight)
            .count()
    }

    /// Counts of what the index did.
    pub fn counts(&self) -> Counts {
        self.counts
    }

    /// How long the oldest change not yet written has waited (zero: none waits).
    pub fn staleness(&self) -> Duration {
        let now = Instant::now();
        self.tasks
            .values()
            .filter_map(|s| s.write.sending_since.or(s.write.changed_since))
            .map(|since| now - since)
            .max()
            .unwrap_or_default()
    }

    /// Seconds from a change until the write of it landed, over every write so far.
    pub fn staleness_histogram(&self) -> &Histogram {
        &self.staleness
    }

    /// The writer's budget now, writes per second ([`super::budget::Budget`]).
    pub fn write_budget(&self) -> f64 {
        self.write_budget
    }

    /// The writer says what its budget is now.
    pub fn set_write_budget(&mut self, rate: f64) {
        self.write_budget = rate;
    }

    /// How many tasks are in each phase now (for `/stats`).
    pub fn phases(&self) -> BTreeMap<Phase, usize> {
        let mut phases = BTreeMap::new();
        for state in self.tasks.values() {
            *phases.entry(phase_key(state).0).or_default() += 1;
        }
        phases
    }

    /// How many tasks this replica runs and writes: those of the shards it holds (all of them
    /// when it follows no terms).
    pub fn owned_tasks(&self) -> usize {
        self.tasks
            .values()
            .filter(|state| self.writes(&state.uid))
            .count()
    }

    /// The status as it would be written now (tests, `/stats`).
    pub fn status(&mut self, key: &TaskKey) -> Option<ChronTaskStatus> {
        let now = self.clock.now();
        let replica = self.replica();
        self.tasks
            .get_mut(key)
            .map(|state| render(state, now, replica.as_deref()))
    }

    /// The pod name of this replica (the holder of its terms).
    fn replica(&self) -> Option<String> {
        Some(crate::leader::pod_name(&self.terms.newest()?.holder).to_string())
    }
}

/// The ChronTask an Event is about, made when one is sent rather than kept for every task.
fn object_reference(key: &TaskKey, uid: &str) -> ObjectReference {
    ObjectReference {
        api_version: Some(ChronTask::api_version(&()).into_owned()),
        kind: Some(ChronTask::kind(&()).into_owned()),
        name: Some(key.name.clone()),
        namespace: Some(key.namespace.clone()),
        uid: Some(uid.to_string()),
        ..ObjectReference::default()
    }
}

/// The Event a schedule fact calls for: only on a real change, and not one the stored status
/// already shows (an operator restart re-reports every task's state).
fn state_event(
    previous: Option<&ScheduleState>,
    stored: &Option<(Phase, Option<String>)>,
    fact: &ScheduleState,
) -> Option<(&'static str, Severity, String)> {
    let was_paused = match previous {
        Some(state) => matches!(state, ScheduleState::Paused { .. }),
        None => matches!(stored, Some((Phase::Paused, _))),
    };
    match fact {
        ScheduleState::Paused { reason, .. } => {
            let message = pause_message(reason);
            let already = match previous {
                Some(ScheduleState::Paused { reason: old, .. }) => old == reason,
                Some(_) => false,
                None => {
                    matches!(stored, Some((Phase::Paused, m)) if m.as_deref() == Some(&message))
                }
            };
            (!already).then_some((reasons::PAUSED, Severity::Normal, message))
        }
        ScheduleState::Invalid { reason } => {
            let already = match previous {
                Some(ScheduleState::Invalid { reason: old }) => old == reason,
                Some(_) => false,
                None => matches!(stored, Some((Phase::Invalid, m)) if m.as_deref() == Some(reason)),
            };
            (!already).then(|| (reasons::INVALID_SPEC, Severity::Warning, reason.clone()))
        }
        ScheduleState::Scheduled { .. } if was_paused => Some((
            reasons::RESUMED,
            Severity::Normal,
            "resumed; the paused period is not replayed".into(),
        )),
        ScheduleState::Scheduled { .. } => None,
    }
}

fn pause_message(reason: &str) -> String {
    if reason.is_empty() {
        "paused".to_string()
    } else {
        format!("paused: {reason}")
    }
}

fn with_suppressed(note: String, reason: &str, suppressed: u32) -> String {
    if suppressed == 0 {
        note
    } else {
        format!(
            "{note} ({suppressed} more {reason} in the last {}s)",
            EVENT_WINDOW.as_secs()
        )
    }
}

fn spec_state(schedule: Option<&ScheduleState>) -> (SpecState, bool) {
    match schedule {
        None => (SpecState::Pending, true),
        Some(ScheduleState::Scheduled { next, .. }) => {
            (SpecState::Valid { paused: None }, next.is_some())
        }
        Some(ScheduleState::Paused { reason, .. }) => (
            SpecState::Valid {
                paused: Some(reason.clone()),
            },
            true,
        ),
        Some(ScheduleState::Invalid { reason }) => (
            SpecState::Invalid {
                reason: reason.clone(),
            },
            true,
        ),
    }
}

fn phase_key(state: &TaskState) -> PhaseKey {
    let (spec, has_next_run) = spec_state(state.schedule.as_ref());
    conditions::phase(&PhaseInputs {
        spec: &spec,
        running: !state.status.active.is_empty(),
        has_next_run,
        last_outcome: state.status.last_run.as_ref().map(|r| r.outcome),
    })
}

/// The status to write: what is stored plus what is derived from the task's state.
fn render(state: &mut TaskState, now: DateTime<Utc>, replica: Option<&str>) -> ChronTaskStatus {
    let (phase, ready, reason, message) = phase_key(state);
    conditions::set_ready(
        &mut state.status.conditions,
        ready,
        reason,
        message.as_deref(),
        state.generation,
        now,
    );
    let mut status = state.status.clone();
    status.phase = Some(phase);
    status.message = message;
    (
        status.schedule,
        status.next_run_time,
        status.schedulable_since,
    ) = match &state.schedule {
        Some(ScheduleState::Scheduled {
            schedule,
            next,
            since,
        }) => (Some(schedule.to_string()), *next, Some(*since)),
        Some(ScheduleState::Paused { schedule, .. }) => (Some(schedule.to_string()), None, None),
        Some(ScheduleState::Invalid { .. }) => (None, None, None),
        None => (
            status.schedule,
            status.next_run_time,
            status.schedulable_since,
        ),
    };
    status.success_rate = conditions::success_rate(status.successful_runs, status.failed_runs);
    status.observed_generation = state.generation;
    status.replica = replica.map(str::to_string);
    status
}

fn format_seconds(duration: chrono::Duration) -> String {
    format!("{:.3}s", duration.num_milliseconds().max(0) as f64 / 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::run::Term;
    use crate::run::{FinishedRun, RunId};
    use chrono::TimeZone;

    fn t(second: i64) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap() + chrono::Duration::seconds(second)
    }

    fn id(name: &str) -> TaskId {
        TaskId::new(TaskKey::new("ns", name), format!("uid-{name}"))
    }

    fn index() -> (StatusIndex, mpsc::Receiver<EventRequest>) {
        let (tx, rx) = mpsc::channel(64);
        (StatusIndex::new(tx, Clock::tokio_at(t(0))), rx)
    }

    fn observe(index: &StatusIndex, task: &TaskId, status: Option<ChronTaskStatus>) {
        index.observe(Observed {
            task: task.clone(),
            generation: Some(1),
            status,
            history: HistorySpec::default(),
        });
    }

    fn scheduled(next: i64) -> ScheduleState {
        ScheduleState::Scheduled {
            schedule: "every 1s".into(),
            next: Some(t(next)),
            since: t(0),
        }
    }

    fn schedule(index: &StatusIndex, task: &TaskId, state: ScheduleState) {
        index.record(Report::Schedule {
            task: task.clone(),
            state,
        });
    }

    fn finished(index: &StatusIndex, task: &TaskId, second: i64, outcome: Outcome) {
        index.record(Report::Finished {
            task: task.clone(),
            run: FinishedRun {
                run_id: RunId::new(task, t(second)),
                trigger: Default::default(),
                scheduled: t(second),
                started: t(second),
                finished: t(second),
                outcome,
                attempts: 1,
                message: Some("HTTP 503".into()),
            },
        });
    }

    fn events(rx: &mut mpsc::Receiver<EventRequest>) -> Vec<(String, String)> {
        std::iter::from_fn(|| rx.try_recv().ok())
            .map(|e| (e.reason.to_string(), e.note))
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn the_engines_facts_are_kept_in_order_from_the_first_one() {
        // The first fact about a new task used to be dropped when it overtook the controller's
        // update on another channel; now the index is updated in the order things happen.
        let (index, _events) = index();
        let task = id("yearly");
        observe(&index, &task, None);
        schedule(&index, &task, scheduled(365 * 86_400));
        let status = index.lock().status(&task.key).unwrap();
        assert_eq!(status.next_run_time, Some(t(365 * 86_400)));
        assert_eq!(status.phase, Some(Phase::Scheduled));
        assert_eq!(status.schedulable_since, Some(t(0)));
        schedule(
            &index,
            &task,
            ScheduleState::Scheduled {
                schedule: "at".into(),
                next: None,
                since: t(0),
            },
        );
        let status = index.lock().status(&task.key).unwrap();
        assert_eq!(status.phase, Some(Phase::Completed));
    }

    #[tokio::test(start_paused = true)]
    async fn reports_about_another_incarnation_are_dropped() {
        let (index, _events) = index();
        let task = id("t");
        observe(&index, &task, None);
        let old = TaskId::new(task.key.clone(), "uid-deleted");
        finished(&index, &old, 1, Outcome::Succeeded);
        assert_eq!(index.lock().status(&task.key).unwrap().total_runs, 0);
        assert_eq!(index.lock().counts().stale_reports, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn ready_transition_time_does_not_move_on_every_write() {
        let (index, _events) = index();
        let task = id("t");
        observe(&index, &task, None);
        schedule(&index, &task, scheduled(1));
        let first = index.lock().take(10, Duration::ZERO).0.pop().unwrap();
        index
            .lock()
            .written(&task, WriteResult::Written, Duration::ZERO, Duration::ZERO);
        tokio::time::advance(Duration::from_secs(30)).await;
        finished(&index, &task, 1, Outcome::Succeeded);
        let second = index.lock().take(10, Duration::ZERO).0.pop().unwrap();
        let ready = |s: &Snapshot| s.status.conditions[0].last_transition_time.clone();
        assert_eq!(ready(&first), ready(&second));
    }

    #[tokio::test(start_paused = true)]
    async fn writes_stay_within_the_budget_urgent_first_then_the_stalest() {
        let (index, _events) = index();
        let tasks: Vec<TaskId> = (0..10).map(|n| id(&format!("t{n}"))).collect();
        for task in &tasks {
            observe(&index, task, None);
            schedule(&index, task, scheduled(1));
        }
        let min_interval = Duration::from_secs(1);
        let first = index.lock().take(4, min_interval).0;
        assert_eq!(first.len(), 4, "the budget caps a batch");
        for s in &first {
            index
                .lock()
                .written(&s.task, WriteResult::Written, min_interval, min_interval);
        }
        // The written four change again, but within the interval they are not written twice.
        for s in &first {
            finished(&index, &s.task, 1, Outcome::Succeeded);
        }
        let second = index.lock().take(100, min_interval).0;
        assert_eq!(second.len(), 6, "only the six never written");
        for s in &second {
            index
                .lock()
                .written(&s.task, WriteResult::Written, min_interval, min_interval);
        }
        tokio::time::advance(min_interval).await;
        // One task's phase changes (Failed); the others only count a success: it goes first.
        for task in &tasks[4..] {
            finished(&index, task, 2, Outcome::Succeeded);
        }
        finished(&index, &tasks[9], 3, Outcome::Failed);
        let third = index.lock().take(1, min_interval).0;
        assert_eq!(third[0].task, tasks[9], "the phase change is urgent");
        assert_eq!(third[0].status.phase, Some(Phase::Failed));
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_task_is_written_once_the_engine_has_scheduled_it() {
        // At start-up every task is new: writing each one Pending and then Scheduled would
        // spend two writes of the budget on it.
        let (index, _events) = index();
        let (quick, slow) = (id("quick"), id("slow"));
        observe(&index, &quick, None);
        observe(&index, &slow, None);
        assert!(index.lock().take(10, Duration::ZERO).0.is_empty());
        schedule(&index, &quick, scheduled(1));
        let batch = index.lock().take(10, Duration::ZERO).0;
        assert_eq!(batch.len(), 1);
        assert_eq!(batch[0].status.phase, Some(Phase::Scheduled));
        // A task the engine says nothing about is still written, Pending, after a while.
        tokio::time::advance(PENDING_GRACE).await;
        let batch = index.lock().take(10, Duration::ZERO).0;
        assert_eq!(batch[0].task, slow);
        assert_eq!(batch[0].status.phase, Some(Phase::Pending));
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_leader_writes_a_task_once_the_ledger_gave_its_counts() {
        // Its own counts date from when it last observed the task; written first, they would
        // set the stored ones back (seen in killing_the_leader_five_times: 25 runs, 15 shown).
        let (index, _events) = index();
        index.count_from_ledger();
        let (counted, silent) = (id("counted"), id("silent"));
        for task in [&counted, &silent] {
            observe(&index, task, None);
            schedule(&index, task, scheduled(1));
        }
        index.new_term();
        assert!(index.lock().take(10, Duration::ZERO).0.is_empty());
        let counts = crate::ledger::Counts {
            runs: 25,
            succeeded: 25,
            ..Default::default()
        };
        index.record(Report::Counts {
            task: counted.clone(),
            counts,
        });
        let batch = index.lock().take(10, Duration::ZERO).0;
        assert_eq!(batch.len(), 1);
        assert_eq!(batch[0].status.total_runs, 25);
        // A ledger that does not answer does not freeze status for good.
        tokio::time::advance(COUNTS_GRACE).await;
        assert_eq!(index.lock().take(10, Duration::ZERO).0[0].task, silent);
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_leader_takes_in_what_other_leaders_wrote_before_it_writes() {
        // A standby's view dates from its start; the leader went on writing meanwhile.
        let (index, _events) = index();
        let task = id("t");
        observe(&index, &task, None);
        schedule(&index, &task, scheduled(1));
        index.lock().take(10, Duration::ZERO);
        index
            .lock()
            .written(&task, WriteResult::Written, Duration::ZERO, Duration::ZERO);
        let written_since = ChronTaskStatus {
            total_runs: 12,
            successful_runs: 12,
            last_run_now: Some("deploy-7".into()),
            recent_runs: vec![RunRecord {
                run_id: RunId::new(&task, t(11)).to_string(),
                trigger: Default::default(),
                scheduled_time: t(11),
                start_time: None,
                finish_time: Some(t(11)),
                duration: None,
                outcome: RunOutcome::Succeeded,
                attempts: 1,
                message: None,
            }],
            ..ChronTaskStatus::default()
        };
        // Not leading: what the watch brings is taken in.
        index.stored(&task, written_since);
        index.new_term();
        let batch = index.lock().take(10, Duration::ZERO).0;
        let status = &batch[0].status;
        assert_eq!(status.total_runs, 12);
        assert_eq!(status.last_run_now.as_deref(), Some("deploy-7"));
        assert_eq!(status.recent_runs.len(), 1, "{:?}", status.recent_runs);
    }

    #[tokio::test(start_paused = true)]
    async fn a_leader_s_own_writes_coming_back_set_nothing_back() {
        // The engine's first answers of a term can come before the writer's next tick.
        let (index, _events) = index();
        let task = id("t");
        observe(&index, &task, None);
        let (term, leader) = watch::channel(Terms::default());
        index.follow_leader(leader);
        let handled = |request: &str| ChronTaskStatus {
            last_run_now: Some(request.into()),
            ..ChronTaskStatus::default()
        };
        index.stored(&task, handled("older"));
        term.send_replace(Terms::all(Term::single("me")));
        index.record(Report::RequestHandled {
            task: task.clone(),
            request: "newer".into(),
        });
        index.lock().follow(); // the writer's tick
        // An earlier write of its own comes back through the watch.
        index.stored(&task, handled("older"));
        let status = &index.lock().tasks[&task.key].status;
        assert_eq!(status.last_run_now.as_deref(), Some("newer"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_replica_writes_the_statuses_of_its_shards_only() {
        let (index, _events) = index();
        let (mine, theirs) = (id("mine"), id("theirs"));
        assert_ne!(Shard::of(&mine.uid), Shard::of(&theirs.uid));
        for task in [&mine, &theirs] {
            observe(&index, task, None);
            schedule(&index, task, scheduled(5));
        }
        let term = Term::single("me");
        let (_terms, leader) = watch::channel(Terms::of_shards([(Shard::of(&mine.uid), term)]));
        index.follow_leader(leader);
        let (written, _) = index.lock().take(10, Duration::ZERO);
        let written: Vec<_> = written.iter().map(|snapshot| &snapshot.task).collect();
        assert_eq!(written, [&mine]);
    }

    #[tokio::test(start_paused = true)]
    async fn the_status_names_the_replica_of_the_term_that_writes_it() {
        let (index, _events) = index();
        let task = id("t");
        observe(&index, &task, None);
        schedule(&index, &task, scheduled(5));
        let (term, leader) = watch::channel(Terms::default());
        index.follow_leader(leader);
        assert_eq!(index.lock().status(&task.key).unwrap().replica, None);
        let holder = Term {
            holder: "chronflow-1#0badcafe".into(),
            epoch: 3,
        };
        term.send_replace(Terms::all(holder));
        index.lock().follow();
        let (written, _) = index.lock().take(10, Duration::ZERO);
        assert_eq!(written.len(), 1);
        assert_eq!(written[0].status.replica.as_deref(), Some("chronflow-1"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_status_the_watch_brings_first_seeds_the_task_and_a_deleted_one_s_is_dropped() {
        let (index, _events) = index();
        let (task, other) = (id("t"), id("u"));
        let stored = ChronTaskStatus {
            total_runs: 7,
            successful_runs: 7,
            ..ChronTaskStatus::default()
        };
        index.stored(&task, stored.clone());
        index.stored(&other, stored);
        observe(&index, &task, None);
        assert_eq!(index.lock().tasks[&task.key].status.total_runs, 7);
        // Deleted before it was observed: its seed goes too.
        index.forget(&other);
        assert!(index.lock().seeds.is_empty());
        // Created again under the same name: its own status, nothing of the old one.
        let again = TaskId::new(task.key.clone(), "uid-2");
        let its_own = ChronTaskStatus {
            total_runs: 2,
            ..ChronTaskStatus::default()
        };
        index.stored(&again, its_own);
        assert_eq!(index.lock().tasks[&task.key].status.total_runs, 7);
        observe(&index, &again, None);
        assert_eq!(index.lock().tasks[&task.key].status.total_runs, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn the_ledgers_newest_counts_win_even_where_a_number_went_down() {
        let (index, _events) = index();
        index.count_from_ledger();
        let task = id("t");
        observe(&index, &task, None);
        let counts = |revision, runs, missed| Report::Counts {
            task: task.clone(),
            counts: crate::ledger::Counts {
                runs,
                succeeded: runs,
                missed,
                revision,
                ..Default::default()
            },
        };
        index.record(counts(5, 10, 3));
        index.record(counts(4, 9, 3)); // a late answer
        let shown = |index: &StatusIndex| {
            let status = &index.lock().tasks[&task.key].status;
            (status.total_runs, status.missed_runs)
        };
        assert_eq!(shown(&index), (10, 3));
        // A backfill ran one of the missed instants.
        index.record(counts(7, 11, 2));
        assert_eq!(shown(&index), (11, 2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_rejected_status_is_surfaced_and_not_retried_until_it_changes() {
        let (index, mut rx) = index();
        let task = id("t");
        observe(&index, &task, None);
        schedule(&index, &task, scheduled(1));
        let batch = index.lock().take(10, Duration::ZERO).0;
        assert_eq!(batch.len(), 1);
        let rejected = WriteResult::Rejected("status.nextRunTime: Invalid value".into());
        index
            .lock()
            .written(&task, rejected, Duration::ZERO, Duration::ZERO);
        assert!(index.lock().take(10, Duration::ZERO).0.is_empty());
        let sent = events(&mut rx);
        assert_eq!(sent[0].0, reasons::STATUS_REJECTED);
        assert!(sent[0].1.contains("Invalid value"), "{sent:?}");
        finished(&index, &task, 1, Outcome::Succeeded);
        assert_eq!(index.lock().take(10, Duration::ZERO).0.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_write_is_retried_after_a_backoff() {
        let (index, _events) = index();
        let task = id("t");
        observe(&index, &task, None);
        schedule(&index, &task, scheduled(1));
        index.lock().take(10, Duration::ZERO);
        let failed = WriteResult::Failed("connection reset".into());
        let backoff = Duration::from_secs(1);
        index.lock().written(&task, failed, backoff, backoff * 8);
        assert!(index.lock().take(10, Duration::ZERO).0.is_empty());
        tokio::time::advance(backoff).await;
        assert_eq!(index.lock().take(10, Duration::ZERO).0.len(), 1);
    }

    /// Staleness runs from the first change a write carries until that write lands, through
    /// a throttled attempt; a change made while a write is in flight waits for the next one.
    #[tokio::test(start_paused = true)]
    async fn staleness_runs_from_the_first_unwritten_change_until_its_write_lands() {
        let (index, _events) = index();
        let task = id("t");
        let second = Duration::from_secs(1);
        observe(&index, &task, None);
        schedule(&index, &task, scheduled(1));
        assert_eq!(index.lock().staleness(), Duration::ZERO);
        tokio::time::advance(2 * second).await;
        assert_eq!(index.lock().staleness(), 2 * second);
        index.lock().take(10, Duration::ZERO);
        tokio::time::advance(second).await;
        let throttled = WriteResult::Throttled("too many requests".into());
        index.lock().written(&task, throttled, second, second);
        assert_eq!(index.lock().counts().throttled, 1);
        assert_eq!(index.lock().staleness(), 3 * second, "still unwritten");
        tokio::time::advance(second).await;
        index.lock().take(10, Duration::ZERO);
        finished(&index, &task, 1, Outcome::Succeeded);
        tokio::time::advance(second).await;
        index
            .lock()
            .written(&task, WriteResult::Written, second, second);
        assert_eq!(
            index.lock().staleness(),
            second,
            "the run that finished during the write waits for the next one"
        );
        let histogram = {
            let mut text = String::new();
            let mut registry = prometheus_client::registry::Registry::default();
            registry.register("s", "", index.lock().staleness_histogram().clone());
            prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
            text
        };
        assert!(histogram.contains("s_sum 5.0"), "{histogram}");
        assert!(histogram.contains("s_count 1"), "{histogram}");
    }

    #[tokio::test(start_paused = true)]
    async fn run_events_are_rate_limited_and_carry_the_newest_run() {
        let (index, mut rx) = index();
        let task = id("t");
        observe(&index, &task, None);
        for second in 1..=5 {
            finished(&index, &task, second, Outcome::Failed);
        }
        let sent = events(&mut rx);
        assert_eq!(sent.len(), 1, "one RunFailed per window: {sent:?}");
        assert!(sent[0].1.contains("ns/t@2026-01-01T00:00:01Z"));
        tokio::time::advance(EVENT_WINDOW).await;
        index.lock().release_events();
        let sent = events(&mut rx);
        assert_eq!(sent.len(), 1);
        assert!(
            sent[0].1.contains("ns/t@2026-01-01T00:00:05Z"),
            "the newest run: {sent:?}"
        );
        assert!(sent[0].1.contains("3 more RunFailed"), "{sent:?}");
        tokio::time::advance(EVENT_WINDOW).await;
        index.lock().release_events();
        assert!(events(&mut rx).is_empty());
        assert!(
            index.lock().tasks[&task.key].events.is_none(),
            "a window that passed with nothing held back is forgotten"
        );
        finished(&index, &task, 6, Outcome::Failed);
        assert_eq!(events(&mut rx).len(), 1, "the next failure is sent at once");
    }

    #[tokio::test(start_paused = true)]
    async fn state_events_only_on_a_real_change_not_at_each_restart() {
        let (index, mut rx) = index();
        let task = id("t");
        let stored: ChronTaskStatus = serde_json::from_value(serde_json::json!({
            "phase": "Paused", "message": "paused: migration"
        }))
        .unwrap();
        observe(&index, &task, Some(stored));
        let paused = ScheduleState::Paused {
            schedule: "every 1s".into(),
            reason: "migration".into(),
        };
        schedule(&index, &task, paused.clone());
        schedule(&index, &task, paused);
        assert!(
            events(&mut rx).is_empty(),
            "already paused before the restart"
        );
        schedule(&index, &task, scheduled(5));
        assert_eq!(events(&mut rx)[0].0, reasons::RESUMED);
        let invalid = ScheduleState::Invalid {
            reason: "spec.schedule.cron: bad".into(),
        };
        schedule(&index, &task, invalid.clone());
        schedule(&index, &task, invalid);
        assert_eq!(events(&mut rx).len(), 1, "InvalidSpec once");
    }
}
