//! `ChronTask.spec`: what users declare. Everything the schema can check is checked at
//! admission (patterns, bounds, CEL rules with messages); what it cannot (cron syntax, time
//! zone names) the operator reports in status.

use k8s_openapi::api::batch::v1::JobTemplateSpec;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::schema;
use super::status::ChronTaskStatus;
use crate::policy::{Backoff, CatchUpPolicy, ConcurrencyPolicy, FollowRedirects};

/// Duration as users write it: one or more `<integer><unit>` parts, units `d h m s ms`, largest first.
pub const DURATION_PATTERN: &str = r"^([0-9]+d)?([0-9]+h)?([0-9]+m)?([0-9]+s)?([0-9]+ms)?$";
/// Durations that CEL's `duration()` can also read (no days), so rules can compare them.
pub const SHORT_DURATION_PATTERN: &str = r"^([0-9]+h)?([0-9]+m)?([0-9]+s)?([0-9]+ms)?$";

/// The largest `startingDeadlineSeconds`: 366 days.
pub const MAX_STARTING_DEADLINE_SECONDS: i64 = 366 * 86_400;

/// A task that chronflow runs on a schedule: cron with seconds, a fixed-rate interval or a
/// one-shot instant. Status reports its runs, success rate and next run.
// Several printcolumn(...) entries share `type_ = ...`, which clippy takes for a repeated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "chronflow.io",
    version = "v1alpha1",
    kind = "ChronTask",
    plural = "chrontasks",
    shortname = "ct",
    category = "chronflow",
    namespaced,
    status = "ChronTaskStatus",
    derive = "PartialEq",
    doc = "A task that chronflow fires on a schedule (cron with seconds, interval or one-shot) and whose runs it counts in status.",
    printcolumn(
        name = "Schedule",
        type_ = "string",
        json_path = ".status.schedule",
        description = "The schedule, as the operator reads it"
    ),
    printcolumn(name = "Paused", type_ = "boolean", json_path = ".spec.paused"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Last Run",
        type_ = "date",
        json_path = ".status.lastScheduleTime"
    ),
    printcolumn(name = "Next Run", type_ = "string", json_path = ".status.nextRunTime"),
    printcolumn(name = "Runs", type_ = "integer", json_path = ".status.totalRuns"),
    printcolumn(name = "Success", type_ = "string", json_path = ".status.successRate"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    printcolumn(
        name = "Message",
        type_ = "string",
        json_path = ".status.message",
        priority = "1"
    ),
    printcolumn(
        name = "Replica",
        type_ = "string",
        json_path = ".status.replica",
        priority = "1"
    ),
    selectable = ".status.phase",
    selectable = ".spec.paused"
)]
#[serde(rename_all = "camelCase")]
pub struct ChronTaskSpec {
    /// When the task fires: exactly one of `cron`, `interval` or `at`, read in `timezone`.
    pub schedule: ScheduleSpec,

    /// Stops firing while true; resuming continues from now without replaying the paused period.
    #[serde(default)]
    pub paused: bool,

    /// Why the task is paused; shown in status and Events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub pause_reason: Option<String>,

    /// What to do when a run is due while the previous one is still running: `Allow` runs both,
    /// `Forbid` skips the new run (counted as missed), `Replace` cancels the old run.
    #[serde(default)]
    pub concurrency_policy: ConcurrencyPolicy,

    /// With `concurrencyPolicy: Allow`, the most runs of this task in flight or waiting for a
    /// worker at once (1 to 100); a run due beyond it is counted as missed. Whatever this says, one
    /// task never holds more than half of the operator's workers.
    #[serde(default = "default_max_concurrent_runs")]
    #[schemars(range(min = 1, max = 100))]
    pub max_concurrent_runs: u32,

    /// A run that cannot start within this many seconds of its scheduled instant is not started
    /// and is counted in `status.missedRuns`. Unset: no deadline. At most 31622400 (366 days).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = MAX_STARTING_DEADLINE_SECONDS))]
    pub starting_deadline_seconds: Option<i64>,

    /// What to do with instants missed while the operator was down: `Skip` them, run the
    /// `Latest` one, or run `All` of them oldest first (at most 100).
    #[serde(default)]
    pub catch_up: CatchUpPolicy,

    /// Time limit of each attempt, e.g. `30s`, `2m` (`h m s ms` units, at most 24h). For a
    /// Job: its `activeDeadlineSeconds`, unless the template sets one.
    #[serde(default = "default_timeout")]
    #[x_kube(validation = Rule::new("duration(self) <= duration('24h')").message("timeout must be at most 24h (it limits each attempt)"))]
    #[schemars(regex(pattern = SHORT_DURATION_PATTERN), length(min = 2, max = 32))]
    pub timeout: String,

    /// Retries of a failed attempt. Default: no retry. For a Job: `maxRetries` is its
    /// `backoffLimit`, unless the template sets one (Kubernetes retries the Pod).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetrySpec>,

    /// What a run does: exactly one of `http` or `job`.
    pub action: ActionSpec,

    /// How many finished runs to keep in `status.recentRuns` and, for a Job action, how many
    /// finished Jobs to keep in the cluster (older ones are deleted; the counts stay).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history: Option<HistorySpec>,

    /// Time ranges whose scheduled instants run now, oldest first, each instant once: those
    /// that already ran are not run again. Progress is in `status.backfill`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 10))]
    #[x_kube(validation = Rule::new("self.all(b, self.exists_one(o, o.id == b.id))").message("backfill ids must be unique"))]
    pub backfill: Vec<BackfillSpec>,
}

/// A range of past instants to run.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("timestamp(self.end) >= timestamp(self.start)").message("backfill.end must not be before backfill.start"))]
pub struct BackfillSpec {
    /// Names this backfill in status; a new id is a new backfill.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub id: String,
    /// The first instant of the range (RFC 3339, inclusive).
    #[schemars(extend("format" = "date-time"), length(max = 64))]
    pub start: String,
    /// The last instant of the range (RFC 3339, inclusive); not in the future.
    #[schemars(extend("format" = "date-time"), length(max = 64))]
    pub end: String,
}

fn default_max_concurrent_runs() -> u32 {
    10
}

fn default_timeout() -> String {
    "30s".into()
}

/// When a task fires. Exactly one of `cron`, `interval` or `at`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("[has(self.cron), has(self.interval), has(self.at)].filter(x, x).size() == 1").message("schedule needs exactly one of cron, interval or at"))]
#[x_kube(validation = Rule::new("!has(self.startAt) || !has(self.endAt) || timestamp(self.endAt) > timestamp(self.startAt)").message("schedule.endAt must be after schedule.startAt"))]
#[x_kube(validation = Rule::new("!has(self.jitter) || duration(self.jitter) <= duration('1h')").message("schedule.jitter must be at most 1h"))]
pub struct ScheduleSpec {
    /// Cron expression: 6 fields with seconds first (`*/5 * * * * *`) or classic 5 fields
    /// (`m h dom mon dow`), names (`JAN`, `MON`), ranges, lists, steps, Sunday as 0 or 7,
    /// and the macros @yearly @annually @monthly @weekly @daily @midnight @hourly.
    /// When both day fields are restricted, a day matches if either does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub cron: Option<String>,

    /// Fixed-rate interval (`500ms`, `10s`, `1m30s`, `2h`, `1d`): runs are due at
    /// `startAt + k*interval` (k = 0, 1, ...) or, without startAt, at `creation + k*interval`
    /// (k = 1, 2, ...). Elapsed time: daylight saving does not move them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN), length(min = 2, max = 32))]
    pub interval: Option<String>,

    /// One-shot instant (RFC 3339, e.g. `2026-12-01T09:00:00+08:00`); the task is Completed after it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("format" = "date-time"), length(max = 64))]
    pub at: Option<String>,

    /// IANA time zone the cron expression is read in (e.g. `Europe/Berlin`). Default: the
    /// operator's `timezone` setting. Daylight saving follows the Vixie cron rule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    pub timezone: Option<String>,

    /// Delays each run by up to this long, by an amount fixed per (task, instant), to spread
    /// load; the run keeps its scheduled instant as its identity. `h m s ms` units, at most
    /// 1h, and shorter than the smallest gap between two runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = SHORT_DURATION_PATTERN), length(min = 2, max = 32))]
    pub jitter: Option<String>,

    /// No run is due before this instant (RFC 3339, inclusive); anchors intervals.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("format" = "date-time"), length(max = 64))]
    pub start_at: Option<String>,

    /// No run is due after this instant (RFC 3339, inclusive); the task is Completed after it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("format" = "date-time"), length(max = 64))]
    pub end_at: Option<String>,
}

/// Retries of a failed attempt, with backoff between attempts.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("duration(self.initialDelay) <= duration(self.maxDelay)").message("retry.initialDelay must not exceed retry.maxDelay"))]
pub struct RetrySpec {
    /// Attempts after the first one (0 to 10).
    #[serde(default)]
    #[schemars(range(min = 0, max = 10))]
    pub max_retries: u32,

    /// How the delay grows: `Exponential` doubles it, `Linear` adds `initialDelay`, `Fixed` keeps it.
    #[serde(default)]
    pub backoff: Backoff,

    /// Delay before the first retry (`h m s ms` units).
    #[serde(default = "default_initial_delay")]
    #[schemars(regex(pattern = SHORT_DURATION_PATTERN), length(min = 2, max = 32))]
    pub initial_delay: String,

    /// Upper bound of any delay (`h m s ms` units, at most 24h).
    #[serde(default = "default_max_delay")]
    #[x_kube(validation = Rule::new("duration(self) <= duration('24h')").message("retry.maxDelay must be at most 24h"))]
    #[schemars(regex(pattern = SHORT_DURATION_PATTERN), length(min = 2, max = 32))]
    pub max_delay: String,
}

fn default_initial_delay() -> String {
    "1s".into()
}

fn default_max_delay() -> String {
    "60s".into()
}

/// What a run does. Exactly one of `http` or `job` (`exec` in `chronflow standalone` only).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("[has(self.http), has(self.job), has(self.exec)].filter(x, x).size() == 1").message("action needs exactly one of http or job"))]
#[x_kube(validation = Rule::new("!has(self.exec)").message("action.exec runs only in chronflow standalone: in a cluster a command would run inside the operator's Pod, with its identity; use http, or job for a container"))]
pub struct ActionSpec {
    /// Call an HTTP endpoint. Every request carries `Idempotency-Key: <namespace>/<name>@<instant>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpAction>,

    /// Create a Job per run, named from the run.
    // Boxed: a Job template is most of a ChronTask's size in memory (2.4 of 3.8 KB), and the
    // informer caches every task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<Box<JobAction>>,

    /// Run a command: `chronflow standalone` only (the apiserver refuses it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec: Option<ExecAction>,
}

/// A command run per attempt, without a shell (`["sh", "-c", "..."]` for one), in a process
/// group of its own that a timeout kills; `spec.timeout` limits each attempt. It gets
/// `CHRONFLOW_RUN_ID`, `CHRONFLOW_SCHEDULED_TIME` and `CHRONFLOW_ATTEMPT`; exit status 0 is
/// success; the end of its output goes into the run's message.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ExecAction {
    /// The program and its arguments.
    #[schemars(length(min = 1, max = 256))]
    pub command: Vec<String>,
    /// Variables added to chronflow's environment.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 128))]
    pub env: Vec<EnvVar>,
    /// The directory it runs in (default: chronflow's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
}

/// An environment variable of an `exec` action.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct EnvVar {
    /// The variable's name.
    #[schemars(length(min = 1, max = 256))]
    pub name: String,
    /// Its value (empty when omitted).
    #[serde(default)]
    pub value: String,
}

/// An HTTP request per run; the run succeeds when the status code is in `successCodes`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.url) != has(self.urlFrom)").message("http needs exactly one of url or urlFrom"))]
#[x_kube(validation = Rule::new("!has(self.tls) || !has(self.url) || self.url.startsWith('https://')").message("http.tls applies to https:// URLs only"))]
pub struct HttpAction {
    /// The endpoint, `http://` or `https://`; shown in status, Events and logs without its
    /// user info and query. Exactly one of `url` and `urlFrom`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.startsWith('http://') || self.startsWith('https://')").message("http.url must start with http:// or https://"))]
    #[schemars(length(min = 8, max = 2048))]
    pub url: Option<String>,

    /// The endpoint read from a Secret in the task's namespace labeled
    /// `chronflow.io/usable-by-tasks=true`, for URLs that carry a token (Slack and Discord
    /// webhooks): shown only as scheme and host, read at each attempt like a header's value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_from: Option<UrlSource>,

    /// HTTP method.
    #[serde(default)]
    pub method: HttpMethod,

    /// Request headers, each with a literal `value` or a `valueFrom.secretKeyRef`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub headers: Vec<HttpHeader>,

    /// Request body, sent as is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 65536))]
    pub body: Option<String>,

    /// Whether a redirect is followed: `Never` (default: the run fails, naming the
    /// `Location`) or `SameOrigin`. Header values never leave the URL's origin.
    #[serde(default)]
    pub follow_redirects: FollowRedirects,

    /// How an `https://` URL's certificate is verified. Default: against the system's roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<HttpTls>,

    /// Status codes that count as success: exact codes (`204`) or classes (`2xx`).
    #[serde(default = "default_success_codes")]
    #[schemars(
        length(min = 1, max = 32),
        inner(regex(pattern = r"^[1-5]([0-9][0-9]|xx)$"))
    )]
    pub success_codes: Vec<String>,
}

fn default_success_codes() -> Vec<String> {
    vec!["2xx".into()]
}

/// HTTP method of an `http` action.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
#[serde(rename_all = "UPPERCASE")]
pub enum HttpMethod {
    /// `GET`.
    Get,
    /// `POST` (the default).
    #[default]
    Post,
    /// `PUT`.
    Put,
    /// `PATCH`.
    Patch,
    /// `DELETE`.
    Delete,
    /// `HEAD`.
    Head,
}

/// A request header.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.value) != has(self.valueFrom)").message("a header needs exactly one of value or valueFrom"))]
pub struct HttpHeader {
    /// Header name. Reserved (in any case): `Idempotency-Key`, `X-Chronflow-Scheduled-Time`,
    /// `X-Chronflow-Attempt` (chronflow sets them), `Host`, `Content-Length`,
    /// `Transfer-Encoding`, `Connection` (the HTTP client sets them).
    #[x_kube(validation = Rule::new("!(self.lowerAscii() in ['idempotency-key', 'x-chronflow-scheduled-time', 'x-chronflow-attempt', 'x-chronflow-epoch', 'host', 'content-length', 'transfer-encoding', 'connection'])").message("header name is reserved: chronflow sets Idempotency-Key, X-Chronflow-Scheduled-Time, X-Chronflow-Attempt and X-Chronflow-Epoch, and the HTTP client sets Host, Content-Length, Transfer-Encoding and Connection"))]
    #[schemars(
        length(min = 1, max = 256),
        regex(pattern = r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
    )]
    pub name: String,

    /// Literal value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 8192))]
    pub value: Option<String>,

    /// Value read from a Secret in the task's namespace; never logged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_from: Option<HeaderValueSource>,
}

/// Where an HTTP action's URL comes from.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct UrlSource {
    /// A key of a Secret in the task's namespace whose value is the URL.
    pub secret_key_ref: SecretKeyRef,
}

/// Where a header value comes from.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HeaderValueSource {
    /// A key of a Secret in the task's namespace.
    pub secret_key_ref: SecretKeyRef,
}

/// A key of a Secret (or ConfigMap) in the task's namespace.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Object name (a DNS subdomain, as Kubernetes names Secrets and ConfigMaps).
    #[schemars(length(min = 1, max = 253), regex(pattern = crate::names::DNS_SUBDOMAIN_PATTERN))]
    pub name: String,
    /// Key within the object (letters, digits, `-`, `_`, `.`; not `.` or `..`).
    #[schemars(length(min = 1, max = 253), regex(pattern = crate::names::DATA_KEY_PATTERN))]
    pub key: String,
}

/// Certificate verification of an `https://` target.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!(has(self.caBundle) && has(self.insecureSkipVerify) && self.insecureSkipVerify)").message("http.tls needs caBundle or insecureSkipVerify, not both"))]
pub struct HttpTls {
    /// PEM certificates that are the only roots trusted for this target (a private CA), from a
    /// key of a ConfigMap or Secret in the task's namespace labeled
    /// `chronflow.io/usable-by-tasks=true`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_bundle: Option<CaBundleSource>,

    /// Accept any certificate. Refused unless the operator's `http.allow_insecure_skip_verify`
    /// is true.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub insecure_skip_verify: bool,
}

/// Where a CA bundle is read from: exactly one of a ConfigMap key or a Secret key.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.configMapKeyRef) != has(self.secretKeyRef)").message("caBundle needs exactly one of configMapKeyRef or secretKeyRef"))]
pub struct CaBundleSource {
    /// A key of a ConfigMap in the task's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map_key_ref: Option<SecretKeyRef>,
    /// A key of a Secret in the task's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_key_ref: Option<SecretKeyRef>,
}

/// A Job per run (the operator with `jobs.enabled`), named `<task>-<hash of the run>` so a run
/// can never create two Jobs, owned by the ChronTask (deleting the task deletes its Jobs) and
/// labeled `chronflow.io/task`, `chronflow.io/task-uid` and `chronflow.io/scheduled-time`. The
/// run succeeds when the Job is Complete and fails when it is Failed, with its reason
/// (`BackoffLimitExceeded`, `DeadlineExceeded`, ...).
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct JobAction {
    /// The Job to create, as in a CronJob's `jobTemplate` (batch/v1 JobTemplateSpec).
    #[schemars(schema_with = "schema::preserve_unknown_object")]
    pub template: JobTemplateSpec,
}

/// How many finished runs to keep.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct HistorySpec {
    /// Successful runs kept in `status.recentRuns`, and succeeded Jobs in the cluster (0 to 50).
    #[serde(default = "default_successful_runs_limit")]
    #[schemars(range(min = 0, max = 50))]
    pub successful_runs_limit: u32,
    /// Failed or missed runs kept in `status.recentRuns`, and failed Jobs in the cluster (0 to 50).
    #[serde(default = "default_failed_runs_limit")]
    #[schemars(range(min = 0, max = 50))]
    pub failed_runs_limit: u32,
}

impl Default for HistorySpec {
    fn default() -> Self {
        Self {
            successful_runs_limit: default_successful_runs_limit(),
            failed_runs_limit: default_failed_runs_limit(),
        }
    }
}

fn default_successful_runs_limit() -> u32 {
    3
}

fn default_failed_runs_limit() -> u32 {
    1
}
