//! The runs waiting and in flight, per task: the queue bound, each task's concurrency policy
//! at submission, and whose turn it is when a worker is free.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;
use tracing::info;

use super::cancel::{Cancel, CancelReason};
use super::{Action, Load, RunRequest, RunSpec, missed};
use crate::clock::Clock;
use crate::policy::ConcurrencyPolicy;
use crate::run::{MissKind, Report, ReportSink, RunId, TaskId};

pub(super) struct Shared {
    pub(super) state: Mutex<State>,
    /// Wakes the dispatcher: a run was queued or a run finished.
    pub(super) changed: Notify,
    /// Wakes whoever waits for a task's runs to leave the queue
    /// ([`Executor::wait_for_room`](super::Executor::wait_for_room)).
    pub(super) left_queue: Notify,
    pub(super) queue_size: usize,
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
    pub(super) tasks: HashMap<TaskId, TaskRuns>,
    /// Tasks with waiting runs, in turn order.
    pub(super) turns: Turns,
    /// Workers held per namespace (runs in flight but those of Jobs, which hold none while
    /// their Job runs).
    pub(super) busy: HashMap<String, usize>,
    /// Runs waiting, over all tasks.
    pub(super) waiting: usize,
    pub(super) closed: bool,
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
}

/// Whose turn it is when a worker is free: namespaces take turns, then the tasks within each,
/// so a namespace with a hundred tasks due gets no more turns than one with a single task.
#[derive(Default)]
pub(super) struct Turns {
    namespaces: VecDeque<String>,
    tasks: HashMap<String, VecDeque<TaskId>>,
}

impl Turns {
    /// Tasks waiting for a turn.
    pub(super) fn len(&self) -> usize {
        self.tasks.values().map(VecDeque::len).sum()
    }

    /// `task` waits for a turn, after the others of its namespace; a namespace new to the
    /// rotation comes after the others.
    pub(super) fn push_back(&mut self, task: TaskId) {
        let namespace = task.key.namespace.clone();
        let queue = self.tasks.entry(namespace.clone()).or_default();
        if queue.is_empty() {
            self.namespaces.push_back(namespace);
        }
        queue.push_back(task);
    }

    /// The next task in turn: the first of the namespace whose turn it is, which then goes
    /// after the others.
    pub(super) fn pop_front(&mut self) -> Option<TaskId> {
        let namespace = self.namespaces.pop_front()?;
        let queue = self.tasks.get_mut(&namespace)?;
        let task = queue.pop_front();
        if queue.is_empty() {
            self.tasks.remove(&namespace);
        } else {
            self.namespaces.push_back(namespace);
        }
        task
    }

    pub(super) fn remove(&mut self, task: &TaskId) {
        let namespace = &task.key.namespace;
        if let Some(queue) = self.tasks.get_mut(namespace) {
            queue.retain(|id| id != task);
            if queue.is_empty() {
                self.tasks.remove(namespace);
                self.namespaces.retain(|n| n != namespace);
            }
        }
    }

    pub(super) fn clear(&mut self) {
        *self = Turns::default();
    }
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
        if state.waiting >= self.queue_size {
            let reason = format!(
                "the run queue is full ({} runs waiting for a worker)",
                state.waiting
            );
            return Err((MissKind::QueueFull, reason));
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
        // An adopted run is in flight already (its Job exists): no policy can refuse it.
        if run.sequential || run.adopted {
            return Ok(());
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
        match run.spec.concurrency {
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
        }
    }

    /// The next run to start, taking tasks in turn: the task's starting deadline is checked
    /// and its policy allows a start (a catch-up run waits for the previous one; `Forbid` and
    /// `Replace` wait for a cancelled run to leave).
    pub(super) fn next_run(&self, reports: &mut Vec<Report>) -> Option<(RunRequest, Cancel)> {
        let now = self.clock.now();
        let mut state = self.lock();
        let state = &mut *state;
        for _ in 0..state.turns.len() {
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
            let holds_worker = !matches!(run.spec.action, Action::Job(_));
            let namespace_full = holds_worker
                && state.busy.get(&id.key.namespace).copied().unwrap_or(0)
                    >= self.namespace_workers.load(Ordering::Relaxed);
            if runs.active.len() + runs.elsewhere.len() >= limit || namespace_full {
                state.turns.push_back(id);
                continue;
            }
            let run = runs.waiting.pop_front()?;
            state.waiting -= 1;
            self.left_queue.notify_waiters();
            let cancel = Cancel {
                outlives_process: !holds_worker,
                ..Cancel::default()
            };
            runs.active.push((run.run_id.clone(), cancel.clone()));
            if holds_worker {
                *state.busy.entry(id.key.namespace.clone()).or_default() += 1;
            }
            if runs.waiting.is_empty() {
                runs.has_turn = false;
            } else {
                state.turns.push_back(id);
            }
            return Some((run, cancel));
        }
        None
    }

    /// A run left the worker pool.
    pub(super) fn finished(&self, task: &TaskId, run_id: &RunId) {
        {
            let mut state = self.lock();
            let mut freed = false;
            if let Some(runs) = state.tasks.get_mut(task) {
                runs.active.retain(|(id, cancel)| {
                    freed |= id == run_id && !cancel.outlives_process;
                    id != run_id
                });
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
    use crate::executor::fixtures::{executor, request};
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
        assert_eq!(started.task.uid, "uid-2");
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
    async fn a_namespace_holds_at_most_its_share_of_workers() {
        let (executor, _reports) = executor();
        executor.limit_workers_per_namespace(1);
        for (namespace, name) in [("a", "1"), ("a", "2"), ("b", "1")] {
            executor.submit(run_of(namespace, name));
        }
        let mut missed = Vec::new();
        let mut next = || executor.shared.next_run(&mut missed).map(|(run, _)| run);
        let first = next().unwrap();
        assert_eq!(first.task.key.to_string(), "a/1");
        assert_eq!(next().unwrap().task.key.to_string(), "b/1");
        assert!(next().is_none(), "a/2 waits while a/1 holds a's one worker");
        executor.shared.finished(&first.task, &first.run_id);
        assert_eq!(next().unwrap().task.key.to_string(), "a/2");
    }
}
