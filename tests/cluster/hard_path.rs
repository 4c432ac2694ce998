//! The run path under pressure, against the real apiserver: an object that cannot be decoded,
//! and an apiserver that answers every call 500 ms late.

use std::collections::HashMap;
use std::time::Duration;

use chronflow::ChronTask;
use chronflow::crd::Phase;
use futures::StreamExt;
use kube::Api;
use kube::api::{ApiResource, DynamicObject, ListParams, PostParams};
use serde_json::json;

use crate::operator::{Operator, create, setup, status_where};
use crate::support::delay_proxy::DelayProxy;
use crate::support::receiver::{Behavior, Hit, Receiver};
use crate::support::{eventually, machine_to_myself, test_env};

#[tokio::test]
async fn a_task_that_cannot_be_decoded_is_invalid_and_the_others_run() {
    let s = setup("undecodable").await;
    let receiver = Receiver::start(Behavior::default()).await;
    create(
        &s.api,
        "good",
        json!({"schedule": {"interval": "1s"}, "action": {"http": {"url": receiver.url("/good")}}}),
    )
    .await;
    // The embedded Job template keeps unknown fields, so the apiserver admits a wrong type
    // inside it; decoding the whole ChronTask then fails.
    let client = test_env().client().await;
    let resource = ApiResource::erase::<ChronTask>(&());
    let dynamic: Api<DynamicObject> = Api::namespaced_with(client, &s.ns, &resource);
    let bad: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "chronflow.io/v1alpha1",
        "kind": "ChronTask",
        "metadata": {"name": "bad"},
        "spec": {"schedule": {"cron": "@daily"},
                 "action": {"job": {"template": {"spec": {"parallelism": "x"}}}}},
    }))
    .unwrap();
    dynamic.create(&PostParams::default(), &bad).await.unwrap();

    let _operator = Operator::start(&s.ns).await;
    status_where(&s.api, "good", "the good task runs", |st| {
        st.successful_runs >= 2
    })
    .await;
    let message = eventually("the bad task is Invalid", || async {
        let object = dynamic.get("bad").await.ok()?;
        let status = object.data.get("status")?;
        (status.get("phase")? == "Invalid").then(|| status["message"].to_string())
    })
    .await;
    assert!(message.contains("cannot decode the ChronTask"), "{message}");
}

#[tokio::test]
async fn a_slow_apiserver_never_delays_or_loses_a_run() {
    const TASKS: usize = 300;
    const SECONDS: i64 = 30;
    let _machine = machine_to_myself().await;
    let s = setup("slow-apiserver").await;
    let receiver = Receiver::start(Behavior::default()).await;
    let (proxy, slow_client) = DelayProxy::in_front_of_apiserver(Duration::from_millis(500)).await;

    // One namespace here: it may hold every worker (by default half, so another tenant's
    // hanging targets cannot starve it; that halves what this burst of 300 a second gets).
    let operator = Operator::start_with(&s.ns, slow_client, |c| {
        c.limits.max_workers_per_namespace = Some(c.max_workers);
    })
    .await;
    // The measured instants begin only once the operator runs a canary task: a start slowed by
    // a loaded machine (every call to the apiserver is late) is not what this test measures.
    create(
        &s.api,
        "canary",
        json!({"schedule": {"interval": "1s"}, "action": {"http": {"url": receiver.url("/canary")}}}),
    )
    .await;
    eventually("the operator runs its first task", || async {
        (receiver.count() > 0).then_some(())
    })
    .await;
    s.api.delete("canary", &Default::default()).await.unwrap();

    // Every task is due each second from a common start, for SECONDS instants.
    let start = chrono::Utc::now() + chrono::Duration::seconds(12);
    let end = start + chrono::Duration::seconds(SECONDS - 1);
    futures::stream::iter(0..TASKS)
        .map(|n| {
            let (api, url) = (s.api.clone(), receiver.url(&format!("/t{n}")));
            async move {
                let spec = json!({
                    "schedule": {"interval": "1s", "startAt": start.to_rfc3339(),
                                 "endAt": end.to_rfc3339()},
                    // Room for a loaded machine's hiccups (the suite runs tests side by side):
                    // a run path that waited on the apiserver shows in the lag's p99 below.
                    "startingDeadlineSeconds": 5,
                    "action": {"http": {"url": url}}
                });
                create(&api, &format!("t{n}"), spec).await;
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<()>>()
        .await;
    assert!(
        chrono::Utc::now() < start,
        "creating {TASKS} tasks outlasted the 12 s before their first instant"
    );
    let measured = || -> Vec<Hit> {
        let mut hits = receiver.hits();
        hits.retain(|hit| hit.path != "/canary");
        hits
    };
    let expected = TASKS * SECONDS as usize;
    let settled = end + chrono::Duration::seconds(15);
    while measured().len() < expected && chrono::Utc::now() < settled {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Every run started within its deadline, on its instant, once.
    let hits = measured();
    let mut per_task: HashMap<String, usize> = HashMap::new();
    let mut lags: Vec<i64> = Vec::new();
    for hit in &hits {
        *per_task
            .entry(hit.idempotency_key.split('@').next().unwrap().to_string())
            .or_default() += 1;
        lags.push((hit.arrived - hit.scheduled).num_milliseconds());
    }
    let short: Vec<_> = per_task
        .iter()
        .filter(|(_, n)| **n != SECONDS as usize)
        .collect();
    assert!(
        hits.len() == expected && short.is_empty(),
        "{} runs of {expected} arrived; {} of {TASKS} tasks ran, these not {SECONDS} times: {short:?}",
        hits.len(),
        per_task.len()
    );
    lags.sort_unstable();
    let p99 = lags[lags.len() * 99 / 100];
    assert!(
        p99 < 1000,
        "start lag p99 {p99} ms: runs waited on the slow apiserver"
    );

    // With the apiserver fast again, status catches up and counts what the receiver saw.
    proxy.set_delay(Duration::ZERO);
    operator.stop().await;
    let tasks = s.api.list(&ListParams::default()).await.unwrap();
    let mut total = 0;
    for task in tasks
        .into_iter()
        .filter(|task| task.metadata.name.as_deref() != Some("canary"))
    {
        let status = task.status.unwrap_or_default();
        assert_eq!(status.missed_runs, 0, "{:?}", status.recent_runs);
        assert_eq!(status.failed_runs, 0);
        assert_eq!(status.phase, Some(Phase::Completed));
        total += status.successful_runs;
    }
    assert_eq!(
        total as usize, expected,
        "status counts = requests received"
    );
    println!(
        "slow apiserver: {expected} runs, start lag p50 {} ms, p99 {p99} ms",
        lags[lags.len() / 2]
    );
}

/// The apiserver's priority and fairness gives the operator's status writes a few seats and
/// rejects the rest (429): the writer cuts its budget instead of hammering it, and once the
/// tasks stop, every task's status shows every run the receiver got.
#[tokio::test]
async fn a_throttling_apiserver_slows_status_writes_and_loses_no_count() {
    use k8s_openapi::api::flowcontrol::v1::{FlowSchema, PriorityLevelConfiguration};
    use k8s_openapi::api::rbac::v1::ClusterRoleBinding;
    use kube::api::{DeleteParams, Patch, PatchParams};

    const TASKS: usize = 30;
    let s = setup("throttled").await;
    let admin = test_env().client().await;
    // A user outside system:masters (which priority and fairness exempts) with every right.
    let user = format!("operator-{}", s.ns);
    let group = "chronflow-test-operators";
    let binding: ClusterRoleBinding = serde_json::from_value(json!({
        "metadata": {"name": group},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": group}],
    }))
    .unwrap();
    let params = PatchParams::apply("chronflow-tests").force();
    Api::<ClusterRoleBinding>::all(admin.clone())
        .patch(group, &params, &Patch::Apply(&binding))
        .await
        .unwrap();
    let level: PriorityLevelConfiguration = serde_json::from_value(json!({
        "metadata": {"name": s.ns},
        "spec": {"type": "Limited", "limited": {
            "nominalConcurrencyShares": 1, "lendablePercent": 0, "borrowingLimitPercent": 0,
            "limitResponse": {"type": "Reject"},
        }},
    }))
    .unwrap();
    let levels = Api::<PriorityLevelConfiguration>::all(admin.clone());
    levels
        .patch(&s.ns, &params, &Patch::Apply(&level))
        .await
        .unwrap();
    let schema: FlowSchema = serde_json::from_value(json!({
        "metadata": {"name": s.ns},
        "spec": {
            "priorityLevelConfiguration": {"name": s.ns},
            "matchingPrecedence": 100,
            "distinguisherMethod": {"type": "ByUser"},
            "rules": [{
                "subjects": [{"kind": "User", "user": {"name": user}}],
                "resourceRules": [{"verbs": ["patch"], "apiGroups": ["chronflow.io"],
                                   "resources": ["chrontasks/status"], "namespaces": [s.ns]}],
            }],
        },
    }))
    .unwrap();
    let schemas = Api::<FlowSchema>::all(admin.clone());
    schemas
        .patch(&s.ns, &params, &Patch::Apply(&schema))
        .await
        .unwrap();

    let receiver = Receiver::start(Behavior::default()).await;
    for i in 0..TASKS {
        create(
            &s.api,
            &format!("t{i}"),
            json!({"schedule": {"interval": "1s"}, "action": {"http": {"url": receiver.url(&format!("/t{i}"))}}}),
        )
        .await;
    }
    let mut config = test_env().config().await;
    config.auth_info.impersonate = Some(user);
    config.auth_info.impersonate_groups = Some(vec![group.into()]);
    let metrics = crate::observability::free_address();
    let operator = Operator::start_with(&s.ns, kube::Client::try_from(config).unwrap(), |c| {
        c.metrics.bind = metrics;
        c.status.flush_interval = Duration::from_millis(100);
    })
    .await;
    // The apiserver refused writes (the client retries a 429 after the Retry-After the
    // apiserver sends, up to a few times: the writer sees slow answers, or the 429 itself once
    // the client gives up) and the writer cut its budget.
    let rejected = || async {
        let request = http::Request::get("/metrics").body(Vec::new()).unwrap();
        let text = admin.request_text(request).await.ok()?;
        let schema = format!("flow_schema=\"{}\"", s.ns);
        let count = text
            .lines()
            .filter(|l| l.starts_with("apiserver_flowcontrol_rejected_requests_total{"))
            .filter(|l| l.contains(&schema))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>();
        Some(count)
    };
    let budget = || async {
        let (_, text) = crate::observability::get(metrics, "/metrics").await?;
        crate::observability::sample(&text, "chronflow_status_write_budget", &[])
    };
    let lowest = eventually("429s and a budget cut", || async {
        let budget = budget().await?;
        (rejected().await? > 0.0 && budget > 0.0 && budget < 50.0).then_some(budget)
    })
    .await;
    assert!(
        lowest >= 5.0,
        "the budget never falls below its floor: {lowest}"
    );

    // Every task stops; its status then shows each run the receiver got, none lost to a 429.
    for i in 0..TASKS {
        crate::operator::patch_spec(&s.api, &format!("t{i}"), json!({"paused": true})).await;
    }
    for i in 0..TASKS {
        let name = format!("t{i}");
        let path = format!("/{name}");
        eventually("every run counted in status", || async {
            let got = receiver.hits().iter().filter(|h| h.path == path).count() as u64;
            let status = s.api.get(&name).await.ok()?.status?;
            (status.phase == Some(Phase::Paused) && status.successful_runs == got && got > 0)
                .then_some(())
        })
        .await;
    }
    operator.stop().await;
    let _ = schemas.delete(&s.ns, &DeleteParams::default()).await;
    let _ = levels.delete(&s.ns, &DeleteParams::default()).await;
}
