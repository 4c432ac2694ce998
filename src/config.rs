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
//! `Deserialize` of the small types below (durations, zones, names, secrets) and in
//! [`OperatorConfig::validate`]. `docs/configuration.md` is the user reference.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono_tz::Tz;
use figment::error::{Actual, Kind};
use figment::providers::{Format, Yaml};
use figment::value::{Dict, Empty, Map, Tag, Value};
use figment::{Figment, Metadata, Profile, Provider, Source};
use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize};

use crate::schedule::duration::{format_duration, parse_duration};

/// Prefix of the environment variables that override the configuration (case-insensitive);
/// `__` separates nesting levels: `SCHEDULER__REDIS__PORT`.
pub const ENV_PREFIX: &str = "SCHEDULER__";

/// Longest `status.flush_interval` and `shutdown.grace_period`.
pub const MAX_PERIOD: Duration = Duration::from_secs(3600);

/// What secrets are printed as by `chronflow check-config`.
pub const REDACTED: &str = "<redacted>";

/// The defaults: the committed `config/chronflow.yaml`, which spells out every key.
const DEFAULTS: &str = include_str!("../config/chronflow.yaml");

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

/// The Job action (`action.job`): a Kubernetes Job per run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobsConfig {
    /// Whether tasks may create Jobs; the operator then watches Jobs it labeled and needs the
    /// rights to create, watch and delete them. When false, Job tasks are Invalid.
    pub enabled: bool,
}

/// What tenants' tasks may ask for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// The shortest gap between two instants of a task; a schedule that fires more often is
    /// Invalid.
    #[serde(with = "duration_serde")]
    pub min_period: Duration,
    /// The most runs one namespace may have in flight or waiting at once; 0: no cap.
    pub max_runs_per_namespace: usize,
    /// The most ChronTasks of one namespace that run (the oldest); 0: no cap.
    pub max_tasks_per_namespace: usize,
    /// The most runs a backfill starts per second.
    #[serde(deserialize_with = "within::<_, _, 1, 1_000>")]
    pub backfill_runs_per_second: u32,
}

/// Where HTTP actions may connect, checked on the resolved address at connect time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Networks no action may reach (cloud metadata, link-local, ...).
    #[serde(deserialize_with = "networks")]
    pub deny_cidrs: Vec<ipnet::IpNet>,
    /// When not empty, the only networks actions may reach (still minus `deny_cidrs`).
    #[serde(deserialize_with = "networks")]
    pub allow_cidrs: Vec<ipnet::IpNet>,
    /// Whether a task may turn off certificate verification (`tls.insecureSkipVerify`).
    pub allow_insecure_skip_verify: bool,
}

/// Secrets and ConfigMaps that tasks read (only those labeled
/// `chronflow.io/usable-by-tasks=true`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretsConfig {
    /// How long a Secret or ConfigMap read is reused before it is read again (0s: at every
    /// attempt).
    #[serde(with = "duration_serde")]
    pub cache_ttl: Duration,
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

/// Redis connection settings. `url`, when set, wins over `host`/`port`/`db`/`password`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://` or `rediss://` URL; printed with its password redacted.
    pub url: Option<RedisUrl>,
    /// Host name or IP address.
    #[serde(deserialize_with = "text")]
    pub host: String,
    /// TCP port.
    #[serde(deserialize_with = "within::<_, _, 1, 65_535>")]
    pub port: u16,
    /// Database index.
    pub db: u32,
    /// Password; printed as `<redacted>`.
    pub password: Option<Secret>,
    /// A file holding the password (a mounted Secret), read at start; wins over `password`.
    pub password_file: Option<PathBuf>,
    /// A PEM file of the CA that signs the server's certificate, for `rediss://` with a
    /// private CA; without it the web PKI roots are trusted.
    pub ca_file: Option<PathBuf>,
    /// Connection pool size.
    #[serde(deserialize_with = "within::<_, _, 1, 10_000>")]
    pub max_connections: u32,
    /// How long one ledger operation may take, waiting for a connection included.
    #[serde(with = "duration_serde")]
    pub timeout: Duration,
    /// Redis Cluster: `url` (or host and port) is a seed node.
    pub cluster: bool,
}

impl RedisConfig {
    /// `url`, else the URL that `host`, `port`, `db` and the password make; the password from
    /// `password_file` when set (trailing newline removed), else `password`.
    pub fn connection_url(&self) -> Result<String, ConfigError> {
        if let Some(url) = &self.url {
            return Ok(url.expose().to_string());
        }
        let from_file = match &self.password_file {
            Some(path) => Some(Secret(
                std::fs::read_to_string(path)
                    .map_err(|e| {
                        let path = path.display();
                        ConfigError::from(format!("redis.password_file: cannot read {path}: {e}"))
                    })?
                    .trim_end_matches(['\r', '\n'])
                    .to_string(),
            )),
            None => None,
        };
        let password = from_file.as_ref().or(self.password.as_ref());
        let password = password.map_or(String::new(), |password| {
            // Percent-encoded: a password may hold `@`, `/` or `:`.
            let encoded: String = password
                .expose()
                .bytes()
                .map(|b| match b {
                    b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                        char::from(b).to_string()
                    }
                    _ => format!("%{b:02X}"),
                })
                .collect();
            format!(":{encoded}@")
        });
        let host = if self.host.contains(':') {
            format!("[{}]", self.host) // an IPv6 address
        } else {
            self.host.clone()
        };
        Ok(format!(
            "redis://{password}{host}:{}/{}",
            self.port, self.db
        ))
    }
}

/// Lease-based leader election. Requires `retry_period < renew_deadline < lease_duration`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaderElectionConfig {
    /// Whether replicas elect a leader through a `coordination.k8s.io` Lease.
    pub enabled: bool,
    /// Name of the Lease object.
    #[serde(deserialize_with = "text")]
    pub lease_name: String,
    /// Namespace of the Lease; `None` means `POD_NAMESPACE`, else `default`.
    pub lease_namespace: Option<Namespace>,
    /// How long a lease stays valid without renewal.
    #[serde(with = "duration_serde")]
    pub lease_duration: Duration,
    /// How long the leader keeps trying to renew before it steps down.
    #[serde(with = "duration_serde")]
    pub renew_deadline: Duration,
    /// Pause between attempts to acquire or renew.
    #[serde(with = "duration_serde")]
    pub retry_period: Duration,
}

impl LeaderElectionConfig {
    /// The Lease namespace: `lease_namespace`, else the `POD_NAMESPACE` environment variable,
    /// else `default`.
    pub fn effective_lease_namespace(&self) -> String {
        self.lease_namespace
            .as_ref()
            .map(|namespace| namespace.0.clone())
            .or_else(|| {
                std::env::var("POD_NAMESPACE")
                    .ok()
                    .filter(|ns| !ns.is_empty())
            })
            .unwrap_or_else(|| "default".to_string())
    }
}

/// Logging settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// Output format.
    pub format: LogFormat,
    /// A `tracing` EnvFilter directive such as `info` or `chronflow=debug,kube=warn`.
    #[serde(deserialize_with = "text")]
    pub level: String,
    /// Whether each successful run is logged (failures always are).
    pub log_task_success: bool,
    /// Also write logs to this file; `None` means standard output only.
    pub file: Option<PathBuf>,
    /// When the log file is rotated.
    pub rotation: LogRotation,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One JSON object per line.
    Json,
    /// Multi-line, human-friendly.
    Pretty,
    /// One line per event.
    Compact,
    /// No logs.
    Off,
}

/// Log file rotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogRotation {
    /// One file forever.
    Never,
    /// A new file every hour.
    Hourly,
    /// A new file every day.
    Daily,
}

/// The HTTP endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Socket address to listen on.
    #[serde(deserialize_with = "socket_address")]
    pub bind: SocketAddr,
    /// Whether run and miss counts carry each task's namespace and name.
    pub per_task: bool,
}

/// ChronTask status writes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusConfig {
    /// At most one status patch per task per interval.
    #[serde(with = "duration_serde")]
    pub flush_interval: Duration,
    /// Status writes per second over all tasks: the apiserver's budget.
    #[serde(deserialize_with = "within::<_, _, 1, 10_000>")]
    pub max_writes_per_second: u32,
}

/// Behaviour on SIGTERM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownConfig {
    /// How long in-flight runs may drain before the process exits.
    #[serde(with = "duration_serde")]
    pub grace_period: Duration,
}

/// A Kubernetes namespace name (an RFC 1123 label), checked when read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Namespace(String);

impl Namespace {
    /// A namespace name, or why it is not one.
    pub fn new(name: impl Into<String>) -> Result<Self, String> {
        let name = name.into();
        if is_dns_label(&name) {
            Ok(Self(name))
        } else {
            Err(format!(
                "expected a namespace name (lowercase letters, digits and '-', at most 63 \
                 characters), got {name:?}"
            ))
        }
    }
}

impl std::ops::Deref for Namespace {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for Namespace {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Self::new(text(deserializer)?).map_err(de::Error::custom)
    }
}

/// A secret string: serialised and debug-printed as `<redacted>`; [`Secret::expose`] reads it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(secret: impl Into<String>) -> Self {
        Self(secret.into())
    }

    /// The secret in clear, for the code that needs it (the Redis client).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(REDACTED)
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        text(deserializer).map(Self)
    }
}

/// A `redis://` or `rediss://` URL: serialised and debug-printed with its password replaced by
/// `<redacted>`; [`RedisUrl::expose`] reads it in clear.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisUrl(String);

impl RedisUrl {
    /// The URL in clear, password included.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL with its password replaced by `<redacted>`.
    pub fn redacted(&self) -> String {
        redact_url(&self.0)
    }
}

impl fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.redacted())
    }
}

impl Serialize for RedisUrl {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.redacted())
    }
}

impl<'de> Deserialize<'de> for RedisUrl {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let url = text(deserializer)?;
        let lower = url.to_ascii_lowercase();
        let valid = ["redis://", "rediss://"]
            .iter()
            .any(|scheme| lower.starts_with(scheme) && lower.len() > scheme.len());
        if valid {
            Ok(Self(url))
        } else {
            Err(de::Error::custom(format!(
                "expected a redis:// or rediss:// URL, got {:?}",
                redact_url(&url)
            )))
        }
    }
}

/// Replaces the password of `scheme://user:password@host…` with `<redacted>`. The user info
/// ends at the last `@`, so a password holding an unescaped `/` or `@` is still hidden.
fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|at| at + 3) else {
        return url.to_string();
    };
    let rest = &url[scheme_end..];
    let Some((userinfo, host)) = rest.rsplit_once('@') else {
        return url.to_string();
    };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{}{user}:{REDACTED}@{host}", &url[..scheme_end]),
        None => url.to_string(),
    }
}

/// Text as written. Environment values always arrive as text; a YAML number given for a text
/// key (a password `123456`) is taken as its text.
fn text<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    struct Text;
    impl Visitor<'_> for Text {
        type Value = String;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("text")
        }
        fn visit_str<E: de::Error>(self, text: &str) -> Result<String, E> {
            Ok(text.to_string())
        }
        fn visit_u64<E: de::Error>(self, number: u64) -> Result<String, E> {
            Ok(number.to_string())
        }
    }
    deserializer.deserialize_any(Text)
}

/// An integer from `MIN` to `MAX`. The upper bounds keep sizes far within what tokio's
/// semaphore and channels accept (`max_workers` above `usize::MAX >> 3` would panic).
fn within<'de, D, T, const MIN: u64, const MAX: u64>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: TryFrom<u64>,
{
    let value = u64::deserialize(deserializer)?;
    match T::try_from(value) {
        Ok(number) if (MIN..=MAX).contains(&value) => Ok(number),
        _ => Err(de::Error::custom(format!(
            "expected an integer from {MIN} to {MAX}, got {value}"
        ))),
    }
}

/// A list, or comma-separated text (`team-a,team-b`: the environment's short form).
fn namespace_list<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<Namespace>, D::Error> {
    struct List;
    impl<'de> Visitor<'de> for List {
        type Value = Vec<Namespace>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a list of namespace names")
        }
        fn visit_str<E: de::Error>(self, text: &str) -> Result<Self::Value, E> {
            let names = text
                .split(',')
                .map(str::trim)
                .filter(|name| !name.is_empty());
            names
                .map(|name| Namespace::new(name).map_err(E::custom))
                .collect()
        }
        fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut names = Vec::new();
            while let Some(name) = seq.next_element()? {
                names.push(name);
            }
            Ok(names)
        }
    }
    deserializer.deserialize_any(List)
}

/// CIDR networks (`10.0.0.0/8`, `fd00:ec2::254/128`), as a list or comma-separated text.
fn networks<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<ipnet::IpNet>, D::Error> {
    let value: Value = Deserialize::deserialize(deserializer)?;
    let texts = match value {
        Value::String(_, text) => text.split(',').map(|t| t.trim().to_string()).collect(),
        value => {
            Vec::<String>::deserialize(&value).map_err(|e| de::Error::custom(reason(&e.kind)))?
        }
    };
    let texts = texts.into_iter().filter(|text| !text.is_empty());
    texts
        .map(|text| {
            text.parse().map_err(|_| {
                de::Error::custom(format!(
                    "expected a network such as 10.0.0.0/8 or fd00::/8, got {text:?}"
                ))
            })
        })
        .collect()
}

/// A section: a mapping, or null (every key commented out) for the defaults.
fn section<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

fn socket_address<'de, D: Deserializer<'de>>(deserializer: D) -> Result<SocketAddr, D::Error> {
    let address = text(deserializer)?;
    address.parse().map_err(|_| {
        de::Error::custom(format!(
            "expected a socket address such as 0.0.0.0:8080 or [::]:8080, got {address:?}"
        ))
    })
}

/// Humane durations (`500ms`, `1m30s`) through `parse_duration` / `format_duration`.
mod duration_serde {
    use std::time::Duration;

    use serde::{Deserializer, Serializer, de::Error};

    use super::{format_duration, parse_duration, text};

    pub fn serialize<S: Serializer>(duration: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&format_duration(*duration))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        let text = text(deserializer)?;
        if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
            return Err(D::Error::custom(format!(
                "expected a duration such as 500ms, 10s, 1m30s, 2h or 1d, got {text} (add a \
                 unit: {text}s)"
            )));
        }
        parse_duration(&text).map_err(D::Error::custom)
    }
}

/// IANA time zones by name.
mod timezone_serde {
    use chrono_tz::Tz;
    use serde::{Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(zone: &Tz, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(zone.name())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Tz, D::Error> {
        let name = super::text(deserializer)?;
        name.parse::<Tz>().map_err(|_| {
            D::Error::custom(format!(
                "expected an IANA time zone name such as UTC or Europe/Paris, got {name:?}"
            ))
        })
    }
}

/// The configuration was refused. Each problem is one line that names the key path, what was
/// expected and where the value came from; `Display` prints every line prefixed `config: `.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    problems: Vec<String>,
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

    /// Checks that types alone do not express; every problem is reported.
    fn validate(&self, figment: &Figment) -> Vec<String> {
        let mut problems = Problems {
            figment,
            found: Vec::new(),
        };
        for (index, name) in self.watch_namespaces.iter().enumerate() {
            let twice = self.watch_namespaces[..index].contains(name);
            let key = format!("watch_namespaces[{index}]");
            problems.refuse(twice, &key, &format!("{:?} is listed twice", &**name));
        }
        let redis = &self.redis;
        let host = format!("{:?}", redis.host);
        problems.expect(
            !redis.host.trim().is_empty(),
            "redis.host",
            "a host name",
            host,
        );

        let leader = &self.leader_election;
        let name = format!("{:?}", leader.lease_name);
        let object_name = "a Kubernetes object name (lowercase letters, digits, '-' and '.')";
        let key = "leader_election.lease_name";
        problems.expect(is_dns_subdomain(&leader.lease_name), key, object_name, name);
        let retry = leader.retry_period;
        let key = "leader_election.retry_period";
        problems.expect(!retry.is_zero(), key, "a duration greater than 0", "0s");
        let ordered = [
            (
                "retry_period",
                retry,
                "renew_deadline",
                leader.renew_deadline,
            ),
            (
                "renew_deadline",
                leader.renew_deadline,
                "lease_duration",
                leader.lease_duration,
            ),
        ];
        for (short_key, shorter, long_key, longer) in ordered {
            let short_key = format!("leader_election.{short_key}");
            let long_key = format!("leader_election.{long_key}");
            let expected = format!(
                "a duration shorter than {long_key} ({}, {})",
                format_duration(longer),
                origin_of(figment, &long_key)
            );
            let ok = retry.is_zero() || shorter < longer;
            problems.expect(ok, &short_key, &expected, format_duration(shorter));
        }

        if let Err(reason) = check_log_level(&self.log.level) {
            problems.refuse(true, "log.level", &reason);
        }

        let flush = self.status.flush_interval;
        let ok = !flush.is_zero() && flush <= MAX_PERIOD;
        let expected = "a duration greater than 0 and at most 1h";
        problems.expect(
            ok,
            "status.flush_interval",
            expected,
            format_duration(flush),
        );
        let ttl = self.secrets.cache_ttl;
        let expected = "a duration of at most 1h";
        problems.expect(
            ttl <= MAX_PERIOD,
            "secrets.cache_ttl",
            expected,
            format_duration(ttl),
        );
        let grace = self.shutdown.grace_period;
        let expected = "a duration of at most 1h";
        let ok = grace <= MAX_PERIOD;
        problems.expect(
            ok,
            "shutdown.grace_period",
            expected,
            format_duration(grace),
        );
        problems.found
    }
}

/// The problems [`OperatorConfig::validate`] found, each naming where its value came from.
struct Problems<'a> {
    figment: &'a Figment,
    found: Vec<String>,
}

impl Problems<'_> {
    fn expect(&mut self, ok: bool, key: &str, expected: &str, got: impl fmt::Display) {
        self.refuse(!ok, key, &format!("expected {expected}, got {got}"));
    }

    fn refuse(&mut self, refused: bool, key: &str, reason: &str) {
        if refused {
            let origin = origin_of(self.figment, key);
            self.found.push(format!("{key}: {reason} ({origin})"));
        }
    }
}

/// Whether a variable's name starts with [`ENV_PREFIX`], in any letter case.
fn is_ours(name: &str) -> bool {
    name.get(..ENV_PREFIX.len())
        .is_some_and(|prefix| prefix.eq_ignore_ascii_case(ENV_PREFIX))
}

/// One `SCHEDULER__…` variable, read as text: figment's own `Env` parses every value, which
/// would turn a password `0123` into the number 123. `[a, b]` is a list, an empty value null.
struct EnvVar {
    name: String,
    value: String,
}

impl EnvVar {
    /// `SCHEDULER__REDIS__PORT` → `redis.port`.
    fn key(&self) -> String {
        let path: Vec<&str> = self.name[ENV_PREFIX.len()..].split("__").collect();
        path.join(".").to_ascii_lowercase()
    }
}

impl Provider for EnvVar {
    fn metadata(&self) -> Metadata {
        Metadata::named(self.name.clone())
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        let key = self.key();
        if key.split('.').any(str::is_empty) {
            return Err(Kind::Message(format!("{} names no key", self.name)).into());
        }
        let value = match self.value.trim() {
            "" => Value::Empty(Tag::Default, Empty::None),
            list if list.starts_with('[') => list.parse().unwrap_or_else(|never| match never {}),
            _ => Value::from(self.value.clone()),
        };
        let dict = figment::util::nest(&key, value)
            .into_dict()
            .unwrap_or_default();
        Ok(Profile::Default.collect(dict))
    }
}

/// `in FILE`, `from SCHEDULER__…` or `default`: where the value at `key` came from (for a list
/// item such as `watch_namespaces[1]`, where the list came from).
fn origin_of(figment: &Figment, key: &str) -> String {
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

/// `KEY: REASON (ORIGIN)` for an error figment or a `Deserialize` above reported.
fn describe_error(figment: &Figment, error: figment::Error) -> String {
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
fn reason(kind: &Kind) -> String {
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

/// An RFC 1123 label: what Kubernetes accepts as a namespace name.
fn is_dns_label(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// An RFC 1123 subdomain: what Kubernetes accepts as most object names (a Lease's).
fn is_dns_subdomain(name: &str) -> bool {
    name.len() <= 253 && name.split('.').all(is_dns_label)
}

/// Checks a log filter: `tracing_subscriber::EnvFilter` must parse it, and a directive without
/// `=` must be a level (`verbose` would otherwise silently mean "everything from the target
/// named verbose", that is nothing at all). The error completes `log.level: `.
fn check_log_level(level: &str) -> Result<(), String> {
    const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
    let expected = "expected a log filter such as info, debug or chronflow=debug,kube=warn";
    if level.trim().is_empty() {
        return Err(format!("{expected}, got {level:?}"));
    }
    for directive in level.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let is_level = LEVELS
            .iter()
            .any(|known| directive.eq_ignore_ascii_case(known));
        if !directive.contains('=') && !directive.contains('[') && !is_level {
            return Err(format!(
                "{directive:?} is not a level (expected trace, debug, info, warn, error or off; \
                 to filter a target give it a level: {directive}=debug)"
            ));
        }
    }
    tracing_subscriber::EnvFilter::try_new(level)
        .map(|_| ())
        .map_err(|error| format!("{expected}, got {level:?} ({error})"))
}

#[cfg(test)]
mod tests {
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

    fn ok(yaml: Option<&str>, pairs: &[(&str, &str)]) -> OperatorConfig {
        load(yaml, pairs).unwrap_or_else(|error| panic!("unexpected error: {error}"))
    }

    fn err(yaml: Option<&str>, pairs: &[(&str, &str)]) -> String {
        match load(yaml, pairs) {
            Ok(config) => panic!("expected an error, got {config:?}"),
            Err(error) => error,
        }
    }

    fn file_err(yaml: &str) -> String {
        err(Some(yaml), &[])
    }

    fn env_err(pairs: &[(&str, &str)]) -> String {
        err(None, pairs)
    }

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
        assert_eq!(config.queue_size, 1000);
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

    #[test]
    fn environment_overrides_file_and_defaults() {
        let config = ok(
            Some("max_workers: 5\nredis:\n  host: from-file\n"),
            &[
                ("SCHEDULER__MAX_WORKERS", "7"),
                ("scheduler__Redis__Max_Connections", "20"),
                ("SCHEDULER__LOG__FORMAT", "json"),
                ("SCHEDULER__LOG__LOG_TASK_SUCCESS", "false"),
                ("SCHEDULER__STATUS__FLUSH_INTERVAL", "250ms"),
                ("PATH", "/usr/bin"),
                ("SCHEDULER_MAX_WORKERS", "ignored: single underscore"),
            ],
        );
        assert_eq!(config.max_workers, 7);
        assert_eq!(config.redis.host, "from-file");
        assert_eq!(config.redis.max_connections, 20);
        assert_eq!(config.log.format, LogFormat::Json);
        assert!(!config.log.log_task_success);
        assert_eq!(config.status.flush_interval, Duration::from_millis(250));
    }

    #[test]
    fn environment_lists_are_comma_separated_or_flow_lists() {
        for raw in ["a,b", " a , b ,", "[a, b]", " [a, \"b\"] "] {
            let config = ok(None, &[("SCHEDULER__WATCH_NAMESPACES", raw)]);
            let namespaces: Vec<&str> = config.watch_namespaces.iter().map(|ns| &**ns).collect();
            assert_eq!(namespaces, ["a", "b"], "{raw:?}");
        }
        for raw in ["[]", " , "] {
            let env = [("SCHEDULER__WATCH_NAMESPACES", raw)];
            let config = ok(Some("watch_namespaces: [x]\n"), &env);
            assert!(config.watch_namespaces.is_empty(), "{raw:?}");
        }
    }

    #[test]
    fn environment_text_stays_text_and_empty_unsets_optional_keys() {
        let config = ok(
            Some("redis:\n  password: from-file\nleader_election:\n  lease_namespace: ops\n"),
            &[
                ("SCHEDULER__REDIS__HOST", "10.0.0.1"),
                ("SCHEDULER__REDIS__PASSWORD", ""),
                ("SCHEDULER__LEADER_ELECTION__LEASE_NAMESPACE", ""),
                ("SCHEDULER__LOG__FILE", ""),
            ],
        );
        assert_eq!(config.redis.host, "10.0.0.1");
        assert_eq!(config.redis.password, None);
        assert_eq!(config.leader_election.lease_namespace, None);
        assert_eq!(config.log.file, None);

        // A password of digits keeps its leading zero; `null` is a file name.
        let config = ok(
            None,
            &[
                ("SCHEDULER__REDIS__PASSWORD", "0123"),
                ("SCHEDULER__LOG__FILE", "null"),
            ],
        );
        assert_eq!(config.redis.password, Some(Secret::new("0123")));
        assert_eq!(config.log.file, Some(PathBuf::from("null")));
    }

    // ---- refused input ---------------------------------------------------------------------

    #[test]
    fn unknown_keys_name_the_path_the_expected_keys_and_the_source() {
        let top = "backend_type, max_workers, queue_size, timezone, watch_namespaces, redis, \
                   leader_election, log, metrics, status, shutdown, secrets, http, limits, jobs";
        let redis = "url, host, port, db, password, password_file, ca_file, max_connections, timeout, cluster";
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

    #[test]
    fn each_validation_rule() {
        let one_to = |max: usize| format!("expected an integer from 1 to {max}");
        let cases = [
            ("max_workers: 0", format!("max_workers: {}, got 0", one_to(10_000))),
            ("max_workers: 10001", format!("max_workers: {}, got 10001", one_to(10_000))),
            ("queue_size: 1000001", format!("queue_size: {}, got 1000001", one_to(1_000_000))),
            ("redis:\n  max_connections: 0", format!("redis.max_connections: {}, got 0", one_to(10_000))),
            ("status:\n  max_writes_per_second: 0", format!("status.max_writes_per_second: {}, got 0", one_to(10_000))),
            ("redis:\n  port: 0", "redis.port: expected an integer from 1 to 65535, got 0".into()),
            ("redis:\n  host: ''", "redis.host: expected a host name, got \"\"".into()),
            ("leader_election:\n  lease_name: Leader", "leader_election.lease_name: expected a Kubernetes object name (lowercase letters, digits, '-' and '.'), got \"Leader\"".into()),
            ("leader_election:\n  retry_period: 0s", "leader_election.retry_period: expected a duration greater than 0, got 0s".into()),
            ("leader_election:\n  retry_period: 10s", "leader_election.retry_period: expected a duration shorter than leader_election.renew_deadline (10s, default), got 10s".into()),
            ("leader_election:\n  renew_deadline: 20s", "leader_election.renew_deadline: expected a duration shorter than leader_election.lease_duration (15s, default), got 20s".into()),
            ("log:\n  level: verbose", "log.level: \"verbose\" is not a level (expected trace, debug, info, warn, error or off; to filter a target give it a level: verbose=debug)".into()),
            ("log:\n  level: info,=x", "log.level: expected a log filter such as info, debug or chronflow=debug,kube=warn, got \"info,=x\" (invalid filter directive)".into()),
            ("status:\n  flush_interval: 0s", "status.flush_interval: expected a duration greater than 0 and at most 1h, got 0s".into()),
            ("status:\n  flush_interval: 1h1ms", "status.flush_interval: expected a duration greater than 0 and at most 1h, got 1h1ms".into()),
            ("shutdown:\n  grace_period: 1h1s", "shutdown.grace_period: expected a duration of at most 1h, got 1h1s".into()),
        ];
        for (yaml, message) in cases {
            assert_eq!(
                file_err(yaml),
                format!("config: {message} (in FILE)"),
                "{yaml:?}"
            );
        }
    }

    #[test]
    fn every_rule_across_keys_is_reported_with_its_source() {
        let error = err(
            Some("leader_election:\n  lease_duration: 20s\nlog:\n  level: loud\n"),
            &[("SCHEDULER__LEADER_ELECTION__RENEW_DEADLINE", "30s")],
        );
        assert_eq!(
            error,
            "config: leader_election.renew_deadline: expected a duration shorter than \
             leader_election.lease_duration (20s, in FILE), got 30s \
             (from SCHEDULER__LEADER_ELECTION__RENEW_DEADLINE)\n\
             config: log.level: \"loud\" is not a level (expected trace, debug, info, warn, \
             error or off; to filter a target give it a level: loud=debug) (in FILE)"
        );
    }

    #[test]
    fn valid_edge_values_are_accepted() {
        let config = ok(
            Some(
                "redis:\n  url: rediss://user:pw@redis.example:6380/2\n  port: 65535\n\
                 leader_election:\n  lease_name: chronflow.leader-1\n  \
                 lease_duration: 3s\n  renew_deadline: 2s\n  retry_period: 1s\n\
                 log:\n  level: \"WARN,chronflow=debug,kube_runtime[reconcile]=trace\"\n\
                 shutdown:\n  grace_period: 0s\n",
            ),
            &[],
        );
        assert_eq!(config.shutdown.grace_period, Duration::ZERO);
        assert_eq!(config.redis.port, 65535);
    }

    #[test]
    fn secrets_are_redacted_in_output_debug_and_messages() {
        let config = ok(
            None,
            &[
                ("SCHEDULER__REDIS__PASSWORD", "hunter2"),
                (
                    "SCHEDULER__REDIS__URL",
                    "redis://admin:hunter2@redis:6379/0",
                ),
            ],
        );
        let yaml = serde_yaml::to_string(&config).unwrap();
        let debug = format!("{config:?}");
        for text in [&yaml, &debug] {
            assert!(!text.contains("hunter2"), "{text}");
        }
        assert!(yaml.contains("password: <redacted>"), "{yaml}");
        assert!(
            yaml.contains("url: redis://admin:<redacted>@redis:6379/0"),
            "{yaml}"
        );
        assert_eq!(
            config.redis.password.as_ref().map(Secret::expose),
            Some("hunter2")
        );

        let error = file_err("redis:\n  password: {a: hunter2}\n");
        assert_eq!(
            error,
            "config: redis.password: expected text, got a mapping (in FILE)"
        );
    }

    #[test]
    fn url_redaction() {
        let cases = [
            ("redis://redis:6379", "redis://redis:6379"),
            ("redis://user@redis", "redis://user@redis"),
            ("redis://:pw@redis/0", "redis://:<redacted>@redis/0"),
            (
                "rediss://u:p/w@d@redis:1/2",
                "rediss://u:<redacted>@redis:1/2",
            ),
            ("not a url", "not a url"),
        ];
        for (url, redacted) in cases {
            assert_eq!(redact_url(url), redacted, "{url}");
        }
    }

    #[test]
    fn kubernetes_names() {
        for good in ["a", "team-a", "a1", &"x".repeat(63)] {
            assert!(is_dns_label(good), "{good}");
        }
        for bad in ["", "-a", "a-", "A", "a_b", "a.b", &"x".repeat(64)] {
            assert!(!is_dns_label(bad), "{bad}");
        }
        assert!(is_dns_subdomain("chronflow.io-leader"));
        assert!(!is_dns_subdomain("a..b"));
        assert!(!is_dns_subdomain(".a"));
    }
}
