//! The Grafana dashboard shipped with the chart: valid JSON in Grafana's shape, and every query
//! names metrics the operator exports (a renamed metric must not leave a blank panel).

use std::collections::BTreeSet;

use serde_json::Value;

#[test]
fn every_panel_queries_metrics_the_operator_exports() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/charts/chronflow/dashboards/chronflow.json"
    );
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert_eq!(dashboard["uid"], "chronflow");
    // What `chronflow_…` series /metrics serves (docs/operations.md lists them).
    let exported: BTreeSet<&str> = [
        "chronflow_runs_total",
        "chronflow_missed_runs_total",
        "chronflow_run_duration_seconds_bucket",
        "chronflow_start_lag_seconds_bucket",
        "chronflow_retries_total",
        "chronflow_claims_total",
        "chronflow_reconcile_errors_total",
        "chronflow_queue_depth",
        "chronflow_queue_capacity",
        "chronflow_queue_refused_total",
        "chronflow_workers_busy",
        "chronflow_workers",
        "chronflow_leader",
        "chronflow_status_writes_total",
        "chronflow_status_write_backlog",
        "chronflow_status_write_budget",
        "chronflow_status_staleness_seconds",
        "chronflow_events_dropped_total",
    ]
    .into();
    let metrics = chronflow::metrics::Metrics::new(true, None);
    let text = metrics.encode();
    let panels = dashboard["panels"].as_array().unwrap();
    assert!(panels.len() >= 8);
    let mut queried = BTreeSet::new();
    for panel in panels {
        assert!(panel["gridPos"]["w"].as_u64().unwrap() > 0, "{panel}");
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for word in expr.split(|c: char| !(c.is_alphanumeric() || c == '_')) {
                if word.starts_with("chronflow_") {
                    assert!(
                        exported.contains(word),
                        "{}: {word} is not exported",
                        panel["title"]
                    );
                    queried.insert(word.to_string());
                }
            }
        }
    }
    // The registry itself declares the metrics the dashboard relies on (label families appear
    // with their first series).
    for family in [
        "chronflow_start_lag_seconds",
        "chronflow_run_duration_seconds",
        "chronflow_retries",
    ] {
        assert!(
            text.contains(&format!("# TYPE {family} ")),
            "{family} in {text}"
        );
    }
    assert!(queried.len() >= 12, "{queried:?}");
}
