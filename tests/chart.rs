//! The Helm chart stays in step with the code: its appVersion is the crate's, its CRD is the
//! generated one, and its `config:` block is `config/chronflow.yaml` key by key (comments
//! included), differing only where the chart says so.

use std::path::Path;

fn read(path: &str) -> String {
    let full = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{}: {e}", full.display()))
}

#[test]
fn app_version_is_the_crate_version() {
    let chart: serde_yaml::Value =
        serde_yaml::from_str(&read("charts/chronflow/Chart.yaml")).unwrap();
    assert_eq!(
        chart["appVersion"].as_str(),
        Some(env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn the_chart_carries_the_generated_crd() {
    assert_eq!(
        read("charts/chronflow/files/chronflow.io_chrontasks.yaml"),
        read("crds/chronflow.io_chrontasks.yaml"),
        "copy crds/chronflow.io_chrontasks.yaml to charts/chronflow/files/"
    );
}

#[test]
fn values_config_mirrors_the_committed_configuration() {
    let values: serde_yaml::Value =
        serde_yaml::from_str(&read("charts/chronflow/values.yaml")).unwrap();
    let mut chart_config = values["config"].clone();
    let defaults: serde_yaml::Value = serde_yaml::from_str(&read("config/chronflow.yaml")).unwrap();
    // The documented differences: a rolling update must never have two leaders, and in a
    // cluster /metrics is for those allowed to read it.
    assert_eq!(
        chart_config["leader_election"]["enabled"],
        serde_yaml::Value::Bool(true)
    );
    chart_config["leader_election"]["enabled"] = serde_yaml::Value::Bool(false);
    assert_eq!(chart_config["metrics"]["auth"], "kubernetes");
    chart_config["metrics"]["auth"] = "none".into();
    assert_eq!(chart_config, defaults);
    // Comments too: the values file is where chart users read what a key does.
    let comments = |text: &str| -> Vec<String> {
        text.lines()
            .map(str::trim)
            .filter(|line| line.starts_with('#'))
            .map(str::to_string)
            .collect()
    };
    let values_text = read("charts/chronflow/values.yaml");
    let config_text = read("config/chronflow.yaml");
    let in_values = comments(&values_text);
    for comment in comments(&config_text).iter().skip(4) {
        assert!(
            in_values.contains(comment),
            "values.yaml lacks the comment {comment:?} of config/chronflow.yaml"
        );
    }
}
