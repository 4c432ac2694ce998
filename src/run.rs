//! Runs: identities (`TaskKey`, `TaskId`, `RunId`) and the reports that the engine and executor
//! send about them to whoever records results (the status index, or standalone history).
//! Free of `kube`.

use std::fmt;
use std::sync::Arc;

use chrono::{DateTime, SecondsFormat, SubsecRound, Utc};

/// A task's name: its namespace and name (the resource name is the unique task name). Shared:
/// every map and every report about the task holds the same allocation, and a clone is a
/// reference count.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TaskKey(Arc<KeyParts>);

/// A map keyed by task on the firing path: foldhash (seeded per process) hashes a key several
/// times faster than the standard library's SipHash.
pub type TaskMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// The parts of a [`TaskKey`], read through it (`key.namespace`).
#[derive(Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyParts {
    /// The task's namespace.
    pub namespace: String,
    /// The task's name.
    pub name: String,
}

impl TaskKey {
    /// The task `name` of `namespace`.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self(Arc::new(KeyParts {
            namespace: namespace.into(),
            name: name.into(),
        }))
    }

    /// Whether the task lives in `namespace`; `None` stands for every namespace.
    pub fn is_in(&self, namespace: Option<&str>) -> bool {
        namespace.is_none_or(|ns| ns == self.namespace)
    }
}

impl std::ops::Deref for TaskKey {
    type Target = KeyParts;

    fn deref(&self) -> &KeyParts {
        &self.0
    }
}

impl fmt::Debug for TaskKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TaskKey")
            .field("namespace", &self.namespace)
            .field("name", &self.name)
            .finish()
    }
}

impl fmt::Display for TaskKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// One incarnation of a task: its name and the object's uid. A task deleted and re-created under
/// the same name is another task; reports about the old one must not touch the new one. Cheap
/// to clone (two reference counts).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TaskId {
    /// The task's name.
    pub key: TaskKey,
    /// The object's uid.
    pub uid: Arc<str>,
}

impl TaskId {
    /// The incarnation `uid` of `key`.
    pub fn new(key: TaskKey, uid: impl AsRef<str>) -> Self {
        Self {
            key,
            uid: Arc::from(uid.as_ref()),
        }
    }
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.key.fmt(f)
    }
}

/// `<namespace>/<name>@<scheduled instant in UTC, RFC 3339>` for a run of the schedule (or of
/// a backfill: the same instant is the same run), `<namespace>/<name>@manual:<request>` for a
/// run-now request: the same for every replica and every attempt of one run, so it is the dedup
/// key and the `Idempotency-Key`. Two ids are the same run when their text is the same (a
/// request's id carries when it was seen, which differs between replicas).
#[derive(Clone, Debug)]
pub struct RunId(Arc<RunParts>);

#[derive(Debug)]
struct RunParts {
    text: String,
    task: TaskId,
    instant: DateTime<Utc>,
    request: Option<String>,
}

impl RunId {
    /// The run of the scheduled instant `scheduled`, to the millisecond: the precision of
    /// schedules and of the Redis ledger, so every replica names a run alike.
    pub fn new(task: &TaskId, scheduled: DateTime<Utc>) -> Self {
        let scheduled = scheduled.trunc_subsecs(3);
        Self(Arc::new(RunParts {
            text: format!(
                "{}@{}",
                task.key,
                scheduled.to_rfc3339_opts(SecondsFormat::AutoSi, true)
            ),
            task: task.clone(),
            instant: scheduled,
            request: None,
        }))
    }

    /// The run of run-now request `request` (the annotation's value), seen at `seen`.
    pub fn manual(task: &TaskId, request: &str, seen: DateTime<Utc>) -> Self {
        Self(Arc::new(RunParts {
            text: format!("{}@manual:{request}", task.key),
            task: task.clone(),
            instant: seen,
            request: Some(request.to_string()),
        }))
    }

    /// The run of `task` whose id is `text` (as [`RunId::as_str`] wrote it); a run-now
    /// request's is taken as seen at `seen`. `None` if `text` is no run id of `task`.
    pub fn parse(task: &TaskId, text: &str, seen: DateTime<Utc>) -> Option<Self> {
        let rest = text.strip_prefix(&format!("{}@", task.key))?;
        match rest.strip_prefix("manual:") {
            Some(request) => Some(Self::manual(task, request, seen)),
            None => DateTime::parse_from_rfc3339(rest)
                .ok()
                .map(|at| Self::new(task, at.with_timezone(&Utc))),
        }
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0.text
    }

    /// The run's task.
    pub fn task(&self) -> &TaskKey {
        &self.0.task.key
    }

    /// The incarnation of the task the run belongs to: a task deleted and re-created under the
    /// same name has other runs (and another ledger record), though their ids read alike.
    pub fn task_id(&self) -> &TaskId {
        &self.0.task
    }

    /// The scheduled instant (before jitter); for a run-now request, when it was seen.
    pub fn instant(&self) -> DateTime<Utc> {
        self.0.instant
    }

    /// The run-now request this run answers, if it is one.
    pub fn request(&self) -> Option<&str> {
        self.0.request.as_deref()
    }
}

impl PartialEq for RunId {
    fn eq(&self, other: &Self) -> bool {
        self.0.text == other.0.text
    }
}

impl Eq for RunId {}

impl std::hash::Hash for RunId {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.text.hash(state);
    }
}

impl PartialOrd for RunId {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for RunId {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.text.cmp(&other.0.text)
    }
}

/// One leadership: who holds the Lease and the epoch it won it with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Term {
    /// The replica's identity (`POD_NAME`), shared by every run of the term.
    pub holder: Arc<str>,
    /// The fencing epoch: the Lease's transitions when it was won.
    pub epoch: u64,
}

impl Term {
    /// The one term of a replica that runs without leader election.
    pub fn single(holder: &str) -> Self {
        Self {
            holder: Arc::from(holder),
            epoch: 0,
        }
    }
}

/// Set to any new value (a timestamp, say) to run the task once now: the value names the
/// request, so the same value never runs twice. `chronflow trigger` sets it.
pub const RUN_NOW_ANNOTATION: &str = "chronflow.io/run-now";

/// `"true"`: a run-now request runs even while the task is paused.
pub const RUN_NOW_WHILE_PAUSED_ANNOTATION: &str = "chronflow.io/run-now-while-paused";

/// What started a run.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    Hash,
    serde::Serialize,
    serde::Deserialize,
    schemars::JsonSchema,
)]
pub enum Trigger {
    /// Its instant came due.
    #[default]
    Schedule,
    /// A run-now request (`chronflow.io/run-now`).
    Manual,
    /// A backfill of `spec.backfill`.
    Backfill,
}

impl Trigger {
    /// Whether the schedule started it.
    pub fn is_schedule(&self) -> bool {
        *self == Trigger::Schedule
    }
}

impl fmt::Display for RunId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.text)
    }
}

/// How a run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The last attempt succeeded.
    Succeeded,
    /// Every attempt failed, or the run was cancelled.
    Failed,
}

/// A run that finished, after all its attempts (or cancelled: then it failed, and the message
/// starts with `cancelled:`).
#[derive(Clone, Debug, PartialEq)]
pub struct FinishedRun {
    /// The run's identity.
    pub run_id: RunId,
    /// What started it.
    pub trigger: Trigger,
    /// Its instant.
    pub scheduled: DateTime<Utc>,
    /// When its first attempt started.
    pub started: DateTime<Utc>,
    /// When its last attempt ended.
    pub finished: DateTime<Utc>,
    /// How it ended.
    pub outcome: Outcome,
    /// Attempts made.
    pub attempts: u32,
    /// What happened (`HTTP 503`, `timed out after 30s`, ...).
    pub message: Option<String>,
}

/// What the engine knows about a task's schedule. The engine is its only source and reports
/// every change, in order, so the recorder never has to reconcile two views.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ScheduleState {
    /// Scheduled. `next` is the next instant due, `None` when none ever will be (Completed).
    /// `since` is when the task last became schedulable (created, resumed, fixed): catch-up
    /// after an outage never reaches before it.
    Scheduled {
        /// The schedule as shown in status (shared: reported again at every fire).
        schedule: Arc<str>,
        /// The next instant due.
        next: Option<DateTime<Utc>>,
        /// When it last became schedulable.
        since: DateTime<Utc>,
    },
    /// Paused, with the schedule and the pause reason (may be empty).
    Paused {
        /// The schedule as shown in status.
        schedule: Arc<str>,
        /// The pause reason (may be empty).
        reason: String,
    },
    /// The spec cannot run: the reason names the field and why.
    Invalid {
        /// The field and why.
        reason: String,
    },
}

/// What the engine and executor tell the recorder of results, per task incarnation.
#[derive(Clone, Debug, PartialEq)]
pub enum Report {
    /// The task's schedule state changed (or its next instant moved).
    Schedule {
        /// The task.
        task: TaskId,
        /// Its new state.
        state: ScheduleState,
    },
    /// A run's first attempt started.
    Started {
        /// The task.
        task: TaskId,
        /// The run.
        run_id: RunId,
        /// What started it.
        trigger: Trigger,
        /// Its instant.
        scheduled: DateTime<Utc>,
        /// When it was due to start (scheduled plus jitter): the start lag counts from here.
        due: DateTime<Utc>,
        /// When its first attempt started.
        started: DateTime<Utc>,
        /// The run's Job, for a Job action.
        job: Option<String>,
    },
    /// A run finished.
    /// A run finished.
    Finished {
        /// The task.
        task: TaskId,
        /// The run, and how it ended.
        run: FinishedRun,
    },
    /// `count` runs were not run; `run` is the newest of them (its instant the latest).
    Missed {
        /// The task.
        task: TaskId,
        /// How many instants.
        count: u64,
        /// The newest of them.
        run: RunId,
        /// What would have started it.
        trigger: Trigger,
        /// Why, in a few stable words.
        kind: MissKind,
        /// Why, for people.
        reason: String,
    },
    /// A run-now request was handled without a run of this process (refused while paused, or
    /// found already run or claimed elsewhere): it is never acted on again. A request this
    /// process runs is handled once its run is recorded started (see
    /// [`Report::handled_request`]).
    RequestHandled {
        /// The task.
        task: TaskId,
        /// The request (the annotation's value).
        request: String,
    },
    /// Progress of a backfill of `spec.backfill`.
    Backfill {
        /// The task.
        task: TaskId,
        /// Where the backfill stands.
        progress: BackfillProgress,
    },
    /// The task's counts as the shared ledger keeps them (Redis): they replace what the
    /// recorder counted, so status never runs ahead of the ledger nor forgets a leader's runs.
    Counts {
        /// The task.
        task: TaskId,
        /// Its counts in the ledger.
        counts: crate::ledger::Counts,
    },
}

/// Where a backfill stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackfillProgress {
    /// The backfill's `id` in `spec.backfill`.
    pub id: String,
    /// Instants of the range handled so far: run, or found already run.
    pub done: u64,
    /// Instants in the range.
    pub total: u64,
    /// Running, complete or refused.
    pub phase: BackfillPhase,
    /// Why it was refused, or where it stands.
    pub message: Option<String>,
}

/// A backfill's phase.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, schemars::JsonSchema,
)]
pub enum BackfillPhase {
    /// Running its instants, oldest first.
    Running,
    /// Every instant of the range is handled.
    Complete,
    /// Not run: the range is too large or too old (the message says which).
    Refused,
}

/// Why instants were not run, in a few stable words (metric labels); the report's `reason`
/// says it for people.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MissKind {
    /// Due while chronflow could not run them (`catchUp`).
    CatchUp,
    /// Could not start within `startingDeadlineSeconds`.
    Deadline,
    /// The run queue, or the queue of claims waiting for the ledger, was full.
    QueueFull,
    /// The concurrency policy said no (`Forbid`, `maxConcurrentRuns`) or a newer run replaced it.
    Concurrency,
    /// Withdrawn before it started: the task was paused, edited, made invalid or deleted.
    Withdrawn,
    /// chronflow was shutting down.
    Shutdown,
    /// The ledger could not take the run's claim or start (a [`crate::ledger::RetriedMarks`]
    /// ledger keeps the miss itself, in the task's order).
    Claim,
}

impl MissKind {
    /// Every kind.
    pub const ALL: [MissKind; 7] = [
        MissKind::CatchUp,
        MissKind::Deadline,
        MissKind::QueueFull,
        MissKind::Concurrency,
        MissKind::Withdrawn,
        MissKind::Shutdown,
        MissKind::Claim,
    ];

    /// The kind as a metric label.
    pub fn label(self) -> &'static str {
        match self {
            MissKind::CatchUp => "catch_up",
            MissKind::Deadline => "deadline",
            MissKind::QueueFull => "queue_full",
            MissKind::Concurrency => "concurrency",
            MissKind::Withdrawn => "withdrawn",
            MissKind::Shutdown => "shutdown",
            MissKind::Claim => "claim",
        }
    }
}

impl Report {
    /// The run-now request this report settles for good: one found handled, one whose run is
    /// recorded started, or one that missed by the task's policy. Not one that missed because
    /// it could not be claimed or was withdrawn at shutdown: whoever leads next runs it.
    pub fn handled_request(&self) -> Option<&str> {
        match self {
            Report::RequestHandled { request, .. } => Some(request),
            Report::Started { run_id, .. } => run_id.request(),
            Report::Missed { run, kind, .. }
                if !matches!(kind, MissKind::Claim | MissKind::Shutdown) =>
            {
                run.request()
            }
            _ => None,
        }
    }

    /// The task the report is about.
    pub fn task(&self) -> &TaskId {
        match self {
            Report::Schedule { task, .. }
            | Report::Started { task, .. }
            | Report::Finished { task, .. }
            | Report::Missed { task, .. }
            | Report::RequestHandled { task, .. }
            | Report::Backfill { task, .. }
            | Report::Counts { task, .. } => task,
        }
    }
}

/// Where reports go. `record` never blocks and never fails: the firing path must not wait for
/// whoever keeps the results (the status index records in memory; I/O happens elsewhere).
pub trait ReportSink: Send + Sync {
    /// Records `report`; returns at once.
    fn record(&self, report: Report);
}

/// A sink for tests and tools: every report into an unbounded channel.
impl ReportSink for tokio::sync::mpsc::UnboundedSender<Report> {
    fn record(&self, report: Report) {
        let _ = self.send(report);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn namespace_scope_none_means_every_namespace() {
        let task = TaskKey::new("shop", "report");
        assert!(task.is_in(None) && task.is_in(Some("shop")));
        assert!(!task.is_in(Some("ops")));
    }

    #[test]
    fn run_id_is_namespace_name_and_utc_instant() {
        let task = TaskId::new(TaskKey::new("shop", "report"), "u1");
        let at = Utc.with_ymd_and_hms(2026, 11, 24, 9, 0, 0).unwrap();
        let id = RunId::new(&task, at);
        assert_eq!(id.as_str(), "shop/report@2026-11-24T09:00:00Z");
        assert_eq!((id.task_id(), id.instant()), (&task, at));
        let half = at + chrono::Duration::milliseconds(500);
        assert_eq!(
            RunId::new(&task, half).as_str(),
            "shop/report@2026-11-24T09:00:00.500Z"
        );
        // Below the millisecond, an instant is named as the Redis ledger stores it.
        let fine = half + chrono::Duration::nanoseconds(123_456);
        assert_eq!(RunId::new(&task, fine), RunId::new(&task, half));
    }

    #[test]
    fn run_ids_read_back_from_their_text() {
        let task = TaskId::new(TaskKey::new("shop", "report"), "u1");
        let at = Utc.with_ymd_and_hms(2026, 11, 24, 9, 0, 0).unwrap();
        for id in [
            RunId::new(&task, at + chrono::Duration::milliseconds(500)),
            RunId::manual(&task, "deploy-42", at),
        ] {
            let back = RunId::parse(&task, id.as_str(), at).unwrap();
            assert_eq!((&back, back.instant()), (&id, id.instant()));
        }
        let other = TaskId::new(TaskKey::new("shop", "other"), "u2");
        assert!(RunId::parse(&other, "shop/report@2026-11-24T09:00:00Z", at).is_none());
        assert!(RunId::parse(&task, "shop/report@yesterday", at).is_none());
    }
}
