//! The operator against a real apiserver and real HTTP receivers on loopback: runs fire on
//! time, status counts equal what the receiver saw, failures, timeouts, retries, pause,
//! deletion, invalid specs and concurrency policies behave as documented.

use std::collections::HashSet;
use std::time::Duration;

use chronflow::ChronTask;
use chronflow::config::{Namespace, OperatorConfig};
use chronflow::crd::{ChronTaskStatus, Phase, RunOutcome};
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::support::receiver::{Behavior, Receiver};
use crate::support::{eventually, namespace, test_env};

/// An operator running in this process, watching only its test's namespace.
pub struct Operator {
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<chronflow::Result<()>>>,
}

impl Operator {
    pub async fn start(ns: &str) -> Operator {
        Operator::start_with(ns, test_env().client().await, |_| {}).await
    }

    /// An operator with its own client (through a proxy, as another user) and settings.
    pub async fn start_with(
        ns: &str,
        client: kube::Client,
        adjust: impl FnOnce(&mut OperatorConfig),
    ) -> Operator {
        let mut config = OperatorConfig {
            watch_namespaces: vec![Namespace::new(ns).expect("test namespaces are valid")],
            ..Default::default()
        };
        config.status.flush_interval = Duration::from_millis(300);
        config.shutdown.grace_period = Duration::from_secs(5);
        // Many operators share this process: each listens on a port of its own.
        config.metrics.bind = "127.0.0.1:0".parse().unwrap();
        adjust(&mut config);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(chronflow::operator::run(config, client, shutdown.clone()));
        Operator {
            shutdown,
            task: Some(task),
        }
    }

    /// A crash: the process is gone at once, nothing drained or written.
    pub fn crash(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }

    /// SIGTERM-equivalent: stop firing, drain, write the last status; it must succeed.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        let task = self.task.take().unwrap();
        task.await.unwrap().unwrap();
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub struct Setup {
    pub api: Api<ChronTask>,
    pub ns: String,
}

pub async fn setup(prefix: &str) -> Setup {
    let client = test_env().client().await;
    let ns = namespace(&client, prefix).await;
    Setup {
        api: Api::namespaced(client, &ns),
        ns,
    }
}

pub fn chrontask(name: &str, spec: Value) -> ChronTask {
    serde_json::from_value(json!({
        "apiVersion": "chronflow.io/v1alpha1",
        "kind": "ChronTask",
        "metadata": {"name": name},
        "spec": spec,
    }))
    .unwrap()
}

pub async fn create(api: &Api<ChronTask>, name: &str, spec: Value) {
    api.create(&PostParams::default(), &chrontask(name, spec))
        .await
        .unwrap();
}

/// Waits until the task's status satisfies `check`, and returns that status.
pub async fn status_where(
    api: &Api<ChronTask>,
    name: &str,
    what: &str,
    check: impl Fn(&ChronTaskStatus) -> bool,
) -> ChronTaskStatus {
    eventually(what, || async {
        let task = api.get(name).await.ok()?;
        task.status.filter(|s| check(s))
    })
    .await
}

pub async fn patch_spec(api: &Api<ChronTask>, name: &str, spec: Value) {
    api.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": spec})),
    )
    .await
    .unwrap();
}

/// Asserts that the receiver gets no call for `window` (absence can only be observed over time).
async fn assert_quiet(receiver: &Receiver, window: Duration, why: &str) {
    let before = receiver.count();
    tokio::time::sleep(window).await;
    assert_eq!(
        receiver.count(),
        before,
        "{why}: the receiver was called during {window:?}"
    );
}

#[tokio::test]
async fn counts_in_status_equal_the_receivers_and_keys_are_unique() {
    let s = setup("counts").await;
    let receiver = Receiver::start(Behavior::default()).await;
    let operator = Operator::start(&s.ns).await;
    create(
        &s.api,
        "tick",
        json!({
            "schedule": {"interval": "1s"},
            "action": {"http": {"url": receiver.url("/tick"), "method": "POST", "body": "{}"}}
        }),
    )
    .await;
    status_where(&s.api, "tick", "3 successful runs", |st| {
        st.successful_runs >= 3
    })
    .await;
    patch_spec(&s.api, "tick", json!({"paused": true})).await;
    status_where(&s.api, "tick", "phase Paused", |st| {
        st.phase == Some(Phase::Paused) && st.active.is_empty()
    })
    .await;
    // A run already in flight when the pause landed may still finish; the operator's final
    // flush at shutdown writes its outcome.
    operator.stop().await;

    let status = s.api.get("tick").await.unwrap().status.unwrap();
    let hits = receiver.hits();
    assert_eq!(
        status.total_runs as usize,
        hits.len(),
        "totalRuns = requests received"
    );
    assert_eq!(status.successful_runs, status.total_runs);
    assert_eq!(status.failed_runs, 0);
    assert_eq!(status.success_rate.as_deref(), Some("100.0%"));
    let keys: HashSet<_> = hits.iter().map(|h| h.idempotency_key.clone()).collect();
    assert_eq!(keys.len(), hits.len(), "every Idempotency-Key is unique");
    for hit in &hits {
        let expected = format!(
            "{}/tick@{}",
            s.ns,
            hit.scheduled
                .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
        );
        assert_eq!(
            hit.idempotency_key, expected,
            "Idempotency-Key names the run"
        );
    }
    let last = status.last_run.unwrap();
    assert_eq!(last.outcome, RunOutcome::Succeeded);
    assert_eq!(last.attempts, 1);
    assert!(status.last_successful_time.is_some());
    assert!(status.recent_runs.len() <= 3, "history bounds recentRuns");
}

#[tokio::test]
async fn failing_endpoint_counts_failures() {
    let s = setup("failing").await;
    let receiver = Receiver::start(Behavior {
        status: 503,
        ..Default::default()
    })
    .await;
    let _operator = Operator::start(&s.ns).await;
    create(
        &s.api,
        "broken",
        json!({
            "schedule": {"cron": "* * * * * *"},
            "action": {"http": {"url": receiver.url("/broken")}}
        }),
    )
    .await;
    let status = status_where(&s.api, "broken", "2 failed runs", |st| st.failed_runs >= 2).await;
    assert_eq!(status.successful_runs, 0);
    assert_eq!(status.success_rate.as_deref(), Some("0.0%"));
    assert!(status.last_failure_time.is_some());
    assert_eq!(status.phase, Some(Phase::Failed));
    let last = status.last_run.unwrap();
    assert_eq!(last.outcome, RunOutcome::Failed);
    assert_eq!(last.message.as_deref(), Some("HTTP 503"));

    // A failure is also a Warning Event on the ChronTask.
    let events = test_env().kubectl(&[
        "get",
        "events",
        "-n",
        &s.ns,
        "--field-selector",
        "reason=RunFailed",
        "-o",
        "name",
    ]);
    assert!(
        !String::from_utf8_lossy(&events.stdout).trim().is_empty(),
        "a RunFailed event exists"
    );
}

#[tokio::test]
async fn a_slow_endpoint_times_out_and_retries_are_attempts() {
    let s = setup("slow").await;
    let receiver = Receiver::start(Behavior {
        status: 200,
        delay: Duration::from_secs(30),
    })
    .await;
    let _operator = Operator::start(&s.ns).await;
    create(&s.api, "slow", json!({
        // One run, two seconds from now (instants before the task existed are never due).
        "schedule": {"interval": "1h", "startAt": (chrono::Utc::now() + chrono::Duration::seconds(2)).to_rfc3339()},
        "timeout": "300ms",
        "retry": {"maxRetries": 2, "backoff": "Fixed", "initialDelay": "100ms", "maxDelay": "1s"},
        "action": {"http": {"url": receiver.url("/slow")}}
    }))
    .await;
    let status = status_where(&s.api, "slow", "one failed run", |st| st.failed_runs >= 1).await;
    let last = status.last_run.unwrap();
    assert_eq!(last.attempts, 3, "1 attempt + 2 retries");
    assert_eq!(last.message.as_deref(), Some("timed out after 300ms"));
    let hits = receiver.hits();
    assert_eq!(hits.len(), 3, "the receiver saw every attempt");
    assert!(
        hits.iter().all(|h| h.idempotency_key == last.run_id),
        "all attempts carry the run's key"
    );
    assert_eq!(
        hits.iter().map(|h| h.attempt).collect::<Vec<_>>(),
        [1, 2, 3]
    );
}

#[tokio::test]
async fn seconds_cron_and_sub_second_interval_fire_on_their_grid() {
    let s = setup("ontime").await;
    let cron = Receiver::start(Behavior::default()).await;
    let interval = Receiver::start(Behavior::default()).await;
    let start = chrono::Utc::now().to_rfc3339();
    let _operator = Operator::start(&s.ns).await;
    create(
        &s.api,
        "cron",
        json!({
            "schedule": {"cron": "*/2 * * * * *"},
            "action": {"http": {"url": cron.url("/cron")}}
        }),
    )
    .await;
    create(
        &s.api,
        "fast",
        json!({
            "schedule": {"interval": "500ms", "startAt": start},
            "action": {"http": {"url": interval.url("/fast")}}
        }),
    )
    .await;
    eventually("3 cron runs and 6 interval runs", || async {
        (cron.count() >= 3 && interval.count() >= 6).then_some(())
    })
    .await;
    for hit in cron.hits() {
        assert_eq!(
            hit.scheduled.timestamp() % 2,
            0,
            "*/2 seconds fires on even seconds: {hit:?}"
        );
        assert_eq!(hit.scheduled.timestamp_subsec_millis(), 0);
    }
    let scheduled: Vec<_> = interval.hits().iter().map(|h| h.scheduled).collect();
    for pair in scheduled.windows(2) {
        assert_eq!(
            (pair[1] - pair[0]).num_milliseconds(),
            500,
            "fixed rate: {scheduled:?}"
        );
    }
    // Generous bound: the real start-lag figures come from the benchmark, not from a test.
    for hit in cron.hits().iter().chain(interval.hits().iter()) {
        let lag = hit.arrived - hit.scheduled;
        assert!(
            lag >= chrono::Duration::zero() && lag < chrono::Duration::seconds(2),
            "lag {lag} for {hit:?}"
        );
    }
}

#[tokio::test]
async fn an_invalid_spec_is_reported_and_never_blocks_the_others() {
    let s = setup("invalid").await;
    let receiver = Receiver::start(Behavior::default()).await;
    let _operator = Operator::start(&s.ns).await;
    create(
        &s.api,
        "bad-cron",
        json!({
            "schedule": {"cron": "61 * * * *"},
            "action": {"http": {"url": receiver.url("/bad")}}
        }),
    )
    .await;
    create(
        &s.api,
        "bad-zone",
        json!({
            "schedule": {"cron": "* * * * * *", "timezone": "Mars/Olympus_Mons"},
            "action": {"http": {"url": receiver.url("/bad")}}
        }),
    )
    .await;
    create(&s.api, "no-secret", json!({
        "schedule": {"cron": "* * * * * *"},
        "action": {"http": {"url": receiver.url("/bad"), "headers": [
            {"name": "Authorization", "valueFrom": {"secretKeyRef": {"name": "absent", "key": "token"}}}]}}
    }))
    .await;
    create(
        &s.api,
        "good",
        json!({
            "schedule": {"cron": "* * * * * *"},
            "action": {"http": {"url": receiver.url("/good")}}
        }),
    )
    .await;
    for (name, expected) in [
        (
            "bad-cron",
            "spec.schedule.cron: minute: 61 is out of range 0-59",
        ),
        ("bad-zone", "spec.schedule.timezone:"),
        ("no-secret", "Secret absent not found"),
    ] {
        let status = status_where(&s.api, name, "phase Invalid", |st| {
            st.phase == Some(Phase::Invalid)
        })
        .await;
        let message = status.message.unwrap_or_default();
        assert!(message.contains(expected), "{name}: {message:?}");
        let ready = status
            .conditions
            .iter()
            .find(|c| c.type_ == "Ready")
            .unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "InvalidSpec")
        );
    }
    status_where(&s.api, "good", "the valid task runs", |st| {
        st.successful_runs >= 2
    })
    .await;
    assert!(
        receiver
            .hits()
            .iter()
            .all(|h| h.idempotency_key.contains("/good@"))
    );
}

#[tokio::test]
async fn secret_headers_are_sent_and_deleting_a_task_stops_its_calls() {
    let s = setup("delete").await;
    let receiver = Receiver::start(Behavior::default()).await;
    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(test_env().client().await, &s.ns);
    let secret = serde_json::from_value(json!({
        "metadata": {"name": "api-token", "labels": {"chronflow.io/usable-by-tasks": "true"}}, "stringData": {"token": "Bearer s3cr3t"}
    }))
    .unwrap();
    secrets
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    let _operator = Operator::start(&s.ns).await;
    create(&s.api, "doomed", json!({
        "schedule": {"cron": "* * * * * *"},
        "action": {"http": {"url": receiver.url("/doomed"), "headers": [
            {"name": "Authorization", "valueFrom": {"secretKeyRef": {"name": "api-token", "key": "token"}}}]}}
    }))
    .await;
    eventually("two calls", || async {
        (receiver.count() >= 2).then_some(())
    })
    .await;
    assert!(
        receiver
            .hits()
            .iter()
            .all(|h| h.authorization.as_deref() == Some("Bearer s3cr3t"))
    );
    s.api
        .delete("doomed", &DeleteParams::default())
        .await
        .unwrap();
    eventually("the task to be gone", || async {
        s.api
            .get_opt("doomed")
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
    assert_quiet(&receiver, Duration::from_secs(3), "after deletion").await;
}

/// A task due every second whose runs take 2.5 s, under `policy`.
async fn outlasting_runs(name: &str, policy: &str) -> (Setup, Receiver, Operator) {
    let s = setup(&policy.to_lowercase()).await;
    let receiver = Receiver::start(Behavior {
        status: 200,
        delay: Duration::from_millis(2500),
    })
    .await;
    let operator = Operator::start(&s.ns).await;
    let spec = json!({
        "schedule": {"interval": "1s"},
        "concurrencyPolicy": policy,
        "action": {"http": {"url": receiver.url("/slow")}}
    });
    create(&s.api, name, spec).await;
    (s, receiver, operator)
}

#[tokio::test]
async fn forbid_skips_runs_while_one_is_in_flight() {
    let (s, receiver, _operator) = outlasting_runs("long", "Forbid").await;
    let status = status_where(&s.api, "long", "a finished run and missed ones", |st| {
        st.successful_runs >= 1 && st.missed_runs >= 2
    })
    .await;
    assert_eq!(receiver.max_in_flight(), 1, "never two runs at once");
    let missed = status
        .recent_runs
        .iter()
        .find(|r| r.outcome == RunOutcome::Missed)
        .unwrap();
    assert!(
        missed
            .message
            .as_deref()
            .unwrap_or_default()
            .contains("still active"),
        "{missed:?}"
    );
}

#[tokio::test]
async fn replace_cancels_the_run_in_flight() {
    let (s, receiver, _operator) = outlasting_runs("newest", "Replace").await;
    let status = status_where(&s.api, "newest", "two replaced runs", |st| {
        st.failed_runs >= 2
    })
    .await;
    assert_eq!(status.missed_runs, 0, "Replace never skips a run");
    let message = status.last_run.and_then(|r| r.message).unwrap_or_default();
    assert!(message.starts_with("cancelled: replaced by "), "{message}");
    eventually("the receiver to see the replacing runs", || async {
        (receiver.count() >= 3).then_some(())
    })
    .await;
    assert_eq!(
        receiver.max_in_flight(),
        1,
        "the replaced request was dropped"
    );
}

#[tokio::test]
async fn counters_survive_an_operator_restart_and_edits_take_effect() {
    let s = setup("restart").await;
    let receiver = Receiver::start(Behavior::default()).await;
    let operator = Operator::start(&s.ns).await;
    create(
        &s.api,
        "steady",
        json!({
            "schedule": {"cron": "* * * * * *"},
            "catchUp": "Skip",
            "action": {"http": {"url": receiver.url("/steady")}}
        }),
    )
    .await;
    status_where(&s.api, "steady", "2 runs", |st| st.total_runs >= 2).await;
    operator.stop().await;
    let before = s
        .api
        .get("steady")
        .await
        .unwrap()
        .status
        .unwrap()
        .total_runs;

    let _operator = Operator::start(&s.ns).await;
    let status = status_where(&s.api, "steady", "runs after the restart", |st| {
        st.total_runs >= before + 2
    })
    .await;
    assert_eq!(
        status.total_runs as usize,
        receiver.count(),
        "no run lost or counted twice across the restart"
    );

    // An edit takes effect at once: the next run moves to the new schedule, with no burst.
    patch_spec(&s.api, "steady", json!({"schedule": {"cron": "0 0 1 1 *"}})).await;
    let status = status_where(&s.api, "steady", "the new schedule", |st| {
        st.schedule
            .as_deref()
            .is_some_and(|t| t.starts_with("0 0 1 1 *"))
            && st
                .next_run_time
                .is_some_and(|t| t > chrono::Utc::now() + chrono::Duration::days(1))
    })
    .await;
    assert!(status.active.is_empty());
}
