//! Runs: identities (`TaskKey`, `RunId`) and the reports that the engine and executor send about
//! them to whoever records results (the status writer, or standalone history). Free of `kube`.

use std::fmt;

use chrono::{DateTime, SecondsFormat, Utc};

/// A task's identity: its namespace and name (the resource name is the unique task name).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TaskKey {
    pub namespace: String,
    pub name: String,
}

impl TaskKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl TaskKey {
    /// Whether the task lives in `namespace`; `None` stands for every namespace.
    pub fn is_in(&self, namespace: Option<&str>) -> bool {
        namespace.is_none_or(|ns| ns == self.namespace)
    }
}

impl fmt::Display for TaskKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// `<namespace>/<name>@<scheduled instant in UTC, RFC 3339>`: the same for every replica and
/// every attempt of one scheduled run, so it is the dedup key and the `Idempotency-Key`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RunId(String);

impl RunId {
    pub fn new(task: &TaskKey, scheduled: DateTime<Utc>) -> Self {
        Self(format!(
            "{task}@{}",
            scheduled.to_rfc3339_opts(SecondsFormat::AutoSi, true)
        ))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RunId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// How a run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Succeeded,
    Failed,
}

/// A run that finished, after all its attempts.
#[derive(Clone, Debug, PartialEq)]
pub struct FinishedRun {
    pub run_id: RunId,
    pub scheduled: DateTime<Utc>,
    pub started: DateTime<Utc>,
    pub finished: DateTime<Utc>,
    pub outcome: Outcome,
    pub attempts: u32,
    pub message: Option<String>,
}

/// What the engine and executor tell the recorder of results, per task.
#[derive(Clone, Debug, PartialEq)]
pub enum Report {
    /// The next instant the task is due; `None` when it never will be again (Completed).
    NextRun {
        task: TaskKey,
        next: Option<DateTime<Utc>>,
    },
    /// A run's first attempt started.
    Started {
        task: TaskKey,
        run_id: RunId,
        scheduled: DateTime<Utc>,
        started: DateTime<Utc>,
    },
    /// A run finished.
    Finished { task: TaskKey, run: FinishedRun },
    /// `count` due instants were not run; `latest` is the newest of them.
    Missed {
        task: TaskKey,
        count: u64,
        latest: DateTime<Utc>,
        reason: String,
    },
}

impl Report {
    pub fn task(&self) -> &TaskKey {
        match self {
            Report::NextRun { task, .. }
            | Report::Started { task, .. }
            | Report::Finished { task, .. }
            | Report::Missed { task, .. } => task,
        }
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
        let task = TaskKey::new("shop", "report");
        let at = Utc.with_ymd_and_hms(2026, 11, 24, 9, 0, 0).unwrap();
        assert_eq!(
            RunId::new(&task, at).as_str(),
            "shop/report@2026-11-24T09:00:00Z"
        );
        let half = at + chrono::Duration::milliseconds(500);
        assert_eq!(
            RunId::new(&task, half).as_str(),
            "shop/report@2026-11-24T09:00:00.500Z"
        );
    }
}
