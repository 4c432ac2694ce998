//! The timing engine: one timer queue of every task's next instant. It sleeps until the
//! earliest one (never a polling tick), and when an instant is due it claims the run in the
//! ledger, hands it to the executor, and schedules the task's next instant. Claims that must
//! wait for the ledger (Redis) are made off the timer loop, so a slow ledger never delays a
//! timer. When this replica becomes leader it takes every task over from the ledger: instants
//! the previous leader did not reach are caught up (per `catchUp`), claims it never started are
//! adopted. It is the one source of a
//! task's schedule facts (scheduled with its next instant, paused, invalid, completed) and
//! reports each change in order. Free of `kube`: the controller (or standalone mode) feeds it
//! tasks through an [`EngineHandle`].

pub mod backfill;
pub mod catch_up;
mod run_now;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::oneshot::error::TryRecvError;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::clock::Clock;
use crate::executor::{Action, Executor, Retire, RunRequest, RunSpec};
use crate::ledger::{Counts, Ledger, LedgerError, TakeOver, Verdict};
use crate::policy::CatchUpPolicy;
use crate::run::Term;
use crate::run::{
    MissKind, Report, ReportSink, RunId, ScheduleState, TaskId, TaskKey, TaskMap, Trigger,
};
use crate::schedule::{Schedule, jitter};
use crate::shard::{Shard, Terms};
use backfill::Progress;
pub use backfill::{BackfillRequest, MAX_BACKFILL};

/// How long a deleted task's uid is remembered, so that a reconcile that was still running when
/// the delete arrived cannot bring the task back.
const TOMBSTONE_TTL: chrono::TimeDelta = chrono::TimeDelta::minutes(10);

/// A validated task, as the engine schedules it.
#[derive(Clone, Debug)]
pub struct EngineTask {
    /// The task and its incarnation (uid).
    pub id: TaskId,
    /// `metadata.generation`: a new one means the spec changed.
    pub generation: i64,
    /// When it is due.
    pub schedule: Schedule,
    /// Maximum jitter; each instant is delayed by a fixed fraction of it (shorter than the gap
    /// between instants: validation guarantees it).
    pub jitter: Option<Duration>,
    /// What to do with instants missed while chronflow was not running.
    pub catch_up: CatchUpPolicy,
    /// When the engine first sees the task, instants after this one that are already due are
    /// caught up by `catch_up`; `None` means from now.
    pub catch_up_from: Option<DateTime<Utc>>,
    /// `Some(reason)` while `spec.paused` (the reason may be empty).
    pub paused: Option<String>,
    /// How its runs go and what they do.
    pub run: Arc<RunSpec>,
    /// A run-now request not handled yet.
    pub run_now: Option<RunNow>,
    /// `spec.backfill`.
    pub backfills: Vec<BackfillRequest>,
    /// Runs a previous process started and may not have seen end (`status.active`), for a
    /// Job action: the leader waits for their Jobs and records how they ended.
    pub adopt: Vec<RunId>,
    /// The counts its stored status shows: a ledger that has none for the task starts from
    /// them (see [`Ledger::take_over`](crate::ledger::Ledger::take_over)).
    pub counts: Option<Counts>,
}

/// A run-now request (`chronflow.io/run-now`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunNow {
    /// The annotation's value: it names the run (`…@manual:<request>`).
    pub request: String,
    /// `chronflow.io/run-now-while-paused: "true"`.
    pub while_paused: bool,
}

enum Command {
    Upsert(Box<EngineTask>),
    Invalidate {
        task: TaskId,
        reason: String,
    },
    Remove(TaskId),
    Retain {
        namespace: Option<String>,
        keep: HashSet<TaskKey>,
    },
}

/// Feeds the engine; cheap to clone. Every method returns once the engine has the command.
#[derive(Clone)]
pub struct EngineHandle {
    commands: mpsc::Sender<Command>,
}

impl EngineHandle {
    /// Adds a task or replaces its definition (including pausing and resuming it). A changed
    /// schedule or a resume takes effect from now on: no burst of past instants.
    pub async fn upsert(&self, task: EngineTask) {
        self.send(Command::Upsert(Box::new(task))).await;
    }

    /// The task's spec cannot run: stop firing it, cancel its runs (each reported), and report
    /// it invalid with `reason`.
    pub async fn invalidate(&self, task: TaskId, reason: String) {
        self.send(Command::Invalidate { task, reason }).await;
    }

    /// Forgets a deleted task and cancels its runs; its uid can never come back.
    pub async fn remove(&self, task: TaskId) {
        self.send(Command::Remove(task)).await;
    }

    /// Forgets every task of `namespace` (all namespaces: `None`) that is not in `keep`: after
    /// a re-list, deletions may have been missed.
    pub async fn retain(&self, namespace: Option<String>, keep: HashSet<TaskKey>) {
        self.send(Command::Retain { namespace, keep }).await;
    }

    async fn send(&self, command: Command) {
        // Fails only once the engine stopped, at shutdown, when nothing is to be scheduled.
        let _ = self.commands.send(command).await;
    }
}

/// Runs of a burst handed to the executor at once: enough that its lock is rarely taken, few
/// enough that the workers start on a burst before all of it is claimed.
const BURST_CHUNK: usize = 256;

/// How long a failed take-over (or settling) waits before it is tried again (doubling up to
/// 30 s).
const TAKE_OVER_RETRY: Duration = Duration::from_secs(1);

/// What the engine needs besides its tasks.
pub struct EngineParts {
    /// Where claimed runs go.
    pub executor: Executor,
    /// Where runs are claimed.
    pub ledger: Arc<dyn Ledger>,
    /// The term of each shard this replica holds, checked when acting: a task whose shard it
    /// does not hold runs nothing, and its timer sleeps once it came due.
    pub leader: watch::Receiver<Terms>,
    /// Where the engine's reports go.
    pub sink: Arc<dyn ReportSink>,
    /// The time source.
    pub clock: Clock,
    /// The most backfill runs per second, per backfill (`limits.backfill_runs_per_second`).
    pub backfill_per_second: u32,
}

/// The engine's state; drive it with [`Engine::run`].
pub struct Engine {
    commands: mpsc::Receiver<Command>,
    tasks: TaskMap<TaskKey, Entry>,
    /// The timer queue, earliest first: (fire time, the entry's `seq`) → task. Ordered by a
    /// number, not the key, so an aligned burst compares no names.
    timers: BTreeMap<(DateTime<Utc>, u64), TaskKey>,
    /// The last `Entry::seq` given.
    seq: u64,
    /// Uids of deleted tasks, with when they were deleted.
    tombstones: TaskMap<Arc<str>, DateTime<Utc>>,
    parts: EngineParts,
    /// The terms the engine last acted on; a shard in a new term has its tasks taken over.
    terms: Terms,
    /// Cancelled at shutdown: take-overs still retrying stop.
    shutdown: CancellationToken,
    /// Permits for claim batches waiting for the ledger, as many as runs may wait for a worker
    /// (`queue_size`): beyond, a due run is counted missed at once rather than piling up behind
    /// a hung Redis (each claim also has `redis.timeout`).
    claims: Arc<tokio::sync::Semaphore>,
    /// Take-over answers, from the tasks that asked the ledger.
    took_over: (
        mpsc::UnboundedSender<TookOver>,
        mpsc::UnboundedReceiver<TookOver>,
    ),
    /// Runs the ledger accepted at once, submitted together before the engine waits again
    /// (one lock of the executor for an aligned burst, not one per run).
    burst: Vec<RunRequest>,
}

/// The ledger's answer about one task, for the term that asked.
struct TookOver {
    task: TaskId,
    term: Term,
    answer: TakeOver,
}

struct Entry {
    /// Tells this entry's timer from others due at the same instant.
    seq: u64,
    uid: Arc<str>,
    generation: i64,
    state: State,
    /// Waiting for the ledger's take-over answer: no timer until it comes, so nothing is
    /// claimed or counted before the engine knows where the previous leaders stopped.
    taking_over: bool,
    /// What outlives a change of the task's state.
    extras: Extras,
}

/// What outlives a change of a task's state.
#[derive(Default)]
struct Extras {
    /// The end of the task's latest batch of claims, while it waits for the ledger: the next
    /// batch (and its misses) waits for it, so the ledger records a task's instants in order
    /// even when Redis answers slower than the task fires. Out of order, a newer leader taking
    /// over between two batches would resume after a later instant and never count the earlier
    /// ones still unclaimed.
    claims: Option<tokio::sync::oneshot::Receiver<()>>,
    /// Allocated only for a task that was asked to run now or to backfill: most never are.
    rare: Option<Box<Rare>>,
}

/// A task's run-now requests and backfills.
#[derive(Default)]
struct Rare {
    /// A request that waits for this replica to lead.
    request: Option<run_now::Request>,
    /// The latest request handled by this process: seen again, it is not run again.
    served: Option<String>,
    /// Backfills by id: running, or where they stopped.
    backfills: HashMap<String, Backfilling>,
}

impl Extras {
    fn rare(&mut self) -> &mut Rare {
        self.rare.get_or_insert_default()
    }

    fn has_request(&self) -> bool {
        self.rare
            .as_ref()
            .is_some_and(|rare| rare.request.is_some())
    }

    fn drop_request(&mut self) {
        if let Some(rare) = &mut self.rare {
            rare.request = None;
        }
    }

    fn stop_backfills(&mut self) {
        for backfill in self.rare.iter().flat_map(|rare| rare.backfills.values()) {
            backfill.cancel.cancel();
        }
    }
}

struct Backfilling {
    cancel: CancellationToken,
    generation: i64,
    term: Term,
    progress: Arc<Progress>,
}

enum State {
    Scheduled {
        /// Shared with what a fire hands on: a fire copies no part of it.
        task: Arc<EngineTask>,
        /// `task.schedule.describe()`, reported at every fire.
        description: Arc<str>,
        /// The next scheduled instant (before jitter); `None` once the schedule has ended.
        next: Option<DateTime<Utc>>,
        /// When its timer fires (next + jitter).
        fire_at: Option<DateTime<Utc>>,
        since: DateTime<Utc>,
    },
    Paused,
    Invalid,
}

impl Engine {
    /// An engine and the handle that feeds it; drive the engine with [`Engine::run`].
    pub fn new(parts: EngineParts) -> (Engine, EngineHandle) {
        let (tx, rx) = mpsc::channel(1024);
        let claims = Arc::new(tokio::sync::Semaphore::new(parts.executor.queue_size()));
        let engine = Engine {
            commands: rx,
            tasks: TaskMap::default(),
            timers: BTreeMap::new(),
            seq: 0,
            tombstones: TaskMap::default(),
            parts,
            terms: Terms::default(),
            shutdown: CancellationToken::new(),
            claims,
            took_over: mpsc::unbounded_channel(),
            burst: Vec::new(),
        };
        (engine, EngineHandle { commands: tx })
    }

    /// Runs until `shutdown` or until every handle is dropped.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let clock = self.parts.clock;
        let mut leader = self.parts.leader.clone();
        let mut leader_open = true;
        self.shutdown = shutdown.clone();
        self.on_terms(leader.borrow_and_update().clone());
        loop {
            let wake = self.timers.first_key_value().map(|((at, _), _)| *at);
            let sleep = async {
                match wake {
                    Some(at) => clock.sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            let term_changed = async {
                if !leader_open {
                    std::future::pending::<()>().await;
                }
                if leader.changed().await.is_err() {
                    leader_open = false;
                }
            };
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                () = term_changed => {
                    let terms = leader.borrow_and_update().clone();
                    self.on_terms(terms);
                }
                Some(answer) = self.took_over.1.recv() => self.apply_take_over(answer),
                command = self.commands.recv() => match command {
                    Some(command) => self.apply(command).await,
                    None => break,
                },
                _ = sleep => self.fire_due(clock.now()),
            }
            self.submit_burst();
        }
    }

    /// New terms: this replica holds shards (again, or newly), so it takes their tasks over;
    /// their timers wait for the ledger's answers.
    fn on_terms(&mut self, terms: Terms) {
        let old = std::mem::replace(&mut self.terms, terms);
        let fresh = self.terms.taken_since(&old);
        if fresh.iter().all(Option::is_none) {
            return;
        }
        let mut asks = Vec::new();
        for (key, entry) in &mut self.tasks {
            let Some(term) = &fresh[Shard::of(&entry.uid).index()] else {
                continue;
            };
            if let State::Scheduled { fire_at, task, .. } = &entry.state {
                if let Some(at) = fire_at {
                    self.timers.remove(&(*at, entry.seq));
                }
                entry.taking_over = true;
                asks.push((task.id.clone(), task.counts, term.clone()));
            } else {
                // Paused or invalid: nothing to fire, but its status shows the ledger's counts.
                let task = TaskId::new(key.clone(), entry.uid.clone());
                asks.push((task, None, term.clone()));
            }
        }
        for (task, seed, term) in asks {
            self.spawn_take_over(task, term, seed);
        }
        // Tasks not taken over (paused) may have a request waiting for this replica to lead.
        let waiting: Vec<TaskKey> = self
            .tasks
            .iter()
            .filter(|(_, entry)| !entry.taking_over && entry.extras.has_request())
            .map(|(key, _)| key.clone())
            .collect();
        for key in waiting {
            self.serve_request(&key);
        }
    }

    /// The term this replica acts in for the task whose uid is `uid`: the engine's, while the
    /// replica still holds the task's shard in it.
    fn leading(&self, uid: &str) -> Option<Term> {
        let term = self.terms.task(uid)?;
        self.parts
            .leader
            .borrow()
            .holds(uid, term)
            .then(|| term.clone())
    }

    /// Asks the ledger about `task` off the loop, retrying while `term` lasts.
    fn spawn_take_over(&self, task: TaskId, term: Term, seed: Option<Counts>) {
        let shutdown = self.shutdown.clone();
        let ledger = self.parts.ledger.clone();
        let mut leader = self.parts.leader.clone();
        let answers = self.took_over.0.clone();
        tokio::spawn(async move {
            let mut wait = TAKE_OVER_RETRY;
            loop {
                match ledger.take_over(&task, &term, &[], seed).await {
                    Ok(answer) => {
                        let _ = answers.send(TookOver { task, term, answer });
                        return;
                    }
                    Err(error) => {
                        warn!(task = %task, %error, ?wait, "cannot take the task over yet")
                    }
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    () = term_ends(&mut leader, &task.uid, &term) => return,
                    _ = tokio::time::sleep(wait) => wait = (wait * 2).min(Duration::from_secs(30)),
                }
            }
        });
    }

    /// Applies what the ledger said about a task this term took over: its counts, the claims
    /// a dead leader never started (run now), its runs that may still be in flight, and where
    /// the previous leaders stopped; then the task's timer runs again.
    fn apply_take_over(&mut self, took: TookOver) {
        if self.terms.task(&took.task.uid) != Some(&took.term) {
            return;
        }
        let TookOver { task, term, answer } = took;
        if let Some(counts) = answer.counts {
            self.parts.sink.record(Report::Counts {
                task: task.clone(),
                counts,
            });
        }
        let now = self.parts.clock.now();
        let Some(entry) = self.tasks.get_mut(&task.key).filter(|e| e.uid == task.uid) else {
            return;
        };
        entry.taking_over = false;
        let (generation, seq) = (entry.generation, entry.seq);
        let State::Scheduled {
            task: engine_task,
            description,
            next,
            fire_at,
            since,
        } = &mut entry.state
        else {
            return;
        };
        let (engine_task, description) = (engine_task.clone(), description.clone());
        // A ledger that keeps records (it has counts) says where the previous leaders stopped:
        // resume right after, whatever this replica's idle timer reached. One that keeps none
        // (memory) knows nothing of other replicas: the timer stays where it is, or, where it
        // slept while another replica held the task, resumes at the next instant from now.
        let moved = answer.counts.is_some();
        let slept = next.is_some() && fire_at.is_none();
        if moved || slept {
            let floor = engine_task.catch_up_from.unwrap_or(*since).max(*since);
            let resume = match answer.newest {
                _ if !moved => now,
                Some(newest) => newest.max(floor),
                None => floor,
            };
            *next = engine_task.schedule.next_after(resume);
            *fire_at = next.map(|t| fire_time(&engine_task, t));
        }
        let (next, since) = (*next, *since);
        if let Some(at) = *fire_at {
            self.timers.insert((at, seq), task.key.clone());
        }
        if moved || slept {
            let state = ScheduleState::Scheduled {
                schedule: description,
                next,
                since,
            };
            self.report(&task, state);
        }
        if let Action::Job(_) = engine_task.run.action {
            // A Job outlives the process that created it: this term waits for it and records
            // its end, whether the ledger or the task's status says it was in flight.
            let mut runs = answer.in_flight;
            for run in &engine_task.adopt {
                if !runs.contains(run) {
                    runs.push(run.clone());
                }
            }
            for run_id in runs {
                let run = self.adopted(&engine_task, generation, run_id, &term);
                self.parts.executor.submit(run);
            }
        } else if !answer.in_flight.is_empty() {
            let held = answer.in_flight;
            let longest = answer.in_flight_for.unwrap_or(engine_task.run.longest());
            self.hold_elsewhere(task.clone(), held, longest, term.clone());
        }
        // Already claimed for this term by the take-over itself; a run-now request among them
        // runs now (its earlier leader may have recorded it handled, so none serves it again).
        for run_id in answer.unstarted {
            let run = match run_id.request() {
                None => self.request(&engine_task, generation, run_id.instant(), false, &term),
                Some(_) => RunRequest {
                    trigger: Trigger::Manual,
                    due: self.parts.clock.now(),
                    run_id,
                    ..self.request(
                        &engine_task,
                        generation,
                        self.parts.clock.now(),
                        false,
                        &term,
                    )
                },
            };
            self.parts.executor.submit(run);
        }
        self.serve_request(&task.key);
        self.sync_backfills(&task.key);
    }

    /// Runs a previous leader started may still be running in its process: the concurrency
    /// policy counts them for as long as a run can last, then the ledger settles them (failed,
    /// outcome unknown) unless they were reported finished meanwhile.
    fn hold_elsewhere(&self, task: TaskId, runs: Vec<RunId>, longest: Duration, term: Term) {
        debug!(task = %task, runs = runs.len(), ?longest, "runs of the previous leader may still be in flight");
        self.parts.executor.hold_elsewhere(&task, runs.clone());
        let (ledger, executor, sink) = (
            self.parts.ledger.clone(),
            self.parts.executor.clone(),
            self.parts.sink.clone(),
        );
        let mut leader = self.parts.leader.clone();
        tokio::spawn(async move {
            let (mut wait, mut retry) = (longest, TAKE_OVER_RETRY);
            // Until the runs are settled, or another term takes the task over afresh.
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    () = term_ends(&mut leader, &task.uid, &term) => break,
                }
                if !leader.borrow().holds(&task.uid, &term) {
                    break;
                }
                match ledger.take_over(&task, &term, &runs, None).await {
                    Ok(taken) => {
                        if let Some(counts) = taken.counts {
                            let task = task.clone();
                            sink.record(Report::Counts { task, counts });
                        }
                        break;
                    }
                    Err(error) => {
                        warn!(task = %task, %error, ?retry, "cannot settle the previous leader's runs yet");
                        wait = retry;
                        retry = (retry * 2).min(Duration::from_secs(30));
                    }
                }
            }
            executor.release_elsewhere(&task, &runs);
        });
    }

    async fn apply(&mut self, command: Command) {
        let now = self.parts.clock.now();
        match command {
            Command::Upsert(task) => self.upsert(*task, now),
            Command::Invalidate { task, reason } => self.invalidate(task, reason),
            Command::Remove(task) => {
                if self.tasks.get(&task.key).is_some_and(|e| e.uid == task.uid) {
                    self.remove(&task.key, now);
                } else {
                    self.bury(&task, now);
                }
            }
            Command::Retain { namespace, keep } => {
                let gone: Vec<TaskKey> = self
                    .tasks
                    .keys()
                    .filter(|k| k.is_in(namespace.as_deref()) && !keep.contains(*k))
                    .cloned()
                    .collect();
                for key in gone {
                    debug!(task = %key, "task no longer exists");
                    self.remove(&key, now);
                }
            }
        }
    }

    /// Takes a task out of the timer queue and the map.
    fn take(&mut self, key: &TaskKey) -> Option<Entry> {
        let entry = self.tasks.remove(key)?;
        if let State::Scheduled {
            fire_at: Some(at), ..
        } = &entry.state
        {
            self.timers.remove(&(*at, entry.seq));
        }
        Some(entry)
    }

    fn remove(&mut self, key: &TaskKey, now: DateTime<Utc>) {
        if let Some(mut entry) = self.take(key) {
            entry.extras.stop_backfills();
            let id = TaskId::new(key.clone(), entry.uid.clone());
            self.parts.executor.retire(&id, Retire::Deleted);
            self.bury(&id, now);
        }
    }

    /// Remembers a deleted incarnation (a late reconcile must not bring it back) and has the
    /// ledger forget it after the same grace.
    fn bury(&mut self, id: &TaskId, now: DateTime<Utc>) {
        self.tombstones.retain(|_, at| now - *at < TOMBSTONE_TTL);
        self.tombstones.insert(id.uid.clone(), now);
        let (ledger, id) = (self.parts.ledger.clone(), id.clone());
        let grace = TOMBSTONE_TTL.to_std().unwrap_or_default();
        tokio::spawn(async move {
            // Missed, its keys still expire by themselves (the Redis ledger's KEY_TTL).
            if let Err(error) = ledger.forget(&id, grace).await {
                debug!(task = %id, %error, "could not forget a deleted task in the ledger");
            }
        });
    }

    /// The current entry of `id`, taken out; an entry of another incarnation is retired.
    fn take_same(&mut self, id: &TaskId) -> Option<Entry> {
        let entry = self.take(&id.key)?;
        if entry.uid == id.uid {
            return Some(entry);
        }
        let old = TaskId::new(id.key.clone(), entry.uid.clone());
        self.parts.executor.retire(&old, Retire::Deleted);
        let mut entry = entry;
        entry.extras.stop_backfills();
        None
    }

    fn upsert(&mut self, task: EngineTask, now: DateTime<Utc>) {
        if self.tombstones.contains_key(&task.id.uid) {
            debug!(task = %task.id, "ignoring an update of a deleted task");
            return;
        }
        let id = task.id.clone();
        let previous = self.take_same(&id);
        if let Some(old) = &previous {
            // Runs still waiting for a worker were made for the old spec or the old state.
            let pausing = task.paused.is_some() && matches!(old.state, State::Scheduled { .. });
            if pausing {
                self.parts.executor.retire(&id, Retire::Paused);
            } else if old.generation != task.generation {
                self.parts.executor.retire(&id, Retire::Edited);
            }
        }
        let (generation, counts) = (task.generation, task.counts);
        let was_taking_over = previous.as_ref().is_some_and(|e| e.taking_over);
        let first_sight = previous.is_none();
        let (state, mut extras) = match previous {
            Some(entry) => (Some(entry.state), entry.extras),
            None => (None, Extras::default()),
        };
        match &task.run_now {
            Some(run_now)
                if extras.rare.as_ref().and_then(|rare| rare.served.as_ref())
                    != Some(&run_now.request) =>
            {
                extras.rare().request = Some(run_now::Request {
                    request: run_now.request.clone(),
                    spec: task.run.clone(),
                    generation,
                    refused_while_paused: task.paused.is_some() && !run_now.while_paused,
                });
            }
            Some(_) => {}
            // Handled by another leader (the status says so) or withdrawn: a standby must not
            // serve it when it leads later.
            None => extras.drop_request(),
        }
        let key = id.key.clone();
        let state = match (state, task.paused.clone()) {
            (_, Some(reason)) => {
                let schedule = task.schedule.describe().into();
                self.report(&id, ScheduleState::Paused { schedule, reason });
                State::Paused
            }
            // Same timing: keep the rhythm; only what a run does may have changed.
            (
                Some(State::Scheduled {
                    task: old,
                    next,
                    since,
                    ..
                }),
                None,
            ) if same_timing(&old, &task) => self.scheduled(task, next, since),
            // Edited: from now on, without replaying anything.
            (Some(State::Scheduled { since, .. }), None) => {
                let next = task.schedule.next_after(now);
                self.scheduled(task, next, since)
            }
            // Resumed or fixed: schedulable from now on.
            (Some(State::Paused | State::Invalid), None) => {
                let next = task.schedule.next_after(now);
                self.scheduled(task, next, now)
            }
            // First sight: instants due since `catch_up_from` are caught up when the timer fires.
            (None, None) => {
                let from = task.catch_up_from.unwrap_or(now);
                let next = task.schedule.next_after(from);
                self.scheduled(task, next, from)
            }
        };
        // First seen while leading: take it over from the ledger before its timer runs.
        let scheduled = matches!(state, State::Scheduled { .. });
        let term = self
            .terms
            .task(&id.uid)
            .filter(|_| first_sight && scheduled);
        let ask = term.is_some();
        if let Some(term) = term.cloned() {
            self.spawn_take_over(id.clone(), term, counts);
        }
        let taking_over = scheduled && (ask || was_taking_over);
        self.insert(id, generation, state, taking_over, extras);
        self.serve_request(&key);
        self.sync_backfills(&key);
    }

    /// A scheduled state, reported.
    fn scheduled(
        &self,
        task: EngineTask,
        next: Option<DateTime<Utc>>,
        since: DateTime<Utc>,
    ) -> State {
        let description: Arc<str> = task.schedule.describe().into();
        let state = ScheduleState::Scheduled {
            schedule: description.clone(),
            next,
            since,
        };
        self.report(&task.id, state);
        State::Scheduled {
            fire_at: next.map(|t| fire_time(&task, t)),
            task: Arc::new(task),
            description,
            next,
            since,
        }
    }

    fn insert(
        &mut self,
        id: TaskId,
        generation: i64,
        state: State,
        taking_over: bool,
        extras: Extras,
    ) {
        self.seq += 1;
        if let State::Scheduled {
            fire_at: Some(at), ..
        } = &state
            && !taking_over
        {
            self.timers.insert((*at, self.seq), id.key.clone());
        }
        let entry = Entry {
            seq: self.seq,
            uid: id.uid,
            generation,
            state,
            taking_over,
            extras,
        };
        self.tasks.insert(id.key, entry);
    }

    fn invalidate(&mut self, id: TaskId, reason: String) {
        if self.tombstones.contains_key(&id.uid) {
            return;
        }
        let (generation, mut extras) = match self.take_same(&id) {
            Some(entry) => {
                if !matches!(entry.state, State::Invalid) {
                    self.parts
                        .executor
                        .retire(&id, Retire::Invalid(reason.clone()));
                }
                (entry.generation, entry.extras)
            }
            None => (0, Extras::default()),
        };
        extras.stop_backfills();
        extras.drop_request();
        self.report(&id, ScheduleState::Invalid { reason });
        self.insert(id, generation, State::Invalid, false, extras);
    }

    /// Fires every timer that is due, earliest first.
    fn fire_due(&mut self, now: DateTime<Utc>) {
        while let Some(timer) = self.timers.first_entry() {
            if timer.key().0 > now {
                break;
            }
            let key = timer.remove();
            self.fire(&key, now);
            // The workers start on a large burst's first runs while the rest are claimed.
            if self.burst.len() >= BURST_CHUNK {
                self.submit_burst();
            }
        }
    }

    fn fire(&mut self, key: &TaskKey, now: DateTime<Utc>) {
        let Some(entry) = self.tasks.get_mut(key) else {
            return;
        };
        let State::Scheduled {
            task,
            description,
            next,
            fire_at,
            since,
        } = &mut entry.state
        else {
            return;
        };
        let Some(first) = *next else {
            return;
        };
        // Another replica's task sleeps until its shard is this one's (the take-over wakes it):
        // each replica fires only its share.
        if self.terms.task(&entry.uid).is_none() {
            *fire_at = None;
            return;
        }
        let plan = catch_up::plan(&task.schedule, first, now, task.catch_up, |t| {
            fire_time(task, t) <= now
        });
        *next = plan.next;
        *fire_at = plan.next.map(|t| fire_time(task, t));
        if let Some(at) = *fire_at {
            self.timers.insert((at, entry.seq), key.clone());
        }
        let (task, since, generation) = (task.clone(), *since, entry.generation);
        let description = description.clone();

        if let Some(term) = self.leading(&task.id.uid) {
            let missed = plan
                .latest_missed
                .filter(|_| plan.missed > 0)
                .map(|latest| Report::Missed {
                    task: task.id.clone(),
                    count: plan.missed,
                    run: RunId::new(&task.id, latest),
                    trigger: Trigger::Schedule,
                    kind: MissKind::CatchUp,
                    reason: format!(
                        "{} instants due while chronflow could not run them (catchUp {:?})",
                        plan.missed, task.catch_up
                    ),
                });
            // A catch-up batch runs one after another, whatever the concurrency policy.
            let sequential = plan.run.len() > 1;
            let runs = plan
                .run
                .into_iter()
                .map(|scheduled| self.request(&task, generation, scheduled, sequential, &term))
                .collect();
            self.claim_and_submit(&task.id, missed, runs, term);
        }
        let state = ScheduleState::Scheduled {
            schedule: description,
            next: plan.next,
            since,
        };
        self.report(&task.id, state);
    }

    fn request(
        &self,
        task: &EngineTask,
        generation: i64,
        scheduled: DateTime<Utc>,
        sequential: bool,
        term: &Term,
    ) -> RunRequest {
        RunRequest {
            trigger: Trigger::Schedule,
            task: task.id.clone(),
            generation,
            run_id: RunId::new(&task.id, scheduled),
            scheduled,
            due: fire_time(task, scheduled),
            spec: task.run.clone(),
            sequential,
            term: term.clone(),
            adopted: false,
        }
    }

    /// A run an earlier leader or process started, for this term to wait for.
    fn adopted(
        &self,
        task: &EngineTask,
        generation: i64,
        run_id: RunId,
        term: &Term,
    ) -> RunRequest {
        RunRequest {
            trigger: match run_id.request() {
                Some(_) => Trigger::Manual,
                None => Trigger::Schedule,
            },
            // Due now for this term: its start lag is this term's, not the time since the run
            // began elsewhere.
            due: self.parts.clock.now(),
            adopted: true,
            run_id: run_id.clone(),
            ..self.request(task, generation, run_id.instant(), false, term)
        }
    }

    /// Reports `missed` (the instants a catch-up skips, all older than `runs`), then claims
    /// `runs` in order and hands each one the ledger gives this term to the executor (which
    /// reports it if it cannot take it); after the task's previous batch, so nothing of a later
    /// instant reaches the ledger before an earlier one, and only while `term` lasts. A ledger
    /// that answers at once (memory) is asked right here; one that must wait (Redis) is asked
    /// off the loop.
    fn claim_and_submit(
        &mut self,
        id: &TaskId,
        missed: Option<Report>,
        runs: Vec<RunRequest>,
        term: Term,
    ) {
        if runs.is_empty() && missed.is_none() {
            return;
        }
        // Only a batch still waiting for the ledger is waited for: awaiting one that ended
        // would cost tokio's cooperative budget, and past 128 of them in one burst every claim
        // would wait and go off the loop.
        let previous = self
            .tasks
            .get_mut(&id.key)
            .and_then(|entry| entry.extras.claims.take())
            .and_then(|mut previous| {
                let waiting = matches!(previous.try_recv(), Err(TryRecvError::Empty));
                waiting.then_some(previous)
            });
        let permit = self.claims.clone().try_acquire_owned().ok();
        let (ledger, executor, sink, leader, task) = (
            self.parts.ledger.clone(),
            self.parts.executor.clone(),
            self.parts.sink.clone(),
            self.parts.leader.clone(),
            id.clone(),
        );
        let mut work = Box::pin(async move {
            if let Some(previous) = previous {
                // Err: that batch was dropped (shutdown); nothing is left to wait for.
                let _ = previous.await;
            }
            // A term that ended while this batch waited (frozen, or behind a slow claim) records
            // nothing more of the task: its misses would be marked under no term, and a claim
            // landing after them would hide them. The next term resumes after the newest record
            // and counts these instants in its gap.
            if !leader.borrow().holds(&task.uid, &term) {
                debug!(%task, "the term ended; the next one counts this batch's instants");
                return Vec::new();
            }
            if let Some(report) = missed {
                sink.record(report);
            }
            if permit.is_none() {
                for run in runs {
                    warn!(run_id = %run.run_id, "too many claims are waiting for the ledger");
                    sink.record(Report::Missed {
                        task: run.task.clone(),
                        count: 1,
                        run: run.run_id.clone(),
                        trigger: run.trigger,
                        kind: MissKind::QueueFull,
                        reason: "too many claims are waiting for the ledger".into(),
                    });
                }
                return Vec::new();
            }
            let mut accepted = Vec::with_capacity(runs.len());
            for run in runs {
                let verdict = ledger.claim(&run.run_id, &term).await;
                accepted.extend(claimed(sink.as_ref(), run, verdict));
            }
            accepted
        });
        let mut context = Context::from_waker(futures::task::noop_waker_ref());
        match work.as_mut().poll(&mut context) {
            // Submitted with the rest of the burst before the engine waits again.
            Poll::Ready(accepted) => self.burst.extend(accepted),
            // Spawned tasks are polled at once, with a real waker. The task's next batch waits
            // until these runs are submitted.
            Poll::Pending => {
                let (done, end) = tokio::sync::oneshot::channel::<()>();
                if let Some(entry) = self.tasks.get_mut(&id.key) {
                    entry.extras.claims = Some(end);
                }
                tokio::spawn(async move {
                    executor.submit_all(work.await);
                    drop(done);
                });
            }
        }
    }

    /// Hands the runs claimed since the last call to the executor, all at once.
    fn submit_burst(&mut self) {
        if !self.burst.is_empty() {
            self.parts.executor.submit_all(self.burst.drain(..));
        }
    }

    fn report(&self, task: &TaskId, state: ScheduleState) {
        self.parts.sink.record(Report::Schedule {
            task: task.clone(),
            state,
        });
    }
}

/// Acts on the ledger's answer to a claim: the run, if this term may run it.
fn claimed(
    sink: &dyn ReportSink,
    run: RunRequest,
    verdict: Result<Verdict, LedgerError>,
) -> Option<RunRequest> {
    match verdict {
        Ok(Verdict::Accepted) => return Some(run),
        Ok(Verdict::Held(record) | Verdict::Busy(record)) => {
            debug!(run_id = %run.run_id, ?record, "already claimed; not running it again");
        }
        Ok(Verdict::Fenced { epoch }) => warn!(
            run_id = %run.run_id, epoch,
            "a newer leader took this task over; not running it"
        ),
        Err(error) => {
            warn!(run_id = %run.run_id, %error, "cannot claim run");
            sink.record(Report::Missed {
                task: run.task.clone(),
                count: 1,
                run: run.run_id.clone(),
                trigger: run.trigger,
                kind: MissKind::Claim,
                reason: format!("cannot claim the run: {error}"),
            });
        }
    }
    None
}

/// Resolves once `term` is over for the task whose uid is `uid`. Never, where nobody can end
/// it: without leader election the one term's sender is dropped at start, and a closed channel
/// is no end of the term.
async fn term_ends(leader: &mut watch::Receiver<Terms>, uid: &str, term: &Term) {
    if leader.wait_for(|now| !now.holds(uid, term)).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Whether two versions of a task fire at the same instants.
fn same_timing(old: &EngineTask, new: &EngineTask) -> bool {
    old.schedule == new.schedule && old.jitter == new.jitter
}

/// When the timer of `instant` fires: the instant plus the task's deterministic jitter (the
/// instant itself should the sum not be representable).
fn fire_time(task: &EngineTask, instant: DateTime<Utc>) -> DateTime<Utc> {
    match task.jitter {
        // Keyed by `<namespace>/<name>`, as docs/schedule.md promises: every replica and every
        // restart computes the same delay.
        Some(max) if !max.is_zero() => {
            jitter::delayed(&task.id.key.to_string(), instant, max).unwrap_or(instant)
        }
        _ => instant,
    }
}

/// The engine on tokio's paused time: a day of instants in milliseconds, exactly on time.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::executor::ExecutorConfig;
    use crate::executor::fixtures::{TestLedger, http_spec, memory_ledger};
    use crate::executor::http::NoValues;
    use crate::schedule::IntervalAnchor;
    use chrono::TimeZone;

    fn t(hours: i64) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap() + chrono::Duration::hours(hours)
    }

    /// An engine and executor on a clock at `t(0)` that follows tokio's paused time. Runs call
    /// a closed port on loopback: they fail at once, which is all these tests need.
    fn start() -> (
        EngineHandle,
        mpsc::UnboundedReceiver<Report>,
        CancellationToken,
    ) {
        start_with(memory_ledger())
    }

    /// [`start`], the engine claiming in `ledger`.
    fn start_with(
        ledger: Arc<dyn Ledger>,
    ) -> (
        EngineHandle,
        mpsc::UnboundedReceiver<Report>,
        CancellationToken,
    ) {
        let (leader_tx, leader) = watch::channel(Terms::all(Term::single("test")));
        std::mem::forget(leader_tx); // leads for the whole test
        start_leading(ledger, leader)
    }

    /// [`start_with`], leading while `leader` says so.
    fn start_leading(
        ledger: Arc<dyn Ledger>,
        leader: watch::Receiver<Terms>,
    ) -> (
        EngineHandle,
        mpsc::UnboundedReceiver<Report>,
        CancellationToken,
    ) {
        let (engine, handle, executor_task, reports) = build(ledger, leader);
        let stop = CancellationToken::new();
        tokio::spawn(engine.run(stop.clone()));
        tokio::spawn(executor_task.run(stop.clone(), Duration::from_secs(1)));
        (handle, reports, stop)
    }

    /// An engine and its executor, not running yet.
    fn build(
        ledger: Arc<dyn Ledger>,
        leader: watch::Receiver<Terms>,
    ) -> (
        Engine,
        EngineHandle,
        crate::executor::ExecutorTask,
        mpsc::UnboundedReceiver<Report>,
    ) {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let clock = Clock::tokio_at(t(0));
        let (tx, reports) = mpsc::unbounded_channel();
        let sink: Arc<dyn ReportSink> = Arc::new(tx);
        let config = ExecutorConfig {
            max_workers: 4,
            queue_size: 100,
            log_success: false,
        };
        let http = crate::executor::http::client().unwrap();
        let (executor, executor_task) = Executor::new(
            config,
            sink.clone(),
            clock,
            http,
            Arc::new(NoValues),
            Arc::new(crate::executor::job::NoJobs),
            memory_ledger(),
        );
        let (engine, handle) = Engine::new(EngineParts {
            executor,
            ledger,
            leader,
            sink,
            clock,
            backfill_per_second: 10,
        });
        (engine, handle, executor_task, reports)
    }

    /// A ledger that answers at once has a whole aligned burst claimed on the timer loop,
    /// however large: tokio's cooperative budget once made every claim after the 128th of a
    /// burst wait, go off the loop as a task of its own and lock the executor alone.
    #[tokio::test(start_paused = true)]
    async fn an_aligned_burst_is_claimed_on_the_loop() {
        let term = Term::single("test");
        let (_leader_tx, leader) = watch::channel(Terms::all(term.clone()));
        let ledger = Arc::new(TestLedger::new());
        let (mut engine, _handle, _workers, _reports) = build(ledger.clone(), leader);
        // Scheduled before leading: no take-over stands between the tasks and their timers.
        for i in 0..500 {
            let mut task = hourly(None);
            task.id = TaskId::new(TaskKey::new("ns", format!("t{i}")), format!("uid-{i}"));
            engine.upsert(task, t(0));
        }
        engine.terms = Terms::all(term);
        // Two bursts: the second waits for nothing the first left behind.
        for hour in [1, 2] {
            engine.fire_due(t(hour));
            let mut claimed = ledger.claimed.lock().unwrap();
            assert_eq!(claimed.len(), 500, "claims made on the loop at {hour} h");
            claimed.clear();
        }
    }

    /// Every hour on the hour, on a grid that started long ago.
    fn hourly(catch_up_from: Option<DateTime<Utc>>) -> EngineTask {
        EngineTask {
            id: TaskId::new(TaskKey::new("ns", "hourly"), "uid"),
            generation: 1,
            schedule: Schedule::interval(
                Duration::from_secs(3600),
                IntervalAnchor::Start(t(-10_000)),
            )
            .unwrap(),
            jitter: None,
            catch_up: CatchUpPolicy::Latest,
            catch_up_from,
            paused: None,
            run: Arc::new(http_spec(
                "http://127.0.0.1:1/",
                Duration::from_secs(5),
                None,
            )),
            run_now: None,
            backfills: Vec::new(),
            adopt: Vec::new(),
            counts: None,
        }
    }

    async fn starts(
        reports: &mut mpsc::UnboundedReceiver<Report>,
        count: usize,
    ) -> Vec<(DateTime<Utc>, DateTime<Utc>)> {
        let mut seen = Vec::new();
        while seen.len() < count {
            if let Some(Report::Started {
                scheduled, started, ..
            }) = reports.recv().await
            {
                seen.push((scheduled, started));
            }
        }
        seen
    }

    #[tokio::test(start_paused = true)]
    async fn a_day_of_hourly_runs_starts_each_exactly_on_its_instant() {
        let (engine, mut reports, stop) = start();
        engine.upsert(hourly(None)).await;
        let seen = starts(&mut reports, 24).await;
        for (n, (scheduled, started)) in seen.into_iter().enumerate() {
            assert_eq!(scheduled, t(n as i64 + 1));
            assert_eq!(started, scheduled, "no lag by the injected clock");
        }
        stop.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn after_a_long_outage_the_newest_instant_runs_at_once() {
        let (engine, mut reports, stop) = start();
        // Last run 30 days ago (720 instants), by a clock that reads t(0) now.
        engine.upsert(hourly(Some(t(-720)))).await;
        let (mut started, mut missed) = (None, None);
        while started.is_none() || missed.is_none() {
            match reports.recv().await {
                Some(Report::Started {
                    scheduled,
                    started: at,
                    ..
                }) => started = Some((scheduled, at)),
                Some(Report::Missed { count, reason, .. }) => missed = Some((count, reason)),
                Some(_) => {}
                None => panic!("the engine stopped"),
            }
        }
        assert_eq!(started, Some((t(0), t(0))), "the newest instant, at once");
        let missed = missed.unwrap();
        assert_eq!(missed.0, 719, "{}", missed.1);
        stop.cancel();
    }

    /// Out of order, a newer leader taking over between two claims resumes after the later
    /// instant and never counts the earlier one (the fault storm found it: seed 0x2910).
    #[tokio::test(start_paused = true)]
    async fn a_slow_claim_keeps_the_task_s_later_instants_behind_it() {
        let ledger = Arc::new(TestLedger::new().first_claim_takes(Duration::from_millis(2500)));
        let (engine, mut reports, stop) = start_with(ledger.clone());
        let mut task = hourly(None);
        task.schedule =
            Schedule::interval(Duration::from_secs(1), IntervalAnchor::Start(t(0))).unwrap();
        engine.upsert(task).await;
        let seen = starts(&mut reports, 4).await;
        let claimed = ledger.claimed.lock().unwrap().clone();
        let mut sorted = claimed.clone();
        sorted.sort();
        assert_eq!(claimed, sorted, "claims reached the ledger out of order");
        assert_eq!(seen[0].0, t(0) + chrono::Duration::seconds(1));
        stop.cancel();
    }

    /// Batches waiting behind a slow claim when the term ends claim nothing: the next term
    /// resumes after the newest record and counts their instants, while a claim landing after
    /// misses marked under no term would hide them (the storm with Redis failovers found it: a
    /// leader frozen across a Lease deletion).
    #[tokio::test(start_paused = true)]
    async fn batches_waiting_when_the_term_ends_claim_nothing() {
        let ledger = Arc::new(TestLedger::new().first_claim_takes(Duration::from_millis(2500)));
        let (term, leader) = watch::channel(Terms::all(Term::single("test")));
        let (engine, _reports, stop) = start_leading(ledger.clone(), leader);
        let mut task = hourly(None);
        task.schedule =
            Schedule::interval(Duration::from_secs(1), IntervalAnchor::Start(t(0))).unwrap();
        engine.upsert(task).await;
        // The first claim (1 s) takes until 3.5 s; the timer fired at 2 and 3 meanwhile.
        tokio::time::sleep(Duration::from_millis(3200)).await;
        term.send_replace(Terms::default());
        tokio::time::sleep(Duration::from_secs(3)).await;
        let claimed = ledger.claimed.lock().unwrap().clone();
        let first = t(0) + chrono::Duration::seconds(1);
        assert_eq!(claimed, [first], "claims of a term that had ended");
        stop.cancel();
    }

    /// A replica runs the tasks of the shards it holds, no other; a shard it gains has its
    /// tasks taken over (the ledger asked first), one it loses stops at once.
    #[tokio::test(start_paused = true)]
    async fn only_the_tasks_of_the_shards_held_run() {
        let ledger = Arc::new(TestLedger::new());
        let (mine, theirs) = ("a", "foobar"); // shards 0xaf and 0x85
        assert_ne!(Shard::of(mine), Shard::of(theirs));
        let term = Term::single("test");
        let held =
            |uids: &[&str]| Terms::of_shards(uids.iter().map(|u| (Shard::of(u), term.clone())));
        let (terms, leader) = watch::channel(held(&[mine]));
        let (engine, _reports, stop) = start_leading(ledger.clone(), leader);
        // Both every second, `theirs` half a second later: its instants end in .5.
        for (uid, offset) in [(mine, 0), (theirs, 500)] {
            let mut task = hourly(None);
            task.id = TaskId::new(TaskKey::new("ns", uid), uid);
            let anchor = t(0) + chrono::Duration::milliseconds(offset);
            task.schedule =
                Schedule::interval(Duration::from_secs(1), IntervalAnchor::Start(anchor)).unwrap();
            engine.upsert(task).await;
        }
        let claimed = || -> Vec<i64> {
            let claimed = ledger.claimed.lock().unwrap();
            claimed
                .iter()
                .map(|at| (*at - t(0)).num_milliseconds())
                .collect()
        };
        tokio::time::sleep(Duration::from_millis(2200)).await;
        assert_eq!(claimed(), [1000, 2000], "only the held shard's task");
        terms.send_replace(held(&[theirs]));
        tokio::time::sleep(Duration::from_secs(2)).await;
        let after = claimed();
        assert!(
            after[2..].iter().all(|ms| ms % 1000 == 500) && after.len() >= 4,
            "the shard lost stops, the one gained runs: {after:?}"
        );
        stop.cancel();
    }

    /// A task of a shard another replica holds keeps no timer once it came due (each replica
    /// fires only its share); when its shard comes, it resumes at the next instant from then,
    /// not at those it slept through.
    #[tokio::test(start_paused = true)]
    async fn another_replica_s_task_sleeps_until_its_shard_comes() {
        let (terms, leader) = watch::channel(Terms::default());
        let (mut engine, _handle, _workers, _reports) = build(memory_ledger(), leader);
        engine.upsert(hourly(None), t(0));
        assert_eq!(engine.timers.len(), 1);
        engine.fire_due(t(1));
        assert!(
            engine.timers.is_empty(),
            "a timer for another replica's task"
        );
        tokio::time::advance(Duration::from_secs(2 * 3600 + 60)).await;
        let term = Term::single("test");
        terms.send_replace(Terms::all(term.clone()));
        engine.on_terms(Terms::all(term));
        let answer = engine.took_over.1.recv().await.unwrap();
        engine.apply_take_over(answer);
        let timers: Vec<DateTime<Utc>> = engine.timers.keys().map(|(at, _)| *at).collect();
        assert_eq!(timers, [t(3)]);
    }
}
