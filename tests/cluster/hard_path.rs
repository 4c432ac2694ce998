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
