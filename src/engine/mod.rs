//! The timing engine: one timer queue of every task's next instant. It sleeps until the
//! earliest one (never a polling tick), and when an instant is due it claims the run (dedup),
//! hands it to the executor, and schedules the task's next instant. Free of `kube`: the
//! controller (or standalone mode) feeds it tasks through an [`EngineHandle`].

pub mod catch_up;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::dedup::{Claim, Dedup};
use crate::executor::{Executor, RunRequest, RunSpec};
use crate::policy::CatchUpPolicy;
use crate::run::{Report, RunId, TaskKey};
use crate::schedule::{Schedule, jitter};

/// A validated task, as the engine schedules it.
#[derive(Clone, Debug)]
pub struct EngineTask {
    pub key: TaskKey,
    /// Identity of this incarnation of the task (the object's uid): a task deleted and
    /// re-created under the same name starts a new rhythm.
    pub uid: String,
    pub schedule: Schedule,
    /// Maximum jitter; each instant is delayed by a fixed fraction of it.
    pub jitter: Option<Duration>,
    pub catch_up: CatchUpPolicy,
    /// When the engine first sees the task, instants after this one that are already due are
    /// caught up by `catch_up` (the last scheduled instant from status, or the creation time).
    pub catch_up_from: Option<DateTime<Utc>>,
    pub run: Arc<RunSpec>,
}

enum Command {
    Upsert(Box<EngineTask>),
    Pause(TaskKey),
    Remove(TaskKey),
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
    /// Adds a task or replaces its definition. A changed schedule takes effect from now on:
    /// the next run is the schedule's next instant, with no burst of past ones.
    pub async fn upsert(&self, task: EngineTask) {
        self.send(Command::Upsert(Box::new(task))).await;
    }

    /// Stops firing a task but remembers it, so that resuming continues from then without
    /// replaying the paused period.
    pub async fn pause(&self, task: TaskKey) {
        self.send(Command::Pause(task)).await;
    }

    /// Forgets a task and cancels its runs in flight (deletion, or a spec that became invalid).
    pub async fn remove(&self, task: TaskKey) {
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

/// The engine's state; drive it with [`Engine::run`].
pub struct Engine {
    commands: mpsc::Receiver<Command>,
    tasks: HashMap<TaskKey, Entry>,
    /// (fire time, task): the timer queue, earliest first.
    timers: BTreeSet<(DateTime<Utc>, TaskKey)>,
    executor: Executor,
    dedup: Arc<dyn Dedup>,
    leader: watch::Receiver<bool>,
    reports: mpsc::Sender<Report>,
}

struct Entry {
    /// `None` while paused.
    task: Option<EngineTask>,
    /// The next scheduled instant (before jitter).
    next: Option<DateTime<Utc>>,
    /// When its timer fires (next + jitter).
    fire_at: Option<DateTime<Utc>>,
}

impl Engine {
    /// `leader` gates firing: a replica that is not leader keeps its timers but runs nothing.
    pub fn new(
        executor: Executor,
        dedup: Arc<dyn Dedup>,
        leader: watch::Receiver<bool>,
        reports: mpsc::Sender<Report>,
    ) -> (Engine, EngineHandle) {
        let (tx, rx) = mpsc::channel(1024);
        let engine = Engine {
            commands: rx,
            tasks: HashMap::new(),
            timers: BTreeSet::new(),
            executor,
            dedup,
            leader,
            reports,
        };
        (engine, EngineHandle { commands: tx })
    }

    /// Runs until `shutdown` or until every handle is dropped.
    pub async fn run(mut self, shutdown: CancellationToken) {
        loop {
            let wake = self.timers.first().map(|(at, _)| *at);
            let sleep = async {
                match wake {
                    Some(at) => {
                        let wait = (at - Utc::now()).to_std().unwrap_or_default();
                        tokio::time::sleep(wait).await;
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                command = self.commands.recv() => match command {
                    Some(command) => self.apply(command).await,
                    None => break,
                },
                _ = sleep => self.fire_due(Utc::now()).await,
            }
        }
    }

    async fn apply(&mut self, command: Command) {
        let now = Utc::now();
        match command {
            Command::Upsert(task) => self.upsert(*task, now).await,
            Command::Pause(key) => {
                let entry = self.tasks.entry(key.clone()).or_insert(Entry {
                    task: None,
                    next: None,
                    fire_at: None,
                });
                entry.task = None;
                entry.next = None;
                if let Some(at) = entry.fire_at.take() {
                    self.timers.remove(&(at, key));
                }
            }
            Command::Remove(key) => self.remove(&key),
            Command::Retain { namespace, keep } => {
                let gone: Vec<TaskKey> = self
                    .tasks
                    .keys()
                    .filter(|k| k.is_in(namespace.as_deref()) && !keep.contains(*k))
                    .cloned()
                    .collect();
                for key in gone {
                    debug!(task = %key, "task no longer exists");
                    self.remove(&key);
                }
            }
        }
    }

    fn remove(&mut self, key: &TaskKey) {
        if let Some(entry) = self.tasks.remove(key)
            && let Some(at) = entry.fire_at
        {
            self.timers.remove(&(at, key.clone()));
        }
        self.executor.cancel_task(key);
    }

    async fn upsert(&mut self, task: EngineTask, now: DateTime<Utc>) {
        let key = task.key.clone();
        let next = match self.tasks.get(&key) {
            // Same schedule: keep the rhythm; only what a run does may have changed.
            Some(entry)
                if entry
                    .task
                    .as_ref()
                    .is_some_and(|old| same_timing(old, &task)) =>
            {
                entry.next
            }
            // Edited or resumed: from now on, without replaying anything.
            Some(_) => task.schedule.next_after(now),
            // First sight: instants due since `catch_up_from` are caught up when the timer fires.
            None => match task.catch_up_from {
                Some(from) => task.schedule.next_after(from),
                None => task.schedule.next_after(now),
            },
        };
        let fire_at = next.map(|t| fire_time(&task, t));
        let entry = self.tasks.entry(key.clone()).or_insert(Entry {
            task: None,
            next: None,
            fire_at: None,
        });
        if let Some(old) = entry.fire_at.take() {
            self.timers.remove(&(old, key.clone()));
        }
        entry.task = Some(task);
        entry.next = next;
        entry.fire_at = fire_at;
        if let Some(at) = fire_at {
            self.timers.insert((at, key.clone()));
        }
        self.report(Report::NextRun { task: key, next }).await;
    }

    /// Fires every timer that is due, earliest first.
    async fn fire_due(&mut self, now: DateTime<Utc>) {
        while let Some((at, key)) = self.timers.first().cloned() {
            if at > now {
                break;
            }
            self.timers.remove(&(at, key.clone()));
            self.fire(&key, now).await;
        }
    }

    async fn fire(&mut self, key: &TaskKey, now: DateTime<Utc>) {
        let Some(entry) = self.tasks.get_mut(key) else {
            return;
        };
        entry.fire_at = None;
        let (Some(task), Some(first)) = (entry.task.clone(), entry.next) else {
            return;
        };
        let plan = catch_up::plan(&task.schedule, first, now, task.catch_up);
        // The plan covers every instant up to now.
        let next = task.schedule.next_after(now);
        entry.next = next;
        entry.fire_at = next.map(|t| fire_time(&task, t));
        if let Some(at) = entry.fire_at {
            self.timers.insert((at, key.clone()));
        }

        if *self.leader.borrow() {
            if plan.missed > 0
                && let Some(latest) = plan.latest_missed
            {
                let reason = format!(
                    "catchUp {:?}: instants due while chronflow could not run them",
                    task.catch_up
                );
                self.report(Report::Missed {
                    task: key.clone(),
                    count: plan.missed,
                    latest,
                    reason,
                })
                .await;
            }
            for scheduled in plan.run {
                self.start(&task, scheduled).await;
            }
        }
        self.report(Report::NextRun {
            task: key.clone(),
            next,
        })
        .await;
    }

    /// Claims one run and hands it to the executor.
    async fn start(&self, task: &EngineTask, scheduled: DateTime<Utc>) {
        let run_id = RunId::new(&task.key, scheduled);
        let missed = |reason: String| Report::Missed {
            task: task.key.clone(),
            count: 1,
            latest: scheduled,
            reason,
        };
        match self.dedup.claim(&run_id).await {
            Ok(Claim::Claimed) => {}
            Ok(Claim::Duplicate) => {
                debug!(%run_id, "already claimed elsewhere; not running it again");
                return;
            }
            Err(error) => {
                warn!(%run_id, %error, "cannot claim run");
                self.report(missed(error.to_string())).await;
                return;
            }
        }
        let request = RunRequest {
            task: task.key.clone(),
            run_id: run_id.clone(),
            scheduled,
            spec: task.run.clone(),
        };
        if let Err(error) = self.executor.submit(request) {
            warn!(%run_id, %error, "run not queued");
            self.report(missed(error.to_string())).await;
        }
    }

    async fn report(&self, report: Report) {
        let _ = self.reports.send(report).await;
    }
}

/// Whether two versions of a task fire at the same instants.
fn same_timing(old: &EngineTask, new: &EngineTask) -> bool {
    old.schedule == new.schedule && old.jitter == new.jitter && old.uid == new.uid
}

/// When the timer of `instant` fires: the instant plus the task's deterministic jitter.
fn fire_time(task: &EngineTask, instant: DateTime<Utc>) -> DateTime<Utc> {
    match task.jitter {
        Some(max) if !max.is_zero() => {
            // Keyed by `<namespace>/<name>`, as docs/schedule.md promises: every replica and
            // every restart computes the same delay.
            let offset = jitter::offset(&task.key.to_string(), instant, max);
            instant + chrono::Duration::from_std(offset).unwrap_or_default()
        }
        _ => instant,
    }
}
