//! Tenant safety: what one ChronTask's author puts in a spec never leaks where others (or logs)
//! can read it.

use chronflow::config::Namespace;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::api::events::v1::Event;
use kube::Api;
use kube::api::{ListParams, PostParams};
use serde::Deserialize;
use serde_json::json;

use crate::observability::free_address;
use crate::operator::{Operator, chrontask, create, setup, status_where};
use crate::support::receiver::{Behavior, Receiver};
use crate::support::{Rule, client_as, eventually, grant, namespace, repo_root, test_env};

#[tokio::test]
async fn a_url_s_credentials_and_query_never_reach_status_or_events() {
    let s = setup("tenant-redact").await;
    let client = test_env().client().await;
    let _operator = Operator::start(&s.ns).await;
    // Nothing listens there: every run fails with the connection error, naming the URL.
    let port = free_address().port();
    let url = format!("http://alice:hunter2@127.0.0.1:{port}/hook?token=abc123");
    let spec = json!({"schedule": {"interval": "1s"}, "action": {"http": {"url": url}}});
    create(&s.api, "leaky", spec).await;
    let status = status_where(&s.api, "leaky", "a failed run", |st| st.failed_runs >= 1).await;
    let message = status
        .last_run
        .and_then(|run| run.message)
        .unwrap_or_default();
    let shown = format!("http://127.0.0.1:{port}/hook?<redacted>");
    assert!(message.contains(&shown), "{message}");

    let failed = run_failed_events(client, &s.ns).await;
    let task = s.api.get("leaky").await.unwrap();
    let everything = format!(
        "{}\n{}",
        serde_json::to_string(&task.status).unwrap(),
        serde_json::to_string(&failed).unwrap()
    );
    for secret in ["abc123", "hunter2", "alice"] {
        assert!(
            !everything.contains(secret),
            "{secret} leaked:\n{everything}"
        );
    }
}

/// A webhook whose path is its token comes from a Secret that opted in: the request goes to the
/// whole URL, and status and Events show only its scheme, host and port.
#[tokio::test]
async fn a_url_from_a_secret_is_called_and_shown_only_as_its_origin() {
    let s = setup("tenant-url-from").await;
    let client = test_env().client().await;
    let receiver = Receiver::start(Behavior::default()).await;
    let port = free_address().port();
    let hooks = [
        ("called", receiver.url("/hooks/T0KEN-called")),
        (
            "refused",
            format!("http://127.0.0.1:{port}/hooks/T0KEN-refused"),
        ),
    ];
    for (name, url) in &hooks {
        let secret: Secret = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"chronflow.io/usable-by-tasks": "true"}},
            "stringData": {"url": url}}))
        .unwrap();
        Api::<Secret>::namespaced(client.clone(), &s.ns)
            .create(&PostParams::default(), &secret)
            .await
            .unwrap();
    }
    let _operator = Operator::start(&s.ns).await;
    for (name, _) in &hooks {
        let spec = json!({"schedule": {"interval": "1s"}, "action": {"http": {
            "urlFrom": {"secretKeyRef": {"name": name, "key": "url"}}}}});
        create(&s.api, name, spec).await;
    }
    status_where(&s.api, "called", "a run", |st| st.successful_runs >= 1).await;
    assert!(
        receiver
            .hits()
            .iter()
            .all(|hit| hit.path == "/hooks/T0KEN-called"),
        "{:?}",
        receiver.hits()
    );
    let status = status_where(&s.api, "refused", "a failed run", |st| st.failed_runs >= 1).await;
    let message = status
        .last_run
        .and_then(|run| run.message)
        .unwrap_or_default();
    assert!(
        message.contains(&format!("(http://127.0.0.1:{port})")),
        "{message}"
    );
    let failed = run_failed_events(client, &s.ns).await;
    let mut everything = serde_json::to_string(&failed).unwrap();
    for (name, _) in &hooks {
        let task = s.api.get(name).await.unwrap();
        everything += &serde_json::to_string(&task.status).unwrap();
    }
    assert!(
        !everything.contains("T0KEN"),
        "a token leaked:\n{everything}"
    );
}

#[tokio::test]
async fn a_redirect_to_another_port_never_receives_a_header_value() {
    let s = setup("tenant-redirect").await;
    let client = test_env().client().await;
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "token", "labels": {"chronflow.io/usable-by-tasks": "true"}}, "stringData": {"token": "s3cr3t-value"}}))
    .unwrap();
    Api::<Secret>::namespaced(client, &s.ns)
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    let elsewhere = Receiver::start(Behavior::default()).await;
    let redirecting = Receiver::redirecting(elsewhere.url("/stolen")).await;
    let _operator = Operator::start(&s.ns).await;
    let header = json!([{"name": "Authorization",
                         "valueFrom": {"secretKeyRef": {"name": "token", "key": "token"}}}]);
    for (name, follow) in [("default", None), ("same-origin", Some("SameOrigin"))] {
        let mut http = json!({"url": redirecting.url("/hook"), "headers": header});
        if let Some(follow) = follow {
            http["followRedirects"] = json!(follow);
        }
        let spec = json!({"schedule": {"interval": "1s"}, "action": {"http": http}});
        create(&s.api, name, spec).await;
    }
    for (name, why) in [
        ("default", "not followed: followRedirects is Never"),
        ("same-origin", "redirected to another origin"),
    ] {
        let status = status_where(&s.api, name, "a failed run", |st| st.failed_runs >= 2).await;
        let message = status.last_run.and_then(|r| r.message).unwrap_or_default();
        assert!(message.contains(why), "{name}: {message}");
        assert!(
            message.contains(&elsewhere.url("/stolen")),
            "{name}: {message}"
        );
    }
    assert!(redirecting.count() >= 4, "the task's own URL was called");
    assert!(
        redirecting.hits()[0].authorization.as_deref() == Some("s3cr3t-value"),
        "the header went to the task's own URL"
    );
    assert_eq!(elsewhere.count(), 0, "the other port was called");
}

/// The `RunFailed` Events of `ns`, once there is one.
async fn run_failed_events(client: kube::Client, ns: &str) -> Vec<Event> {
    let events: Api<Event> = Api::namespaced(client, ns);
    eventually("a RunFailed Event", || async {
        let list = events.list(&ListParams::default()).await.ok()?;
        let found: Vec<Event> = list
            .items
            .into_iter()
            .filter(|e| e.reason.as_deref() == Some("RunFailed"))
            .collect();
        (!found.is_empty()).then_some(found)
    })
    .await
}

/// A Secret named `name` with `token: value`, labeled for tasks or not.
async fn secret(ns: &str, name: &str, value: &str, usable: bool) {
    let labels = if usable {
        json!({"chronflow.io/usable-by-tasks": "true"})
    } else {
        json!({})
    };
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": labels}, "stringData": {"token": value}}))
    .unwrap();
    let api = Api::<Secret>::namespaced(test_env().client().await, ns);
    match api.get_opt(name).await.unwrap() {
        None => {
            api.create(&PostParams::default(), &secret).await.unwrap();
        }
        Some(_) => {
            let patch = kube::api::Patch::Merge(json!({"stringData": {"token": value}}));
            api.patch(name, &kube::api::PatchParams::default(), &patch)
                .await
                .unwrap();
        }
    }
}

fn header_task(url: String, secret: &str) -> serde_json::Value {
    json!({"schedule": {"interval": "1s"}, "action": {"http": {"url": url, "headers": [
        {"name": "Authorization", "valueFrom": {"secretKeyRef": {"name": secret, "key": "token"}}}]}}})
}

#[tokio::test]
async fn only_opted_in_secrets_are_read_and_a_rotation_shows_within_the_cache_ttl() {
    // One operator caches Secrets for an hour, the other reads them at every attempt.
    let cached = setup("tenant-cached").await;
    let fresh = setup("tenant-fresh").await;
    let hour = std::time::Duration::from_secs(3600);
    let client = test_env().client().await;
    let _cached_operator =
        Operator::start_with(&cached.ns, client.clone(), |c| c.secrets.cache_ttl = hour).await;
    let _fresh_operator = Operator::start_with(&fresh.ns, client, |c| {
        c.secrets.cache_ttl = std::time::Duration::ZERO;
    })
    .await;
    let (cached_hits, fresh_hits) = (
        Receiver::start(Behavior::default()).await,
        Receiver::start(Behavior::default()).await,
    );
    for (s, receiver) in [(&cached, &cached_hits), (&fresh, &fresh_hits)] {
        secret(&s.ns, "token", "v1", true).await;
        create(
            &s.api,
            "uses-token",
            header_task(receiver.url("/t"), "token"),
        )
        .await;
    }
    // A Secret that did not opt in is never read for a task: the task is Invalid and says how.
    secret(&cached.ns, "plain", "never-sent", false).await;
    create(
        &cached.api,
        "uses-plain",
        header_task(cached_hits.url("/plain"), "plain"),
    )
    .await;
    let status = status_where(&cached.api, "uses-plain", "Invalid", |st| {
        st.phase == Some(chronflow::crd::Phase::Invalid)
    })
    .await;
    let message = status.message.unwrap_or_default();
    let how = "kubectl label secret plain chronflow.io/usable-by-tasks=true";
    assert!(message.contains(how), "{message}");

    for receiver in [&cached_hits, &fresh_hits] {
        eventually("a call with v1", || async {
            (receiver
                .hits()
                .iter()
                .any(|h| h.authorization.as_deref() == Some("v1")))
            .then_some(())
        })
        .await;
    }
    for s in [&cached, &fresh] {
        secret(&s.ns, "token", "v2", true).await;
    }
    let rotated = std::time::Instant::now();
    eventually("the rotated value without a cache", || async {
        (fresh_hits
            .hits()
            .iter()
            .any(|h| h.authorization.as_deref() == Some("v2")))
        .then_some(())
    })
    .await;
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let cached_calls = cached_hits.hits();
    assert!(
        cached_calls
            .iter()
            .all(|h| h.authorization.as_deref() == Some("v1")),
        "within cache_ttl the cached value is used ({:?} after the rotation)",
        rotated.elapsed()
    );
    assert!(cached_calls.len() >= 3);
    assert!(
        cached_calls
            .iter()
            .all(|h| h.authorization.as_deref() != Some("never-sent")),
        "a Secret that did not opt in was sent"
    );
}

#[tokio::test]
async fn a_denied_address_fails_with_the_reason_even_behind_a_host_name() {
    let denied = setup("tenant-deny").await;
    let outside = setup("tenant-allow").await;
    let receiver = Receiver::start(Behavior::default()).await;
    let client = test_env().client().await;
    let loopback: [ipnet::IpNet; 2] = ["127.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()];
    let _denying = Operator::start_with(&denied.ns, client.clone(), |c| {
        c.http.deny_cidrs.extend(loopback);
    })
    .await;
    let _allowing = Operator::start_with(&outside.ns, client, |c| {
        c.http.allow_cidrs = vec!["10.0.0.0/8".parse().unwrap()];
    })
    .await;
    // `localhost` resolves to loopback: refused at connect time, not by the URL's text.
    let url = receiver.url("/hook").replace("127.0.0.1", "localhost");
    for (s, why) in [
        (&denied, "is not allowed (http.deny_cidrs has "),
        (&outside, "is not allowed (not in http.allow_cidrs)"),
    ] {
        let spec = json!({"schedule": {"interval": "1s"}, "action": {"http": {"url": url}}});
        create(&s.api, "inside", spec).await;
        let status =
            status_where(&s.api, "inside", "a refused run", |st| st.failed_runs >= 1).await;
        let message = status.last_run.and_then(|r| r.message).unwrap_or_default();
        assert!(message.contains(why), "{message}");
    }
    assert_eq!(receiver.count(), 0, "a refused address was reached");
}

#[tokio::test]
async fn a_schedule_more_frequent_than_limits_min_period_is_invalid() {
    let s = setup("tenant-period").await;
    let receiver = Receiver::start(Behavior::default()).await;
    let client = test_env().client().await;
    let _operator = Operator::start_with(&s.ns, client, |c| {
        c.limits.min_period = std::time::Duration::from_secs(2);
    })
    .await;
    for (name, every) in [("too-often", "1s"), ("allowed", "2s")] {
        let spec = json!({"schedule": {"interval": every},
                          "action": {"http": {"url": receiver.url(&format!("/{name}"))}}});
        create(&s.api, name, spec).await;
    }
    let status = status_where(&s.api, "too-often", "Invalid", |st| {
        st.phase == Some(chronflow::crd::Phase::Invalid)
    })
    .await;
    let message = status.message.unwrap_or_default();
    assert_eq!(
        message,
        "spec.schedule: fires every 1s, more often than this operator allows (limits.min_period 2s)"
    );
    status_where(&s.api, "allowed", "a run", |st| st.total_runs >= 1).await;
    assert!(
        receiver
            .hits()
            .iter()
            .all(|h| !h.idempotency_key.contains("too-often"))
    );
}

#[tokio::test]
async fn runs_in_flight_per_namespace_are_capped() {
    let s = setup("tenant-cap").await;
    // Calls take 3 s; four tasks every second would keep up to 12 in flight.
    let receiver = Receiver::start(Behavior {
        status: 200,
        delay: std::time::Duration::from_secs(3),
    })
    .await;
    let client = test_env().client().await;
    let _operator = Operator::start_with(&s.ns, client, |c| {
        c.max_workers = 20;
        c.limits.max_runs_per_namespace = 2;
    })
    .await;
    for name in ["a", "b", "c", "d"] {
        let spec = json!({"schedule": {"interval": "1s"}, "concurrencyPolicy": "Allow",
                          "timeout": "5s",
                          "action": {"http": {"url": receiver.url(&format!("/{name}"))}}});
        create(&s.api, name, spec).await;
    }
    let capped = |st: &chronflow::crd::ChronTaskStatus| {
        st.recent_runs.iter().any(|r| {
            r.message
                .as_deref()
                .is_some_and(|m| m.contains("limits.max_runs_per_namespace 2"))
        })
    };
    eventually("a run missed at the cap", || async {
        for name in ["a", "b", "c", "d"] {
            let status = s.api.get(name).await.ok()?.status?;
            if capped(&status) {
                return Some(());
            }
        }
        None
    })
    .await;
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    assert!(
        receiver.max_in_flight() <= 2,
        "{} at once",
        receiver.max_in_flight()
    );
}

/// A ConfigMap (or Secret) `name` with `ca.crt: pem`, labeled for tasks or not.
async fn ca_bundle(ns: &str, kind: &str, name: &str, pem: &str, usable: bool) {
    let labels = if usable {
        json!({"chronflow.io/usable-by-tasks": "true"})
    } else {
        json!({})
    };
    let client = test_env().client().await;
    let metadata = json!({"name": name, "labels": labels});
    if kind == "Secret" {
        let secret: Secret =
            serde_json::from_value(json!({"metadata": metadata, "stringData": {"ca.crt": pem}}))
                .unwrap();
        let api = Api::<Secret>::namespaced(client, ns);
        api.create(&PostParams::default(), &secret).await.unwrap();
    } else {
        let map: ConfigMap =
            serde_json::from_value(json!({"metadata": metadata, "data": {"ca.crt": pem}})).unwrap();
        let api = Api::<ConfigMap>::namespaced(client, ns);
        api.create(&PostParams::default(), &map).await.unwrap();
    }
}

fn https_task(url: String, tls: serde_json::Value) -> serde_json::Value {
    let mut http = json!({"url": url});
    if !tls.is_null() {
        http["tls"] = tls;
    }
    json!({"schedule": {"interval": "1s"}, "action": {"http": http}})
}

#[tokio::test]
async fn https_targets_are_verified_against_system_roots_or_an_opted_in_ca_bundle() {
    let s = setup("tenant-tls").await;
    let lax = setup("tenant-insecure").await;
    let (receiver, ca) = Receiver::start_tls(Behavior::default()).await;
    let client = test_env().client().await;
    let _operator = Operator::start(&s.ns).await;
    let _lax_operator = Operator::start_with(&lax.ns, client, |c| {
        c.http.allow_insecure_skip_verify = true;
    })
    .await;
    ca_bundle(&s.ns, "ConfigMap", "ca", &ca, true).await;
    ca_bundle(&s.ns, "Secret", "ca", &ca, true).await;
    ca_bundle(&s.ns, "ConfigMap", "ca-plain", &ca, false).await;
    let from =
        |kind: &str, name: &str| json!({"caBundle": {kind: {"name": name, "key": "ca.crt"}}});
    let tasks = [
        ("system", serde_json::Value::Null),
        ("bundle-config-map", from("configMapKeyRef", "ca")),
        ("bundle-secret", from("secretKeyRef", "ca")),
        ("bundle-unlabeled", from("configMapKeyRef", "ca-plain")),
        ("insecure", json!({"insecureSkipVerify": true})),
    ];
    for (name, tls) in tasks.clone() {
        create(
            &s.api,
            name,
            https_task(receiver.url(&format!("/{name}")), tls),
        )
        .await;
    }
    let (_, insecure) = tasks.last().unwrap().clone();
    create(
        &lax.api,
        "insecure",
        https_task(receiver.url("/lax"), insecure),
    )
    .await;

    // The receiver's CA is not among the system's roots: the run fails, saying why.
    let status = status_where(&s.api, "system", "a failed run", |st| st.failed_runs >= 1).await;
    let message = status.last_run.and_then(|r| r.message).unwrap_or_default();
    assert!(message.contains("certificate"), "{message}");
    for (api, name) in [
        (&s.api, "bundle-config-map"),
        (&s.api, "bundle-secret"),
        (&lax.api, "insecure"),
    ] {
        status_where(api, name, "a successful run", |st| st.successful_runs >= 1).await;
    }
    for (name, why) in [
        (
            "bundle-unlabeled",
            "kubectl label configmap ca-plain chronflow.io/usable-by-tasks=true",
        ),
        ("insecure", "http.allow_insecure_skip_verify is false"),
    ] {
        let status = status_where(&s.api, name, "Invalid", |st| {
            st.phase == Some(chronflow::crd::Phase::Invalid)
        })
        .await;
        let message = status.message.unwrap_or_default();
        assert!(message.contains(why), "{name}: {message}");
    }
    let reached = |path: &str| {
        receiver
            .hits()
            .iter()
            .any(|h| h.idempotency_key.starts_with(&format!("{}/{path}@", s.ns)))
    };
    for refused in ["system", "bundle-unlabeled", "insecure"] {
        assert!(!reached(refused), "{refused} reached the receiver");
    }
}

#[tokio::test]
async fn tasks_per_namespace_are_capped_oldest_first() {
    let s = setup("tenant-tasks").await;
    let other = setup("tenant-tasks-other").await;
    let receiver = Receiver::start(Behavior::default()).await;
    let client = test_env().client().await;
    let _operator = Operator::start_with(&s.ns, client, |c| {
        let other = chronflow::config::Namespace::new(&other.ns).unwrap();
        c.watch_namespaces.push(other);
        c.limits.max_tasks_per_namespace = 2;
    })
    .await;
    let spec = |name: &str| {
        json!({"schedule": {"interval": "1s"},
               "action": {"http": {"url": receiver.url(&format!("/{name}"))}}})
    };
    for name in ["a", "b", "c"] {
        create(&s.api, name, spec(name)).await;
    }
    // The cap is per namespace: another namespace's tasks run beside them.
    for name in ["x", "y"] {
        create(&other.api, name, spec(name)).await;
    }
    let invalid =
        |st: &chronflow::crd::ChronTaskStatus| st.phase == Some(chronflow::crd::Phase::Invalid);
    let status = status_where(&s.api, "c", "Invalid", invalid).await;
    let message = status.message.unwrap_or_default();
    assert!(
        message.contains("has more than 2 ChronTasks")
            && message.contains("limits.max_tasks_per_namespace 2"),
        "{message}"
    );
    for (api, name) in [
        (&s.api, "a"),
        (&s.api, "b"),
        (&other.api, "x"),
        (&other.api, "y"),
    ] {
        status_where(api, name, "a run", |st| st.total_runs >= 1).await;
    }
    // Deleting an older task makes room: the newer one starts, without waiting for a recheck.
    let deleted = std::time::Instant::now();
    s.api
        .delete("a", &kube::api::DeleteParams::default())
        .await
        .unwrap();
    status_where(&s.api, "c", "a run once a is gone", |st| st.total_runs >= 1).await;
    assert!(
        deleted.elapsed() < std::time::Duration::from_secs(20),
        "c started {:?} after the delete",
        deleted.elapsed()
    );
}

/// A Job task's spec: one container, as the namespace's `account` (None: no ServiceAccount set).
fn job_spec(account: Option<&str>) -> serde_json::Value {
    let mut pod =
        json!({"containers": [{"name": "c", "image": "busybox"}], "restartPolicy": "Never"});
    if let Some(account) = account {
        pod["serviceAccountName"] = json!(account);
    }
    json!({"schedule": {"cron": "@daily"},
           "action": {"job": {"template": {"spec": {"template": {"spec": pod}}}}}})
}

/// The message of a refused create, or `None` when it was admitted.
async fn refused(
    api: &Api<chronflow::ChronTask>,
    name: &str,
    spec: serde_json::Value,
) -> Option<String> {
    match api
        .create(&PostParams::default(), &chrontask(name, spec))
        .await
    {
        Ok(_) => None,
        Err(kube::Error::Api(status)) => Some(status.message),
        Err(other) => panic!("{name}: {other}"),
    }
}

#[tokio::test]
async fn the_job_action_needs_its_author_s_own_right_to_create_jobs() {
    use kube::api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
    let admin = test_env().client().await;
    let ns = namespace(&admin, "job-policy").await;
    // The policy as shipped for kubectl users (the chart renders the same), bound to this
    // namespace only: the control plane is shared with other tests.
    let text = std::fs::read_to_string(repo_root().join("crds/chronflow-job-policy.yaml")).unwrap();
    let mut policy: DynamicObject = serde_yaml::Deserializer::from_str(&text)
        .map(|doc| serde_yaml::Value::deserialize(doc).unwrap())
        .find(|doc| doc["kind"] == "ValidatingAdmissionPolicy")
        .map(|doc| serde_json::from_value(serde_json::to_value(doc).unwrap()).unwrap())
        .expect("crds/chronflow-job-policy.yaml holds the policy");
    let name = format!("chronflow-job-action-{ns}");
    policy.metadata.name = Some(name.clone());
    let gvk = |kind| GroupVersionKind::gvk("admissionregistration.k8s.io", "v1", kind);
    let policies: Api<DynamicObject> = Api::all_with(
        admin.clone(),
        &ApiResource::from_gvk(&gvk("ValidatingAdmissionPolicy")),
    );
    policies
        .create(&PostParams::default(), &policy)
        .await
        .unwrap();
    let binding: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": name},
        "spec": {"policyName": name, "validationActions": ["Deny"], "matchResources": {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}}}}
    }))
    .unwrap();
    let binding_resource = ApiResource::from_gvk(&gvk("ValidatingAdmissionPolicyBinding"));
    Api::<DynamicObject>::all_with(admin.clone(), &binding_resource)
        .create(&PostParams::default(), &binding)
        .await
        .unwrap();

    // alice may write ChronTasks; bob may also create Jobs.
    let tasks: Rule = (
        "chronflow.io",
        &["chrontasks"],
        &["get", "create", "update", "patch"],
    );
    let (alice, bob) = (format!("alice-{ns}"), format!("bob-{ns}"));
    grant(&admin, &ns, &alice, "author", &[tasks]).await;
    grant(
        &admin,
        &ns,
        &bob,
        "job-author",
        &[tasks, ("batch", &["jobs"], &["create"])],
    )
    .await;
    let as_alice: Api<chronflow::ChronTask> = Api::namespaced(client_as(&alice).await, &ns);
    let as_bob: Api<chronflow::ChronTask> = Api::namespaced(client_as(&bob).await, &ns);

    // The apiserver loads a new policy within a few seconds: until then alice's task is
    // admitted, and taken away again.
    let mut probe = 0;
    let message = eventually("the policy refuses alice's Job task", || {
        probe += 1;
        let (api, name) = (as_alice.clone(), format!("probe-{probe}"));
        let admin_api: Api<chronflow::ChronTask> = Api::namespaced(admin.clone(), &ns);
        async move {
            let refusal = refused(&api, &name, job_spec(None)).await;
            if refusal.is_none() {
                admin_api.delete(&name, &Default::default()).await.unwrap();
            }
            refusal
        }
    })
    .await;
    assert!(
        message.contains(&format!(
            "action.job creates a Job per run, and {alice} may not create Jobs in namespace {ns}"
        )),
        "{message}"
    );
    let http =
        json!({"schedule": {"cron": "@daily"}, "action": {"http": {"url": "http://x.example/"}}});
    assert_eq!(
        refused(&as_alice, "alice-http", http).await,
        None,
        "no Job, no check"
    );

    assert_eq!(refused(&as_bob, "bob-job", job_spec(None)).await, None);
    assert_eq!(
        refused(&as_bob, "bob-default", job_spec(Some("default"))).await,
        None
    );
    let message = refused(&as_bob, "bob-as-admin", job_spec(Some("chronflow")))
        .await
        .unwrap();
    assert!(
        message.contains("action.job: the Pod's ServiceAccount chronflow is not among those Job actions may use (default;"),
        "{message}"
    );

    // alice may still ask bob's task to run now (its spec unchanged), not change what it runs.
    let run_now = json!({"metadata": {"annotations": {"chronflow.io/run-now": "r1"}}});
    as_alice
        .patch("bob-job", &PatchParams::default(), &Patch::Merge(&run_now))
        .await
        .expect("an annotation leaves the spec alone");
    let rewrite = json!({"spec": {"schedule": {"cron": "@hourly"}}});
    let error = as_alice
        .patch("bob-job", &PatchParams::default(), &Patch::Merge(&rewrite))
        .await
        .unwrap_err();
    assert!(error.to_string().contains("may not create Jobs"), "{error}");
}

#[tokio::test]
async fn a_namespace_whose_targets_hang_holds_only_its_share_of_workers() {
    let admin = test_env().client().await;
    let hog = namespace(&admin, "hog").await;
    let fair = namespace(&admin, "fair").await;
    // The hog's targets never answer within the test; each of its runs would hold a worker.
    let hanging = Receiver::start(Behavior {
        status: 200,
        delay: std::time::Duration::from_secs(3600),
    })
    .await;
    let receiver = Receiver::start(Behavior::default()).await;
    let hogs: Api<chronflow::ChronTask> = Api::namespaced(admin.clone(), &hog);
    for n in 0..6 {
        let spec = json!({"schedule": {"interval": "1s"}, "timeout": "1h",
                          "action": {"http": {"url": hanging.url(&format!("/h{n}"))}}});
        create(&hogs, &format!("h{n}"), spec).await;
    }
    let namespaces = [&hog, &fair].map(|ns| Namespace::new(ns.as_str()).unwrap());
    // 4 workers: the hog's share is 2 (limits.max_workers_per_namespace's default, half).
    let _operator = Operator::start_with(&hog, admin.clone(), |config| {
        config.watch_namespaces = namespaces.to_vec();
        config.max_workers = 4;
    })
    .await;
    // Created once the operator runs: an instant due while a loaded machine starts it would be
    // counted missed (catch-up), which says nothing of the hog.
    let fairs: Api<chronflow::ChronTask> = Api::namespaced(admin.clone(), &fair);
    let spec = json!({"schedule": {"interval": "1s"}, "startingDeadlineSeconds": 1,
                      "action": {"http": {"url": receiver.url("/fair")}}});
    create(&fairs, "tick", spec).await;

    eventually("the hog holds its share of workers", || async {
        (hanging.count() >= 2).then_some(())
    })
    .await;
    let before = receiver.count();
    eventually(
        "the other namespace's task runs, on time, five times more",
        || async { (receiver.count() >= before + 5).then_some(()) },
    )
    .await;
    assert_eq!(
        hanging.max_in_flight(),
        2,
        "the hog held more than its share"
    );
    let status = status_where(&fairs, "tick", "runs counted", |st| st.successful_runs >= 5).await;
    assert_eq!(status.missed_runs, 0, "{:?}", status.recent_runs);
}
