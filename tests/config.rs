//! `chronflow check-config`, run as a binary: the committed configuration file is exactly the
//! defaults, and bad keys or values (in a file or in `SCHEDULER__…` variables) exit 2 with a
//! message naming the key path and where the value came from.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_yaml::Value;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `chronflow check-config ARGS` with the given `SCHEDULER__…` variables and none inherited.
fn check_config(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_chronflow"));
    command.current_dir(repo()).arg("check-config").args(args);
    for (name, _) in std::env::vars_os() {
        let text = name.to_string_lossy().to_ascii_uppercase();
        if text.starts_with("SCHEDULER__") || text == "CHRONFLOW_CONFIG" {
            command.env_remove(&name);
        }
    }
    command.envs(env.iter().copied());
    command.output().expect("run chronflow check-config")
}

fn stdout(output: &Output) -> String {
    String::from_utf8(output.stdout.clone()).expect("stdout is UTF-8")
}

fn stderr(output: &Output) -> String {
    String::from_utf8(output.stderr.clone()).expect("stderr is UTF-8")
}

/// Runs and expects exit 0; returns standard output.
fn ok(args: &[&str], env: &[(&str, &str)]) -> String {
    let output = check_config(args, env);
    assert_eq!(output.status.code(), Some(0), "stderr: {}", stderr(&output));
    stdout(&output)
}

/// Runs and expects exit 2 with nothing on standard output; returns standard error.
fn fails(args: &[&str], env: &[(&str, &str)]) -> String {
    let output = check_config(args, env);
    assert_eq!(
        output.status.code(),
        Some(2),
        "stdout: {}\nstderr: {}",
        stdout(&output),
        stderr(&output)
    );
    assert!(output.stdout.is_empty(), "stdout: {}", stdout(&output));
    stderr(&output)
}

fn write(dir: &tempfile::TempDir, yaml: &str) -> PathBuf {
    let path = dir.path().join("chronflow.yaml");
    std::fs::write(&path, yaml).expect("write config file");
    path
}

fn path_arg(path: &Path) -> &str {
    path.to_str().expect("UTF-8 temp path")
}

/// `(dotted key, default as written in YAML)` for every leaf of the effective configuration.
fn leaves(value: &Value, prefix: &str, out: &mut Vec<(String, String)>) {
    let Value::Mapping(mapping) = value else {
        return;
    };
    for (key, child) in mapping {
        let key = format!("{prefix}{}", key.as_str().expect("string key"));
        match child {
            Value::Mapping(_) => leaves(child, &format!("{key}."), out),
            Value::Null => out.push((key, "null".into())),
            Value::Bool(flag) => out.push((key, flag.to_string())),
            Value::Number(number) => out.push((key, number.to_string())),
            Value::String(text) => out.push((key, text.clone())),
            Value::Sequence(items) => {
                let items: Vec<&str> = items.iter().filter_map(Value::as_str).collect();
                out.push((key, format!("[{}]", items.join(", "))));
            }
            other => panic!("unexpected default for {key}: {other:?}"),
        }
    }
}

fn default_leaves() -> Vec<(String, String)> {
    let defaults: Value = serde_yaml::from_str(&ok(&[], &[])).expect("check-config prints YAML");
    let mut out = Vec::new();
    leaves(&defaults, "", &mut out);
    out
}

#[test]
fn committed_file_is_exactly_the_defaults() {
    let from_file = ok(&["-f", "config/chronflow.yaml"], &[]);
    let defaults = ok(&[], &[]);
    assert_eq!(from_file, defaults);

    // Not only equal in effect: the file spells out every key with its default.
    let text = std::fs::read_to_string(repo().join("config/chronflow.yaml"))
        .expect("read config/chronflow.yaml");
    let file: Value = serde_yaml::from_str(&text).expect("config/chronflow.yaml is YAML");
    let printed: Value = serde_yaml::from_str(&defaults).expect("check-config prints YAML");
    assert_eq!(
        file, printed,
        "config/chronflow.yaml must list every key with its default"
    );
}

#[test]
fn committed_file_comments_every_key() {
    let text = std::fs::read_to_string(repo().join("config/chronflow.yaml"))
        .expect("read config/chronflow.yaml");
    let mut previous = "";
    for line in text.lines() {
        let trimmed = line.trim();
        if !trimmed.is_empty() && !trimmed.starts_with('#') {
            assert!(
                trimmed.contains(" #") || previous.trim().starts_with('#'),
                "config/chronflow.yaml: {line:?} has no comment"
            );
        }
        previous = line;
    }
}

#[test]
fn docs_list_every_key_with_its_variable_and_default() {
    let docs = std::fs::read_to_string(repo().join("docs/configuration.md"))
        .expect("read docs/configuration.md");
    let keys = default_leaves();
    assert_eq!(keys.len(), 51, "{keys:?}");
    for (key, default) in keys {
        let env = format!("SCHEDULER__{}", key.replace('.', "__").to_ascii_uppercase());
        let row = format!("| `{key}` | `{env}` | `{default}` |");
        assert!(
            docs.contains(&row),
            "docs/configuration.md lacks the row {row}"
        );
    }
}

#[test]
fn docs_name_a_test_that_shows_each_key_s_effect() {
    let docs = std::fs::read_to_string(repo().join("docs/configuration.md"))
        .expect("read docs/configuration.md");
    let section = docs
        .split("## Every key has an effect")
        .nth(1)
        .and_then(|rest| rest.split("\n## ").next())
        .expect("docs/configuration.md has the section \"Every key has an effect\"");
    for (key, _) in default_leaves() {
        let row = section
            .lines()
            .find(|line| line.starts_with(&format!("| `{key}` |")))
            .unwrap_or_else(|| panic!("no test named for {key}"));
        let cells: Vec<&str> = row.split('`').collect();
        let (file, test) = (cells[3], cells[5]);
        let source = std::fs::read_to_string(repo().join(file))
            .unwrap_or_else(|e| panic!("{key}: {file}: {e}"));
        assert!(
            source.contains(&format!("fn {test}(")),
            "{key}: {file} has no test {test}"
        );
    }
}

#[test]
fn bad_key_in_a_file_exits_2_naming_the_key_path_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(&dir, "max_workers: 4\nredis:\n  max_conection: 20\n");
    let error = fails(&["-f", path_arg(&path)], &[]);
    assert_eq!(
        error.trim_end(),
        format!(
            "chronflow: config: redis.max_conection: unknown key \
             (expected one of: url, host, port, db, password, password_file, ca_file, max_connections, timeout, cluster, wait_replicas) (in {})",
            path.display()
        )
    );
}

#[test]
fn bad_value_in_a_file_exits_2_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(&dir, "status:\n  flush_interval: 5x\n");
    let error = fails(&["-f", path_arg(&path)], &[]);
    assert!(
        error.contains("status.flush_interval: \"5x\" is not a duration"),
        "{error}"
    );
    assert!(
        error.contains(&format!("(in {})", path.display())),
        "{error}"
    );
}

#[test]
fn bad_value_from_the_environment_exits_2_naming_key_and_variable() {
    let error = fails(&[], &[("SCHEDULER__MAX_WORKERS", "0")]);
    assert_eq!(
        error.trim_end(),
        "chronflow: config: max_workers: expected an integer from 1 to 10000, got 0 (from SCHEDULER__MAX_WORKERS)"
    );

    let error = fails(
        &["-f", "config/chronflow.yaml"],
        &[("SCHEDULER__LOG__FORMAT", "xml")],
    );
    assert!(error.contains("log.format"), "{error}");
    assert!(error.contains("SCHEDULER__LOG__FORMAT"), "{error}");
}

#[test]
fn unknown_variable_exits_2_naming_it() {
    let error = fails(&[], &[("SCHEDULER__REDIS__MAX_CONECTION", "20")]);
    assert_eq!(
        error.trim_end(),
        "chronflow: config: redis.max_conection: unknown key \
         (expected one of: url, host, port, db, password, password_file, ca_file, max_connections, timeout, cluster, wait_replicas) \
         (from SCHEDULER__REDIS__MAX_CONECTION)"
    );
}

#[test]
fn missing_file_exits_2_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("absent.yaml");
    let error = fails(&["-f", path_arg(&path)], &[]);
    assert!(
        error.starts_with(&format!(
            "chronflow: config: cannot read {}: ",
            path.display()
        )),
        "{error}"
    );
}

#[test]
fn file_from_chronflow_config_variable_is_checked() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(&dir, "bogus: 1\n");
    let mut command = Command::new(env!("CARGO_BIN_EXE_chronflow"));
    for (name, _) in std::env::vars_os() {
        if name
            .to_string_lossy()
            .to_ascii_uppercase()
            .starts_with("SCHEDULER__")
        {
            command.env_remove(&name);
        }
    }
    let output = command
        .arg("check-config")
        .env("CHRONFLOW_CONFIG", &path)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("bogus: unknown key"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn effective_configuration_reflects_file_and_environment() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        &dir,
        "max_workers: 4\nredis:\n  host: from-file\n  port: 6380\n",
    );
    let printed = ok(
        &["-f", path_arg(&path)],
        &[
            ("SCHEDULER__MAX_WORKERS", "12"),
            ("SCHEDULER__REDIS__MAX_CONNECTIONS", "20"),
            ("scheduler__log__format", "json"),
            ("SCHEDULER__WATCH_NAMESPACES", "team-a,team-b"),
            ("SCHEDULER__LEADER_ELECTION__LEASE_DURATION", "1m30s"),
        ],
    );
    let config: Value = serde_yaml::from_str(&printed).expect("YAML");
    assert_eq!(config["max_workers"], Value::from(12));
    assert_eq!(config["redis"]["host"], Value::from("from-file"));
    assert_eq!(config["redis"]["port"], Value::from(6380));
    assert_eq!(config["redis"]["max_connections"], Value::from(20));
    assert_eq!(config["log"]["format"], Value::from("json"));
    assert_eq!(
        config["watch_namespaces"],
        Value::from(vec!["team-a", "team-b"])
    );
    assert_eq!(
        config["leader_election"]["lease_duration"],
        Value::from("1m30s")
    );
    assert_eq!(config["queue_size"], Value::from(100_000));
}

#[test]
fn secrets_are_redacted_in_the_printed_configuration() {
    let printed = ok(
        &[],
        &[
            ("SCHEDULER__REDIS__PASSWORD", "hunter2"),
            (
                "SCHEDULER__REDIS__URL",
                "rediss://chronflow:hunter2@redis.example:6380/1",
            ),
        ],
    );
    assert!(!printed.contains("hunter2"), "{printed}");
    let config: Value = serde_yaml::from_str(&printed).expect("YAML");
    assert_eq!(config["redis"]["password"], Value::from("<redacted>"));
    assert_eq!(
        config["redis"]["url"],
        Value::from("rediss://chronflow:<redacted>@redis.example:6380/1")
    );
}

/// `chronflow run ARGS` with the given variables and none inherited; it must stop at the
/// configuration, before looking for a cluster (no KUBECONFIG is given anyway).
fn run_fails(args: &[&str], env: &[(&str, &str)]) -> String {
    let mut command = Command::new(env!("CARGO_BIN_EXE_chronflow"));
    command.current_dir(repo()).arg("run").args(args);
    for (name, _) in std::env::vars_os() {
        let text = name.to_string_lossy().to_ascii_uppercase();
        if text.starts_with("SCHEDULER__") || text == "CHRONFLOW_CONFIG" {
            command.env_remove(&name);
        }
    }
    command
        .env("KUBECONFIG", "/nonexistent/kubeconfig")
        .envs(env.iter().copied());
    let output = command.output().expect("run chronflow run");
    assert_eq!(output.status.code(), Some(2), "stderr: {}", stderr(&output));
    stderr(&output)
}

#[test]
fn sizes_and_periods_too_large_for_the_runtime_exit_2_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "max_workers: 18446744073709551615\n",
            "max_workers: expected an integer from 1 to 10000, got 18446744073709551615",
        ),
        (
            "queue_size: 1000001\n",
            "queue_size: expected an integer from 1 to 1000000, got 1000001",
        ),
        (
            "redis:\n  max_connections: 10001\n",
            "redis.max_connections: expected an integer from 1 to 10000, got 10001",
        ),
        (
            "status:\n  flush_interval: 1h1ms\n",
            "status.flush_interval: expected a duration greater than 0 and at most 1h, got 1h1ms",
        ),
        (
            "shutdown:\n  grace_period: 2h\n",
            "shutdown.grace_period: expected a duration of at most 1h, got 2h",
        ),
    ];
    for (yaml, message) in cases {
        let path = write(&dir, yaml);
        let error = fails(&["-f", path_arg(&path)], &[]);
        let expected = format!("chronflow: config: {message} (in {})\n", path.display());
        assert_eq!(error, expected);
        // `run` reads the configuration the same way and stops before starting anything.
        assert_eq!(run_fails(&["-f", path_arg(&path)], &[]), expected);
    }

    let error = fails(&[], &[("SCHEDULER__QUEUE_SIZE", "18446744073709551615")]);
    assert_eq!(
        error.trim_end(),
        "chronflow: config: queue_size: expected an integer from 1 to 1000000, \
         got 18446744073709551615 (from SCHEDULER__QUEUE_SIZE)"
    );

    let edges = write(
        &dir,
        "max_workers: 10000\nqueue_size: 1000000\nredis:\n  max_connections: 10000\n\
         status:\n  flush_interval: 1h\nshutdown:\n  grace_period: 1h\n",
    );
    let printed: Value = serde_yaml::from_str(&ok(&["-f", path_arg(&edges)], &[])).unwrap();
    assert_eq!(printed["max_workers"], Value::from(10000));
    assert_eq!(printed["queue_size"], Value::from(1_000_000));
    assert_eq!(printed["status"]["flush_interval"], Value::from("1h"));
}

#[test]
fn a_bad_rust_log_stops_run_naming_the_variable() {
    // Before any cluster is contacted: the filter is read right after the configuration.
    let output = Command::new(env!("CARGO_BIN_EXE_chronflow"))
        .arg("run")
        .env("RUST_LOG", "chronflow=loudest")
        .env("KUBECONFIG", "/nonexistent")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    let message = stderr(&output);
    assert!(message.starts_with("chronflow: RUST_LOG: "), "{message}");
    assert_eq!(message.lines().count(), 1, "{message}");
}
