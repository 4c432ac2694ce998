//! Run now: a `chronflow.io/run-now` value starts exactly one run, named by the value, counted in
//! status; the same value never runs again (re-applied, after a spec change, after a restart).

use std::collections::BTreeMap;

use chronflow::ChronTask;
use chronflow::crd::{ChronTaskStatus, Trigger};
use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::json;

use crate::operator::{Operator, create, patch_spec, setup, status_where};
use crate::support::receiver::{Behavior, Receiver};
use crate::support::{eventually, test_env};

/// Sets the task's annotations (a merge: others stay).
pub(crate) async fn annotate(api: &Api<ChronTask>, name: &str, annotations: serde_json::Value) {
    let patch = Patch::Merge(json!({"metadata": {"annotations": annotations}}));
    api.patch(name, &PatchParams::default(), &patch)
        .await
        .unwrap();
}

/// How many calls the receiver got for each run-now request of `task`.
fn requests(receiver: &Receiver, ns: &str, task: &str) -> BTreeMap<String, usize> {
    let prefix = format!("{ns}/{task}@manual:");
    let mut seen = BTreeMap::new();
    for hit in receiver.hits() {
        if let Some(request) = hit.idempotency_key.strip_prefix(&prefix) {
            *seen.entry(request.to_string()).or_insert(0) += 1;
        }
    }
    seen
}

/// Waits until the receiver got a call for `request`.
async fn ran(receiver: &Receiver, ns: &str, task: &str, request: &str) {
    eventually(&format!("a run for request {request}"), || async {
        requests(receiver, ns, task)
            .contains_key(request)
            .then_some(())
    })
    .await;
}

fn once_each(receiver: &Receiver, ns: &str, task: &str, expected: &[&str]) {
    let seen = requests(receiver, ns, task);
    let expected: BTreeMap<String, usize> = expected.iter().map(|r| (r.to_string(), 1)).collect();
    assert_eq!(seen, expected, "each request runs exactly once");
}

#[tokio::test]
async fn a_run_now_request_runs_once_and_never_again() {
    let s = setup("run-now").await;
    let receiver = Receiver::start(Behavior::default()).await;
    let mut operator = Operator::start(&s.ns).await;
    // Due once a year: every call the receiver gets is a requested one.
    let spec = json!({"schedule": {"cron": "0 0 0 1 1 *"},
                      "action": {"http": {"url": receiver.url("/report")}}});
    create(&s.api, "report", spec).await;
    status_where(&s.api, "report", "Scheduled", |st| {
        st.next_run_time.is_some()
    })
    .await;

    annotate(&s.api, "report", json!({"chronflow.io/run-now": "first"})).await;
    let status = status_where(&s.api, "report", "a manual run counted", |st| {
        st.manual_runs == 1
    })
    .await;
    assert_eq!((status.total_runs, status.successful_runs), (1, 1));
    assert_eq!(status.last_run_now.as_deref(), Some("first"));
    let last = status.last_run.expect("the run is recorded");
    assert_eq!(last.run_id, format!("{}/report@manual:first", s.ns));
    assert_eq!(last.trigger, Trigger::Manual);
    assert_eq!(status.recent_runs[0].trigger, Trigger::Manual);

    // The same value again, and a spec change that makes the operator read the task afresh.
    annotate(&s.api, "report", json!({"chronflow.io/run-now": "first"})).await;
    patch_spec(&s.api, "report", json!({"timeout": "20s"})).await;
    // `chronflow trigger` sets a new value through the API.
    let trigger = std::process::Command::new(env!("CARGO_BIN_EXE_chronflow"))
        .args(["trigger", "report", "-n", &s.ns, "--request", "second"])
        .env("KUBECONFIG", &test_env().kubeconfig)
        .output()
        .unwrap();
    assert!(trigger.status.success(), "{trigger:?}");
    let said = String::from_utf8_lossy(&trigger.stdout);
    assert!(said.contains("chronflow.io/run-now=second"), "{said}");
    ran(&receiver, &s.ns, "report", "second").await;
    once_each(&receiver, &s.ns, "report", &["first", "second"]);

    // A restart with the value still set: status says it was handled.
    status_where(&s.api, "report", "the second request recorded", |st| {
        st.last_run_now.as_deref() == Some("second") && st.manual_runs == 2
    })
    .await;
    operator.stop().await;
    operator = Operator::start(&s.ns).await;
    annotate(&s.api, "report", json!({"chronflow.io/run-now": "third"})).await;
    ran(&receiver, &s.ns, "report", "third").await;
    once_each(&receiver, &s.ns, "report", &["first", "second", "third"]);
    drop(operator);
}

#[tokio::test]
async fn a_paused_task_runs_a_request_only_when_told_to_and_forbid_applies() {
    let s = setup("run-now-paused").await;
    let receiver = Receiver::start(Behavior {
        status: 200,
        delay: std::time::Duration::from_secs(3),
    })
    .await;
    let _operator = Operator::start(&s.ns).await;
    let spec = json!({"schedule": {"cron": "0 0 0 1 1 *"}, "paused": true,
                      "concurrencyPolicy": "Forbid",
                      "action": {"http": {"url": receiver.url("/job")}}});
    create(&s.api, "job", spec).await;
    status_where(&s.api, "job", "Paused", |st| {
        st.phase == Some(chronflow::crd::Phase::Paused)
    })
    .await;

    annotate(
        &s.api,
        "job",
        json!({"chronflow.io/run-now": "while-paused"}),
    )
    .await;
    let refused = |st: &ChronTaskStatus| {
        st.recent_runs.iter().any(|r| {
            r.trigger == Trigger::Manual
                && r.message
                    .as_deref()
                    .is_some_and(|m| m.contains("chronflow.io/run-now-while-paused=true"))
        })
    };
    let status = status_where(&s.api, "job", "the request refused, saying how", refused).await;
    assert_eq!(status.total_runs, 0);

    // Allowed while paused: it runs; a second request while it runs is skipped by Forbid.
    annotate(
        &s.api,
        "job",
        json!({"chronflow.io/run-now": "allowed", "chronflow.io/run-now-while-paused": "true"}),
    )
    .await;
    ran(&receiver, &s.ns, "job", "allowed").await;
    annotate(
        &s.api,
        "job",
        json!({"chronflow.io/run-now": "overlapping"}),
    )
    .await;
    let skipped = |st: &ChronTaskStatus| {
        st.recent_runs.iter().any(|r| {
            r.run_id.ends_with("@manual:overlapping")
                && r.message
                    .as_deref()
                    .is_some_and(|m| m.contains("concurrencyPolicy Forbid"))
        })
    };
    status_where(&s.api, "job", "the overlapping request skipped", skipped).await;
    status_where(&s.api, "job", "the allowed run counted", |st| {
        st.manual_runs == 1
    })
    .await;
    once_each(&receiver, &s.ns, "job", &["allowed"]);
}
