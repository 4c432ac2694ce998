//! The sections of the operator process itself: its HTTP endpoint (`metrics`), its status
//! writes (`status`) and its shutdown (`shutdown`).

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

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
