//! ChronTask → `ValidTask` or `Invalid{reason}`: everything the schema could not check (cron
//! syntax, time zones, durations, URLs) is checked here, once. Nothing after validation reads
//! the raw spec. Pure: no client.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;

use crate::crd::{ChronTask, HistorySpec, HttpMethod, Phase};
use crate::engine::EngineTask;
use crate::executor::http::{HeaderValue, SuccessCodes};
use crate::executor::{Action, HttpAction, RetryPolicy, RunSpec};
use crate::schedule::{IntervalAnchor, Schedule, parse_duration, parse_instant, parse_timezone};

/// A ChronTask that can be scheduled.
#[derive(Debug)]
pub struct ValidTask {
    pub engine: EngineTask,
    /// The schedule as shown in status and `kubectl get`.
    pub schedule_text: String,
    /// Secrets the action reads: (name, key), checked for readability by the controller.
    pub secret_refs: Vec<(String, String)>,
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
    let timeout = duration("spec.timeout", &spec.timeout)?;
    if timeout.is_zero() {
        return Err(invalid("spec.timeout", "must be longer than 0s"));
    }
    let retry = match &spec.retry {
        None => RetryPolicy::default(),
        Some(retry) => RetryPolicy {
            max_retries: retry.max_retries,
            backoff: retry.backoff,
            initial_delay: duration("spec.retry.initialDelay", &retry.initial_delay)?,
            max_delay: duration("spec.retry.maxDelay", &retry.max_delay)?,
        },
    };
    let (action, secret_refs) = action(task)?;
    let starting_deadline = spec
        .starting_deadline_seconds
        .map(|s| Duration::from_secs(s.max(0) as u64));

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
    };
    Ok(ValidTask {
        engine,
        schedule_text,
        secret_refs,
        history: spec.history.unwrap_or_default(),
    })
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
        (None, None, Some(_)) => Schedule::at(instant("at", &spec.at)?.unwrap_or(created)),
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

fn action(task: &ChronTask) -> Result<(Action, Vec<(String, String)>), Invalid> {
    let action = &task.spec.action;
    match (&action.http, &action.job) {
        (Some(http), None) => {
            let url =
                reqwest::Url::parse(&http.url).map_err(|e| invalid("spec.action.http.url", e))?;
            if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
                return Err(invalid(
                    "spec.action.http.url",
                    "must be an http:// or https:// URL with a host",
                ));
            }
            let mut headers = Vec::new();
            let mut secret_refs = Vec::new();
            for (i, header) in http.headers.iter().enumerate() {
                let field = format!("spec.action.http.headers[{i}]");
                reqwest::header::HeaderName::from_bytes(header.name.as_bytes()).map_err(|_| {
                    invalid(
                        &field,
                        format!("{:?} is not a valid header name", header.name),
                    )
                })?;
                let value = match (&header.value, &header.value_from) {
                    (Some(value), None) => {
                        reqwest::header::HeaderValue::from_str(value).map_err(|_| {
                            invalid(&field, "value has characters a header cannot carry")
                        })?;
                        HeaderValue::Literal(value.clone())
                    }
                    (None, Some(source)) => {
                        let secret = &source.secret_key_ref;
                        secret_refs.push((secret.name.clone(), secret.key.clone()));
                        HeaderValue::Secret {
                            name: secret.name.clone(),
                            key: secret.key.clone(),
                        }
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
            let action = HttpAction {
                url,
                method,
                headers,
                body: http.body.clone(),
                success_codes,
            };
            Ok((Action::Http(action), secret_refs))
        }
        (None, Some(_)) => Err(invalid(
            "spec.action.job",
            "Job actions are not available in this version of chronflow; use an http action",
        )),
        _ => Err(invalid("spec.action", "needs exactly one of http or job")),
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
    fn a_valid_task_becomes_an_engine_task() {
        let valid = validate(
            &http(json!({"cron": "*/5 * * * * *", "jitter": "2s"})),
            Tz::UTC,
        )
        .unwrap();
        assert_eq!(valid.engine.id.key, TaskKey::new("ns", "t"));
        assert_eq!(valid.engine.id.uid, "u-1");
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
        assert!(
            reason(http(json!({"cron": "* * * * *", "jitter": "soon"})))
                .starts_with("spec.schedule.jitter: ")
        );
        let job =
            task(json!({"schedule": {"cron": "@daily"}, "action": {"job": {"template": {}}}}));
        assert!(reason(job).starts_with("spec.action.job: "));
        let bad_header = task(json!({"schedule": {"cron": "@daily"}, "action": {"http": {
            "url": "http://x.example/", "headers": [{"name": "X", "value": "a\nb"}]}}}));
        assert!(reason(bad_header).starts_with("spec.action.http.headers[0]: "));
    }

    fn with_status(mut task: ChronTask, status: serde_json::Value) -> ChronTask {
        task.status = Some(serde_json::from_value(status).unwrap());
        task
    }

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text).unwrap().to_utc()
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
        assert_eq!(valid.secret_refs, [("s".to_string(), "token".to_string())]);
    }
}
