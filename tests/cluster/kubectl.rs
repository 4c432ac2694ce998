//! What people see through the real kubectl: printer columns filled from status, field
//! selectors on status.phase and spec.paused, and `kubectl explain` docs.

use chrono::{TimeZone, Utc};
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::json;

use crate::support::{eventually, namespace, test_env};
use chronflow::ChronTask;
use chronflow::crd::{ChronTaskStatus, Phase};

fn task(name: &str, paused: bool) -> ChronTask {
    serde_json::from_value(json!({
        "apiVersion": "chronflow.io/v1alpha1",
        "kind": "ChronTask",
        "metadata": {"name": name},
        "spec": {
            "schedule": {"cron": "*/5 * * * * *"},
            "paused": paused,
            "action": {"http": {"url": "http://127.0.0.1:9/hook"}}
        }
    }))
    .unwrap()
}

/// Writes status the way the operator does: server-side apply to the status subresource.
async fn apply_status(api: &Api<ChronTask>, name: &str, status: ChronTaskStatus) {
    let patch = json!({
        "apiVersion": "chronflow.io/v1alpha1",
        "kind": "ChronTask",
        "status": status,
    });
    api.patch_status(
        name,
        &PatchParams::apply("chronflow-test").force(),
        &Patch::Apply(&patch),
    )
    .await
    .unwrap();
}

fn stdout(output: std::process::Output) -> String {
    assert!(
        output.status.success(),
        "kubectl failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

#[tokio::test]
async fn get_shows_columns_filled_from_status() {
    let env = test_env();
    let client = env.client().await;
    let ns = namespace(&client, "columns").await;
    let api = Api::<ChronTask>::namespaced(client, &ns);
    api.create(&PostParams::default(), &task("report", false))
        .await
        .unwrap();
    let status = ChronTaskStatus {
        phase: Some(Phase::Scheduled),
        schedule: Some("*/5 * * * * * (UTC)".into()),
        last_schedule_time: Some(Utc::now()),
        next_run_time: Some(Utc.with_ymd_and_hms(2031, 1, 2, 3, 4, 5).unwrap()),
        total_runs: 7,
        successful_runs: 6,
        failed_runs: 1,
        success_rate: Some("85.7%".into()),
        ..Default::default()
    };
    apply_status(&api, "report", status).await;

    let table = stdout(env.kubectl(&["get", "chrontasks", "-n", &ns]));
    let mut lines = table.lines();
    let header: Vec<&str> = lines
        .next()
        .unwrap()
        .split("  ")
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    assert_eq!(
        header,
        [
            "NAME", "SCHEDULE", "PAUSED", "PHASE", "LAST RUN", "NEXT RUN", "RUNS", "SUCCESS", "AGE"
        ]
    );
    let row: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(row[0], "report");
    assert_eq!(&row[1..7], ["*/5", "*", "*", "*", "*", "*"]);
    // row[10] (Last Run) and row[14] (Age) are relative ages such as "0s".
    assert_eq!(
        [row[7], row[8], row[9], row[11], row[12], row[13]],
        [
            "(UTC)",
            "false",
            "Scheduled",
            "2031-01-02T03:04:05Z",
            "7",
            "85.7%"
        ]
    );

    // The short name and category reach the same objects.
    let by_short_name = stdout(env.kubectl(&["get", "ct", "-n", &ns, "-o", "name"]));
    assert_eq!(by_short_name.trim(), "chrontask.chronflow.io/report");
    let by_category = stdout(env.kubectl(&["get", "chronflow", "-n", &ns, "-o", "name"]));
    assert_eq!(by_category.trim(), "chrontask.chronflow.io/report");
}

#[tokio::test]
async fn field_selectors_pick_by_phase_and_paused() {
    let env = test_env();
    let client = env.client().await;
    let ns = namespace(&client, "selectors").await;
    let api = Api::<ChronTask>::namespaced(client, &ns);
    for (name, paused, phase) in [
        ("failing", false, Phase::Failed),
        ("healthy", false, Phase::Scheduled),
        ("resting", true, Phase::Paused),
    ] {
        api.create(&PostParams::default(), &task(name, paused))
            .await
            .unwrap();
        let status = ChronTaskStatus {
            phase: Some(phase),
            ..Default::default()
        };
        apply_status(&api, name, status).await;
    }
    let select = |selector: &str| {
        stdout(env.kubectl(&[
            "get",
            "ct",
            "-n",
            &ns,
            "--field-selector",
            selector,
            "-o",
            "name",
        ]))
    };
    assert_eq!(
        select("status.phase=Failed").trim(),
        "chrontask.chronflow.io/failing"
    );
    assert_eq!(
        select("status.phase=Paused").trim(),
        "chrontask.chronflow.io/resting"
    );
    assert_eq!(
        select("spec.paused=true").trim(),
        "chrontask.chronflow.io/resting"
    );
    assert_eq!(select("spec.paused=false").lines().count(), 2);
}

#[tokio::test]
async fn patch_pauses_a_task() {
    let env = test_env();
    let client = env.client().await;
    let ns = namespace(&client, "patch").await;
    let api = Api::<ChronTask>::namespaced(client, &ns);
    api.create(&PostParams::default(), &task("x", false))
        .await
        .unwrap();
    stdout(env.kubectl(&[
        "patch",
        "chrontask",
        "x",
        "-n",
        &ns,
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"paused":true}}"#,
    ]));
    assert!(api.get("x").await.unwrap().spec.paused);
}

/// kubectl explain wraps text at its terminal width; compare with the wrapping undone.
fn unwrap_lines(output: std::process::Output) -> String {
    stdout(output)
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

#[tokio::test]
async fn explain_prints_field_docs() {
    let env = test_env();
    // The apiserver publishes a new CRD's OpenAPI a moment after it is Established.
    let text = eventually("kubectl explain to know ChronTask", || async {
        let output = env.kubectl(&["explain", "chrontask.spec.schedule"]);
        output.status.success().then(|| unwrap_lines(output))
    })
    .await;
    assert!(
        text.contains("exactly one of `cron`, `interval` or `at`"),
        "{text}"
    );
    assert!(text.contains("6 fields with seconds first"), "{text}");
    assert!(
        text.contains("Daylight saving follows the Vixie cron rule"),
        "{text}"
    );
    let text = unwrap_lines(env.kubectl(&["explain", "chrontask.spec.concurrencyPolicy"]));
    assert!(text.contains("`Forbid` skips the new run"), "{text}");
}
