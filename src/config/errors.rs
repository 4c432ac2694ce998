//! Refusals in words: `ConfigError`, and what figment's and serde's errors become (the key
//! path, what was expected, what was found, and where the value came from).

use std::fmt;

use figment::error::{Actual, Kind};
use figment::{Figment, Metadata, Source};

use super::env::is_ours;

/// The configuration was refused. Each problem is one line that names the key path, what was
/// expected and where the value came from; `Display` prints every line prefixed `config: `.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub(super) problems: Vec<String>,
}

impl ConfigError {
    /// The problems found, without the `config: ` prefix.
    pub fn problems(&self) -> &[String] {
        &self.problems
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let lines: Vec<String> = self
            .problems
            .iter()
            .map(|p| format!("config: {p}"))
            .collect();
        f.write_str(&lines.join("\n"))
    }
}

impl std::error::Error for ConfigError {}

impl From<String> for ConfigError {
    fn from(problem: String) -> Self {
        Self {
            problems: vec![problem],
        }
    }
}

/// `in FILE`, `from SCHEDULER__…` or `default`: where the value at `key` came from (for a list
/// item such as `watch_namespaces[1]`, where the list came from).
pub(super) fn origin_of(figment: &Figment, key: &str) -> String {
    let key = key.split('[').next().unwrap_or(key);
    match figment.find_metadata(key) {
        Some(metadata) => origin(metadata),
        None => "default".to_string(),
    }
}

fn origin(metadata: &Metadata) -> String {
    match &metadata.source {
        Some(Source::File(path)) => format!("in {}", path.display()),
        _ if is_ours(&metadata.name) => format!("from {}", metadata.name),
        _ => "default".to_string(),
    }
}

/// `KEY: REASON (ORIGIN)` for an error figment or a `Deserialize` of the configuration reported.
pub(super) fn describe_error(figment: &Figment, error: figment::Error) -> String {
    // `watch_namespaces.1` → `watch_namespaces[1]`.
    let mut key = String::new();
    for segment in &error.path {
        match segment.parse::<usize>() {
            Ok(index) => key.push_str(&format!("[{index}]")),
            Err(_) if key.is_empty() => key.push_str(segment),
            Err(_) => key.push_str(&format!(".{segment}")),
        }
    }
    let reason = reason(&error.kind);
    match (&error.metadata, key.is_empty()) {
        (Some(metadata), true) => format!("{reason} ({})", origin(metadata)),
        (None, true) => reason,
        _ => format!("{key}: {reason} ({})", origin_of(figment, &key)),
    }
}

/// What was wrong, in words.
pub(super) fn reason(kind: &Kind) -> String {
    match kind {
        Kind::UnknownField(_, expected) => {
            format!("unknown key (expected one of: {})", expected.join(", "))
        }
        Kind::UnknownVariant(got, expected) => {
            format!("expected one of {}, got {got:?}", expected.join(", "))
        }
        Kind::InvalidType(got, expected) | Kind::InvalidValue(got, expected) => {
            format!(
                "expected {}, got {}",
                plain_expected(expected),
                plain_actual(got)
            )
        }
        other => other.to_string(),
    }
}

/// serde's names of the expected type, in words.
fn plain_expected(expected: &str) -> String {
    match expected {
        "u16" => "an integer from 0 to 65535".to_string(),
        "u32" => "an integer from 0 to 4294967295".to_string(),
        "u64" | "usize" => "an integer >= 0".to_string(),
        "a boolean" => "true or false".to_string(),
        other if other.starts_with("struct ") => "a mapping of keys".to_string(),
        other => other.to_string(),
    }
}

/// A value as shown in messages: `"5x"`, `0`, `true`, `null`, `a list`, `a mapping`.
fn plain_actual(actual: &Actual) -> String {
    match actual {
        Actual::Str(text) => format!("{text:?}"),
        Actual::Unsigned(number) => number.to_string(),
        Actual::Signed(number) => number.to_string(),
        Actual::Float(number) => number.to_string(),
        Actual::Bool(flag) => flag.to_string(),
        Actual::Unit | Actual::Option => "null".to_string(),
        Actual::Seq => "a list".to_string(),
        Actual::Map => "a mapping".to_string(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use crate::config::fixtures::{env_err, file_err};

    // ---- refused input ---------------------------------------------------------------------

    #[test]
    fn unknown_keys_name_the_path_the_expected_keys_and_the_source() {
        let top = "backend_type, max_workers, queue_size, timezone, watch_namespaces, redis, \
                   leader_election, log, metrics, status, shutdown, secrets, http, limits, jobs";
        let redis = "url, host, port, db, password, password_file, ca_file, max_connections, timeout, cluster, wait_replicas";
        let cases = [
            (
                file_err("max_worker: 3\n"),
                format!("max_worker: unknown key (expected one of: {top}) (in FILE)"),
            ),
            (
                file_err("redis:\n  max_conection: 5\n"),
                format!("redis.max_conection: unknown key (expected one of: {redis}) (in FILE)"),
            ),
            (
                env_err(&[("SCHEDULER__MAX_WORKER", "3")]),
                format!(
                    "max_worker: unknown key (expected one of: {top}) (from SCHEDULER__MAX_WORKER)"
                ),
            ),
            (
                env_err(&[("SCHEDULER__REDIS__MAX_CONECTION", "3")]),
                format!(
                    "redis.max_conection: unknown key (expected one of: {redis}) (from SCHEDULER__REDIS__MAX_CONECTION)"
                ),
            ),
            (
                env_err(&[("SCHEDULER__METRICS", "x")]),
                "metrics: expected a mapping of keys, got \"x\" (from SCHEDULER__METRICS)"
                    .to_string(),
            ),
        ];
        for (error, expected) in cases {
            assert_eq!(error, format!("config: {expected}"));
        }
        for name in ["SCHEDULER__", "SCHEDULER__REDIS____HOST"] {
            assert!(env_err(&[(name, "x")]).contains(&format!("{name} names no key")));
        }
    }

    #[test]
    fn wrong_values_name_the_key_expectation_value_and_source() {
        let zone = "expected an IANA time zone name such as UTC or Europe/Paris";
        let label =
            "expected a namespace name (lowercase letters, digits and '-', at most 63 characters)";
        let cases = [
            (
                "max_workers: many\n",
                "max_workers: expected an integer >= 0, got \"many\"",
            ),
            (
                "queue_size: -1\n",
                "queue_size: expected an integer >= 0, got -1",
            ),
            (
                "max_workers: 1.5\n",
                "max_workers: expected an integer >= 0, got 1.5",
            ),
            (
                "max_workers:\n",
                "max_workers: expected an integer >= 0, got null",
            ),
            (
                "backend_type: etcd\n",
                "backend_type: expected one of memory, redis, got \"etcd\"",
            ),
            (
                "timezone: Mars/Olympus\n",
                &format!("timezone: {zone}, got \"Mars/Olympus\""),
            ),
            (
                "watch_namespaces: [a, Team_A]\n",
                &format!("watch_namespaces[1]: {label}, got \"Team_A\""),
            ),
            (
                "watch_namespaces: [a, b, a]\n",
                "watch_namespaces[2]: \"a\" is listed twice",
            ),
            ("redis: 5\n", "redis: expected a mapping of keys, got 5"),
            (
                "redis:\n  port: 70000\n",
                "redis.port: expected an integer from 1 to 65535, got 70000",
            ),
            (
                "redis:\n  url: http://admin:hunter2@redis\n",
                "redis.url: expected a redis:// or rediss:// URL, got \"http://admin:<redacted>@redis\"",
            ),
            (
                "redis:\n  url: redis://\n",
                "redis.url: expected a redis:// or rediss:// URL, got \"redis://\"",
            ),
            (
                "leader_election:\n  lease_namespace: kube.system\n",
                &format!("leader_election.lease_namespace: {label}, got \"kube.system\""),
            ),
            (
                "leader_election:\n  lease_duration: 15\n",
                "leader_election.lease_duration: expected a duration such as 500ms, 10s, 1m30s, 2h or 1d, got 15 (add a unit: 15s)",
            ),
            (
                "status:\n  flush_interval: 5x\n",
                "status.flush_interval: \"5x\" is not a duration (expected e.g. 500ms, 10s, 1m30s, 2h, 1d)",
            ),
            (
                "log:\n  format: xml\n",
                "log.format: expected one of json, pretty, compact, off, got \"xml\"",
            ),
            (
                "log:\n  rotation: weekly\n",
                "log.rotation: expected one of never, hourly, daily, got \"weekly\"",
            ),
            (
                "log:\n  level: [info]\n",
                "log.level: expected text, got a list",
            ),
            (
                "http:\n  deny_cidrs: [10.0.0.0/33]\n",
                "http.deny_cidrs: expected a network such as 10.0.0.0/8 or fd00::/8, got \"10.0.0.0/33\"",
            ),
            (
                "http:\n  proxy: ftp://u:secret@proxy:21\n",
                "http.proxy: expected an http://, https://, socks5:// or socks5h:// proxy URL, got \"ftp://u:<redacted>@proxy:21\"",
            ),
            (
                "jobs:\n  allowed_service_accounts: [default, Admin]\n",
                "jobs.allowed_service_accounts: expected Kubernetes object names (lower-case letters, digits, '-' and '.'), got \"Admin\"",
            ),
            (
                "metrics:\n  bind: localhost:8080\n",
                "metrics.bind: expected a socket address such as 0.0.0.0:8080 or [::]:8080, got \"localhost:8080\"",
            ),
        ];
        for (yaml, message) in cases {
            assert_eq!(
                file_err(yaml),
                format!("config: {message} (in FILE)"),
                "{yaml:?}"
            );
        }
        assert_eq!(
            env_err(&[("SCHEDULER__REDIS__PORT", "")]),
            "config: redis.port: expected an integer >= 0, got null (from SCHEDULER__REDIS__PORT)"
        );
        assert_eq!(
            env_err(&[("SCHEDULER__SHUTDOWN__GRACE_PERIOD", "30")]),
            "config: shutdown.grace_period: expected a duration such as 500ms, 10s, 1m30s, 2h or \
             1d, got 30 (add a unit: 30s) (from SCHEDULER__SHUTDOWN__GRACE_PERIOD)"
        );
    }
}
