//! The `chronflow run` binary's logs, against the real apiserver: each format has its shape
//! (json lines parse, with the run id on each run's lines), `log_task_success: false` drops
//! success lines only, and a Secret header value never appears, even at debug level.

use std::io::Read;
use std::process::{Child, Command, Stdio};

use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::PostParams;
use serde_json::{Value, json};

use crate::operator::{create, setup, status_where};
use crate::support::receiver::{Behavior, Receiver};
use crate::support::test_env;

const SECRET_VALUE: &str = "s3cr3t-token-value";

/// `chronflow run` as a process, watching `ns`, with `log` settings.
fn run_binary(ns: &str, log: &str, dir: &tempfile::TempDir) -> Child {
    run_binary_with(ns, log, dir, None)
}

/// [`run_binary`] with `RUST_LOG` set (or unset).
fn run_binary_with(ns: &str, log: &str, dir: &tempfile::TempDir, rust_log: Option<&str>) -> Child {
    let config = dir.path().join("chronflow.yaml");
    let yaml = format!(
        "watch_namespaces: [{ns}]\nmetrics:\n  bind: 127.0.0.1:0\nstatus:\n  flush_interval: 300ms\n\
         shutdown:\n  grace_period: 2s\nlog:\n{log}"
    );
    std::fs::write(&config, yaml).unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_chronflow"));
    command
        .args(["run", "-f"])
        .arg(&config)
        .env("KUBECONFIG", &test_env().kubeconfig)
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(filter) = rust_log {
        command.env("RUST_LOG", filter);
    }
    command.spawn().expect("chronflow runs")
}

/// SIGTERM, then everything it printed; it must exit 0.
fn stop(mut child: Child) -> String {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let exit = child.wait().unwrap();
    assert!(exit.success(), "exit {exit}: {out}");
    out
}

/// One task that succeeds every second and one that fails, each with a Secret header; runs
/// until both have run twice.
async fn two_tasks(prefix: &str, log: &str) -> (String, String) {
    let s = setup(prefix).await;
    let ok = Receiver::start(Behavior::default()).await;
    let failing = Receiver::start(Behavior {
        status: 503,
        ..Default::default()
    })
    .await;
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "token", "labels": {"chronflow.io/usable-by-tasks": "true"}}, "stringData": {"token": SECRET_VALUE}}))
    .unwrap();
    Api::<Secret>::namespaced(test_env().client().await, &s.ns)
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    let header = json!([{"name": "Authorization", "valueFrom": {"secretKeyRef": {"name": "token", "key": "token"}}}]);
    for (name, url) in [("good", ok.url("/good")), ("bad", failing.url("/bad"))] {
        let spec = json!({"schedule": {"interval": "1s"},
                          "action": {"http": {"url": url, "headers": header}}});
        create(&s.api, name, spec).await;
    }
    let dir = tempfile::tempdir().unwrap();
    let child = run_binary(&s.ns, log, &dir);
    status_where(&s.api, "good", "2 successes", |st| st.successful_runs >= 2).await;
    status_where(&s.api, "bad", "2 failures", |st| st.failed_runs >= 2).await;
    assert_eq!(
        ok.hits()[0].authorization.as_deref(),
        Some(SECRET_VALUE),
        "the header was sent"
    );
    (stop(child), s.ns)
}

#[tokio::test]
async fn json_logs_parse_and_carry_the_run_id_and_never_a_secret() {
    let (out, ns) = two_tasks(
        "log-json",
        "  format: json\n  level: chronflow=debug,info\n",
    )
    .await;
    assert!(!out.contains(SECRET_VALUE), "a Secret value was logged");
    let lines: Vec<Value> = out
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect();
    let message = |line: &Value| line["fields"]["message"].as_str().unwrap_or("").to_string();
    let success = lines
        .iter()
        .find(|l| message(l) == "run succeeded")
        .unwrap_or_else(|| panic!("a success line in: {out}"));
    let run_id = success["span"]["run_id"].as_str().unwrap();
    assert!(run_id.starts_with(&format!("{ns}/good@")), "{success}");
    assert_eq!(success["level"], "INFO");
    assert_eq!(success["fields"]["result"], "HTTP 200");
    let failure = lines.iter().find(|l| message(l) == "run failed").unwrap();
    assert!(
        failure["span"]["run_id"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{ns}/bad@"))
    );
    assert_eq!(failure["fields"]["error"], "HTTP 503");
}

#[tokio::test]
async fn without_log_task_success_only_failures_are_logged() {
    let (out, _) = two_tasks(
        "log-quiet",
        "  format: compact\n  log_task_success: false\n",
    )
    .await;
    assert!(!out.contains("run succeeded"), "{out}");
    assert!(out.contains("run failed"), "{out}");
    let line = out.lines().find(|l| l.contains("run failed")).unwrap();
    assert!(
        line.contains("WARN") && line.contains("run_id="),
        "compact shape: {line}"
    );
}

#[tokio::test]
async fn pretty_and_off_formats() {
    let (pretty, _) = two_tasks("log-pretty", "  format: pretty\n").await;
    assert!(pretty.contains("run succeeded"), "{pretty}");
    assert!(
        pretty
            .lines()
            .any(|l| l.trim_start().starts_with("at src/")),
        "pretty logs name the source line: {pretty}"
    );
    let (off, _) = two_tasks("log-off", "  format: off\n").await;
    assert_eq!(off, "", "format off prints nothing");
}

#[tokio::test]
async fn a_log_file_receives_the_lines() {
    let s = setup("log-file").await;
    let receiver = Receiver::start(Behavior::default()).await;
    let spec =
        json!({"schedule": {"interval": "1s"}, "action": {"http": {"url": receiver.url("/x")}}});
    create(&s.api, "tick", spec).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("logs/chronflow.log");
    let log = format!(
        "  format: json\n  file: {}\n  rotation: daily\n",
        file.display()
    );
    let child = run_binary(&s.ns, &log, &dir);
    status_where(&s.api, "tick", "2 runs", |st| st.successful_runs >= 2).await;
    let out = stop(child);
    assert_eq!(out, "", "with a file, nothing on stdout");
    // Daily rotation names the file with the date.
    let written: Vec<_> = std::fs::read_dir(dir.path().join("logs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(written.len(), 1, "{written:?}");
    let text = std::fs::read_to_string(&written[0]).unwrap();
    assert!(
        text.lines()
            .all(|l| serde_json::from_str::<Value>(l).is_ok())
    );
    assert!(text.contains("run succeeded"));
}

#[tokio::test]
async fn log_level_filters_and_rust_log_replaces_it() {
    let s = setup("log-rust-log").await;
    let receiver = Receiver::start(Behavior::default()).await;
    let spec =
        json!({"schedule": {"interval": "1s"}, "action": {"http": {"url": receiver.url("/x")}}});
    create(&s.api, "tick", spec).await;
    let dir = tempfile::tempdir().unwrap();
    // log.level says warn; RUST_LOG asks for info, so successes show.
    let log = "  format: compact\n  level: warn\n";
    let child = run_binary_with(&s.ns, log, &dir, Some("chronflow=info"));
    status_where(&s.api, "tick", "2 runs", |st| st.successful_runs >= 2).await;
    let out = stop(child);
    assert!(out.contains("run succeeded"), "{out}");

    // Without RUST_LOG, log.level rules: at warn, successes (info) are not logged.
    let child = run_binary_with(&s.ns, log, &dir, None);
    status_where(&s.api, "tick", "2 more runs", |st| st.successful_runs >= 4).await;
    let out = stop(child);
    assert!(!out.contains("run succeeded"), "{out}");
}
