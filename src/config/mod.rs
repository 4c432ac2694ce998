//! Operator configuration: defaults, then a YAML file, then `SCHEDULER__…` environment variables,
//! layered by [figment](https://docs.rs/figment).
//!
//! Loading ([`OperatorConfig::load`]) is strict: an unknown key or a bad value stops start-up
//! with a [`ConfigError`] that names the key path and where the value came from (`in FILE`,
//! `from SCHEDULER__…` or `default`):
//!
//! ```text
//! config: redis.max_conection: unknown key (expected one of: url, host, …) (in /etc/chronflow.yaml)
//! config: max_workers: expected an integer from 1 to 10000, got 0 (from SCHEDULER__MAX_WORKERS)
//! ```
//!
//! Unknown keys are refused by `deny_unknown_fields`; value-specific messages live in the
//! `Deserialize` of the small types in `values` (durations, zones, names, secrets) and in
//! [`OperatorConfig::validate`]. `docs/configuration.md` is the user reference.

mod env;
mod errors;
mod leader;
mod limits;
mod logging;
mod redis;
mod runtime;
mod selector;
mod validate;
mod values;

use std::path::Path;
use std::time::Duration;

use chrono_tz::Tz;
use figment::Figment;
use figment::providers::{Format, Yaml};
use serde::{Deserialize, Serialize};

pub use self::redis::{RedisConfig, RedisUrl};
use env::{EnvVar, is_ours};
pub use errors::ConfigError;
use errors::describe_error;
pub use leader::LeaderElectionConfig;
pub use limits::{HttpConfig, JobsConfig, LimitsConfig, SecretsConfig};
pub use logging::{LogConfig, LogFormat, LogRotation};
pub use runtime::{MetricsAuth, MetricsConfig, ShutdownConfig, StatusConfig};
pub use selector::TaskSelector;
pub use values::{Namespace, Secret};
use values::{namespace_list, section, timezone_serde, within};

/// Prefix of the environment variables that override the configuration (case-insensitive);
/// `__` separates nesting levels: `SCHEDULER__REDIS__PORT`.
pub const ENV_PREFIX: &str = "SCHEDULER__";

/// Longest `status.flush_interval` and `shutdown.grace_period`.
pub const MAX_PERIOD: Duration = Duration::from_secs(3600);

/// What secrets are printed as by `chronflow check-config`.
pub const REDACTED: &str = "<redacted>";

/// The defaults: the committed `config/chronflow.yaml`, which spells out every key.
const DEFAULTS: &str = include_str!("../../config/chronflow.yaml");

/// The operator configuration (the Python library's `SchedulerConfig`, mapped to the operator).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OperatorConfig {
    /// Where the run ledger lives: in process (one replica), or in Redis (several replicas).
    pub backend_type: BackendType,
    /// Size of the worker pool that executes runs.
    #[serde(deserialize_with = "within::<_, _, 1, 10_000>")]
    pub max_workers: usize,
    /// Capacity of the bounded queue of runs waiting for a worker.
    #[serde(deserialize_with = "within::<_, _, 1, 1_000_000>")]
    pub queue_size: usize,
    /// Time zone of cron schedules whose ChronTask sets no `spec.schedule.timezone`.
    #[serde(with = "timezone_serde")]
    pub timezone: Tz,
    /// Namespaces whose ChronTasks are watched; empty means every namespace.
    #[serde(deserialize_with = "namespace_list")]
    pub watch_namespaces: Vec<Namespace>,
    /// Redis connection, used when `backend_type` is `redis`.
    #[serde(deserialize_with = "section")]
    pub redis: RedisConfig,
    /// Lease-based leader election between replicas.
    #[serde(deserialize_with = "section")]
    pub leader_election: LeaderElectionConfig,
    /// Logging.
    #[serde(deserialize_with = "section")]
    pub log: LogConfig,
    /// The HTTP endpoint for `/metrics`, `/stats`, `/healthz` and `/readyz`.
    #[serde(deserialize_with = "section")]
    pub metrics: MetricsConfig,
    /// ChronTask status writes.
    #[serde(deserialize_with = "section")]
    pub status: StatusConfig,
    /// Behaviour on SIGTERM.
    #[serde(deserialize_with = "section")]
    pub shutdown: ShutdownConfig,
    /// Secrets that tasks' headers read.
    #[serde(deserialize_with = "section")]
    pub secrets: SecretsConfig,
    /// Where HTTP actions may connect.
    #[serde(deserialize_with = "section")]
    pub http: HttpConfig,
    /// What tenants' tasks may ask for.
    #[serde(deserialize_with = "section")]
    pub limits: LimitsConfig,
    /// The Job action.
    #[serde(deserialize_with = "section")]
    pub jobs: JobsConfig,
}

impl Default for OperatorConfig {
    fn default() -> Self {
        // A unit test loads the file, so this cannot fail at run time.
        Figment::from(Yaml::string(DEFAULTS))
            .extract()
            .expect("config/chronflow.yaml holds valid defaults")
    }
}

/// Each section's defaults are its part of [`OperatorConfig::default`].
macro_rules! section_defaults {
    ($($section:ident: $type:ty),* $(,)?) => {$(
        impl Default for $type {
            fn default() -> Self {
                OperatorConfig::default().$section
            }
        }
    )*};
}

section_defaults!(
    redis: RedisConfig,
    leader_election: LeaderElectionConfig,
    log: LogConfig,
    metrics: MetricsConfig,
    status: StatusConfig,
    shutdown: ShutdownConfig,
    secrets: SecretsConfig,
    http: HttpConfig,
    limits: LimitsConfig,
    jobs: JobsConfig,
);

/// Where the run ledger lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendType {
    /// In process: exactly once for a single replica.
    Memory,
    /// In Redis: exactly once across replicas, restarts and failovers.
    Redis,
}

impl OperatorConfig {
    /// Loads the configuration: defaults, then `file` (YAML) when given, then the process's
    /// `SCHEDULER__…` environment variables; then validates it.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let mut env = Vec::new();
        for (name, value) in std::env::vars_os() {
            let name = name.to_string_lossy().into_owned();
            if is_ours(&name) {
                let value = value
                    .into_string()
                    .map_err(|_| ConfigError::from(format!("{name} is not valid UTF-8")))?;
                env.push((name, value));
            }
        }
        Self::load_from(file, env)
    }

    /// [`OperatorConfig::load`] with the environment given as `(name, value)` pairs (variables
    /// without the `SCHEDULER__` prefix are ignored), so tests need not touch the process
    /// environment.
    pub fn load_from(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let one = ConfigError::from;
        let mut figment = Figment::from(Yaml::string(DEFAULTS));
        if let Some(path) = file {
            let text = std::fs::read_to_string(path)
                .map_err(|error| one(format!("cannot read {}: {error}", path.display())))?;
            // Parsed here too for serde_yaml's line numbers and its refusal of duplicate keys,
            // where figment would let the last one win.
            let tree: serde_yaml::Value = serde_yaml::from_str(&text)
                .map_err(|error| one(format!("{} is not valid YAML: {error}", path.display())))?;
            // An empty or comment-only file is the defaults.
            match tree {
                serde_yaml::Value::Null => {}
                serde_yaml::Value::Mapping(_) => figment = figment.merge(Yaml::file_exact(path)),
                _ => {
                    let at = path.display();
                    return Err(one(format!(
                        "{at}: expected a mapping of configuration keys"
                    )));
                }
            }
        }
        for (name, value) in env {
            if is_ours(&name) {
                figment = figment.merge(EnvVar { name, value });
            }
        }
        // Lossy: environment text becomes a number or boolean where the key wants one.
        let config: Self = figment
            .extract_lossy()
            .map_err(|error| one(describe_error(&figment, error)))?;
        let problems = config.validate(&figment);
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError { problems })
        }
    }
}

/// Shared by the configuration's unit tests.
#[cfg(test)]
mod fixtures {
    use super::*;

    /// Loads `yaml` (written to a temporary file when given) with the environment `pairs`; an
    /// error comes back as its text with the file's path replaced by `FILE`.
    fn load(yaml: Option<&str>, pairs: &[(&str, &str)]) -> Result<OperatorConfig, String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chronflow.yaml");
        if let Some(yaml) = yaml {
            std::fs::write(&path, yaml).unwrap();
        }
        let env = pairs
            .iter()
            .map(|(name, value)| (name.to_string(), value.to_string()));
        OperatorConfig::load_from(yaml.map(|_| path.as_path()), env.collect::<Vec<_>>()).map_err(
            |error| {
                error
                    .to_string()
                    .replace(&path.display().to_string(), "FILE")
            },
        )
    }

    pub(super) fn ok(yaml: Option<&str>, pairs: &[(&str, &str)]) -> OperatorConfig {
        load(yaml, pairs).unwrap_or_else(|error| panic!("unexpected error: {error}"))
    }

    pub(super) fn err(yaml: Option<&str>, pairs: &[(&str, &str)]) -> String {
        match load(yaml, pairs) {
            Ok(config) => panic!("expected an error, got {config:?}"),
            Err(error) => error,
        }
    }

    pub(super) fn file_err(yaml: &str) -> String {
        err(Some(yaml), &[])
    }

    pub(super) fn env_err(pairs: &[(&str, &str)]) -> String {
        err(None, pairs)
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::fixtures::{file_err, ok};
    use super::*;

    // ---- defaults and layering -------------------------------------------------------------

    #[test]
    fn defaults_pass_validation() {
        assert_eq!(ok(None, &[]), OperatorConfig::default());
    }

    #[test]
    fn empty_comment_only_and_null_section_files_are_defaults() {
        for yaml in [
            "",
            "\n  \n",
            "# nothing here\n",
            "redis:\nlog:\n  # level: debug\n",
        ] {
            assert_eq!(ok(Some(yaml), &[]), OperatorConfig::default(), "{yaml:?}");
        }
    }

    #[test]
    fn file_values_override_defaults_and_the_rest_stays_default() {
        let config = ok(
            Some(
                "max_workers: 4\ntimezone: Europe/Paris\nwatch_namespaces: [team-a, team-b]\n\
                 redis:\n  host: redis.svc\n  password: 123456\n\
                 leader_election:\n  lease_namespace: ops\n  lease_duration: 1m30s\n  \
                 renew_deadline: 1m\n  retry_period: 500ms\n\
                 log:\n  format: json\n  file: /var/log/chronflow.log\n  rotation: hourly\n\
                 metrics:\n  bind: \"[::]:9090\"\n",
            ),
            &[],
        );
        assert_eq!(config.max_workers, 4);
        assert_eq!(config.queue_size, 100_000);
        assert_eq!(config.timezone, chrono_tz::Europe::Paris);
        let namespaces: Vec<&str> = config.watch_namespaces.iter().map(|ns| &**ns).collect();
        assert_eq!(namespaces, ["team-a", "team-b"]);
        assert_eq!(config.redis.host, "redis.svc");
        assert_eq!(config.redis.port, 6379);
        assert_eq!(config.redis.password, Some(Secret::new("123456")));
        assert_eq!(config.leader_election.effective_lease_namespace(), "ops");
        assert_eq!(
            config.leader_election.lease_duration,
            Duration::from_secs(90)
        );
        assert_eq!(
            config.leader_election.retry_period,
            Duration::from_millis(500)
        );
        assert_eq!(config.log.format, LogFormat::Json);
        assert_eq!(
            config.log.file,
            Some(PathBuf::from("/var/log/chronflow.log"))
        );
        assert_eq!(config.log.rotation, LogRotation::Hourly);
        assert_eq!(config.metrics.bind.to_string(), "[::]:9090");
        assert_eq!(config.status, StatusConfig::default());
    }

    #[test]
    fn effective_configuration_round_trips_through_yaml() {
        let config = ok(Some("leader_election:\n  lease_duration: 1m30s\n"), &[]);
        let yaml = serde_yaml::to_string(&config).unwrap();
        assert!(yaml.contains("lease_duration: 1m30s"), "{yaml}");
        assert_eq!(ok(Some(&yaml), &[]), config);
    }

    #[test]
    fn unreadable_or_invalid_files_name_the_path() {
        let missing = Path::new("/nonexistent/chronflow.yaml");
        let error = OperatorConfig::load_from(Some(missing), Vec::new()).unwrap_err();
        let error = error.to_string();
        assert!(
            error.starts_with("config: cannot read /nonexistent/chronflow.yaml: "),
            "{error}"
        );
        for (yaml, reason) in [
            (
                "max_workers: [\n",
                "did not find expected node content at line 2 column 1",
            ),
            (
                "max_workers: 1\nmax_workers: 2\n",
                "duplicate entry with key \"max_workers\"",
            ),
        ] {
            let error = file_err(yaml);
            assert!(
                error.starts_with("config: FILE is not valid YAML: "),
                "{error}"
            );
            assert!(error.contains(reason), "{error}");
        }
        assert_eq!(
            file_err("- a\n"),
            "config: FILE: expected a mapping of configuration keys"
        );
    }
}
