//! Hostile input never panics: whatever a user puts in a ChronTask spec (arbitrary JSON, or the
//! spec's own shape with arbitrary values) or in the operator's configuration (arbitrary YAML
//! and `SCHEDULER__` variables), the result is a value or an error that names the field or
//! key, never a panic and never a hang. The cron and duration parsers have their own properties
//! in `tests/schedule_props.rs`. Case counts bound the time (a few seconds in `scripts/test`).

use chronflow::ChronTask;
use chronflow::config::OperatorConfig;
use chronflow::controller::validate::validate;
use chrono_tz::Tz;
use proptest::prelude::*;
use serde_json::{Value, json};

/// Any JSON value, a few levels deep.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| json!(f)),
        ".{0,24}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 5, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-zA-Z]{1,12}", inner, 0..5)
                .prop_map(|map| Value::Object(map.into_iter().collect())),
        ]
    })
}

/// Text that looks like what goes in a field, and sometimes is not.
fn field_text() -> impl Strategy<Value = Value> {
    prop_oneof![
        "[0-9*/,?LW#@a-zA-Z -]{0,30}",
        "-?[0-9]{1,25}(ms|s|m|h|d|x)?",
        "(http|https|ftp)://[a-z0-9.:@\\[\\]]{0,20}(/[a-z?=&%]{0,10})?",
        "[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(Z|[+-][0-9]{2}:[0-9]{2})?",
        "[A-Za-z_/+-]{0,30}",
        ".{0,40}",
    ]
    .prop_map(Value::String)
}

/// A value for a field: mostly text of the right kind, sometimes anything.
fn field_value() -> impl Strategy<Value = Value> {
    prop_oneof![4 => field_text(), 1 => any::<i64>().prop_map(Value::from), 1 => any_json()]
}

/// Mostly text that fits (`pattern`), sometimes any field text.
fn fitting(pattern: &'static str) -> impl Strategy<Value = Value> {
    prop_oneof![3 => pattern.prop_map(Value::String), 1 => field_text()]
}

fn maybe<S: Strategy<Value = Value>>(strategy: S) -> impl Strategy<Value = Value> {
    prop::option::weighted(0.3, strategy).prop_map(|v| v.unwrap_or(Value::Null))
}

/// Mostly a small number, sometimes any.
fn small<T: Strategy<Value = u32>>(range: T) -> impl Strategy<Value = u32> {
    prop_oneof![3 => range, 1 => any::<u32>()]
}

fn one_of(words: &'static [&'static str]) -> impl Strategy<Value = Value> {
    prop::sample::select(words).prop_map(|word| json!(word))
}

/// The ChronTask spec's own shape and types, with arbitrary values: these decode, so they
/// reach validation.
fn shaped_spec() -> impl Strategy<Value = Value> {
    let schedule = (
        prop_oneof![
            fitting("(\\*|[0-5]?[0-9])( (\\*|\\*/[1-9]|[0-9]{1,2})){4,5}")
                .prop_map(|v| ("cron", v)),
            fitting("[1-9][0-9]{0,3}(ms|s|m|h)").prop_map(|v| ("interval", v)),
            fitting("20[2-9][0-9]-0[1-9]-1[0-9]T0[0-9]:00:00Z").prop_map(|v| ("at", v)),
        ],
        maybe(fitting("UTC|Europe/Paris|Asia/Shanghai|America/New_York")),
        maybe(fitting("[1-9]00ms")),
        maybe(fitting("20[2-9][0-9]-0[1-9]-1[0-9]T0[0-9]:00:00Z")),
        maybe(fitting("20[2-9][0-9]-0[1-9]-2[0-9]T0[0-9]:00:00Z")),
    )
        .prop_map(|((kind, value), timezone, jitter, start, end)| {
            json!({kind: value, "timezone": timezone, "jitter": jitter,
                   "startAt": start, "endAt": end})
        });
    let header = (fitting("X-[A-Z][a-z]{1,8}"), fitting("[a-z0-9]{0,12}"))
        .prop_map(|(name, value)| json!({"name": name, "value": value}));
    let http = (
        fitting("http://127\\.0\\.0\\.1:[1-9][0-9]{0,3}/[a-z]{0,5}"),
        one_of(&["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"]),
        prop::collection::vec(header, 0..2),
        maybe(field_text()),
        one_of(&["Never", "SameOrigin"]),
        prop::collection::vec(fitting("[1-5]([0-9]{2}|xx)"), 1..3),
    )
        .prop_map(|(url, method, headers, body, follow, codes)| {
            json!({"url": url, "method": method, "headers": headers, "body": body,
                   "followRedirects": follow, "successCodes": codes})
        });
    let delay = || fitting("[1-9](00ms|s)");
    let retry = (small(0u32..5), one_of(&["Fixed", "Linear", "Exponential"]), delay(), delay())
        .prop_map(|(max, backoff, initial, most)| {
            json!({"maxRetries": max, "backoff": backoff, "initialDelay": initial, "maxDelay": most})
        });
    let policies = (
        any::<bool>(),
        one_of(&["Allow", "Forbid", "Replace"]),
        small(1u32..20),
        prop::option::of(prop_oneof![3 => 1i64..100, 1 => any::<i64>()]),
        one_of(&["Skip", "Latest", "All"]),
        fitting("[1-9][0-9]{0,2}(ms|s)"),
    );
    (schedule, http, maybe(retry), policies).prop_map(
        |(schedule, http, retry, (paused, concurrency, most, deadline, catch_up, timeout))| {
            json!({"schedule": schedule, "action": {"http": http}, "retry": retry,
                   "paused": paused, "concurrencyPolicy": concurrency,
                   "maxConcurrentRuns": most, "startingDeadlineSeconds": deadline,
                   "catchUp": catch_up, "timeout": timeout})
        },
    )
}

fn check_spec(spec: Value) -> Result<(), TestCaseError> {
    let object = json!({
        "apiVersion": "chronflow.io/v1alpha1",
        "kind": "ChronTask",
        "metadata": {"name": "hostile", "namespace": "ns", "uid": "u",
                     "creationTimestamp": "2026-11-29T00:00:00Z", "generation": 1},
        "spec": spec,
    });
    // What does not decode reaches reconcile as an error and becomes Invalid (the controller
    // watches DeserializeGuard<ChronTask>); what decodes is validated.
    if let Ok(task) = serde_json::from_value::<ChronTask>(object) {
        for zone in [Tz::UTC, Tz::Australia__Lord_Howe] {
            if let Err(invalid) = validate(&task, zone) {
                let (field, reason) = invalid.0.split_once(": ").unwrap_or(("", ""));
                prop_assert!(
                    field.starts_with("spec") || field.starts_with("metadata"),
                    "no field named: {}",
                    invalid.0
                );
                prop_assert!(!reason.is_empty(), "no reason: {}", invalid.0);
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1500, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_json_specs_never_panic(spec in any_json()) {
        check_spec(spec)?;
    }

    #[test]
    fn shaped_specs_with_arbitrary_values_never_panic(spec in shaped_spec()) {
        check_spec(spec)?;
    }
}

/// Every key of the configuration, dotted.
const KEYS: &[&str] = &[
    "backend_type",
    "max_workers",
    "queue_size",
    "timezone",
    "watch_namespaces",
    "redis.url",
    "redis.host",
    "redis.port",
    "redis.db",
    "redis.password",
    "redis.timeout",
    "redis.max_connections",
    "redis.cluster",
    "redis.wait_replicas",
    "leader_election.enabled",
    "leader_election.lease_duration",
    "leader_election.renew_deadline",
    "leader_election.retry_period",
    "leader_election.max_clock_skew",
    "leader_election.lease_name",
    "log.format",
    "log.level",
    "metrics.bind",
    "status.flush_interval",
    "status.max_writes_per_second",
    "shutdown.grace_period",
    "secrets.cache_ttl",
    "http.deny_cidrs",
    "http.allow_cidrs",
    "http.allow_insecure_skip_verify",
    "limits.min_period",
    "limits.max_runs_per_namespace",
    "limits.max_tasks_per_namespace",
    "limits.backfill_runs_per_second",
    "jobs.enabled",
    "no_such_key",
    "redis.no_such_key",
];

fn check_config(yaml: &str, env: Vec<(String, String)>) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("chronflow.yaml");
    std::fs::write(&path, yaml).unwrap();
    if let Err(error) = OperatorConfig::load_from(Some(&path), env) {
        let text = error.to_string();
        prop_assert!(
            !error.problems().is_empty() && text.starts_with("config: "),
            "{text}"
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 600, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_configuration_text_never_panics(yaml in ".{0,200}") {
        check_config(&yaml, Vec::new())?;
    }

    #[test]
    fn known_keys_with_arbitrary_values_never_panic(
        file in prop::collection::vec((prop::sample::select(KEYS), field_value()), 0..6),
        env in prop::collection::vec((prop::sample::select(KEYS), ".{0,30}"), 0..4),
    ) {
        // Nested YAML from dotted keys.
        let mut tree = json!({});
        for (key, value) in file {
            let mut node = &mut tree;
            let parts: Vec<&str> = key.split('.').collect();
            for part in &parts[..parts.len() - 1] {
                if !node[*part].is_object() {
                    node[*part] = json!({});
                }
                node = &mut node[*part];
            }
            node[parts[parts.len() - 1]] = value;
        }
        let yaml = serde_yaml::to_string(&tree).unwrap();
        let env = env
            .into_iter()
            .map(|(key, value)| {
                (format!("SCHEDULER__{}", key.replace('.', "__").to_uppercase()), value)
            })
            .collect();
        check_config(&yaml, env)?;
    }
}
