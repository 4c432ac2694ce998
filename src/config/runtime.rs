//! The sections of the operator process itself: its HTTP endpoint (`metrics`), its status
//! writes (`status`) and its shutdown (`shutdown`).

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::selector::TaskSelector;
use super::values::{duration_serde, socket_address, within};

/// The HTTP endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Socket address to listen on.
    #[serde(deserialize_with = "socket_address")]
    pub bind: SocketAddr,
    /// Whether run and miss counts carry each task's namespace and name.
    pub per_task: bool,
    /// With `per_task`: only the tasks whose labels match carry their namespace and name; the
    /// others are counted in the series with empty labels. `None`: every task.
    pub per_task_selector: Option<TaskSelector>,
    /// Who may read `/metrics`.
    pub auth: MetricsAuth,
}

/// Who may read `/metrics` (`/healthz`, `/readyz` and `/stats` stay open: probes use them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MetricsAuth {
    /// Whoever reaches the port.
    None,
    /// A bearer token the apiserver authenticates (TokenReview) and authorizes for `get` on
    /// the non-resource URL `/metrics` (SubjectAccessReview), as controller-runtime's secure
    /// metrics serving does.
    Kubernetes,
}

/// ChronTask status writes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusConfig {
    /// At most one status patch per task per interval.
    #[serde(with = "duration_serde")]
    pub flush_interval: Duration,
    /// The most status writes per second over all tasks: the ceiling of the writer's budget,
    /// which adapts to the apiserver below it.
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
