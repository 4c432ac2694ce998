//! The sections that bound what tasks may do: `jobs`, `limits`, `http` and `secrets`.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::values::{duration_serde, networks, within};

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
