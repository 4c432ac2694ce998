//! Operator configuration: defaults, then a YAML file, then `SCHEDULER__…` environment variables.
//!
//! Loading ([`OperatorConfig::load`]) is strict: an unknown key, an unknown `SCHEDULER__`
//! variable or a bad value stops start-up with a [`ConfigError`] that names the key path, what
//! was expected and where the value came from (`in FILE`, `from SCHEDULER__…` or `default`):
//!
//! ```text
//! config: unknown key "redis.max_conection" in /etc/chronflow.yaml (expected one of: url, host, port, db, password, max_connections)
//! config: max_workers: expected an integer from 1 to 10000, got 0 (from SCHEDULER__MAX_WORKERS)
//! ```
//!
//! The key tree is the serialised [`OperatorConfig::default`]: it drives the unknown-key
//! checks, the environment names and how an environment value is read, so it cannot drift
//! from the structs. `docs/configuration.md` is the user reference.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono_tz::Tz;
use serde::{Deserialize, Serialize};
use serde_yaml::{Mapping, Value};

use crate::schedule::duration::{format_duration, parse_duration};

/// Prefix of the environment variables that override the configuration (case-insensitive).
pub const ENV_PREFIX: &str = "SCHEDULER__";

/// Separator of nested keys in an environment variable name: `SCHEDULER__REDIS__PORT`.
const ENV_NESTING: &str = "__";

/// Largest `max_workers`: far more concurrent runs than one operator should make, and far below
/// what tokio's semaphore accepts (`usize::MAX >> 3` permits; more panics at start-up).
pub const MAX_WORKERS: usize = 10_000;

/// Largest `queue_size`: a million waiting runs, far below tokio's channel limits.
pub const MAX_QUEUE_SIZE: usize = 1_000_000;

/// Largest `redis.max_connections`.
pub const MAX_REDIS_CONNECTIONS: u32 = 10_000;

/// Longest `status.flush_interval` and `shutdown.grace_period`.
pub const MAX_PERIOD: Duration = Duration::from_secs(3600);

/// What secrets are printed as by `chronflow check-config`.
pub const REDACTED: &str = "<redacted>";

/// The operator configuration (the Python library's `SchedulerConfig`, mapped to the operator).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OperatorConfig {
    /// Where run deduplication lives: in process, or in Redis (HA, several replicas).
    pub backend_type: BackendType,
    /// Size of the worker pool that executes runs.
    pub max_workers: usize,
    /// Capacity of the bounded queue of runs waiting for a worker.
    pub queue_size: usize,
    /// Time zone of cron schedules whose ChronTask sets no `spec.schedule.timezone`.
    #[serde(with = "timezone_serde")]
    pub timezone: Tz,
    /// Namespaces whose ChronTasks are watched; empty means every namespace.
    pub watch_namespaces: Vec<String>,
    /// Redis connection, used when `backend_type` is `redis`.
    pub redis: RedisConfig,
    /// Lease-based leader election between replicas.
    pub leader_election: LeaderElectionConfig,
    /// Logging.
    pub log: LogConfig,
    /// The HTTP endpoint for `/metrics`, `/stats`, `/healthz` and `/readyz`.
    pub metrics: MetricsConfig,
    /// ChronTask status writes.
    pub status: StatusConfig,
    /// Behaviour on SIGTERM.
    pub shutdown: ShutdownConfig,
}

impl Default for OperatorConfig {
    fn default() -> Self {
        Self {
            backend_type: BackendType::Memory,
            max_workers: 10,
            queue_size: 1000,
            timezone: Tz::UTC,
            watch_namespaces: Vec::new(),
            redis: RedisConfig::default(),
            leader_election: LeaderElectionConfig::default(),
            log: LogConfig::default(),
            metrics: MetricsConfig::default(),
            status: StatusConfig::default(),
            shutdown: ShutdownConfig::default(),
        }
    }
}

/// Where run deduplication state lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendType {
    /// In process: correct for a single replica.
    Memory,
    /// In Redis: exactly-once across replicas.
    Redis,
}

/// Redis connection settings. `url`, when set, wins over `host`/`port`/`db`/`password`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://` or `rediss://` URL; printed with its password redacted.
    pub url: Option<RedisUrl>,
    /// Host name or IP address.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Database index.
    pub db: u32,
    /// Password; printed as `<redacted>`.
    pub password: Option<Secret>,
    /// Connection pool size.
    pub max_connections: u32,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: None,
            host: "localhost".to_string(),
            port: 6379,
            db: 0,
            password: None,
            max_connections: 10,
        }
    }
}

/// Lease-based leader election. Requires `retry_period < renew_deadline < lease_duration`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LeaderElectionConfig {
    /// Whether replicas elect a leader through a `coordination.k8s.io` Lease.
    pub enabled: bool,
    /// Name of the Lease object.
    pub lease_name: String,
    /// Namespace of the Lease; `None` means `POD_NAMESPACE`, else `default`.
    pub lease_namespace: Option<String>,
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

impl Default for LeaderElectionConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            lease_name: "chronflow-leader".to_string(),
            lease_namespace: None,
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

impl LeaderElectionConfig {
    /// The Lease namespace: `lease_namespace`, else the `POD_NAMESPACE` environment variable,
    /// else `default`.
    pub fn effective_lease_namespace(&self) -> String {
        self.lease_namespace
            .clone()
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
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// Output format.
    pub format: LogFormat,
    /// A `tracing` EnvFilter directive such as `info` or `chronflow=debug,kube=warn`.
    pub level: String,
    /// Whether each successful run is logged (failures always are).
    pub log_task_success: bool,
    /// Also write logs to this file; `None` means standard output only.
    pub file: Option<PathBuf>,
    /// When the log file is rotated.
    pub rotation: LogRotation,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Compact,
            level: "info".to_string(),
            log_task_success: true,
            file: None,
            rotation: LogRotation::Daily,
        }
    }
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
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Socket address to listen on.
    pub bind: SocketAddr,
    /// Whether run and miss counts carry each task's namespace and name.
    pub per_task: bool,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            bind: SocketAddr::from(([0, 0, 0, 0], 8080)),
            per_task: true,
        }
    }
}

/// ChronTask status writes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StatusConfig {
    /// At most one status patch per task per interval.
    #[serde(with = "duration_serde")]
    pub flush_interval: Duration,
    /// Status writes per second over all tasks: the apiserver's budget.
    pub max_writes_per_second: u32,
}

impl Default for StatusConfig {
    fn default() -> Self {
        Self {
            flush_interval: Duration::from_secs(1),
            max_writes_per_second: 50,
        }
    }
}

/// Behaviour on SIGTERM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShutdownConfig {
    /// How long in-flight runs may drain before the process exits.
    #[serde(with = "duration_serde")]
    pub grace_period: Duration,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self {
            grace_period: Duration::from_secs(25),
        }
    }
}

/// A secret string: serialised and debug-printed as `<redacted>`; [`Secret::expose`] reads it.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
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

/// A Redis URL: serialised and debug-printed with its password replaced by `<redacted>`;
/// [`RedisUrl::expose`] reads it in clear.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct RedisUrl(String);

impl RedisUrl {
    /// Wraps a URL.
    pub fn new(url: impl Into<String>) -> Self {
        Self(url.into())
    }

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

/// Replaces the password of `scheme://user:password@host…` with `<redacted>`. The user info
/// ends at the last `@`, so a password holding an unescaped `/` or `@` is still hidden.
fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|at| at + 3) else {
        return url.to_string();
    };
    let rest = &url[scheme_end..];
    let Some(at) = rest.rfind('@') else {
        return url.to_string();
    };
    let userinfo = &rest[..at];
    match userinfo.find(':') {
        Some(colon) => format!(
            "{}{}:{REDACTED}{}",
            &url[..scheme_end],
            &userinfo[..colon],
            &rest[at..]
        ),
        None => url.to_string(),
    }
}

/// Humane durations (`500ms`, `1m30s`) through `parse_duration` / `format_duration`.
mod duration_serde {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    use super::{format_duration, parse_duration};

    pub fn serialize<S: Serializer>(duration: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&format_duration(*duration))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(deserializer)?;
        parse_duration(&text).map_err(D::Error::custom)
    }
}

/// IANA time zones by name.
mod timezone_serde {
    use chrono_tz::Tz;
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(zone: &Tz, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(zone.name())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Tz, D::Error> {
        let name = String::deserialize(deserializer)?;
        name.parse::<Tz>()
            .map_err(|_| D::Error::custom(format!("{name:?} is not an IANA time zone")))
    }
}

/// The configuration was refused. Each problem is one line that names the key path, what was
/// expected and where the value came from; `Display` prints every line prefixed `config: `.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    problems: Vec<String>,
}

impl ConfigError {
    fn one(problem: String) -> Self {
        Self {
            problems: vec![problem],
        }
    }

    /// The problems found, without the `config: ` prefix.
    pub fn problems(&self) -> &[String] {
        &self.problems
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, problem) in self.problems.iter().enumerate() {
            if index > 0 {
                f.write_str("\n")?;
            }
            write!(f, "config: {problem}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

impl OperatorConfig {
    /// Loads the configuration: defaults, then `file` (YAML) when given, then the process's
    /// `SCHEDULER__…` environment variables; then validates it.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let mut env = Vec::new();
        for (name, value) in std::env::vars_os() {
            let name = name.to_string_lossy().into_owned();
            if !has_env_prefix(&name) {
                continue;
            }
            match value.into_string() {
                Ok(value) => env.push((name, value)),
                Err(_) => {
                    return Err(ConfigError::one(format!("{name} is not valid UTF-8")));
                }
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
        let schema = schema();
        let mut problems = Vec::new();

        let file_tree = match file {
            Some(path) => {
                let tree = read_file(path)?;
                check_file_keys(&tree, &schema, path, &mut problems)
            }
            None => Mapping::new(),
        };

        let mut sources = Sources {
            file,
            file_tree: Value::Mapping(file_tree.clone()),
            env: BTreeMap::new(),
        };
        let mut tree = file_tree;
        overlay_env(&mut tree, &schema, env, &mut sources, &mut problems);
        if !problems.is_empty() {
            return Err(ConfigError { problems });
        }

        let tree = Value::Mapping(tree);
        let config: OperatorConfig = serde_path_to_error::deserialize(tree.clone())
            .map_err(|error| ConfigError::one(sources.deserialize_problem(&error, &tree)))?;

        let problems = config.validate(&sources);
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError { problems })
        }
    }

    /// Semantic checks that types alone do not express.
    fn validate(&self, sources: &Sources<'_>) -> Vec<String> {
        let mut problems = Vec::new();
        let check = |ok: bool, key: &str, got: String| (!ok).then(|| sources.expected(key, &got));

        // Features this version lacks: refused here, so `check-config` and `run` agree.
        if self.backend_type == BackendType::Redis {
            problems.push(format!(
                "backend_type: redis (HA dedup) is not available in this version; use memory \
                 with one replica ({})",
                sources.origin("backend_type")
            ));
        }
        if self.leader_election.enabled {
            problems.push(format!(
                "leader_election.enabled: leader election is not available in this version; \
                 run one replica ({})",
                sources.origin("leader_election.enabled")
            ));
        }

        // Upper bounds keep every size within what tokio's semaphore and channels accept.
        problems.extend(check(
            (1..=MAX_WORKERS).contains(&self.max_workers),
            "max_workers",
            self.max_workers.to_string(),
        ));
        problems.extend(check(
            (1..=MAX_QUEUE_SIZE).contains(&self.queue_size),
            "queue_size",
            self.queue_size.to_string(),
        ));

        for (index, namespace) in self.watch_namespaces.iter().enumerate() {
            let key = format!("watch_namespaces[{index}]");
            problems.extend(check(
                is_dns_label(namespace),
                &key,
                format!("{namespace:?}"),
            ));
            if self.watch_namespaces[..index].contains(namespace) {
                problems.push(format!(
                    "{key}: {namespace:?} is listed twice ({})",
                    sources.origin(&key)
                ));
            }
        }

        let redis = &self.redis;
        if let Some(url) = &redis.url {
            let got = format!("{:?}", url.redacted());
            problems.extend(check(is_redis_url(url.expose()), "redis.url", got));
        }
        problems.extend(check(
            !redis.host.trim().is_empty(),
            "redis.host",
            format!("{:?}", redis.host),
        ));
        problems.extend(check(redis.port >= 1, "redis.port", redis.port.to_string()));
        problems.extend(check(
            (1..=MAX_REDIS_CONNECTIONS).contains(&redis.max_connections),
            "redis.max_connections",
            redis.max_connections.to_string(),
        ));

        let leader = &self.leader_election;
        problems.extend(check(
            is_dns_subdomain(&leader.lease_name),
            "leader_election.lease_name",
            format!("{:?}", leader.lease_name),
        ));
        if let Some(namespace) = &leader.lease_namespace {
            problems.extend(check(
                is_dns_label(namespace),
                "leader_election.lease_namespace",
                format!("{namespace:?}"),
            ));
        }
        problems.extend(check(
            !leader.retry_period.is_zero(),
            "leader_election.retry_period",
            format_duration(leader.retry_period),
        ));
        if !leader.retry_period.is_zero() {
            problems.extend(sources.shorter_than(
                ("leader_election.retry_period", leader.retry_period),
                ("leader_election.renew_deadline", leader.renew_deadline),
            ));
        }
        problems.extend(sources.shorter_than(
            ("leader_election.renew_deadline", leader.renew_deadline),
            ("leader_election.lease_duration", leader.lease_duration),
        ));

        let log = &self.log;
        if let Err(reason) = check_log_level(&log.level) {
            problems.push(format!(
                "log.level: {reason} ({})",
                sources.origin("log.level")
            ));
        }
        if let Some(file) = &log.file {
            problems.extend(check(
                !file.as_os_str().is_empty(),
                "log.file",
                "\"\"".to_string(),
            ));
        }

        let flush = self.status.flush_interval;
        problems.extend(check(
            !flush.is_zero() && flush <= MAX_PERIOD,
            "status.flush_interval",
            format_duration(flush),
        ));
        let writes = self.status.max_writes_per_second;
        problems.extend(check(
            (1..=10_000).contains(&writes),
            "status.max_writes_per_second",
            writes.to_string(),
        ));
        problems.extend(check(
            self.shutdown.grace_period <= MAX_PERIOD,
            "shutdown.grace_period",
            format_duration(self.shutdown.grace_period),
        ));
        problems
    }
}

/// Whether an environment variable name starts with [`ENV_PREFIX`], ignoring case.
fn has_env_prefix(name: &str) -> bool {
    name.get(..ENV_PREFIX.len())
        .is_some_and(|prefix| prefix.eq_ignore_ascii_case(ENV_PREFIX))
}

/// The key tree: the defaults, serialised. Every key is present (`None` serialises as null).
fn schema() -> Value {
    serde_yaml::to_value(OperatorConfig::default()).unwrap_or(Value::Null)
}

/// Reads and parses the YAML file; an empty (or comment-only) file is an empty mapping.
fn read_file(path: &Path) -> Result<Value, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|error| ConfigError::one(format!("cannot read {}: {error}", path.display())))?;
    if text.trim().is_empty() {
        return Ok(Value::Null);
    }
    serde_yaml::from_str(&text)
        .map_err(|error| ConfigError::one(format!("{} is not valid YAML: {error}", path.display())))
}

/// Checks the file's keys against the schema (unknown keys, sections that are not mappings)
/// and returns its top-level mapping, with null sections (`redis:` with every key commented
/// out) read as empty ones.
fn check_file_keys(
    tree: &Value,
    schema: &Value,
    path: &Path,
    problems: &mut Vec<String>,
) -> Mapping {
    match tree {
        Value::Null => Mapping::new(),
        Value::Mapping(mapping) => check_section(mapping, schema, "", path, problems),
        other => {
            problems.push(format!(
                "{}: expected a mapping of configuration keys at the top level, got {}",
                path.display(),
                describe(other)
            ));
            Mapping::new()
        }
    }
}

fn check_section(
    mapping: &Mapping,
    schema: &Value,
    prefix: &str,
    path: &Path,
    problems: &mut Vec<String>,
) -> Mapping {
    let mut out = Mapping::new();
    for (key, value) in mapping {
        let name = match key {
            Value::String(name) => name.clone(),
            other => scalar_text(other),
        };
        let full = format!("{prefix}{name}");
        let Some(expected) = schema.get(&name).filter(|_| key.is_string()) else {
            problems.push(format!(
                "unknown key {full:?} in {} (expected one of: {})",
                path.display(),
                keys_of(schema).join(", ")
            ));
            continue;
        };
        let value = match (expected, value) {
            (Value::Mapping(_), Value::Null) => Value::Mapping(Mapping::new()),
            (Value::Mapping(_), Value::Mapping(inner)) => Value::Mapping(check_section(
                inner,
                expected,
                &format!("{full}."),
                path,
                problems,
            )),
            (Value::Mapping(_), other) => {
                problems.push(format!(
                    "{full}: expected a mapping with keys {}, got {} (in {})",
                    keys_of(expected).join(", "),
                    describe(other),
                    path.display()
                ));
                continue;
            }
            (_, value) => value.clone(),
        };
        out.insert(Value::String(name), value);
    }
    out
}

/// The keys of a schema mapping, in declaration order.
fn keys_of(schema: &Value) -> Vec<String> {
    match schema {
        Value::Mapping(mapping) => mapping.keys().map(scalar_text).collect(),
        _ => Vec::new(),
    }
}

/// Applies the `SCHEDULER__…` variables, sorted by name, onto `tree`.
fn overlay_env(
    tree: &mut Mapping,
    schema: &Value,
    env: impl IntoIterator<Item = (String, String)>,
    sources: &mut Sources<'_>,
    problems: &mut Vec<String>,
) {
    let mut vars: Vec<(String, String)> = env
        .into_iter()
        .filter(|(name, _)| has_env_prefix(name))
        .collect();
    vars.sort();
    for (name, raw) in vars {
        let segments: Vec<String> = name[ENV_PREFIX.len()..]
            .split(ENV_NESTING)
            .map(str::to_ascii_lowercase)
            .collect();
        let default = match resolve_env_name(&name, &segments, schema) {
            Ok(default) => default,
            Err(problem) => {
                problems.push(problem);
                continue;
            }
        };
        let key = segments.join(".");
        if let Some(other) = sources.env.get(&key) {
            problems.push(format!("{other} and {name} both set {key:?}; keep one"));
            continue;
        }
        match env_value(default, &raw) {
            Ok(value) => set_path(tree, &segments, value),
            Err(reason) => problems.push(format!("{key}: {reason} (from {name})")),
        }
        sources.env.insert(key, name);
    }
}

/// Finds the schema leaf a variable names; the error says why it names none.
fn resolve_env_name<'s>(
    name: &str,
    segments: &[String],
    schema: &'s Value,
) -> Result<&'s Value, String> {
    let mut node = schema;
    for (depth, segment) in segments.iter().enumerate() {
        let walked = segments[..depth].join(".");
        let env_prefix = env_name(&segments[..depth]);
        match node {
            Value::Mapping(_) => match node.get(segment.as_str()).filter(|_| !segment.is_empty()) {
                Some(child) => node = child,
                None => {
                    let full = segments[..=depth].join(".");
                    return Err(format!(
                        "unknown variable {name}: there is no key {full:?} (expected {env_prefix} followed by one of: {})",
                        keys_of(node).join(", ").to_ascii_uppercase()
                    ));
                }
            },
            _ => {
                return Err(format!(
                    "unknown variable {name}: {walked:?} has no sub-keys (set {} instead)",
                    env_name(&segments[..depth]).trim_end_matches(ENV_NESTING)
                ));
            }
        }
    }
    if let Value::Mapping(_) = node {
        let key = segments.join(".");
        return Err(format!(
            "variable {name} names the section {key:?}, not a key (expected {} followed by one of: {})",
            env_name(segments),
            keys_of(node).join(", ").to_ascii_uppercase()
        ));
    }
    Ok(node)
}

/// `SCHEDULER__` plus the upper-cased segments, each followed by `__`.
fn env_name(segments: &[String]) -> String {
    let mut name = ENV_PREFIX.to_string();
    for segment in segments {
        name.push_str(&segment.to_ascii_uppercase());
        name.push_str(ENV_NESTING);
    }
    name
}

/// Reads an environment value according to the key's default: text keys verbatim (an empty
/// value unsets an optional key), lists comma-separated or as a YAML flow list, everything else
/// as a YAML scalar (numbers, booleans, null).
fn env_value(default: &Value, raw: &str) -> Result<Value, String> {
    Ok(match default {
        Value::Sequence(_) => {
            let text = raw.trim();
            if text.starts_with('[') {
                serde_yaml::from_str(text)
                    .map_err(|error| format!("{raw:?} is not a valid YAML list ({error})"))?
            } else {
                Value::Sequence(
                    text.split(',')
                        .map(str::trim)
                        .filter(|item| !item.is_empty())
                        .map(|item| Value::String(item.to_string()))
                        .collect(),
                )
            }
        }
        Value::Null if raw.is_empty() => Value::Null,
        Value::Null | Value::String(_) => Value::String(raw.to_string()),
        _ => match serde_yaml::from_str::<Value>(raw) {
            Ok(value @ (Value::Null | Value::Bool(_) | Value::Number(_) | Value::String(_))) => {
                value
            }
            _ => Value::String(raw.to_string()),
        },
    })
}

/// Sets `tree[segments…] = value`, creating (or replacing non-mapping) sections on the way.
fn set_path(tree: &mut Mapping, segments: &[String], value: Value) {
    let Some((last, parents)) = segments.split_last() else {
        return;
    };
    let mut node = tree;
    for segment in parents {
        let entry = node
            .entry(Value::String(segment.clone()))
            .or_insert_with(|| Value::Mapping(Mapping::new()));
        if !entry.is_mapping() {
            *entry = Value::Mapping(Mapping::new());
        }
        let Value::Mapping(inner) = entry else {
            return;
        };
        node = inner;
    }
    node.insert(Value::String(last.clone()), value);
}

/// Where each value came from, to say so in messages.
struct Sources<'a> {
    file: Option<&'a Path>,
    file_tree: Value,
    /// Dotted key → the variable that set it.
    env: BTreeMap<String, String>,
}

impl Sources<'_> {
    /// `from SCHEDULER__…`, `in FILE` or `default`, for a key such as `redis.port` or
    /// `watch_namespaces[1]`.
    fn origin(&self, key: &str) -> String {
        let leaf = key.split('[').next().unwrap_or(key);
        if let Some(var) = self.env.get(leaf) {
            return format!("from {var}");
        }
        if let Some(file) = self.file {
            let mut node = Some(&self.file_tree);
            for segment in leaf.split('.') {
                node = node.and_then(|value| value.get(segment));
            }
            if node.is_some() {
                return format!("in {}", file.display());
            }
        }
        "default".to_string()
    }

    fn is_default(&self, key: &str) -> bool {
        self.origin(key) == "default"
    }

    /// `KEY: expected WHAT, got GOT (ORIGIN)`.
    fn expected(&self, key: &str, got: &str) -> String {
        let expect = leaf(&table_key(key)).map_or("a valid value", |leaf| leaf.expect);
        format!("{key}: expected {expect}, got {got} ({})", self.origin(key))
    }

    /// The problem when `shorter` is not shorter than `longer`; blames the key the user set.
    fn shorter_than(&self, shorter: (&str, Duration), longer: (&str, Duration)) -> Option<String> {
        if shorter.1 < longer.1 {
            return None;
        }
        let show = |(key, value): (&str, Duration)| {
            format!("{} ({}, {})", key, format_duration(value), self.origin(key))
        };
        Some(
            if self.is_default(shorter.0) && !self.is_default(longer.0) {
                format!(
                    "{}: expected a duration longer than {}, got {} ({})",
                    longer.0,
                    show(shorter),
                    format_duration(longer.1),
                    self.origin(longer.0)
                )
            } else {
                format!(
                    "{}: expected a duration shorter than {}, got {} ({})",
                    shorter.0,
                    show(longer),
                    format_duration(shorter.1),
                    self.origin(shorter.0)
                )
            },
        )
    }

    /// Turns a deserialisation error into `KEY: expected WHAT, got VALUE (ORIGIN)`.
    fn deserialize_problem(
        &self,
        error: &serde_path_to_error::Error<serde_yaml::Error>,
        tree: &Value,
    ) -> String {
        let mut key = String::new();
        let mut node = Some(tree);
        for segment in error.path().iter() {
            match segment {
                serde_path_to_error::Segment::Seq { index } => {
                    key.push_str(&format!("[{index}]"));
                    node = node.and_then(|value| value.get(index));
                }
                serde_path_to_error::Segment::Map { key: name } => {
                    if !key.is_empty() {
                        key.push('.');
                    }
                    key.push_str(name);
                    node = node.and_then(|value| value.get(name.as_str()));
                }
                serde_path_to_error::Segment::Enum { .. }
                | serde_path_to_error::Segment::Unknown => {}
            }
        }
        let inner = error.inner().to_string();
        if key.is_empty() {
            return inner;
        }
        let origin = self.origin(&key);
        match (leaf(&table_key(&key)), node) {
            (Some(found), Some(value)) if found.kind == Kind::Duration => match value {
                // A bare number: the unit is missing.
                Value::Number(number) => format!(
                    "{key}: expected {}, got {number} (add a unit: {number}s) ({origin})",
                    found.expect
                ),
                Value::String(text)
                    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) =>
                {
                    format!(
                        "{key}: expected {}, got {text:?} (add a unit: {text}s) ({origin})",
                        found.expect
                    )
                }
                // parse_duration's own message: `"5x" is not a duration (expected e.g. …)`.
                Value::String(_) => format!("{key}: {inner} ({origin})"),
                other => format!(
                    "{key}: expected {}, got {} ({origin})",
                    found.expect,
                    describe(other)
                ),
            },
            (Some(found), Some(value)) => {
                let got = match found.kind {
                    Kind::Secret | Kind::SecretUrl => describe_secret(value),
                    Kind::Plain | Kind::Duration => describe(value),
                };
                format!("{key}: expected {}, got {got} ({origin})", found.expect)
            }
            _ => format!("{key}: {inner} ({origin})"),
        }
    }
}

/// `watch_namespaces[3]` → `watch_namespaces[]`, the form [`leaf`] knows.
fn table_key(key: &str) -> String {
    match key.find('[') {
        Some(open) => format!("{}[]", &key[..open]),
        None => key.to_string(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Plain,
    Duration,
    /// Never shown in messages.
    Secret,
    /// Shown with its password redacted.
    SecretUrl,
}

#[derive(Debug, Clone, Copy)]
struct Leaf {
    /// Completes "expected …".
    expect: &'static str,
    kind: Kind,
}

/// What each key expects, for messages. A unit test checks every schema leaf is here.
fn leaf(key: &str) -> Option<Leaf> {
    use Kind::*;
    const DURATION: &str = "a duration such as 500ms, 10s, 1m30s, 2h or 1d";
    let (expect, kind) = match key {
        "backend_type" => ("one of memory or redis", Plain),
        "max_workers" | "redis.max_connections" | "status.max_writes_per_second" => {
            ("an integer from 1 to 10000", Plain)
        }
        "queue_size" => ("an integer from 1 to 1000000", Plain),
        "timezone" => ("an IANA time zone name such as UTC or Europe/Paris", Plain),
        "watch_namespaces" => ("a list of namespace names", Plain),
        "watch_namespaces[]" | "leader_election.lease_namespace" => (
            "a namespace name (lowercase letters, digits and '-', at most 63 characters)",
            Plain,
        ),
        "redis.url" => ("null or a redis:// or rediss:// URL", SecretUrl),
        "redis.host" => ("a host name or IP address", Plain),
        "redis.port" => ("a port number from 1 to 65535", Plain),
        "redis.db" => ("a database index (an integer >= 0)", Plain),
        "redis.password" => ("null or a quoted string", Secret),
        "leader_election.enabled" | "log.log_task_success" | "metrics.per_task" => {
            ("true or false", Plain)
        }
        "leader_election.lease_name" => (
            "a Kubernetes object name (lowercase letters, digits, '-' and '.')",
            Plain,
        ),
        "leader_election.lease_duration" | "leader_election.renew_deadline" => (DURATION, Duration),
        "shutdown.grace_period" => ("a duration of at most 1h, such as 10s, 25s or 1m", Duration),
        "leader_election.retry_period" => (
            "a duration greater than 0 such as 500ms, 1s or 2s",
            Duration,
        ),
        "status.flush_interval" => (
            "a duration greater than 0 and at most 1h, such as 500ms, 1s or 2s",
            Duration,
        ),
        "log.format" => ("one of json, pretty, compact or off", Plain),
        "log.level" => (
            "a log filter such as info, debug or chronflow=debug,kube=warn",
            Plain,
        ),
        "log.file" => ("null or a file path", Plain),
        "log.rotation" => ("one of never, hourly or daily", Plain),
        "metrics.bind" => ("a socket address such as 0.0.0.0:8080 or [::]:8080", Plain),
        _ => return None,
    };
    Some(Leaf { expect, kind })
}

/// A value as shown in messages: `"5x"`, `0`, `true`, `null`, `a list`, `a mapping`.
fn describe(value: &Value) -> String {
    match value {
        Value::Null => "null".to_string(),
        Value::Bool(flag) => flag.to_string(),
        Value::Number(number) => number.to_string(),
        Value::String(text) => format!("{text:?}"),
        Value::Sequence(_) => "a list".to_string(),
        Value::Mapping(_) => "a mapping".to_string(),
        Value::Tagged(tagged) => format!("a value tagged {}", tagged.tag),
    }
}

/// Like [`describe`], without revealing a secret's content.
fn describe_secret(value: &Value) -> String {
    match value {
        Value::String(text) if text.contains("://") => format!("{:?}", redact_url(text)),
        Value::String(_) => "a string".to_string(),
        Value::Number(_) => "a number".to_string(),
        Value::Bool(_) => "a boolean".to_string(),
        other => describe(other),
    }
}

/// A scalar key as text (`5`, `true`, `null`); other keys described.
fn scalar_text(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        Value::Null => "null".to_string(),
        Value::Bool(flag) => flag.to_string(),
        Value::Number(number) => number.to_string(),
        other => describe(other),
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

fn is_redis_url(url: &str) -> bool {
    let lower = url.to_ascii_lowercase();
    ["redis://", "rediss://"]
        .iter()
        .any(|scheme| lower.starts_with(scheme) && lower.len() > scheme.len())
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
        if !directive.contains('=')
            && !directive.contains('[')
            && !LEVELS
                .iter()
                .any(|known| directive.eq_ignore_ascii_case(known))
        {
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

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(name, value)| (name.to_string(), value.to_string()))
            .collect()
    }

    /// Loads `yaml` (written to a temporary file when given) with the environment `pairs`.
    fn load(yaml: Option<&str>, pairs: &[(&str, &str)]) -> Result<OperatorConfig, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chronflow.yaml");
        if let Some(yaml) = yaml {
            std::fs::write(&path, yaml).unwrap();
        }
        OperatorConfig::load_from(yaml.map(|_| path.as_path()), vars(pairs))
    }

    fn ok(yaml: Option<&str>, pairs: &[(&str, &str)]) -> OperatorConfig {
        load(yaml, pairs).unwrap_or_else(|error| panic!("unexpected error: {error}"))
    }

    /// The error message, with the temporary file's path replaced by `FILE`.
    fn err(yaml: Option<&str>, pairs: &[(&str, &str)]) -> String {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chronflow.yaml");
        if let Some(yaml) = yaml {
            std::fs::write(&path, yaml).unwrap();
        }
        match OperatorConfig::load_from(yaml.map(|_| path.as_path()), vars(pairs)) {
            Ok(config) => panic!("expected an error, got {config:?}"),
            Err(error) => error
                .to_string()
                .replace(&path.display().to_string(), "FILE"),
        }
    }

    fn file_err(yaml: &str) -> String {
        err(Some(yaml), &[])
    }

    fn env_err(pairs: &[(&str, &str)]) -> String {
        err(None, pairs)
    }

    // ---- defaults -------------------------------------------------------------------------

    #[test]
    fn defaults_are_the_documented_values() {
        let config = OperatorConfig::default();
        assert_eq!(config.backend_type, BackendType::Memory);
        assert_eq!(config.max_workers, 10);
        assert_eq!(config.queue_size, 1000);
        assert_eq!(config.timezone, Tz::UTC);
        assert!(config.watch_namespaces.is_empty());
        assert_eq!(config.redis.url, None);
        assert_eq!(config.redis.host, "localhost");
        assert_eq!(config.redis.port, 6379);
        assert_eq!(config.redis.db, 0);
        assert_eq!(config.redis.password, None);
        assert_eq!(config.redis.max_connections, 10);
        let leader = &config.leader_election;
        assert!(!leader.enabled);
        assert_eq!(leader.lease_name, "chronflow-leader");
        assert_eq!(leader.lease_namespace, None);
        assert_eq!(leader.lease_duration, Duration::from_secs(15));
        assert_eq!(leader.renew_deadline, Duration::from_secs(10));
        assert_eq!(leader.retry_period, Duration::from_secs(2));
        assert_eq!(config.log.format, LogFormat::Compact);
        assert_eq!(config.log.level, "info");
        assert!(config.log.log_task_success);
        assert_eq!(config.log.file, None);
        assert_eq!(config.log.rotation, LogRotation::Daily);
        assert_eq!(config.metrics.bind.to_string(), "0.0.0.0:8080");
        assert_eq!(config.status.flush_interval, Duration::from_secs(1));
        assert_eq!(config.shutdown.grace_period, Duration::from_secs(25));
    }

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
            "---\n",
            "redis:\nlog:\n  # level: debug\n",
        ] {
            assert_eq!(ok(Some(yaml), &[]), OperatorConfig::default(), "{yaml:?}");
        }
    }

    #[test]
    fn defaults_serialise_in_the_documented_forms() {
        let yaml = serde_yaml::to_string(&OperatorConfig::default()).unwrap();
        for line in [
            "backend_type: memory",
            "timezone: UTC",
            "watch_namespaces: []",
            "  url: null",
            "  lease_duration: 15s",
            "  format: compact",
            "  rotation: daily",
            "  bind: 0.0.0.0:8080",
            "  flush_interval: 1s",
            "  grace_period: 25s",
        ] {
            assert!(
                yaml.lines().any(|l| l == line),
                "{line:?} missing from\n{yaml}"
            );
        }
    }

    #[test]
    fn every_key_has_a_message_entry() {
        fn walk(value: &Value, prefix: &str, out: &mut Vec<String>) {
            if let Value::Mapping(mapping) = value {
                for (key, child) in mapping {
                    let key = format!("{prefix}{}", scalar_text(key));
                    match child {
                        Value::Mapping(_) => walk(child, &format!("{key}."), out),
                        _ => out.push(key),
                    }
                }
            }
        }
        let mut leaves = Vec::new();
        walk(&schema(), "", &mut leaves);
        assert_eq!(leaves.len(), 27, "{leaves:?}");
        for key in leaves {
            assert!(leaf(&key).is_some(), "no message entry for {key}");
        }
        assert!(leaf("watch_namespaces[]").is_some());
    }

    // ---- file overlay ---------------------------------------------------------------------

    #[test]
    fn file_values_override_defaults_and_the_rest_stays_default() {
        let config = ok(
            Some(
                "backend_type: memory\nmax_workers: 4\ntimezone: Europe/Paris\n\
                 watch_namespaces: [team-a, team-b]\n\
                 redis:\n  host: redis.svc\n  password: \"123456\"\n\
                 leader_election:\n  enabled: false\n  lease_duration: 1m30s\n  renew_deadline: 1m\n  retry_period: 500ms\n\
                 log:\n  format: json\n  level: chronflow=debug,kube=warn\n  file: /var/log/chronflow.log\n  rotation: hourly\n\
                 metrics:\n  bind: \"[::]:9090\"\n",
            ),
            &[],
        );
        assert_eq!(config.backend_type, BackendType::Memory);
        assert_eq!(config.max_workers, 4);
        assert_eq!(config.queue_size, 1000);
        assert_eq!(config.timezone, chrono_tz::Europe::Paris);
        assert_eq!(config.watch_namespaces, ["team-a", "team-b"]);
        assert_eq!(config.redis.host, "redis.svc");
        assert_eq!(config.redis.port, 6379);
        assert_eq!(
            config.redis.password.as_ref().map(Secret::expose),
            Some("123456")
        );
        assert!(!config.leader_election.enabled);
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
        let config = ok(
            Some("leader_election:\n  lease_duration: 1m30s\nlog:\n  format: pretty\n"),
            &[],
        );
        let yaml = serde_yaml::to_string(&config).unwrap();
        assert!(yaml.contains("lease_duration: 1m30s"), "{yaml}");
        assert_eq!(ok(Some(&yaml), &[]), config);
    }

    #[test]
    fn missing_file_names_the_path() {
        let missing = Path::new("/nonexistent/chronflow.yaml");
        let error = OperatorConfig::load_from(Some(missing), vars(&[]))
            .unwrap_err()
            .to_string();
        assert!(
            error.starts_with("config: cannot read /nonexistent/chronflow.yaml: "),
            "{error}"
        );
    }

    #[test]
    fn invalid_yaml_names_the_file() {
        let error = file_err("max_workers: [\n");
        assert!(
            error.starts_with("config: FILE is not valid YAML: "),
            "{error}"
        );
        let error = file_err("max_workers: 1\nmax_workers: 2\n");
        assert!(
            error.contains("FILE is not valid YAML: duplicate entry"),
            "{error}"
        );
    }

    // ---- environment overlay --------------------------------------------------------------

    #[test]
    fn environment_overrides_file_and_defaults() {
        let config = ok(
            Some("max_workers: 5\nredis:\n  host: from-file\n"),
            &[
                ("SCHEDULER__MAX_WORKERS", "7"),
                ("SCHEDULER__REDIS__MAX_CONNECTIONS", "20"),
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
    fn environment_names_are_case_insensitive() {
        let config = ok(
            None,
            &[
                ("scheduler__Redis__Port", "6380"),
                ("Scheduler__queue_SIZE", "5"),
            ],
        );
        assert_eq!(config.redis.port, 6380);
        assert_eq!(config.queue_size, 5);
    }

    #[test]
    fn environment_lists_are_comma_separated_or_yaml() {
        for raw in ["a,b", " a , b ,", "[a, b]", "[\"a\", 'b']"] {
            let config = ok(None, &[("SCHEDULER__WATCH_NAMESPACES", raw)]);
            assert_eq!(config.watch_namespaces, ["a", "b"], "{raw:?}");
        }
        for raw in ["", "[]", " , "] {
            let config = ok(
                Some("watch_namespaces: [x]\n"),
                &[("SCHEDULER__WATCH_NAMESPACES", raw)],
            );
            assert!(config.watch_namespaces.is_empty(), "{raw:?}");
        }
        assert_eq!(
            ok(None, &[("SCHEDULER__WATCH_NAMESPACES", "solo")]).watch_namespaces,
            ["solo"]
        );
    }

    #[test]
    fn environment_text_values_are_verbatim_and_empty_unsets_optional_keys() {
        let config = ok(
            Some("redis:\n  password: from-file\nleader_election:\n  lease_namespace: ops\n"),
            &[
                ("SCHEDULER__REDIS__HOST", "10.0.0.1"),
                ("SCHEDULER__REDIS__PASSWORD", ""),
                ("SCHEDULER__LEADER_ELECTION__LEASE_NAMESPACE", ""),
                ("SCHEDULER__REDIS__URL", "redis://:p@ss: word@redis:6379/1"),
            ],
        );
        assert_eq!(config.redis.host, "10.0.0.1");
        assert_eq!(config.redis.password, None);
        assert_eq!(config.leader_election.lease_namespace, None);
        assert_eq!(
            config.redis.url.as_ref().map(RedisUrl::expose),
            Some("redis://:p@ss: word@redis:6379/1")
        );

        let config = ok(
            None,
            &[
                ("SCHEDULER__REDIS__PASSWORD", "123456"),
                ("SCHEDULER__LOG__FILE", "null"),
            ],
        );
        assert_eq!(config.redis.password, Some(Secret::new("123456")));
        assert_eq!(config.log.file, Some(PathBuf::from("null")));
    }

    #[test]
    fn environment_scalars_are_yaml() {
        let config = ok(
            None,
            &[
                ("SCHEDULER__LOG__LOG_TASK_SUCCESS", "false"),
                ("SCHEDULER__REDIS__DB", " 3 "),
            ],
        );
        assert!(!config.log.log_task_success);
        assert_eq!(config.redis.db, 3);
    }

    // ---- unknown keys and variables -------------------------------------------------------

    #[test]
    fn unknown_top_level_key_in_file() {
        assert_eq!(
            file_err("max_worker: 3\n"),
            "config: unknown key \"max_worker\" in FILE (expected one of: backend_type, max_workers, \
             queue_size, timezone, watch_namespaces, redis, leader_election, log, metrics, status, shutdown)"
        );
    }

    #[test]
    fn unknown_nested_key_in_file() {
        assert_eq!(
            file_err("redis:\n  max_conection: 5\n"),
            "config: unknown key \"redis.max_conection\" in FILE \
             (expected one of: url, host, port, db, password, max_connections)"
        );
    }

    #[test]
    fn every_unknown_key_is_reported() {
        let error = file_err("foo: 1\nlog:\n  colour: true\n  level: debug\nmetrics:\n  port: 1\n");
        let lines: Vec<&str> = error.lines().collect();
        assert_eq!(lines.len(), 3, "{error}");
        assert!(
            lines[0].starts_with("config: unknown key \"foo\""),
            "{error}"
        );
        assert!(
            lines[1].starts_with("config: unknown key \"log.colour\""),
            "{error}"
        );
        assert!(
            lines[2].starts_with("config: unknown key \"metrics.port\""),
            "{error}"
        );
        assert!(
            lines[2].ends_with("(expected one of: bind, per_task)"),
            "{error}"
        );
    }

    #[test]
    fn non_string_keys_are_unknown() {
        assert!(file_err("5: x\n").starts_with("config: unknown key \"5\" in FILE"));
    }

    #[test]
    fn sections_must_be_mappings() {
        assert_eq!(
            file_err("metrics: 8080\n"),
            "config: metrics: expected a mapping with keys bind, per_task, got 8080 (in FILE)"
        );
        assert_eq!(
            file_err("- a\n"),
            "config: FILE: expected a mapping of configuration keys at the top level, got a list"
        );
    }

    #[test]
    fn unknown_variables_are_named() {
        assert_eq!(
            env_err(&[("SCHEDULER__MAX_WORKER", "3")]),
            "config: unknown variable SCHEDULER__MAX_WORKER: there is no key \"max_worker\" (expected \
             SCHEDULER__ followed by one of: BACKEND_TYPE, MAX_WORKERS, QUEUE_SIZE, TIMEZONE, \
             WATCH_NAMESPACES, REDIS, LEADER_ELECTION, LOG, METRICS, STATUS, SHUTDOWN)"
        );
        assert_eq!(
            env_err(&[("SCHEDULER__REDIS__MAX_CONECTION", "3")]),
            "config: unknown variable SCHEDULER__REDIS__MAX_CONECTION: there is no key \
             \"redis.max_conection\" (expected SCHEDULER__REDIS__ followed by one of: URL, HOST, \
             PORT, DB, PASSWORD, MAX_CONNECTIONS)"
        );
        assert_eq!(
            env_err(&[("SCHEDULER__MAX_WORKERS__LIMIT", "3")]),
            "config: unknown variable SCHEDULER__MAX_WORKERS__LIMIT: \"max_workers\" has no sub-keys \
             (set SCHEDULER__MAX_WORKERS instead)"
        );
        assert_eq!(
            env_err(&[("SCHEDULER__METRICS", "x")]),
            "config: variable SCHEDULER__METRICS names the section \"metrics\", not a key \
             (expected SCHEDULER__METRICS__ followed by one of: BIND, PER_TASK)"
        );
        assert!(
            env_err(&[("SCHEDULER__", "x")]).starts_with("config: unknown variable SCHEDULER__: ")
        );
        assert!(
            env_err(&[("SCHEDULER__REDIS____HOST", "x")])
                .starts_with("config: unknown variable SCHEDULER__REDIS____HOST: ")
        );
    }

    #[test]
    fn the_same_key_set_twice_in_the_environment_is_an_error() {
        assert_eq!(
            env_err(&[
                ("SCHEDULER__MAX_WORKERS", "3"),
                ("scheduler__max_workers", "4")
            ]),
            "config: SCHEDULER__MAX_WORKERS and scheduler__max_workers both set \"max_workers\"; keep one"
        );
    }

    // ---- wrong types ----------------------------------------------------------------------

    #[test]
    fn wrong_types_name_the_key_expectation_value_and_source() {
        let cases = [
            (
                "max_workers: many\n",
                "max_workers: expected an integer from 1 to 10000, got \"many\" (in FILE)",
            ),
            (
                "queue_size: -1\n",
                "queue_size: expected an integer from 1 to 1000000, got -1 (in FILE)",
            ),
            (
                "max_workers: 1.5\n",
                "max_workers: expected an integer from 1 to 10000, got 1.5 (in FILE)",
            ),
            (
                "backend_type: etcd\n",
                "backend_type: expected one of memory or redis, got \"etcd\" (in FILE)",
            ),
            (
                "timezone: Mars/Olympus\n",
                "timezone: expected an IANA time zone name such as UTC or Europe/Paris, got \"Mars/Olympus\" (in FILE)",
            ),
            (
                "watch_namespaces: team-a\n",
                "watch_namespaces: expected a list of namespace names, got \"team-a\" (in FILE)",
            ),
            (
                "watch_namespaces: [a, 7]\n",
                "watch_namespaces[1]: expected a namespace name (lowercase letters, digits and '-', at most 63 characters), got 7 (in FILE)",
            ),
            (
                "redis:\n  port: 70000\n",
                "redis.port: expected a port number from 1 to 65535, got 70000 (in FILE)",
            ),
            (
                "redis:\n  db: -1\n",
                "redis.db: expected a database index (an integer >= 0), got -1 (in FILE)",
            ),
            (
                "leader_election:\n  enabled: yes\n",
                "leader_election.enabled: expected true or false, got \"yes\" (in FILE)",
            ),
            (
                "leader_election:\n  lease_duration: 15\n",
                "leader_election.lease_duration: expected a duration such as 500ms, 10s, 1m30s, 2h or 1d, got 15 (add a unit: 15s) (in FILE)",
            ),
            (
                "status:\n  flush_interval: 5x\n",
                "status.flush_interval: \"5x\" is not a duration (expected e.g. 500ms, 10s, 1m30s, 2h, 1d) (in FILE)",
            ),
            (
                "log:\n  format: xml\n",
                "log.format: expected one of json, pretty, compact or off, got \"xml\" (in FILE)",
            ),
            (
                "log:\n  rotation: weekly\n",
                "log.rotation: expected one of never, hourly or daily, got \"weekly\" (in FILE)",
            ),
            (
                "log:\n  level: [info]\n",
                "log.level: expected a log filter such as info, debug or chronflow=debug,kube=warn, got a list (in FILE)",
            ),
            (
                "metrics:\n  bind: localhost:8080\n",
                "metrics.bind: expected a socket address such as 0.0.0.0:8080 or [::]:8080, got \"localhost:8080\" (in FILE)",
            ),
            (
                "max_workers:\n",
                "max_workers: expected an integer from 1 to 10000, got null (in FILE)",
            ),
        ];
        for (yaml, message) in cases {
            assert_eq!(file_err(yaml), format!("config: {message}"), "{yaml:?}");
        }
    }

    #[test]
    fn wrong_types_from_the_environment_name_the_variable() {
        assert_eq!(
            env_err(&[("SCHEDULER__MAX_WORKERS", "ten")]),
            "config: max_workers: expected an integer from 1 to 10000, got \"ten\" (from SCHEDULER__MAX_WORKERS)"
        );
        assert_eq!(
            env_err(&[("SCHEDULER__REDIS__PORT", "")]),
            "config: redis.port: expected a port number from 1 to 65535, got null (from SCHEDULER__REDIS__PORT)"
        );
        assert_eq!(
            env_err(&[("SCHEDULER__QUEUE_SIZE", "[1]")]),
            "config: queue_size: expected an integer from 1 to 1000000, got \"[1]\" (from SCHEDULER__QUEUE_SIZE)"
        );
        assert_eq!(
            env_err(&[("SCHEDULER__SHUTDOWN__GRACE_PERIOD", "30")]),
            "config: shutdown.grace_period: expected a duration of at most 1h, such as 10s, 25s or 1m, \
             got \"30\" (add a unit: 30s) (from SCHEDULER__SHUTDOWN__GRACE_PERIOD)"
        );
        assert!(
            env_err(&[("SCHEDULER__WATCH_NAMESPACES", "[a, b")])
                .starts_with("config: watch_namespaces: \"[a, b\" is not a valid YAML list (")
        );
    }

    // ---- semantic validation --------------------------------------------------------------

    #[test]
    fn each_validation_rule() {
        let cases: &[(&str, &str)] = &[
            (
                "max_workers: 0",
                "max_workers: expected an integer from 1 to 10000, got 0 (in FILE)",
            ),
            (
                "queue_size: 0",
                "queue_size: expected an integer from 1 to 1000000, got 0 (in FILE)",
            ),
            (
                "redis:\n  max_connections: 0",
                "redis.max_connections: expected an integer from 1 to 10000, got 0 (in FILE)",
            ),
            (
                "redis:\n  port: 0",
                "redis.port: expected a port number from 1 to 65535, got 0 (in FILE)",
            ),
            (
                "status:\n  max_writes_per_second: 0",
                "status.max_writes_per_second: expected an integer from 1 to 10000, got 0 (in FILE)",
            ),
            (
                "redis:\n  host: ''",
                "redis.host: expected a host name or IP address, got \"\" (in FILE)",
            ),
            (
                "redis:\n  url: http://redis:6379",
                "redis.url: expected null or a redis:// or rediss:// URL, got \"http://redis:6379\" (in FILE)",
            ),
            (
                "redis:\n  url: redis://",
                "redis.url: expected null or a redis:// or rediss:// URL, got \"redis://\" (in FILE)",
            ),
            (
                "watch_namespaces: [Team_A]",
                "watch_namespaces[0]: expected a namespace name (lowercase letters, digits and '-', at most 63 characters), got \"Team_A\" (in FILE)",
            ),
            (
                "watch_namespaces: [a, b, a]",
                "watch_namespaces[2]: \"a\" is listed twice (in FILE)",
            ),
            (
                "leader_election:\n  lease_name: Leader",
                "leader_election.lease_name: expected a Kubernetes object name (lowercase letters, digits, '-' and '.'), got \"Leader\" (in FILE)",
            ),
            (
                "leader_election:\n  lease_namespace: kube.system",
                "leader_election.lease_namespace: expected a namespace name (lowercase letters, digits and '-', at most 63 characters), got \"kube.system\" (in FILE)",
            ),
            (
                "leader_election:\n  retry_period: 0s",
                "leader_election.retry_period: expected a duration greater than 0 such as 500ms, 1s or 2s, got 0s (in FILE)",
            ),
            (
                "leader_election:\n  retry_period: 10s",
                "leader_election.retry_period: expected a duration shorter than leader_election.renew_deadline (10s, default), got 10s (in FILE)",
            ),
            (
                "leader_election:\n  renew_deadline: 20s",
                "leader_election.renew_deadline: expected a duration shorter than leader_election.lease_duration (15s, default), got 20s (in FILE)",
            ),
            (
                "leader_election:\n  lease_duration: 10s",
                "leader_election.lease_duration: expected a duration longer than leader_election.renew_deadline (10s, default), got 10s (in FILE)",
            ),
            (
                "log:\n  level: verbose",
                "log.level: \"verbose\" is not a level (expected trace, debug, info, warn, error or off; to filter a target give it a level: verbose=debug) (in FILE)",
            ),
            (
                "log:\n  level: info,=x",
                "log.level: expected a log filter such as info, debug or chronflow=debug,kube=warn, got \"info,=x\" (invalid filter directive) (in FILE)",
            ),
            (
                "log:\n  level: ' '",
                "log.level: expected a log filter such as info, debug or chronflow=debug,kube=warn, got \" \" (in FILE)",
            ),
            (
                "log:\n  file: ''",
                "log.file: expected null or a file path, got \"\" (in FILE)",
            ),
            (
                "backend_type: redis",
                "backend_type: redis (HA dedup) is not available in this version; use memory with one replica (in FILE)",
            ),
            (
                "leader_election:\n  enabled: true",
                "leader_election.enabled: leader election is not available in this version; run one replica (in FILE)",
            ),
            (
                "max_workers: 10001",
                "max_workers: expected an integer from 1 to 10000, got 10001 (in FILE)",
            ),
            (
                "max_workers: 18446744073709551615",
                "max_workers: expected an integer from 1 to 10000, got 18446744073709551615 (in FILE)",
            ),
            (
                "queue_size: 1000001",
                "queue_size: expected an integer from 1 to 1000000, got 1000001 (in FILE)",
            ),
            (
                "redis:\n  max_connections: 4294967295",
                "redis.max_connections: expected an integer from 1 to 10000, got 4294967295 (in FILE)",
            ),
            (
                "status:\n  flush_interval: 1h1ms",
                "status.flush_interval: expected a duration greater than 0 and at most 1h, such as 500ms, 1s or 2s, got 1h1ms (in FILE)",
            ),
            (
                "shutdown:\n  grace_period: 1h1s",
                "shutdown.grace_period: expected a duration of at most 1h, such as 10s, 25s or 1m, got 1h1s (in FILE)",
            ),
            (
                "status:\n  flush_interval: 0s",
                "status.flush_interval: expected a duration greater than 0 and at most 1h, such as 500ms, 1s or 2s, got 0s (in FILE)",
            ),
        ];
        for (yaml, message) in cases {
            assert_eq!(file_err(yaml), format!("config: {message}"), "{yaml:?}");
        }
    }

    #[test]
    fn valid_edge_values_are_accepted() {
        let config = ok(
            Some(
                "redis:\n  url: rediss://user:pw@redis.example:6380/2\n  port: 65535\n\
                 leader_election:\n  lease_name: chronflow.leader-1\n  lease_namespace: ops\n  \
                 lease_duration: 3s\n  renew_deadline: 2s\n  retry_period: 1s\n\
                 log:\n  level: \"WARN,chronflow=debug,kube_runtime[reconcile]=trace\"\n\
                 shutdown:\n  grace_period: 0s\n",
            ),
            &[],
        );
        assert_eq!(
            config.leader_election.lease_namespace.as_deref(),
            Some("ops")
        );
        assert_eq!(config.shutdown.grace_period, Duration::ZERO);
    }

    #[test]
    fn semantic_errors_from_the_environment_name_the_variable() {
        assert_eq!(
            env_err(&[("SCHEDULER__MAX_WORKERS", "0")]),
            "config: max_workers: expected an integer from 1 to 10000, got 0 (from SCHEDULER__MAX_WORKERS)"
        );
        assert_eq!(
            err(
                Some("leader_election:\n  lease_duration: 20s\n"),
                &[("SCHEDULER__LEADER_ELECTION__RENEW_DEADLINE", "30s")]
            ),
            "config: leader_election.renew_deadline: expected a duration shorter than \
             leader_election.lease_duration (20s, in FILE), got 30s \
             (from SCHEDULER__LEADER_ELECTION__RENEW_DEADLINE)"
        );
    }

    #[test]
    fn several_semantic_problems_are_all_reported_one_per_line() {
        let error = err(Some("max_workers: 0\n"), &[("SCHEDULER__QUEUE_SIZE", "0")]);
        assert_eq!(
            error,
            "config: max_workers: expected an integer from 1 to 10000, got 0 (in FILE)\n\
             config: queue_size: expected an integer from 1 to 1000000, got 0 (from SCHEDULER__QUEUE_SIZE)"
        );
    }

    // ---- secrets --------------------------------------------------------------------------

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

        let error = file_err("redis:\n  password: 424242\n");
        assert_eq!(
            error,
            "config: redis.password: expected null or a quoted string, got a number (in FILE)"
        );
        let error = file_err("redis:\n  url: http://admin:hunter2@redis\n");
        assert!(!error.contains("hunter2"), "{error}");
        assert!(
            error.contains("\"http://admin:<redacted>@redis\""),
            "{error}"
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

    // ---- helpers --------------------------------------------------------------------------

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

    #[test]
    fn explicit_lease_namespace_wins() {
        let explicit = LeaderElectionConfig {
            lease_namespace: Some("ops".into()),
            ..Default::default()
        };
        assert_eq!(explicit.effective_lease_namespace(), "ops");
    }
}
