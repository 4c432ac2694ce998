//! ChronTask → `ValidTask` or `Invalid{reason}`: everything the schema could not check (cron
//! syntax, time zones, durations, URLs) is checked here, once. Nothing after validation reads
//! the raw spec. Pure: no client.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, TimeDelta, Utc};
use chrono_tz::Tz;

use crate::crd::spec::MAX_STARTING_DEADLINE_SECONDS;
use crate::crd::spec::SecretKeyRef;
use crate::crd::{ChronTask, HistorySpec, HttpMethod, HttpTls, Phase};
use crate::crd::{RUN_NOW_ANNOTATION, RUN_NOW_WHILE_PAUSED_ANNOTATION};
use crate::engine::{BackfillRequest, EngineTask, RunNow};
use crate::executor::http::{HeaderValue, SuccessCodes, Target, Tls, ValueRef, is_reserved_header};
use crate::executor::job::JOB_DEADLINE_GRACE;
use crate::executor::{Action, HttpAction, JobAction, RetryPolicy, RunSpec};
use crate::ledger::Counts;
use crate::schedule::jitter::MAX_JITTER;
use crate::schedule::{
    IntervalAnchor, Schedule, format_duration, parse_duration, parse_instant, parse_timezone,
};

/// Why a header name is refused; the CRD's CEL rule says the same.
const RESERVED_REASON: &str = "is a reserved header name: chronflow sets Idempotency-Key, \
     X-Chronflow-Scheduled-Time and X-Chronflow-Attempt, and the HTTP client sets Host, \
     Content-Length, Transfer-Encoding and Connection";

/// How long before its creation an `at` instant may be: one written as "now" by a client whose
/// clock runs a little ahead is still run. Earlier than that, nothing would ever run.
const AT_BEFORE_CREATION: TimeDelta = TimeDelta::minutes(1);

/// The longest `spec.timeout` (per attempt) and retry delay.
const MAX_DAY: Duration = Duration::from_secs(24 * 3600);

/// A ChronTask that can be scheduled.
#[derive(Debug)]
pub struct ValidTask {
    /// The task as the engine schedules it.
    pub engine: EngineTask,
    /// The schedule as shown in status and `kubectl get`.
    pub schedule_text: String,
    /// Secret and ConfigMap keys the action reads, checked for readability by the controller.
    pub references: Vec<ValueRef>,
    /// How many runs `status.recentRuns` keeps.
    pub history: HistorySpec,
}

/// Why a ChronTask cannot be scheduled, naming the field: `spec.schedule.cron: minute: 61 is
/// out of range 0-59`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

fn invalid(field: &str, reason: impl std::fmt::Display) -> Invalid {
    Invalid(format!("{field}: {reason}"))
}

/// Validates a ChronTask. `default_timezone` is the operator's `timezone` setting.
pub fn validate(task: &ChronTask, default_timezone: Tz) -> Result<ValidTask, Invalid> {
    let meta = &task.metadata;
    let id = super::id_of(task);
    let created = meta
        .creation_timestamp
        .as_ref()
        .and_then(|t| {
            DateTime::from_timestamp(t.0.as_second(), t.0.subsec_nanosecond().max(0) as u32)
        })
        .unwrap_or_else(Utc::now);
    let spec = &task.spec;
    let (schedule, schedule_text) = schedule(task, default_timezone, created)?;

    let duration = |field: &str, text: &str| parse_duration(text).map_err(|e| invalid(field, e));
    let jitter = spec
        .schedule
        .jitter
        .as_deref()
        .map(|j| duration("spec.schedule.jitter", j))
        .transpose()?;
    if let Some(jitter) = jitter {
        check_jitter(jitter, &schedule)?;
    }
    // The same bounds as the CRD's CEL rules, for objects stored before them.
    let at_most = |field: &str, text: &str, why: &str| {
        let value = duration(field, text)?;
        if value > MAX_DAY {
            return Err(invalid(
                field,
                format!("{text:?} is longer than the maximum 24h{why}"),
            ));
        }
        Ok(value)
    };
    let timeout = at_most("spec.timeout", &spec.timeout, " (it limits each attempt)")?;
    if timeout.is_zero() {
        return Err(invalid("spec.timeout", "must be longer than 0s"));
    }
    let retry = match &spec.retry {
        None => RetryPolicy::default(),
        Some(retry) => RetryPolicy {
            max_retries: retry.max_retries,
            backoff: retry.backoff,
            initial_delay: at_most("spec.retry.initialDelay", &retry.initial_delay, "")?,
            max_delay: at_most("spec.retry.maxDelay", &retry.max_delay, "")?,
        },
    };
    let (mut action, references) = action(task)?;
    let history = spec.history.unwrap_or_default();
    // Kubernetes times out and retries a Job: the task's timeout and retries go into it.
    let (timeout, retry) = match &mut action {
        Action::Job(job) => {
            apply_to_job(job, timeout, retry.max_retries, history);
            (job.deadline + JOB_DEADLINE_GRACE, RetryPolicy::default())
        }
        _ => (timeout, retry),
    };
    let starting_deadline = match spec.starting_deadline_seconds {
        Some(seconds) if seconds > MAX_STARTING_DEADLINE_SECONDS => {
            return Err(invalid(
                "spec.startingDeadlineSeconds",
                format!(
                    "{seconds} is more than the maximum {MAX_STARTING_DEADLINE_SECONDS} (366 days)"
                ),
            ));
        }
        seconds => seconds.map(|s| Duration::from_secs(s.max(0) as u64)),
    };

    let engine = EngineTask {
        id,
        generation: meta.generation.unwrap_or_default(),
        catch_up_from: catch_up_from(task, created, &schedule),
        schedule,
        jitter,
        catch_up: spec.catch_up,
        paused: spec
            .paused
            .then(|| spec.pause_reason.clone().unwrap_or_default()),
        run: Arc::new(RunSpec {
            action,
            timeout,
            retry,
            concurrency: spec.concurrency_policy,
            max_concurrent_runs: spec.max_concurrent_runs,
            starting_deadline,
        }),
        run_now: run_now(task),
        backfills: backfills(task)?,
        adopt: Vec::new(),
        counts: task.status.as_ref().map(|status| Counts {
            runs: status.total_runs,
            succeeded: status.successful_runs,
            failed: status.failed_runs,
            missed: status.missed_runs,
            manual: status.manual_runs,
            revision: 0,
        }),
    };
    // Last, behind the checks that explain more: every limit the schema states, for a CRD
    // installed without them and for standalone manifests.
    let json = serde_json::to_value(spec).map_err(|e| invalid("spec", e))?;
    crate::crd::limits::check(&json).map_err(|(field, why)| invalid(&field, why))?;
    Ok(ValidTask {
        engine,
        schedule_text,
        references,
        history,
    })
}

/// Sets the Job's `activeDeadlineSeconds` to the task's timeout and its `backoffLimit` to its
/// retries, where the template leaves them unset (the template wins), and the Jobs kept to the
/// task's history limits.
fn apply_to_job(job: &mut JobAction, timeout: Duration, max_retries: u32, history: HistorySpec) {
    let mut template = (*job.template).clone();
    let spec = &mut template["spec"];
    if spec["activeDeadlineSeconds"].as_u64().is_none() {
        let seconds = timeout.as_secs() + u64::from(timeout.subsec_nanos() > 0);
        spec["activeDeadlineSeconds"] = seconds.max(1).into();
    }
    if spec["backoffLimit"].as_u64().is_none() {
        spec["backoffLimit"] = max_retries.into();
    }
    job.deadline = Duration::from_secs(spec["activeDeadlineSeconds"].as_u64().unwrap_or(1));
    job.template = Arc::new(template);
    job.keep_succeeded = history.successful_runs_limit;
    job.keep_failed = history.failed_runs_limit;
}

/// A jitter is at most [`MAX_JITTER`] and shorter than the smallest gap between two runs, so a
/// delayed run always starts before the next one is due.
fn check_jitter(jitter: Duration, schedule: &Schedule) -> Result<(), Invalid> {
    let field = "spec.schedule.jitter";
    if jitter > MAX_JITTER {
        return Err(invalid(
            field,
            format!(
                "{} is longer than the maximum {}",
                format_duration(jitter),
                format_duration(MAX_JITTER)
            ),
        ));
    }
    match schedule.min_gap() {
        Some(gap) if jitter >= gap => Err(invalid(
            field,
            format!(
                "{} is not shorter than the smallest gap between runs ({})",
                format_duration(jitter),
                format_duration(gap)
            ),
        )),
        _ => Ok(()),
    }
}

/// Where catch-up after downtime starts when the engine first sees the task (`None`: now).
/// Never before the task last became schedulable (`status.schedulableSince`), so a paused or
/// invalid period is not replayed, even across an operator restart.
fn catch_up_from(
    task: &ChronTask,
    created: DateTime<Utc>,
    schedule: &Schedule,
) -> Option<DateTime<Utc>> {
    let status = task.status.as_ref();
    let from = match status {
        None => created,
        Some(status) => match (status.schedulable_since, status.phase) {
            (Some(since), _) => since.max(created),
            // Stored while paused or invalid: it became schedulable while chronflow was not
            // looking, at a moment nobody recorded; replay nothing.
            (None, Some(Phase::Paused | Phase::Invalid)) => return None,
            (None, _) => created,
        },
    };
    let from = from.max(status.and_then(|s| s.last_schedule_time).unwrap_or(from));
    // A one-shot whose instant came at or just before creation ("now", or clock skew) still
    // runs once; validation rejects one further in the past.
    match schedule.one_shot() {
        Some(at) if status.is_none_or(|s| s.last_schedule_time.is_none()) => {
            Some(from.min(at - chrono::TimeDelta::nanoseconds(1)))
        }
        _ => Some(from),
    }
}

fn schedule(
    task: &ChronTask,
    default_timezone: Tz,
    created: DateTime<Utc>,
) -> Result<(Schedule, String), Invalid> {
    let spec = &task.spec.schedule;
    let field = |name: &str| format!("spec.schedule.{name}");
    let timezone = match &spec.timezone {
        Some(name) => parse_timezone(name).map_err(|e| invalid(&field("timezone"), e.reason))?,
        None => default_timezone,
    };
    let instant = |name: &str, text: &Option<String>| {
        text.as_deref()
            .map(|t| parse_instant(name, t).map_err(|e| invalid(&field(name), e.reason)))
            .transpose()
    };
    let start_at = instant("startAt", &spec.start_at)?;
    let end_at = instant("endAt", &spec.end_at)?;
    let schedule = match (&spec.cron, &spec.interval, &spec.at) {
        (Some(cron), None, None) => {
            Schedule::cron(cron, timezone).map_err(|e| invalid(&field("cron"), e))?
        }
        (None, Some(interval), None) => {
            let every = parse_duration(interval).map_err(|e| invalid(&field("interval"), e))?;
            let anchor = match start_at {
                Some(start) => IntervalAnchor::Start(start),
                None => IntervalAnchor::Created(created),
            };
            Schedule::interval(every, anchor).map_err(|e| invalid(&field("interval"), e.reason))?
        }
        (None, None, Some(_)) => {
            let at = instant("at", &spec.at)?.unwrap_or(created);
            let earliest = created
                .checked_sub_signed(AT_BEFORE_CREATION)
                .unwrap_or(created);
            if at < earliest {
                let show = |t: DateTime<Utc>| t.to_rfc3339_opts(SecondsFormat::AutoSi, true);
                return Err(invalid(
                    &field("at"),
                    format!(
                        "{} is before the task was created (creationTimestamp {}), so nothing would run",
                        show(at),
                        show(created)
                    ),
                ));
            }
            Schedule::at(at)
        }
        _ => {
            return Err(invalid(
                "spec.schedule",
                "needs exactly one of cron, interval or at",
            ));
        }
    };
    let schedule = schedule
        .with_bounds(start_at, end_at)
        .map_err(|e| invalid(&field(&e.field), e.reason))?;
    let text = schedule.describe();
    Ok((schedule, text))
}

fn action(task: &ChronTask) -> Result<(Action, Vec<ValueRef>), Invalid> {
    let action = &task.spec.action;
    match (&action.http, &action.job, &action.exec) {
        (None, None, Some(exec)) => {
            if exec
                .command
                .first()
                .is_none_or(|program| program.is_empty())
            {
                return Err(invalid("spec.action.exec.command", "needs a program"));
            }
            let action = crate::executor::exec::ExecAction {
                command: exec.command.clone(),
                env: exec
                    .env
                    .iter()
                    .map(|var| (var.name.clone(), var.value.clone()))
                    .collect(),
                working_dir: exec.working_dir.as_ref().map(Into::into),
            };
            Ok((Action::Exec(Box::new(action)), Vec::new()))
        }
        (Some(http), None, None) => {
            let mut references = Vec::new();
            let url = match (&http.url, &http.url_from) {
                (Some(url), None) => {
                    let field = "spec.action.http.url";
                    let url = reqwest::Url::parse(url).map_err(|e| invalid(field, e))?;
                    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
                        return Err(invalid(
                            field,
                            "must be an http:// or https:// URL with a host",
                        ));
                    }
                    Target::Url(url)
                }
                (None, Some(source)) => {
                    let secret = &source.secret_key_ref;
                    key_ref("spec.action.http.urlFrom.secretKeyRef", secret)?;
                    let reference = ValueRef::secret(&secret.name, &secret.key);
                    references.push(reference.clone());
                    Target::Secret(reference)
                }
                _ => {
                    return Err(invalid(
                        "spec.action.http",
                        "needs exactly one of url or urlFrom",
                    ));
                }
            };
            let mut headers = Vec::new();
            for (i, header) in http.headers.iter().enumerate() {
                let field = format!("spec.action.http.headers[{i}]");
                reqwest::header::HeaderName::from_bytes(header.name.as_bytes()).map_err(|_| {
                    invalid(
                        &field,
                        format!("{:?} is not a valid header name", header.name),
                    )
                })?;
                if is_reserved_header(&header.name) {
                    return Err(invalid(
                        &field,
                        format!("{:?} {RESERVED_REASON}", header.name),
                    ));
                }
                let value = match (&header.value, &header.value_from) {
                    (Some(value), None) => {
                        reqwest::header::HeaderValue::from_str(value).map_err(|_| {
                            invalid(&field, "value has characters a header cannot carry")
                        })?;
                        HeaderValue::Literal(value.clone())
                    }
                    (None, Some(source)) => {
                        let secret = &source.secret_key_ref;
                        key_ref(&format!("{field}.valueFrom.secretKeyRef"), secret)?;
                        let reference = ValueRef::secret(&secret.name, &secret.key);
                        references.push(reference.clone());
                        HeaderValue::Reference(reference)
                    }
                    _ => return Err(invalid(&field, "needs exactly one of value or valueFrom")),
                };
                headers.push((header.name.clone(), value));
            }
            let success_codes = SuccessCodes::parse(&http.success_codes)
                .map_err(|e| invalid("spec.action.http.successCodes", e))?;
            let method = match http.method {
                HttpMethod::Get => reqwest::Method::GET,
                HttpMethod::Post => reqwest::Method::POST,
                HttpMethod::Put => reqwest::Method::PUT,
                HttpMethod::Patch => reqwest::Method::PATCH,
                HttpMethod::Delete => reqwest::Method::DELETE,
                HttpMethod::Head => reqwest::Method::HEAD,
            };
            let tls = tls(http.tls.as_ref(), &url, &mut references)?;
            let action = HttpAction {
                url,
                method,
                headers,
                body: http.body.clone(),
                success_codes,
                follow_redirects: http.follow_redirects,
                tls,
            };
            Ok((Action::Http(Box::new(action)), references))
        }
        (None, Some(job), None) => {
            let containers = job
                .template
                .spec
                .as_ref()
                .and_then(|spec| spec.template.spec.as_ref())
                .map_or(0, |pod| pod.containers.len());
            if containers == 0 {
                return Err(invalid(
                    "spec.action.job.template.spec.template.spec.containers",
                    "needs at least one container",
                ));
            }
            let template = serde_json::to_value(&job.template)
                .map_err(|e| invalid("spec.action.job.template", e))?;
            let action = JobAction {
                template: Arc::new(template),
                deadline: Duration::ZERO,
                keep_succeeded: 0,
                keep_failed: 0,
            };
            Ok((Action::Job(action), Vec::new()))
        }
        _ => Err(invalid(
            "spec.action",
            "needs exactly one of http or job (exec: standalone only)",
        )),
    }
}

/// The `chronflow.io/run-now` request, if the annotation has a value.
fn run_now(task: &ChronTask) -> Option<RunNow> {
    let annotations = task.metadata.annotations.as_ref()?;
    let request = annotations
        .get(RUN_NOW_ANNOTATION)
        .map(|value| value.trim())
        .filter(|value| !value.is_empty())?;
    let while_paused = annotations
        .get(RUN_NOW_WHILE_PAUSED_ANNOTATION)
        .is_some_and(|value| value == "true");
    Some(RunNow {
        request: request.to_string(),
        while_paused,
    })
}

/// `spec.backfill`, not started (the controller adds where each stands).
fn backfills(task: &ChronTask) -> Result<Vec<BackfillRequest>, Invalid> {
    let mut requests: Vec<BackfillRequest> = Vec::new();
    for (i, backfill) in task.spec.backfill.iter().enumerate() {
        let field = |name: &str| format!("spec.backfill[{i}].{name}");
        let instant = |name: &str, text: &str| {
            parse_instant(&field(name), text).map_err(|e| invalid(&field(name), e.reason))
        };
        let (start, end) = (
            instant("start", &backfill.start)?,
            instant("end", &backfill.end)?,
        );
        if end < start {
            return Err(invalid(&field("end"), "must not be before start"));
        }
        if requests.iter().any(|r| r.id == backfill.id) {
            return Err(invalid(
                &field("id"),
                format!("{:?} is used twice", backfill.id),
            ));
        }
        requests.push(BackfillRequest {
            id: backfill.id.clone(),
            start,
            end,
            done: 0,
            over: false,
        });
    }
    Ok(requests)
}

/// `spec.action.http.tls`; a CA bundle's reference is added to `references`.
/// A Secret's or ConfigMap's name and key as Kubernetes allows them (the CRD's patterns, checked
/// again: a CRD applied without them, or a standalone manifest, never reaches the API path or
/// the file system with `/` or `..`).
fn key_ref(field: &str, reference: &SecretKeyRef) -> Result<(), Invalid> {
    if !crate::names::is_dns_subdomain(&reference.name) {
        return Err(invalid(
            &format!("{field}.name"),
            format!(
                "{:?} is not a valid name (lower-case letters, digits, '-' and '.')",
                reference.name
            ),
        ));
    }
    if !crate::names::is_data_key(&reference.key) {
        return Err(invalid(
            &format!("{field}.key"),
            format!(
                "{:?} is not a valid key (letters, digits, '-', '_' and '.'; not '.' or '..')",
                reference.key
            ),
        ));
    }
    Ok(())
}

/// A URL read from a Secret is checked against `tls` at each attempt instead.
fn tls(
    spec: Option<&HttpTls>,
    url: &Target,
    references: &mut Vec<ValueRef>,
) -> Result<Tls, Invalid> {
    let field = "spec.action.http.tls";
    let Some(spec) = spec else {
        return Ok(Tls::SystemRoots);
    };
    if let Target::Url(url) = url
        && url.scheme() != "https"
    {
        return Err(invalid(field, "applies to https:// URLs only"));
    }
    let bundle = spec.ca_bundle.as_ref().map(|source| {
        let field = format!("{field}.caBundle");
        match (&source.config_map_key_ref, &source.secret_key_ref) {
            (Some(r), None) => key_ref(&format!("{field}.configMapKeyRef"), r)
                .map(|()| ValueRef::config_map(&r.name, &r.key)),
            (None, Some(r)) => key_ref(&format!("{field}.secretKeyRef"), r)
                .map(|()| ValueRef::secret(&r.name, &r.key)),
            _ => Err(invalid(
                &field,
                "needs exactly one of configMapKeyRef or secretKeyRef",
            )),
        }
    });
    match (bundle.transpose()?, spec.insecure_skip_verify) {
        (Some(_), true) => Err(invalid(
            field,
            "needs caBundle or insecureSkipVerify, not both",
        )),
        (Some(reference), false) => {
            references.push(reference.clone());
            Ok(Tls::CaBundle(reference))
        }
        (None, true) => Ok(Tls::InsecureSkipVerify),
        (None, false) => Ok(Tls::SystemRoots),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::run::TaskKey;
    use serde_json::json;

    fn task(spec: serde_json::Value) -> ChronTask {
        serde_json::from_value(json!({
            "apiVersion": "chronflow.io/v1alpha1",
            "kind": "ChronTask",
            "metadata": {"name": "t", "namespace": "ns", "uid": "u-1",
                         "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": spec,
        }))
        .unwrap()
    }

    fn http(schedule: serde_json::Value) -> ChronTask {
        task(json!({"schedule": schedule, "action": {"http": {"url": "http://127.0.0.1:9/x"}}}))
    }

    fn reason(task: ChronTask) -> String {
        validate(&task, Tz::UTC).unwrap_err().0
    }

    #[test]
    fn a_job_gets_the_tasks_timeout_and_retries_unless_its_template_sets_them() {
        let job = |template: serde_json::Value| {
            let valid = validate(
                &task(json!({"schedule": {"cron": "@daily"}, "timeout": "90s",
                    "retry": {"maxRetries": 2}, "history": {"successfulRunsLimit": 5},
                    "action": {"job": {"template": template}}})),
                Tz::UTC,
            )
            .unwrap();
            let Action::Job(action) = &valid.engine.run.action else {
                panic!("not a Job action")
            };
            let spec = &action.template["spec"];
            (
                spec["activeDeadlineSeconds"].clone(),
                spec["backoffLimit"].clone(),
                action.deadline,
                valid.engine.run.clone(),
                (action.keep_succeeded, action.keep_failed),
            )
        };
        let pod = json!({"spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "x"}]}});
        let (deadline, backoff, kept, run, keep) = job(json!({"spec": {"template": pod}}));
        assert_eq!((deadline, backoff), (json!(90), json!(2)));
        assert_eq!(kept, Duration::from_secs(90));
        // Kubernetes retries and times the Job out; the executor only waits for it, a little
        // longer than its deadline.
        assert_eq!(run.retry.max_attempts(), 1);
        assert_eq!(run.timeout, Duration::from_secs(90) + JOB_DEADLINE_GRACE);
        assert_eq!(keep, (5, 1));
        let (deadline, backoff, kept, _, _) = job(json!({"spec": {
            "activeDeadlineSeconds": 7200, "backoffLimit": 0, "template": pod}}));
        assert_eq!((deadline, backoff), (json!(7200), json!(0)));
        assert_eq!(kept, Duration::from_secs(7200));
    }

    #[test]
    fn a_valid_task_becomes_an_engine_task() {
        let valid = validate(
            &http(json!({"cron": "*/5 * * * * *", "jitter": "2s"})),
            Tz::UTC,
        )
        .unwrap();
        assert_eq!(valid.engine.id.key, TaskKey::new("ns", "t"));
        assert_eq!(&*valid.engine.id.uid, "u-1");
        assert_eq!(valid.engine.jitter, Some(Duration::from_secs(2)));
        assert_eq!(valid.engine.run.timeout, Duration::from_secs(30));
        assert_eq!(valid.engine.run.retry.max_attempts(), 1);
        assert_eq!(valid.engine.paused, None);
        assert!(
            valid.schedule_text.contains("*/5 * * * * *"),
            "{}",
            valid.schedule_text
        );
    }

    #[test]
    fn interval_without_start_is_anchored_at_creation() {
        let valid = validate(&http(json!({"interval": "10s"})), Tz::UTC).unwrap();
        let created = DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
            .unwrap()
            .to_utc();
        assert_eq!(
            valid.engine.schedule.next_after(created),
            Some(created + chrono::Duration::seconds(10))
        );
    }

    #[test]
    fn invalid_specs_name_the_field() {
        assert_eq!(
            reason(http(json!({"cron": "61 * * * *"}))),
            "spec.schedule.cron: minute: 61 is out of range 0-59"
        );
        assert!(
            reason(http(json!({"cron": "* * * * *", "timezone": "Mars/Base"})))
                .starts_with("spec.schedule.timezone: ")
        );
        assert!(reason(http(json!({"interval": "0s"}))).starts_with("spec.schedule.interval: "));
        assert_eq!(
            reason(http(json!({"interval": "3000000d"}))),
            "spec.schedule.interval: \"3000000d\" is longer than the maximum 366d"
        );
        assert!(
            reason(http(json!({"cron": "* * * * *", "jitter": "soon"})))
                .starts_with("spec.schedule.jitter: ")
        );
        let job =
            task(json!({"schedule": {"cron": "@daily"}, "action": {"job": {"template": {}}}}));
        assert!(
            reason(job).starts_with("spec.action.job.template.spec.template.spec.containers: ")
        );
        let bad_header = task(json!({"schedule": {"cron": "@daily"}, "action": {"http": {
            "url": "http://x.example/", "headers": [{"name": "X", "value": "a\nb"}]}}}));
        assert!(reason(bad_header).starts_with("spec.action.http.headers[0]: "));
    }

    #[test]
    fn secret_names_and_keys_are_checked_as_kubernetes_does() {
        let header = |name: &str, key: &str| {
            task(json!({"schedule": {"cron": "@daily"}, "action": {"http": {
                "url": "https://x.example/", "headers": [{"name": "Authorization",
                "valueFrom": {"secretKeyRef": {"name": name, "key": key}}}]}}}))
        };
        assert_eq!(
            reason(header(
                "../../api/v1/namespaces/kube-system/secrets/x",
                "token"
            )),
            "spec.action.http.headers[0].valueFrom.secretKeyRef.name: \"../../api/v1/namespaces/\
             kube-system/secrets/x\" is not a valid name (lower-case letters, digits, '-' and '.')"
        );
        assert_eq!(
            reason(header("shop", "/etc/hostname")),
            "spec.action.http.headers[0].valueFrom.secretKeyRef.key: \"/etc/hostname\" is not a \
             valid key (letters, digits, '-', '_' and '.'; not '.' or '..')"
        );
        assert!(reason(header("shop", "..")).contains(".key: \"..\" is not a valid key"));
        let bundle = task(json!({"schedule": {"cron": "@daily"}, "action": {"http": {
            "url": "https://x.example/", "tls": {"caBundle": {"configMapKeyRef":
            {"name": "Ca", "key": "ca.crt"}}}}}}));
        assert!(
            reason(bundle)
                .starts_with("spec.action.http.tls.caBundle.configMapKeyRef.name: \"Ca\" is not")
        );
    }

    /// A CRD installed without the schema's limits (or a standalone manifest) lifts none: they
    /// are checked again here.
    #[test]
    fn the_schema_s_limits_hold_without_the_apiserver() {
        let headers: Vec<_> = (0..65)
            .map(|i| json!({"name": format!("X-{i}"), "value": "v"}))
            .collect();
        let many = task(json!({"schedule": {"cron": "@daily"}, "action": {"http": {
            "url": "http://x.example/", "headers": headers}}}));
        assert_eq!(
            reason(many),
            "spec.action.http.headers: 65 items, at most 64"
        );
        let concurrent = task(
            json!({"schedule": {"cron": "@daily"}, "maxConcurrentRuns": 101,
            "concurrencyPolicy": "Allow", "action": {"http": {"url": "http://x.example/"}}}),
        );
        assert_eq!(
            reason(concurrent),
            "spec.maxConcurrentRuns: 101 is above the maximum 100"
        );
    }

    #[test]
    fn a_url_comes_from_the_spec_or_from_a_secret_never_both() {
        let with = |http: serde_json::Value| {
            task(json!({"schedule": {"cron": "@daily"}, "action": {"http": http}}))
        };
        let from = json!({"secretKeyRef": {"name": "hook", "key": "url"}});
        let exactly_one = "spec.action.http: needs exactly one of url or urlFrom";
        assert_eq!(reason(with(json!({}))), exactly_one);
        assert_eq!(
            reason(with(json!({"url": "http://x.example/", "urlFrom": from}))),
            exactly_one
        );
        let valid = validate(&with(json!({"urlFrom": from})), Tz::UTC).unwrap();
        assert_eq!(valid.references, [ValueRef::secret("hook", "url")]);
        // Its scheme is known at each attempt only, where tls is checked against it.
        let tls = json!({"urlFrom": from, "tls": {"insecureSkipVerify": true}});
        assert!(validate(&with(tls), Tz::UTC).is_ok());
        let bad = json!({"urlFrom": {"secretKeyRef": {"name": "hook", "key": "/etc/hostname"}}});
        assert!(reason(with(bad)).starts_with("spec.action.http.urlFrom.secretKeyRef.key: "));
    }

    fn with_status(mut task: ChronTask, status: serde_json::Value) -> ChronTask {
        task.status = Some(serde_json::from_value(status).unwrap());
        task
    }

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text).unwrap().to_utc()
    }

    #[test]
    fn jitter_is_at_most_an_hour_and_shorter_than_the_gap_between_runs() {
        assert_eq!(
            reason(http(json!({"cron": "*/5 * * * * *", "jitter": "10s"}))),
            "spec.schedule.jitter: 10s is not shorter than the smallest gap between runs (5s)"
        );
        assert_eq!(
            reason(http(json!({"cron": "*/5 * * * * *", "jitter": "5s"}))),
            "spec.schedule.jitter: 5s is not shorter than the smallest gap between runs (5s)"
        );
        assert_eq!(
            reason(http(json!({"interval": "1m", "jitter": "1m"}))),
            "spec.schedule.jitter: 1m is not shorter than the smallest gap between runs (1m)"
        );
        assert_eq!(
            reason(http(json!({"cron": "@daily", "jitter": "1h1ms"}))),
            "spec.schedule.jitter: 1h1ms is longer than the maximum 1h"
        );
        assert_eq!(
            reason(http(
                json!({"at": "2026-06-01T00:00:00Z", "jitter": "9999999999d"})
            )),
            "spec.schedule.jitter: \"9999999999d\" is longer than the maximum 366d"
        );
        for (schedule, jitter) in [
            (json!({"cron": "*/5 * * * * *"}), "4s999ms"),
            (json!({"cron": "@daily"}), "1h"),
            (json!({"interval": "1m"}), "59s"),
            (json!({"at": "2026-06-01T00:00:00Z"}), "1h"),
            (json!({"cron": "* * * * *"}), "0s"),
        ] {
            let mut schedule = schedule;
            schedule["jitter"] = json!(jitter);
            let valid = validate(&http(schedule.clone()), Tz::UTC)
                .unwrap_or_else(|e| panic!("{schedule}: {e}"));
            assert_eq!(valid.engine.jitter, parse_duration(jitter).ok());
        }
    }

    #[test]
    fn an_at_instant_before_creation_is_invalid_as_it_would_never_run() {
        // The task was created at 2026-01-01T00:00:00Z.
        assert_eq!(
            reason(http(json!({"at": "2025-12-31T23:58:59Z"}))),
            "spec.schedule.at: 2025-12-31T23:58:59Z is before the task was created \
             (creationTimestamp 2026-01-01T00:00:00Z), so nothing would run"
        );
        assert!(
            reason(http(json!({"at": "2020-01-01T08:00:00+08:00"}))).starts_with(
                "spec.schedule.at: 2020-01-01T00:00:00Z is before the task was created"
            )
        );
        // Within a minute before creation (clock skew, "now"): valid, the engine runs it.
        for at in [
            "2025-12-31T23:59:00Z",
            "2025-12-31T23:59:30.5Z",
            "2026-01-01T00:00:00Z",
            "2026-06-01T00:00:00Z",
        ] {
            let valid =
                validate(&http(json!({"at": at})), Tz::UTC).unwrap_or_else(|e| panic!("{at}: {e}"));
            assert!(valid.schedule_text.starts_with("at "), "{at}");
        }
    }

    #[test]
    fn timeouts_retry_delays_and_deadlines_are_bounded() {
        let with = |extra: serde_json::Value| {
            let mut spec = json!({"schedule": {"cron": "@daily"},
                "action": {"http": {"url": "http://127.0.0.1:9/x"}}});
            for (key, value) in extra.as_object().unwrap() {
                spec[key] = value.clone();
            }
            task(spec)
        };
        assert_eq!(
            reason(with(json!({"timeout": "24h1ms"}))),
            "spec.timeout: \"24h1ms\" is longer than the maximum 24h (it limits each attempt)"
        );
        assert_eq!(
            reason(with(json!({"timeout": "2d"}))),
            "spec.timeout: \"2d\" is longer than the maximum 24h (it limits each attempt)"
        );
        assert_eq!(
            reason(with(
                json!({"retry": {"maxRetries": 1, "initialDelay": "1s", "maxDelay": "25h"}})
            )),
            "spec.retry.maxDelay: \"25h\" is longer than the maximum 24h"
        );
        assert_eq!(
            reason(with(
                json!({"retry": {"maxRetries": 1, "initialDelay": "30h", "maxDelay": "1h"}})
            )),
            "spec.retry.initialDelay: \"30h\" is longer than the maximum 24h"
        );
        assert_eq!(
            reason(with(json!({"startingDeadlineSeconds": 31_622_401}))),
            "spec.startingDeadlineSeconds: 31622401 is more than the maximum 31622400 (366 days)"
        );
        let longest = with(
            json!({"timeout": "24h", "startingDeadlineSeconds": 31_622_400,
            "retry": {"maxRetries": 10, "initialDelay": "24h", "maxDelay": "24h"}}),
        );
        let valid = validate(&longest, Tz::UTC).unwrap();
        assert_eq!(valid.engine.run.timeout, Duration::from_secs(86_400));
        assert_eq!(
            valid.engine.run.retry.max_delay,
            Duration::from_secs(86_400)
        );
        assert_eq!(
            valid.engine.run.starting_deadline,
            Some(Duration::from_secs(31_622_400))
        );
        // A day written in days, as objects stored before the pattern excluded them.
        assert!(validate(&with(json!({"timeout": "1d"})), Tz::UTC).is_ok());
    }

    #[test]
    fn reserved_header_names_are_refused_in_any_case() {
        let with_header = |name: &str| {
            task(json!({"schedule": {"cron": "@daily"}, "action": {"http": {
                "url": "http://x.example/", "headers": [
                    {"name": "X-Ok", "value": "1"},
                    {"name": name, "value": "x"}]}}}))
        };
        for name in [
            "Idempotency-Key",
            "idempotency-key",
            "X-CHRONFLOW-SCHEDULED-TIME",
            "X-Chronflow-Attempt",
            "host",
            "Content-Length",
            "Transfer-Encoding",
            "Connection",
        ] {
            assert_eq!(
                reason(with_header(name)),
                format!("spec.action.http.headers[1]: {name:?} {RESERVED_REASON}"),
            );
        }
        for name in [
            "X-Idempotency-Key",
            "Authorization",
            "User-Agent",
            "Hostname",
        ] {
            assert!(validate(&with_header(name), Tz::UTC).is_ok(), "{name}");
        }
    }

    #[test]
    fn catch_up_never_reaches_back_before_the_task_became_schedulable() {
        let anchor = |status| {
            let task = with_status(http(json!({"cron": "30 2 * * *"})), status);
            validate(&task, Tz::UTC).unwrap().engine.catch_up_from
        };
        // Resumed (or fixed) after its last run: schedulableSince wins.
        assert_eq!(
            anchor(
                json!({"phase": "Scheduled", "lastScheduleTime": "2026-03-02T02:30:00Z",
                          "schedulableSince": "2026-03-04T12:00:00Z"})
            ),
            Some(at("2026-03-04T12:00:00Z"))
        );
        // Running all along: from the last scheduled instant.
        assert_eq!(
            anchor(
                json!({"phase": "Scheduled", "lastScheduleTime": "2026-03-05T02:30:00Z",
                          "schedulableSince": "2026-03-04T12:00:00Z"})
            ),
            Some(at("2026-03-05T02:30:00Z"))
        );
        // Last seen paused or invalid: resumed or fixed while chronflow was down; from now.
        for phase in ["Paused", "Invalid"] {
            let status = json!({"phase": phase, "lastScheduleTime": "2026-03-02T02:30:00Z"});
            assert_eq!(anchor(status), None, "{phase}");
        }
        let fresh = validate(&http(json!({"cron": "30 2 * * *"})), Tz::UTC).unwrap();
        assert_eq!(
            fresh.engine.catch_up_from,
            Some(at("2026-01-01T00:00:00Z")),
            "creation"
        );
    }

    #[test]
    fn a_one_shot_at_its_creation_instant_is_still_due() {
        let created = at("2026-01-01T00:00:00Z");
        for at_text in [
            "2026-01-01T00:00:00Z",
            "2026-01-01T00:00:00-00:00",
            "2025-12-31T23:59:59Z",
        ] {
            let valid = validate(&http(json!({"at": at_text})), Tz::UTC).unwrap();
            let from = valid.engine.catch_up_from.unwrap();
            assert_eq!(
                valid.engine.schedule.next_after(from),
                Some(at(at_text)),
                "{at_text}: the instant is due once the engine sees the task"
            );
            assert!(from < created);
        }
        // Once it ran, it never runs again.
        let ran = with_status(
            http(json!({"at": "2026-01-01T00:00:00Z"})),
            json!({"phase": "Completed", "lastScheduleTime": "2026-01-01T00:00:00Z",
                   "schedulableSince": "2026-01-01T00:00:00Z"}),
        );
        let valid = validate(&ran, Tz::UTC).unwrap();
        assert_eq!(
            valid
                .engine
                .schedule
                .next_after(valid.engine.catch_up_from.unwrap()),
            None
        );
    }

    #[test]
    fn paused_tasks_carry_their_reason_and_secrets_are_collected() {
        let paused = task(
            json!({"schedule": {"cron": "@hourly"}, "paused": true, "pauseReason": "migration",
            "action": {"http": {"url": "https://x.example/", "headers": [
                {"name": "Authorization", "valueFrom": {"secretKeyRef": {"name": "s", "key": "token"}}}]}}}),
        );
        let valid = validate(&paused, Tz::UTC).unwrap();
        assert_eq!(valid.engine.paused.as_deref(), Some("migration"));
        assert_eq!(valid.references, [ValueRef::secret("s", "token")]);
    }
}
