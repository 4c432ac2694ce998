//! The run path under pressure, against the real apiserver: an object that cannot be decoded,
//! and an apiserver that answers every call 500 ms late.

use std::collections::HashMap;
use std::time::Duration;

use chronflow::ChronTask;
use chronflow::crd::Phase;
use kube::Api;
use kube::api::{ApiResource, DynamicObject, ListParams, PostParams};
use serde_json::json;

use crate::operator::{Operator, create, setup, status_where};
use crate::support::delay_proxy::DelayProxy;
use crate::support::receiver::{Behavior, Receiver};
use crate::support::{eventually, test_env};

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
    let s = setup("slow-apiserver").await;
    let receiver = Receiver::start(Behavior::default()).await;
    let (proxy, slow_client) = DelayProxy::in_front_of_apiserver(Duration::from_millis(500)).await;

    // Every task is due each second from a common start, for SECONDS instants.
    let start = chrono::Utc::now() + chrono::Duration::seconds(25);
    let end = start + chrono::Duration::seconds(SECONDS - 1);
    let rfc = |t: chrono::DateTime<chrono::Utc>| t.to_rfc3339();
    for n in 0..TASKS {
        create(
            &s.api,
            &format!("t{n}"),
            json!({
                "schedule": {"interval": "1s", "startAt": rfc(start), "endAt": rfc(end)},
                "startingDeadlineSeconds": 1,
                "action": {"http": {"url": receiver.url(&format!("/t{n}"))}}
            }),
        )
        .await;
    }
    let operator = Operator::start_with(&s.ns, slow_client, |_| {}).await;
    let expected = TASKS * SECONDS as usize;
    eventually("every instant reaches the receiver", || async {
        (receiver.count() >= expected).then_some(())
    })
    .await;

    // Every run started within its deadline, on its instant, once.
    let hits = receiver.hits();
    let mut per_task: HashMap<String, usize> = HashMap::new();
    let mut lags: Vec<i64> = Vec::new();
    for hit in &hits {
        *per_task
            .entry(hit.idempotency_key.split('@').next().unwrap().to_string())
            .or_default() += 1;
        lags.push((hit.arrived - hit.scheduled).num_milliseconds());
    }
    assert_eq!(hits.len(), expected, "no run lost or repeated");
    assert!(per_task.values().all(|n| *n == SECONDS as usize));
    lags.sort_unstable();
    let p99 = lags[lags.len() * 99 / 100];
    assert!(
        p99 < 1000,
        "start lag p99 {p99} ms is past the starting deadline"
    );

    // With the apiserver fast again, status catches up and counts what the receiver saw.
    proxy.set_delay(Duration::ZERO);
    operator.stop().await;
    let tasks = s.api.list(&ListParams::default()).await.unwrap();
    let mut total = 0;
    for task in tasks {
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
