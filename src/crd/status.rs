//! `ChronTask.status`: what chronflow reports. Written only by the operator, with server-side
//! apply to the status subresource.

use chrono::{DateTime, Utc};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use serde::{Deserialize, Serialize};

use super::schema;
pub use crate::run::{BackfillPhase, Trigger};

/// Observed state of a ChronTask: phase, run counters and recent runs.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ChronTaskStatus {
    /// Pending, Scheduled, Running, Failed, Paused, Completed or Invalid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,

    /// Why the task is in its phase (the invalid field, the pause reason), when there is a reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,

    /// The schedule as the operator reads it, e.g. `*/5 * * * * * (Asia/Shanghai)` or `every 30s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,

    /// The next instant the task is due (before jitter).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_run_time: Option<DateTime<Utc>>,

    /// When the task last became schedulable (created, resumed, or fixed after being invalid).
    /// After an outage, catch-up never replays an instant before it; unset while the task is
    /// paused or invalid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedulable_since: Option<DateTime<Utc>>,

    /// The scheduled instant of the latest run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_schedule_time: Option<DateTime<Utc>>,

    /// When the latest successful run finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_successful_time: Option<DateTime<Utc>>,

    /// When the latest failed run finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failure_time: Option<DateTime<Utc>>,

    /// Runs that finished (successful + failed).
    #[serde(default)]
    pub total_runs: u64,

    /// Runs that succeeded.
    #[serde(default)]
    pub successful_runs: u64,

    /// Runs that failed after all their attempts.
    #[serde(default)]
    pub failed_runs: u64,

    /// Instants that were due but not run (deadline passed, queue full, skipped by policy).
    #[serde(default)]
    pub missed_runs: u64,

    /// Finished runs that run-now requests started (counted in totalRuns too).
    #[serde(default)]
    pub manual_runs: u64,

    /// The latest run-now request handled (the `chronflow.io/run-now` value): it never runs
    /// again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_run_now: Option<String>,

    /// Progress of each range of `spec.backfill`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backfill: Vec<BackfillStatus>,

    /// successfulRuns / (successfulRuns + failedRuns), one decimal, e.g. `98.5%`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub success_rate: Option<String>,

    /// The latest finished run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_run: Option<RunRecord>,

    /// Recently finished runs, newest first, bounded by `spec.history`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recent_runs: Vec<RunRecord>,

    /// Runs in flight.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub active: Vec<ActiveRun>,

    /// `Ready`: the spec is valid and the task is scheduled.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "schema::conditions")]
    pub conditions: Vec<Condition>,

    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// The replica (its pod name) that runs the task and wrote this status: with several
    /// replicas, the leader.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica: Option<String>,
}

/// Lifecycle phase of a ChronTask.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord,
)]
pub enum Phase {
    /// Accepted, not yet scheduled.
    Pending,
    /// Waiting for its next run.
    Scheduled,
    /// A run is in flight.
    Running,
    /// Still scheduled, but the latest run failed; the next success returns it to Scheduled.
    /// Find such tasks with `kubectl get ct --field-selector status.phase=Failed`.
    Failed,
    /// `spec.paused` is true.
    Paused,
    /// No run will ever be due again (`at` fired, or past `endAt`).
    Completed,
    /// The spec cannot be run; `message` and the Ready condition say why.
    Invalid,
}

/// Where a backfill stands.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BackfillStatus {
    /// The backfill's id in `spec.backfill`.
    pub id: String,
    /// Running, Complete or Refused.
    pub phase: BackfillPhase,
    /// Instants of the range handled: run now, or found already run.
    #[serde(default)]
    pub done: u64,
    /// Instants in the range.
    #[serde(default)]
    pub total: u64,
    /// Why it was refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// One finished (or missed) run.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RunRecord {
    /// `<namespace>/<name>@<scheduled instant in UTC>` (`@manual:<request>` for run now); sent
    /// as `Idempotency-Key`.
    pub run_id: String,
    /// What started it: Schedule, Manual (run now) or Backfill.
    #[serde(default)]
    pub trigger: Trigger,
    /// The instant the run was due.
    pub scheduled_time: DateTime<Utc>,
    /// When the first attempt started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<DateTime<Utc>>,
    /// When the last attempt ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finish_time: Option<DateTime<Utc>>,
    /// finishTime - startTime, e.g. `1.204s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration: Option<String>,
    /// Succeeded, Failed or Missed.
    pub outcome: RunOutcome,
    /// Attempts made (1 + retries).
    #[serde(default)]
    pub attempts: u32,
    /// What happened, e.g. `HTTP 503` or `timed out after 30s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// How a run ended.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunOutcome {
    /// Every attempt done, the last one succeeded.
    Succeeded,
    /// Every attempt failed (or the run was cancelled).
    Failed,
    /// Due, but not run; the message says why.
    Missed,
}

/// A run in flight.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ActiveRun {
    /// `<namespace>/<name>@<scheduled instant in UTC>`.
    pub run_id: String,
    /// The instant the run was due.
    pub scheduled_time: DateTime<Utc>,
    /// When its first attempt started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<DateTime<Utc>>,
    /// The Job of a `job` action.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_name: Option<String>,
}
