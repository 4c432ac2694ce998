//! The apiserver accepts every sample and rejects bad ChronTasks with the messages we wrote.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Api;
use kube::api::{ApiResource, DynamicObject, PostParams};
use serde_json::{Value, json};

use crate::support::{namespace, repo_root, test_env};
use chronflow::ChronTask;

fn chrontasks(client: kube::Client, ns: &str) -> Api<DynamicObject> {
    Api::namespaced_with(client, ns, &ApiResource::erase::<ChronTask>(&()))
}

/// A valid ChronTask; each invalid case changes one thing.
fn valid(name: &str) -> Value {
    json!({
        "apiVersion": "chronflow.io/v1alpha1",
        "kind": "ChronTask",
        "metadata": {"name": name},
        "spec": {
            "schedule": {"cron": "*/5 * * * * *"},
            "action": {"http": {"url": "http://127.0.0.1:9/hook"}}
        }
    })
}

/// RFC 7386 merge: `null` removes a key.
fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(target), Value::Object(patch)) => {
            for (key, value) in patch {
                if value.is_null() {
                    target.remove(key);
                } else {
                    merge(target.entry(key.clone()).or_insert(Value::Null), value);
                }
            }
        }
        (target, patch) => *target = patch.clone(),
    }
}

#[tokio::test]
async fn crd_is_established_with_the_committed_schema() {
    let client = test_env().client().await;
    let crd = Api::<CustomResourceDefinition>::all(client)
        .get(chronflow::crd::CRD_NAME)
        .await
        .unwrap();
    let established = crd
        .status
        .and_then(|s| s.conditions)
        .unwrap_or_default()
        .into_iter()
        .any(|c| c.type_ == "Established" && c.status == "True");
    assert!(established, "CRD is Established");
    assert_eq!(crd.spec.versions, chronflow::crd::crd().spec.versions);
}

#[tokio::test]
async fn every_sample_is_accepted() {
    let client = test_env().client().await;
    let ns = namespace(&client, "samples").await;
    let api = chrontasks(client, &ns);
    let mut accepted = 0;
    for entry in std::fs::read_dir(repo_root().join("e2e/samples")).unwrap() {
        let path = entry.unwrap().path();
        let object: DynamicObject =
            serde_yaml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        if let Err(error) = api.create(&PostParams::default(), &object).await {
            panic!("{} was rejected: {error}", path.display());
        }
        accepted += 1;
    }
    assert!(accepted >= 5);
}

#[tokio::test]
async fn invalid_chrontasks_are_rejected_with_clear_messages() {
    let client = test_env().client().await;
    let ns = namespace(&client, "invalid").await;
    let api = chrontasks(client, &ns);
    let cases: &[(&str, Value, &str)] = &[
        (
            "no-schedule-kind",
            json!({"spec": {"schedule": {"cron": null, "timezone": "UTC"}}}),
            "schedule needs exactly one of cron, interval or at",
        ),
        (
            "cron-and-interval",
            json!({"spec": {"schedule": {"interval": "5s"}}}),
            "schedule needs exactly one of cron, interval or at",
        ),
        (
            "end-before-start",
            json!({"spec": {"schedule": {"startAt": "2026-02-01T00:00:00Z", "endAt": "2026-01-01T00:00:00Z"}}}),
            "schedule.endAt must be after schedule.startAt",
        ),
        (
            "bad-interval",
            json!({"spec": {"schedule": {"cron": null, "interval": "5x"}}}),
            "spec.schedule.interval in body should match",
        ),
        (
            "bad-at",
            json!({"spec": {"schedule": {"cron": null, "at": "tomorrow at nine"}}}),
            "spec.schedule.at in body must be of type date-time",
        ),
        (
            "jitter-above-an-hour",
            json!({"spec": {"schedule": {"jitter": "1h1s"}}}),
            "schedule.jitter must be at most 1h",
        ),
        (
            "jitter-in-days",
            json!({"spec": {"schedule": {"jitter": "1d"}}}),
            "spec.schedule.jitter in body should match",
        ),
        (
            "no-action-kind",
            json!({"spec": {"action": {"http": null}}}),
            "action needs exactly one of http or job",
        ),
        (
            "two-actions",
            json!({"spec": {"action": {"job": {"template": {"spec": {}}}}}}),
            "action needs exactly one of http or job",
        ),
        (
            "ftp-url",
            json!({"spec": {"action": {"http": {"url": "ftp://files.example.com/x"}}}}),
            "http.url must start with http:// or https://",
        ),
        (
            "header-value-and-secret",
            json!({"spec": {"action": {"http": {"headers": [
            {"name": "Authorization", "value": "x", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]}}}}),
            "a header needs exactly one of value or valueFrom",
        ),
        (
            "reserved-header",
            json!({"spec": {"action": {"http": {"headers": [
            {"name": "X-Team", "value": "ops"}, {"name": "Idempotency-KEY", "value": "mine"}]}}}}),
            "header name is reserved",
        ),
        (
            "reserved-header-host",
            json!({"spec": {"action": {"http": {"headers": [{"name": "host", "value": "x"}]}}}}),
            "spec.action.http.headers[0].name: Invalid value",
        ),
        (
            "too-many-retries",
            json!({"spec": {"retry": {"maxRetries": 11}}}),
            "spec.retry.maxRetries in body should be less than or equal to 10",
        ),
        (
            "initial-delay-above-max",
            json!({"spec": {"retry": {"maxRetries": 2, "initialDelay": "2m", "maxDelay": "1m"}}}),
            "retry.initialDelay must not exceed retry.maxDelay",
        ),
        (
            "retry-delay-in-days",
            json!({"spec": {"retry": {"initialDelay": "1d"}}}),
            "spec.retry.initialDelay in body should match",
        ),
        (
            "retry-max-delay-above-a-day",
            json!({"spec": {"retry": {"maxDelay": "24h1s"}}}),
            "retry.maxDelay must be at most 24h",
        ),
        (
            "timeout-above-a-day",
            json!({"spec": {"timeout": "25h"}}),
            "timeout must be at most 24h (it limits each attempt)",
        ),
        (
            "timeout-in-days",
            json!({"spec": {"timeout": "2d"}}),
            "spec.timeout in body should match",
        ),
        (
            "deadline-above-a-year",
            json!({"spec": {"startingDeadlineSeconds": 31_622_401}}),
            "spec.startingDeadlineSeconds in body should be less than or equal to 31622400",
        ),
        (
            "unknown-concurrency-policy",
            json!({"spec": {"concurrencyPolicy": "Sometimes"}}),
            "Unsupported value: \"Sometimes\"",
        ),
        (
            "unknown-catch-up",
            json!({"spec": {"catchUp": "Never"}}),
            "Unsupported value: \"Never\"",
        ),
        (
            "zero-deadline",
            json!({"spec": {"startingDeadlineSeconds": 0}}),
            "spec.startingDeadlineSeconds in body should be greater than or equal to 1",
        ),
        (
            "bad-success-code",
            json!({"spec": {"action": {"http": {"successCodes": ["ok"]}}}}),
            "spec.action.http.successCodes[0] in body should match",
        ),
        (
            "unitless-timeout",
            json!({"spec": {"timeout": "30"}}),
            "spec.timeout in body should match",
        ),
        (
            "unknown-method",
            json!({"spec": {"action": {"http": {"method": "FETCH"}}}}),
            "Unsupported value: \"FETCH\"",
        ),
        (
            "history-too-long",
            json!({"spec": {"history": {"successfulRunsLimit": 51}}}),
            "spec.history.successfulRunsLimit in body should be less than or equal to 50",
        ),
        (
            "paused-not-boolean",
            json!({"spec": {"paused": "yes"}}),
            "spec.paused in body must be of type boolean",
        ),
        (
            "tls-on-plain-http",
            json!({"spec": {"action": {"http": {"tls": {"insecureSkipVerify": true}}}}}),
            "http.tls applies to https:// URLs only",
        ),
        (
            "url-and-url-from",
            json!({"spec": {"action": {"http": {"urlFrom": {"secretKeyRef":
                {"name": "hook", "key": "url"}}}}}}),
            "http needs exactly one of url or urlFrom",
        ),
        (
            "no-url",
            json!({"spec": {"action": {"http": {"url": null, "method": "GET"}}}}),
            "http needs exactly one of url or urlFrom",
        ),
        (
            "tls-bundle-and-skip-verify",
            json!({"spec": {"action": {"http": {"url": "https://example.com/", "tls": {
                "insecureSkipVerify": true,
                "caBundle": {"configMapKeyRef": {"name": "ca", "key": "ca.crt"}}}}}}}),
            "http.tls needs caBundle or insecureSkipVerify, not both",
        ),
        (
            "ca-bundle-two-sources",
            json!({"spec": {"action": {"http": {"url": "https://example.com/", "tls": {
                "caBundle": {"configMapKeyRef": {"name": "ca", "key": "ca.crt"},
                             "secretKeyRef": {"name": "ca", "key": "ca.crt"}}}}}}}),
            "caBundle needs exactly one of configMapKeyRef or secretKeyRef",
        ),
        (
            "secret-name-with-a-path",
            json!({"spec": {"action": {"http": {"headers": [{"name": "Authorization",
            "valueFrom": {"secretKeyRef": {"name": "../../kube-system/secrets/x", "key": "k"}}}]}}}}),
            "secretKeyRef.name: Invalid value",
        ),
        (
            "secret-key-with-a-path",
            json!({"spec": {"action": {"http": {"headers": [{"name": "Authorization",
            "valueFrom": {"secretKeyRef": {"name": "s", "key": "/etc/hostname"}}}]}}}}),
            "secretKeyRef.key: Invalid value",
        ),
        (
            "exec-in-a-cluster",
            json!({"spec": {"action": {"http": null, "exec": {"command": ["rm", "-rf", "/"]}}}}),
            "action.exec runs only in chronflow standalone",
        ),
        (
            "missing-action",
            json!({"spec": {"action": null}}),
            "spec.action: Required value",
        ),
    ];
    assert!(cases.len() >= 12);
    for (name, patch, expected) in cases {
        let mut object = valid(name);
        merge(&mut object, patch);
        let object: DynamicObject = serde_json::from_value(object).unwrap();
        match api.create(&PostParams::default(), &object).await {
            Ok(_) => panic!("{name}: accepted, expected rejection with {expected:?}"),
            Err(kube::Error::Api(status)) => {
                assert_eq!(status.code, 422, "{name}: {status:?}");
                assert!(
                    status.message.contains(expected),
                    "{name}: message {:?} does not contain {expected:?}",
                    status.message
                );
            }
            Err(other) => panic!("{name}: unexpected error {other}"),
        }
    }
    // The valid base itself is accepted, so each rejection above is due to its one change.
    let base: DynamicObject = serde_json::from_value(valid("base")).unwrap();
    api.create(&PostParams::default(), &base).await.unwrap();
}
