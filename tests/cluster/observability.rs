//! `/metrics`, `/stats`, `/healthz` and `/readyz` of an operator running against the real
//! apiserver, read back with a real OpenMetrics parser and compared with what a loopback
//! receiver saw.

use std::time::Duration;

use chronflow::crd::Phase;
use serde_json::{Value, json};

use crate::operator::{Operator, create, patch_spec, setup, status_where};
use crate::support::eventually;
use crate::support::receiver::{Behavior, Receiver};

/// A port nobody listens on now (the operator binds it a moment later).
pub fn free_address() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

pub async fn get(address: std::net::SocketAddr, path: &str) -> Option<(u16, String)> {
    // A new connection each time, and a bound: a server shutting down may hold a kept-alive one.
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .pool_max_idle_per_host(0)
        .build()
        .ok()?;
    let response = client
        .get(format!("http://{address}{path}"))
        .send()
        .await
        .ok()?;
    let status = response.status().as_u16();
    Some((status, response.text().await.ok()?))
}

/// The value of the sample `name` whose labels include all of `labels`.
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let (_, families) = nom_openmetrics::parser::openmetrics(text).expect("valid OpenMetrics");
    families
        .iter()
        .flat_map(|family| family.samples.iter())
        .find(|s| {
            s.name() == name
                && labels.iter().all(|(key, value)| {
                    s.labels()
                        .iter()
                        .any(|l| l.name == *key && l.value == *value)
                })
        })
        .map(|s| s.number())
}

#[tokio::test]
async fn metrics_and_stats_count_what_the_receiver_saw() {
    let s = setup("metrics").await;
    let receiver = Receiver::start(Behavior::default()).await;
    let address = free_address();
    let _operator = Operator::start_with(&s.ns, crate::support::test_env().client().await, |c| {
        c.metrics.bind = address;
    })
    .await;
    eventually("the operator is ready", || async {
        get(address, "/readyz")
            .await
            .filter(|(code, _)| *code == 200)
    })
    .await;
    assert_eq!(get(address, "/healthz").await.unwrap().0, 200);
    create(
        &s.api,
        "tick",
        json!({"schedule": {"interval": "500ms"}, "action": {"http": {"url": receiver.url("/tick")}}}),
    )
    .await;
    status_where(&s.api, "tick", "3 runs", |st| st.successful_runs >= 3).await;
    patch_spec(&s.api, "tick", json!({"paused": true})).await;
    status_where(&s.api, "tick", "paused, nothing in flight", |st| {
        st.phase == Some(Phase::Paused) && st.active.is_empty()
    })
    .await;

    let runs = receiver.count() as f64;
    let (code, text) = get(address, "/metrics").await.unwrap();
    assert_eq!(code, 200);
    let task = [("namespace", s.ns.as_str()), ("task", "tick")];
    let succeeded = [task[0], task[1], ("outcome", "succeeded")];
    assert_eq!(
        sample(&text, "chronflow_runs_total", &succeeded),
        Some(runs),
        "{text}"
    );
    assert_eq!(
        sample(&text, "chronflow_start_lag_seconds_count", &[]),
        Some(runs),
        "one start lag per run"
    );
    assert_eq!(
        sample(&text, "chronflow_run_duration_seconds_count", &[]),
        Some(runs)
    );
    assert_eq!(sample(&text, "chronflow_workers", &[]), Some(10.0));
    assert_eq!(sample(&text, "chronflow_workers_busy", &[]), Some(0.0));
    assert_eq!(
        sample(&text, "chronflow_queue_capacity", &[]),
        Some(100_000.0)
    );
    assert_eq!(
        sample(&text, "chronflow_queue_refused_total", &[]),
        Some(0.0)
    );
    assert_eq!(sample(&text, "chronflow_leader", &[]), Some(1.0));
    assert!(
        sample(
            &text,
            "chronflow_status_writes_total",
            &[("result", "written")]
        )
        .unwrap()
            > 0.0
    );
    assert_eq!(
        sample(&text, "chronflow_claims_total", &[("result", "claimed")]),
        Some(runs)
    );

    let (code, body) = get(address, "/stats").await.unwrap();
    assert_eq!(code, 200);
    let stats: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(stats["total_tasks"], 1, "{stats}");
    assert_eq!(stats["tasks_by_phase"]["Paused"], 1, "{stats}");
    assert_eq!(stats["queue_size"], 0);
    assert_eq!(stats["queue_refused"], 0);
    assert_eq!(stats["active_workers"], 0);
    assert_eq!(stats["max_workers"], 10);
    assert_eq!(stats["leader"], true);
    assert_eq!(stats["running"], true);
}

#[tokio::test]
async fn readiness_drops_as_soon_as_shutdown_begins() {
    let s = setup("readiness").await;
    let slow = Receiver::start(Behavior {
        status: 200,
        delay: Duration::from_secs(4),
    })
    .await;
    let address = free_address();
    let operator = Operator::start_with(&s.ns, crate::support::test_env().client().await, |c| {
        c.metrics.bind = address;
        c.shutdown.grace_period = Duration::from_secs(10);
    })
    .await;
    eventually("ready", || async {
        get(address, "/readyz")
            .await
            .filter(|(code, _)| *code == 200)
    })
    .await;
    create(
        &s.api,
        "slow",
        json!({"schedule": {"interval": "1s"}, "action": {"http": {"url": slow.url("/slow")}}}),
    )
    .await;
    status_where(&s.api, "slow", "a run in flight", |st| {
        !st.active.is_empty()
    })
    .await;
    // The run in flight keeps the operator draining for seconds; meanwhile it says so.
    let stopping = tokio::spawn(operator.stop());
    let (_, why) = eventually("unready while draining", || async {
        get(address, "/readyz")
            .await
            .filter(|(code, _)| *code == 503)
    })
    .await;
    assert_eq!(why, "stopping");
    stopping.await.unwrap();
}
