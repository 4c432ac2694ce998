//! The Job action: one Kubernetes Job per run. The core only names the Job and waits for the
//! end a [`JobRunner`] reports; the operator's runner (`controller::jobs`) creates, watches and
//! prunes Jobs. A run's Job is named from the run, so creating it twice finds the first one.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::future::{BoxFuture, FutureExt};

use crate::run::{RunId, TaskId};

/// A Job per run.
#[derive(Clone, Debug, PartialEq)]
pub struct JobAction {
    /// The `batch/v1` JobTemplateSpec, with the task's `timeout` and `retry` applied where the
    /// template left `activeDeadlineSeconds` and `backoffLimit` unset.
    pub template: Arc<serde_json::Value>,
    /// The Job's `activeDeadlineSeconds`: how long it may run before Kubernetes fails it.
    pub deadline: Duration,
    /// Finished Jobs kept in the cluster: the newest succeeded and the newest failed ones.
    pub keep_succeeded: u32,
    /// See `keep_succeeded`.
    pub keep_failed: u32,
}

/// How long past its deadline a Job may take to be reported failed (the Job controller marks
/// it, the watch delivers it) before the run gives up waiting.
pub const JOB_DEADLINE_GRACE: Duration = Duration::from_secs(300);

/// One run's Job.
#[derive(Clone, Copy, Debug)]
pub struct JobRun<'a> {
    /// The task (its uid goes into the owner reference).
    pub task: &'a TaskId,
    /// The run.
    pub run_id: &'a RunId,
    /// The epoch of the leader that creates the Job, written as its `chronflow.io/epoch`
    /// annotation.
    pub epoch: u64,
    /// The run's instant.
    pub scheduled: DateTime<Utc>,
    /// The Job's name: [`job_name`].
    pub name: &'a str,
    /// What to create.
    pub action: &'a JobAction,
    /// The run was started by an earlier leader or process: wait for its Job, never create it
    /// (a Job that is gone ended while nobody watched, and its outcome is unknown).
    pub adopted: bool,
}

/// How a run's Job ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobEnd {
    /// `Ok` with a message when the Job completed, `Err` with the reason when it failed or
    /// could not be created.
    pub result: Result<String, String>,
    /// Pods the Job ran (its attempts).
    pub attempts: u32,
}

/// Creates a run's Job and waits for its end; implemented by the operator.
pub trait JobRunner: Send + Sync {
    /// Creates the run's Job; one that exists already (created before a restart or a
    /// failover) is this run's. `Err` says why it cannot be created.
    fn create<'a>(&'a self, run: JobRun<'a>) -> BoxFuture<'a, Result<(), String>>;

    /// Waits until the run's Job completes or fails.
    fn wait<'a>(&'a self, run: JobRun<'a>) -> BoxFuture<'a, JobEnd>;

    /// Deletes a run's Job and its Pods (Replace, or a task that became invalid).
    fn stop<'a>(&'a self, namespace: &'a str, name: &'a str) -> BoxFuture<'a, ()>;
}

/// For hosts without a cluster (standalone mode, the embedding API): every Job run fails.
pub struct NoJobs;

impl JobRunner for NoJobs {
    fn create<'a>(&'a self, _run: JobRun<'a>) -> BoxFuture<'a, Result<(), String>> {
        async { Err("Job actions run only in the operator, in a cluster".into()) }.boxed()
    }

    fn wait<'a>(&'a self, _run: JobRun<'a>) -> BoxFuture<'a, JobEnd> {
        let end = JobEnd {
            result: Err("Job actions run only in the operator, in a cluster".into()),
            attempts: 1,
        };
        async move { end }.boxed()
    }

    fn stop<'a>(&'a self, _namespace: &'a str, _name: &'a str) -> BoxFuture<'a, ()> {
        async {}.boxed()
    }
}

/// The longest Job name: the `batch.kubernetes.io/job-name` label its Pods carry is at most 63
/// characters.
const MAX_NAME: usize = 63;
/// Hex digits of the run's hash that end the name.
const HASH_DIGITS: usize = 10;

/// The Job name of a run: the task's name (dots made dashes, cut to fit) and a hash of the task's
/// uid and the run id, so every run of every incarnation of a task has its own name, and the
/// same run always the same one. A DNS label of at most 63 characters.
pub fn job_name(task: &TaskId, run: &RunId) -> String {
    let hash = fnv1a(format!("{}/{}", task.uid, run.as_str()).as_bytes());
    let digits = format!("{hash:016x}");
    let room = MAX_NAME - HASH_DIGITS - 1;
    let prefix: String = task
        .key
        .name
        .chars()
        .map(|c| if c == '.' { '-' } else { c })
        .take(room)
        .collect();
    format!(
        "{}-{}",
        prefix.trim_end_matches('-'),
        &digits[..HASH_DIGITS]
    )
}

/// 64-bit FNV-1a: stable across builds and platforms, as a name derived from it must be.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::run::TaskKey;
    use chrono::TimeZone;

    fn dns_label(name: &str) -> bool {
        name.len() <= 63
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            && !name.starts_with('-')
            && !name.ends_with('-')
    }

    #[test]
    fn job_names_are_short_stable_dns_labels_one_per_run_and_incarnation() {
        let at = |s: i64| Utc.timestamp_opt(1_764_400_000 + s, 0).unwrap();
        let long = format!("{}.reports-{}", "a".repeat(60), "b".repeat(100));
        for name in [
            "backup",
            "a.b.c",
            long.as_str(),
            "x-----------------------------------------------------------------y",
        ] {
            let task = TaskId::new(TaskKey::new("ns", name), "uid-1");
            let first = job_name(&task, &RunId::new(&task, at(0)));
            assert!(dns_label(&first), "{first}");
            assert_eq!(first, job_name(&task, &RunId::new(&task, at(0))));
            assert_ne!(first, job_name(&task, &RunId::new(&task, at(1))));
            let again = TaskId::new(task.key.clone(), "uid-2");
            assert_ne!(first, job_name(&again, &RunId::new(&task, at(0))));
            let manual = RunId::manual(&task, "r1", at(0));
            assert!(dns_label(&job_name(&task, &manual)));
        }
        let task = TaskId::new(TaskKey::new("ns", "backup"), "uid-1");
        // Fixed, so a new build finds the Jobs an older one created.
        assert_eq!(
            job_name(&task, &RunId::new(&task, at(0))),
            "backup-8997756e9f"
        );
    }
}
