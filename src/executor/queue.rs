//! The runs waiting and in flight, per task: the queue bound, each task's concurrency policy
//! at submission, and whose turn it is when a worker is free.

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use tokio::sync::Notify;
use tracing::{info, warn};

use super::cancel::{Cancel, CancelReason};
use super::{Action, Load, RunRequest, RunSpec, missed};
use crate::clock::Clock;
use crate::policy::ConcurrencyPolicy;
use crate::run::{MissKind, Report, ReportSink, RunId, TaskId, TaskMap};

pub(super) struct Shared {
    pub(super) state: Mutex<State>,
    /// Wakes an idle worker: a run was queued or a run finished.
    pub(super) changed: Notify,
    /// Wakes whoever waits for a task's runs to leave the queue
    /// ([`Executor::wait_for_room`](super::Executor::wait_for_room)).
    pub(super) left_queue: Notify,
    pub(super) queue_size: usize,
    /// Runs the full queue refused (or displaced), since start.
    pub(super) refused: AtomicU64,
    /// The most runs one task may have in flight: half the workers, at least one.
    pub(super) per_task_workers: usize,
    /// The most runs one namespace may have in flight or waiting (`limits`); 0: no cap.
    pub(super) per_namespace: AtomicUsize,
    /// The most workers one namespace may hold at once (`limits.max_workers_per_namespace`):
    /// its other runs wait, so one tenant's slow targets never hold every worker.
    pub(super) namespace_workers: AtomicUsize,
    pub(super) max_workers: usize,
    /// Job runs in flight that hold no worker (their Job was created).
    pub(super) job_waits: Arc<AtomicUsize>,
    pub(super) sink: Arc<dyn ReportSink>,
    pub(super) clock: Clock,
}

#[derive(Default)]
pub(super) struct State {
    pub(super) tasks: TaskMap<TaskId, TaskRuns>,
    /// Tasks with waiting runs, in turn order.
    pub(super) turns: Turns,
    /// Workers held per namespace (runs in flight but those of Jobs, which hold none while
    /// their Job runs).
    pub(super) busy: HashMap<String, usize>,
    /// Runs waiting, over all tasks.
    pub(super) waiting: usize,
    pub(super) refusals: Refusals,
    pub(super) closed: bool,
}

/// How often the full queue refused each task, and who may be displaced (see
/// [`Shared::make_room`]).
#[derive(Default)]
pub(super) struct Refusals {
    /// Runs refused per task (tasks never refused have no entry; dropped with the task).
    times: TaskMap<TaskId, u64>,
    /// While the queue is full (until half of it drained): the tasks with a run that may be
    /// displaced, by times refused, then newest first. Each task's key is in its
    /// [`TaskRuns::candidate`].
    candidates: BTreeMap<(u64, Reverse<u64>), TaskId>,
    ranked: bool,
    sequence: u64,
    /// When the queue was last said to be full.
    warned: Option<DateTime<Utc>>,
}

impl Refusals {
    /// Ranks every task with a run that may be displaced, once per time the queue is full.
    fn rank(&mut self, tasks: &mut TaskMap<TaskId, TaskRuns>) {
        if std::mem::replace(&mut self.ranked, true) {
            return;
        }
        for (id, runs) in tasks.iter_mut() {
            self.enlist(id, runs);
        }
    }

    /// `task`'s runs changed: it is a candidate while it has a run that may be displaced.
    pub(super) fn enlist(&mut self, task: &TaskId, runs: &mut TaskRuns) {
        if let Some(key) = runs.candidate.take() {
            self.candidates.remove(&key);
        }
        if self.ranked && runs.waiting.iter().any(|run| !run.adopted) {
            self.sequence += 1;
            let times = self.times.get(task).copied().unwrap_or(0);
            let key = (times, Reverse(self.sequence));
            self.candidates.insert(key, task.clone());
            runs.candidate = Some(key);
        }
    }

    fn refuse(&mut self, task: &TaskId, runs: &mut TaskRuns) {
        *self.times.entry(task.clone()).or_default() += 1;
        self.enlist(task, runs);
    }

    /// Half the queue drained: the ranking is rebuilt the next time it is full.
    pub(super) fn relax(&mut self, tasks: &mut TaskMap<TaskId, TaskRuns>) {
        if std::mem::take(&mut self.ranked) {
            self.candidates.clear();
            for runs in tasks.values_mut() {
                runs.candidate = None;
            }
        }
    }

    /// A task is gone: its refusals with it.
    pub(super) fn forget(&mut self, task: &TaskId) {
        self.times.remove(task);
    }
}

#[derive(Default)]
pub(super) struct TaskRuns {
    pub(super) waiting: VecDeque<RunRequest>,
    pub(super) active: Vec<(RunId, Cancel)>,
    /// Runs a previous leader started that may still be in flight in its process: they count
    /// for the concurrency policy until
    /// [`Executor::release_elsewhere`](super::Executor::release_elsewhere).
    pub(super) elsewhere: Vec<RunId>,
    pub(super) has_turn: bool,
    /// Its key among the runs the full queue may displace ([`Refusals::candidates`]).
    pub(super) candidate: Option<(u64, Reverse<u64>)>,
}

/// Whose turn it is when a worker is free: lanes take turns, then the tasks within each. A lane
/// is a namespace's tasks whose runs hold a worker, or its tasks whose runs do not (Jobs): a
/// namespace with a hundred tasks due gets no more turns than one with a single task, and a lane
/// whose namespace has all its workers busy is passed over whole, its tasks unseen (with 10 000
/// tasks of one namespace waiting, looking at each one per free worker stalled the workers).
#[derive(Default)]
pub(super) struct Turns {
    lanes: VecDeque<Lane>,
    tasks: HashMap<Lane, VecDeque<TaskId>>,
}

/// A namespace's tasks whose runs hold a worker, or those whose runs do not.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) struct Lane {
    pub(super) namespace: String,
    pub(super) holds_worker: bool,
}

impl Turns {
    /// Tasks waiting for a turn.
    pub(super) fn len(&self) -> usize {
        self.tasks.values().map(VecDeque::len).sum()
    }

    /// Lanes with a task waiting.
    fn lanes(&self) -> usize {
        self.lanes.len()
    }

    /// `task` waits for a turn in its lane, after the others there; a lane new to the rotation
    /// comes after the others.
    pub(super) fn push_back(&mut self, task: TaskId, holds_worker: bool) {
        let lane = Lane {
            namespace: task.key.namespace.clone(),
            holds_worker,
        };
        let queue = self.tasks.entry(lane.clone()).or_default();
        if queue.is_empty() {
            self.lanes.push_back(lane);
        }
        queue.push_back(task);
    }

    /// The lane whose turn it is.
    fn front(&self) -> Option<&Lane> {
        self.lanes.front()
    }

    /// The lane whose turn it is goes after the others, its tasks untouched.
    fn pass(&mut self) {
        self.lanes.rotate_left(1.min(self.lanes.len()));
    }

    /// The next task in turn: the first of the lane whose turn it is, which then goes after
    /// the others.
    pub(super) fn pop_front(&mut self) -> Option<TaskId> {
        let lane = self.lanes.pop_front()?;
        let queue = self.tasks.get_mut(&lane)?;
        let task = queue.pop_front();
        if queue.is_empty() {
            self.tasks.remove(&lane);
        } else {
            self.lanes.push_back(lane);
        }
        task
    }

    pub(super) fn remove(&mut self, task: &TaskId) {
        for holds_worker in [true, false] {
            let lane = Lane {
                namespace: task.key.namespace.clone(),
                holds_worker,
            };
            if let Some(queue) = self.tasks.get_mut(&lane) {
                queue.retain(|id| id != task);
                if queue.is_empty() {
                    self.tasks.remove(&lane);
                    self.lanes.retain(|l| *l != lane);
                }
            }
        }
    }

    pub(super) fn clear(&mut self) {
        *self = Turns::default();
    }
}

/// Whether the run takes a worker while it runs (a Job run does not: its Job does the work).
pub(super) fn holds_worker(run: &RunRequest) -> bool {
    !matches!(run.spec.action, Action::Job(_))
}

impl TaskRuns {
    pub(super) fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.active.is_empty() && self.elsewhere.is_empty()
    }
}

impl Shared {
    pub(super) fn load(&self) -> Load {
        let state = self.lock();
        Load {
            waiting: state.waiting,
            queue_size: self.queue_size,
            busy_workers: state
                .tasks
                .values()
                .map(|runs| runs.active.len())
                .sum::<usize>()
                .saturating_sub(self.job_waits.load(Ordering::Relaxed)),
            max_workers: self.max_workers,
            refused: self.refused.load(Ordering::Relaxed),
        }
    }

    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Reports outside the lock: the sink has a lock of its own.
    pub(super) fn publish(&self, reports: Vec<Report>) {
        for report in reports {
            self.sink.record(report);
        }
    }

    /// The most runs of this task that may be in flight or waiting at once.
    fn task_limit(&self, spec: &RunSpec) -> usize {
        match spec.concurrency {
            // A Job run holds no worker while its Job runs.
            ConcurrencyPolicy::Allow if matches!(spec.action, Action::Job(_)) => {
                spec.max_concurrent_runs.max(1) as usize
            }
            ConcurrencyPolicy::Allow => {
                (spec.max_concurrent_runs.max(1) as usize).min(self.per_task_workers)
            }
            ConcurrencyPolicy::Forbid | ConcurrencyPolicy::Replace => 1,
        }
    }

    /// Applies the queue bound and the concurrency policy; `Err` is why the run is missed.
    pub(super) fn admit(
        &self,
        state: &mut State,
        run: &RunRequest,
        reports: &mut Vec<Report>,
    ) -> Result<(), (MissKind, String)> {
        if state.closed {
            return Err((MissKind::Shutdown, "chronflow is shutting down".into()));
        }
        // An adopted run is in flight already (its Job exists): no bound can refuse it.
        if run.adopted {
            return Ok(());
        }
        let most = self.per_namespace.load(Ordering::Relaxed);
        if most > 0 {
            let namespace = &run.task.key.namespace;
            let busy: usize = state
                .tasks
                .iter()
                .filter(|(id, _)| &id.key.namespace == namespace)
                .map(|(_, runs)| runs.active.len() + runs.waiting.len() + runs.elsewhere.len())
                .sum();
            if busy >= most {
                let reason = format!(
                    "namespace {namespace} has {busy} runs in flight or waiting (the most \
                     allowed: limits.max_runs_per_namespace {most})"
                );
                return Err((MissKind::Concurrency, reason));
            }
        }
        let runs = state.tasks.entry(run.task.clone()).or_default();
        if run.sequential {
            return self.make_room(state, &run.task, reports);
        }
        let busy = runs.active.len() + runs.waiting.len() + runs.elsewhere.len();
        if let (ConcurrencyPolicy::Replace, Some(held)) =
            (run.spec.concurrency, runs.elsewhere.first())
        {
            let reason = format!(
                "run {held}, started by the previous leader, may still be in flight and cannot \
                 be replaced from here (concurrencyPolicy Replace)"
            );
            return Err((MissKind::Concurrency, reason));
        }
        let allowed = match run.spec.concurrency {
            ConcurrencyPolicy::Forbid if busy > 0 => {
                let previous = runs
                    .active
                    .first()
                    .map(|(id, _)| id)
                    .or(runs.elsewhere.first())
                    .or(runs.waiting.front().map(|r| &r.run_id));
                let previous = previous.map(ToString::to_string).unwrap_or_default();
                let reason =
                    format!("previous run {previous} still active (concurrencyPolicy Forbid)");
                Err((MissKind::Concurrency, reason))
            }
            ConcurrencyPolicy::Replace => {
                for (old, handle) in &runs.active {
                    info!(replaced = %old, by = %run.run_id, "replacing run still in flight");
                    handle.cancel(CancelReason::Replaced(run.run_id.clone()));
                }
                let dropped: Vec<RunRequest> = runs.waiting.drain(..).collect();
                state.refusals.enlist(&run.task, runs);
                state.waiting -= dropped.len();
                self.left_queue.notify_waiters();
                let reason = format!("replaced by {} before it started", run.run_id);
                reports.extend(
                    dropped
                        .iter()
                        .map(|old| missed(old, MissKind::Concurrency, reason.clone())),
                );
                Ok(())
            }
            ConcurrencyPolicy::Allow if busy >= self.task_limit(&run.spec) => {
                let reason = format!(
                    "{busy} runs of the task already in flight or waiting (the most allowed: {})",
                    self.task_limit(&run.spec)
                );
                Err((MissKind::Concurrency, reason))
            }
            _ => Ok(()),
        };
        allowed?;
        self.make_room(state, &run.task, reports)
    }

    /// Room in the queue for a run of `task`. When it is full, refusals go round the tasks:
    /// the run takes the place of the newest waiting run of a task refused fewer times than
    /// `task` (that run is missed instead), else it is refused itself. No task is refused
    /// again while a task competing for the queue was refused less often, whatever order the
    /// runs come in.
    fn make_room(
        &self,
        state: &mut State,
        task: &TaskId,
        reports: &mut Vec<Report>,
    ) -> Result<(), (MissKind, String)> {
        if state.waiting < self.queue_size {
            return Ok(());
        }
        self.refused.fetch_add(1, Ordering::Relaxed);
        self.warn_queue_full(state);
        let reason = format!(
            "the run queue is full ({} runs waiting for a worker; queue_size {})",
            state.waiting, self.queue_size
        );
        let State {
            tasks,
            refusals,
            waiting,
            ..
        } = state;
        let times = refusals.times.get(task).copied().unwrap_or(0);
        refusals.rank(tasks);
        // Candidates always have a run that may be displaced (`Refusals::enlist` follows every
        // change of a task's waiting runs); were one stale, the newcomer is refused instead.
        let spared = refusals
            .candidates
            .first_key_value()
            .filter(|((fewer, _), _)| *fewer < times)
            .map(|(_, spared)| spared.clone());
        if let Some(spared) = spared
            && let Some(runs) = tasks.get_mut(&spared)
            && let Some(newest) = runs.waiting.iter().rposition(|r| !r.adopted)
            && let Some(evicted) = runs.waiting.remove(newest)
        {
            // Its turn, if it has no run left, is dropped when a worker reaches it: taking it
            // out of its lane now would cost the lane's length per displaced run.
            *waiting -= 1;
            self.left_queue.notify_waiters();
            refusals.refuse(&spared, runs);
            let why = format!("{reason}; its place went to a run of {task}, refused more often");
            reports.push(missed(&evicted, MissKind::QueueFull, why));
            return Ok(());
        }
        let runs = tasks.entry(task.clone()).or_default();
        refusals.refuse(task, runs);
        Err((MissKind::QueueFull, reason))
    }

    /// At most once a minute: the queue is too small for the bursts it gets.
    fn warn_queue_full(&self, state: &mut State) {
        let now = self.clock.now();
        if state
            .refusals
            .warned
            .is_some_and(|at| now - at < chrono::Duration::minutes(1))
        {
            return;
        }
        state.refusals.warned = Some(now);
        warn!(
            queue_size = self.queue_size,
            max_workers = self.max_workers,
            refused = self.refused.load(Ordering::Relaxed),
            "the run queue is full: runs are refused in turn and counted missed; raise \
             queue_size (or max_workers) for the bursts this load makes"
        );
    }

    /// The next run to start, taking tasks in turn: the task's starting deadline is checked
    /// and its policy allows a start (a catch-up run waits for the previous one; `Forbid` and
    /// `Replace` wait for a cancelled run to leave).
    pub(super) fn next_run(&self, reports: &mut Vec<Report>) -> Option<(RunRequest, Cancel)> {
        let now = self.clock.now();
        let mut state = self.lock();
        let state = &mut *state;
        let namespace_workers = self.namespace_workers.load(Ordering::Relaxed);
        let (mut tasks_left, mut passed) = (state.turns.len(), 0);
        while tasks_left > 0 {
            let lane = state.turns.front()?;
            let busy = state.busy.get(&lane.namespace).copied().unwrap_or(0);
            if lane.holds_worker && busy >= namespace_workers {
                passed += 1;
                if passed >= state.turns.lanes() {
                    return None;
                }
                state.turns.pass();
                continue;
            }
            (tasks_left, passed) = (tasks_left - 1, 0);
            let id = state.turns.pop_front()?;
            let Some(runs) = state.tasks.get_mut(&id) else {
                continue;
            };
            while let Some(run) = runs.waiting.front() {
                let late = (now - run.due).to_std().unwrap_or_default();
                match run.spec.starting_deadline {
                    // An adopted run started long ago, in another process.
                    Some(deadline) if late > deadline && !run.adopted => {
                        let reason = format!(
                            "could not start within the starting deadline ({late:.1?} late)"
                        );
                        reports.push(missed(run, MissKind::Deadline, reason));
                        runs.waiting.pop_front();
                        state.waiting -= 1;
                        self.left_queue.notify_waiters();
                    }
                    _ => break,
                }
            }
            state.refusals.enlist(&id, runs);
            let Some(run) = runs.waiting.front() else {
                runs.has_turn = false;
                if runs.is_idle() {
                    state.tasks.remove(&id);
                }
                continue;
            };
            let limit = if run.adopted {
                self.per_task_workers
            } else if run.sequential {
                1
            } else {
                self.task_limit(&run.spec)
            };
            let takes_worker = holds_worker(run);
            let namespace_full = takes_worker
                && state.busy.get(&id.key.namespace).copied().unwrap_or(0) >= namespace_workers;
            if runs.active.len() + runs.elsewhere.len() >= limit || namespace_full {
                state.turns.push_back(id, takes_worker);
                continue;
            }
            let run = runs.waiting.pop_front()?;
            state.waiting -= 1;
            state.refusals.enlist(&id, runs);
            self.left_queue.notify_waiters();
            let cancel = Cancel {
                outlives_process: !takes_worker,
                ..Cancel::default()
            };
            runs.active.push((run.run_id.clone(), cancel.clone()));
            if takes_worker {
                *state.busy.entry(id.key.namespace.clone()).or_default() += 1;
            }
            if runs.waiting.is_empty() {
                runs.has_turn = false;
            } else {
                let next_holds = runs.waiting.front().is_some_and(holds_worker);
                state.turns.push_back(id, next_holds);
            }
            if state.waiting <= self.queue_size / 2 {
                state.refusals.relax(&mut state.tasks);
            }
            if state.waiting > 0 {
                // Another idle worker takes the next one: the notice that woke this one may
                // have stood for several runs.
                self.changed.notify_one();
            }
            return Some((run, cancel));
        }
        None
    }

    /// A run left the worker pool.
    /// A run handed out by [`Shared::next_run`] ended; `cancel` is the handle it was handed
    /// out with. A run may be handed out twice under one id (a leader that lost its term and
    /// won the next re-runs the claims it had not started): only this one's place is freed.
    pub(super) fn finished(&self, task: &TaskId, run_id: &RunId, cancel: &Cancel) {
        {
            let mut state = self.lock();
            let mut freed = false;
            if let Some(runs) = state.tasks.get_mut(task) {
                if let Some(at) = runs
                    .active
                    .iter()
                    .position(|(id, theirs)| id == run_id && theirs.same(cancel))
                {
                    freed = !runs.active.remove(at).1.outlives_process;
                }
                if runs.is_idle() {
                    state.tasks.remove(task);
                }
            }
            let namespace = &task.key.namespace;
            if freed && let Some(busy) = state.busy.get_mut(namespace) {
                *busy -= 1;
                if *busy == 0 {
                    state.busy.remove(namespace);
                }
            }
        }
        self.changed.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use chrono::Utc;

    use crate::executor::Retire;
    use crate::executor::fixtures::{executor, executor_queueing, executor_with, request};
    use crate::run::{Report, RunId};

    #[tokio::test]
    async fn the_starting_deadline_counts_from_the_jittered_start() {
        let (executor, _reports) = executor();
        let now = Utc::now();
        let deadline = Some(Duration::from_secs(1));
        // Scheduled 10 s ago with a 10 s jitter: due now, so within its 1 s deadline.
        executor.submit(request(now - chrono::Duration::seconds(10), now, deadline));
        let mut missed = Vec::new();
        assert!(
            executor.shared.next_run(&mut missed).is_some(),
            "{missed:?}"
        );
    }

    #[tokio::test]
    async fn a_run_the_previous_leader_may_still_run_holds_forbid_until_released() {
        let (executor, mut reports) = executor();
        let now = Utc::now();
        let first = request(now, now, None); // Forbid
        let task = first.task.clone();
        let theirs = RunId::new(&task, now - chrono::Duration::seconds(1));
        executor.hold_elsewhere(&task, vec![theirs.clone()]);
        executor.submit(first);
        match reports.try_recv() {
            Ok(Report::Missed { reason, .. }) => {
                assert!(reason.contains(theirs.as_str()), "{reason}");
            }
            other => panic!("expected a miss, got {other:?}"),
        }
        executor.release_elsewhere(&task, &[theirs]);
        let later = now + chrono::Duration::seconds(1);
        executor.submit(request(later, later, None));
        assert!(
            reports.try_recv().is_err(),
            "admitted once the hold is released"
        );
        let mut missed = Vec::new();
        assert!(executor.shared.next_run(&mut missed).is_some());
    }

    #[tokio::test]
    async fn a_run_past_its_starting_deadline_is_missed_not_started() {
        let (executor, _reports) = executor();
        let due = Utc::now() - chrono::Duration::seconds(5);
        executor.submit(request(due, due, Some(Duration::from_secs(1))));
        let mut missed = Vec::new();
        assert!(executor.shared.next_run(&mut missed).is_none());
        assert!(
            matches!(&missed[..], [Report::Missed { reason, .. }] if reason.contains("starting deadline")),
            "{missed:?}"
        );
    }

    #[tokio::test]
    async fn a_task_recreated_under_the_same_name_inherits_nothing() {
        let (executor, _reports) = executor();
        let now = Utc::now();
        let old = request(now, now, None);
        executor.submit(old.clone());
        let mut missed = Vec::new();
        assert!(executor.shared.next_run(&mut missed).is_some(), "in flight");
        let mut queued = request(now + chrono::Duration::seconds(1), now, None);
        queued.run_id = RunId::new(&old.task, queued.scheduled);
        // The old object is deleted while one of its runs is in flight; a new one of the same
        // name (another uid) is due at once. Forbid looks at its own runs only.
        executor.retire(&old.task, Retire::Deleted);
        let mut new = queued;
        new.task.uid = "uid-2".into();
        executor.submit(new);
        let (started, _) = executor.shared.next_run(&mut missed).expect("not blocked");
        assert_eq!(&*started.task.uid, "uid-2");
        assert!(missed.is_empty(), "{missed:?}");
    }

    /// A run of task `name` in `namespace`, due now.
    fn run_of(namespace: &str, name: &str) -> crate::executor::RunRequest {
        let now = Utc::now();
        let mut run = request(now, now, None);
        run.task = crate::run::TaskId::new(crate::run::TaskKey::new(namespace, name), "uid");
        run.run_id = RunId::new(&run.task, now);
        run
    }

    /// Submits one run of each task, in `order`, then starts and finishes every run admitted;
    /// returns the tasks refused (their own run, or their waiting run displaced) and checks
    /// each refusal: no task with a run waiting was refused fewer times than the one refused.
    fn burst(
        executor: &crate::executor::Executor,
        reports: &mut tokio::sync::mpsc::UnboundedReceiver<Report>,
        order: &[usize],
        refused: &mut [u64],
    ) -> Vec<usize> {
        let index = |run: &RunId| run.task_id().key.name.parse::<usize>().unwrap();
        let mut now_refused = Vec::new();
        for &task in order {
            executor.submit(run_of("ns", &task.to_string()));
            while let Ok(report) = reports.try_recv() {
                let Report::Missed { run, kind, .. } = report else {
                    continue;
                };
                assert_eq!(kind, crate::run::MissKind::QueueFull);
                let who = index(&run);
                let state = executor.shared.lock();
                for waiting in state.tasks.values().flat_map(|runs| &runs.waiting) {
                    let other = index(&waiting.run_id);
                    assert!(
                        refused[other] >= refused[who],
                        "task {who} refused a {}th time while task {other}, refused {} times, \
                         waits in the queue",
                        refused[who] + 1,
                        refused[other]
                    );
                }
                refused[who] += 1;
                now_refused.push(who);
            }
        }
        let mut missed = Vec::new();
        while let Some((run, cancel)) = executor.shared.next_run(&mut missed) {
            executor.shared.finished(&run.task, &run.run_id, &cancel);
        }
        assert!(missed.is_empty(), "{missed:?}");
        now_refused
    }

    #[tokio::test]
    async fn a_full_queue_refuses_the_tasks_in_turn_so_none_starves() {
        let (executor, mut reports) = executor_queueing(4);
        let mut refused = [0; 10];
        let order: Vec<usize> = (0..10).collect();
        // The same ten tasks due together each second, always in the same order, four places.
        for second in 1..=5 {
            let now_refused = burst(&executor, &mut reports, &order, &mut refused);
            assert_eq!(now_refused.len(), 6, "second {second}: {now_refused:?}");
        }
        // 20 runs in 5 bursts: two each, whoever came first.
        assert_eq!(refused, [3; 10], "refusals per task");
        assert_eq!(executor.shared.load().refused, 30);
    }

    #[tokio::test]
    async fn refusals_stay_even_whatever_order_the_runs_come_in() {
        let (executor, mut reports) = executor_queueing(5);
        let mut refused = [0; 12];
        let mut order: Vec<usize> = (0..12).collect();
        let mut seed = 0x2910_u64;
        for _ in 0..40 {
            // A different order each burst (Fisher–Yates on a small LCG).
            for i in (1..order.len()).rev() {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                order.swap(i, (seed >> 33) as usize % (i + 1));
            }
            burst(&executor, &mut reports, &order, &mut refused);
        }
        let (fewest, most) = (refused.iter().min().unwrap(), refused.iter().max().unwrap());
        assert!(most - fewest <= 2, "refusals per task: {refused:?}");
    }

    #[tokio::test]
    async fn a_displaced_run_says_which_run_took_its_place() {
        let (executor, mut reports) = executor_queueing(1);
        executor.submit(run_of("ns", "a"));
        executor.submit(run_of("ns", "b")); // refused: b's first refusal, a has none
        let Ok(Report::Missed { reason, .. }) = reports.try_recv() else {
            panic!("b refused");
        };
        assert!(reason.contains("queue_size 1"), "{reason}");
        executor.submit(run_of("ns", "b")); // a, never refused, gives way
        match reports.try_recv() {
            Ok(Report::Missed { run, reason, .. }) => {
                assert_eq!(run.task_id().key.name, "a");
                assert!(
                    reason.contains("its place went to a run of ns/b"),
                    "{reason}"
                );
            }
            other => panic!("expected a's run displaced, got {other:?}"),
        }
        let mut missed = Vec::new();
        let (started, _) = executor.shared.next_run(&mut missed).unwrap();
        assert_eq!(started.task.key.name, "b");
    }

    #[tokio::test]
    async fn free_workers_go_to_namespaces_in_turn_then_to_their_tasks() {
        let (executor, _reports) = executor();
        executor.limit_workers_per_namespace(10);
        for (namespace, name) in [("a", "1"), ("a", "2"), ("a", "3"), ("b", "1")] {
            executor.submit(run_of(namespace, name));
        }
        let mut missed = Vec::new();
        let mut order = Vec::new();
        while let Some((run, _)) = executor.shared.next_run(&mut missed) {
            order.push(run.task.key.to_string());
        }
        assert_eq!(order, ["a/1", "b/1", "a/2", "a/3"]);
    }

    #[tokio::test]
    async fn a_namespace_whose_workers_are_busy_is_passed_over_without_looking_at_its_tasks() {
        let (executor, _reports) = executor();
        executor.limit_workers_per_namespace(1);
        executor.submit(run_of("a", "1"));
        let mut missed = Vec::new();
        let (first, first_cancel) = executor.shared.next_run(&mut missed).unwrap();
        assert_eq!(first.task.key.to_string(), "a/1");
        // a's one worker is busy: its waiting runs are not looked at, even one whose starting
        // deadline has passed (a lane of 10 000 tasks was scanned per free worker before).
        let mut late = run_of("a", "2");
        late.due -= chrono::Duration::seconds(10);
        late.spec = std::sync::Arc::new(crate::executor::fixtures::http_spec(
            "http://127.0.0.1:9/",
            Duration::from_secs(1),
            Some(Duration::from_secs(1)),
        ));
        executor.submit(late);
        executor.submit(run_of("b", "1"));
        let next = executor.shared.next_run(&mut missed).unwrap().0;
        assert_eq!(next.task.key.to_string(), "b/1");
        assert!(executor.shared.next_run(&mut missed).is_none());
        assert!(missed.is_empty(), "a's lane was looked at: {missed:?}");
        // A worker of a's is free: its late run is looked at then, and missed.
        executor
            .shared
            .finished(&first.task, &first.run_id, &first_cancel);
        assert!(executor.shared.next_run(&mut missed).is_none());
        assert!(
            matches!(&missed[..], [Report::Missed { reason, .. }] if reason.contains("starting deadline")),
            "{missed:?}"
        );
    }

    #[tokio::test]
    async fn a_namespace_holds_at_most_its_share_of_workers() {
        let (executor, _reports) = executor();
        executor.limit_workers_per_namespace(1);
        for (namespace, name) in [("a", "1"), ("a", "2"), ("b", "1")] {
            executor.submit(run_of(namespace, name));
        }
        let mut missed = Vec::new();
        let mut next = || executor.shared.next_run(&mut missed);
        let (first, first_cancel) = next().unwrap();
        assert_eq!(first.task.key.to_string(), "a/1");
        assert_eq!(next().unwrap().0.task.key.to_string(), "b/1");
        assert!(next().is_none(), "a/2 waits while a/1 holds a's one worker");
        executor
            .shared
            .finished(&first.task, &first.run_id, &first_cancel);
        assert_eq!(next().unwrap().0.task.key.to_string(), "a/2");
    }

    #[tokio::test]
    async fn a_run_handed_out_twice_frees_only_its_own_place_when_one_ends() {
        // A leader that lost its term and won the next one re-runs the runs it had claimed but
        // not started, under the same ids: the refused one's end must not free the other's
        // place (three runs of a task allowed two were in flight at once).
        let (executor, mut reports) = executor_with(4, 10);
        let allow_two = |at| {
            let mut run = request(at, at, None);
            let spec = std::sync::Arc::make_mut(&mut run.spec);
            spec.concurrency = crate::policy::ConcurrencyPolicy::Allow;
            spec.max_concurrent_runs = 2;
            run
        };
        let now = Utc::now();
        let mut missed = Vec::new();
        executor.submit(allow_two(now));
        let (refused, refused_cancel) = executor.shared.next_run(&mut missed).unwrap();
        executor.submit(allow_two(now));
        let (again, _) = executor.shared.next_run(&mut missed).unwrap();
        assert_eq!(refused.run_id, again.run_id);
        executor
            .shared
            .finished(&refused.task, &refused.run_id, &refused_cancel);
        executor.submit(allow_two(now + chrono::Duration::seconds(1)));
        assert!(executor.shared.next_run(&mut missed).is_some());
        assert!(missed.is_empty(), "{missed:?}");
        executor.submit(allow_two(now + chrono::Duration::seconds(2)));
        match reports.try_recv() {
            Ok(Report::Missed { reason, .. }) => {
                assert!(reason.contains("the most allowed: 2"), "{reason}")
            }
            other => panic!("a third run in flight: {other:?}"),
        }
    }
}
