//! The `leader_election` section: the Lease replicas elect a leader through.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::values::{Namespace, duration_serde, text};

/// Lease-based leader election. Requires `retry_period < renew_deadline < lease_duration`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaderElectionConfig {
    /// Whether replicas elect a leader through a `coordination.k8s.io` Lease.
    pub enabled: bool,
    /// With `enabled`: the tasks are split between the replicas by shard
    /// (`docs/architecture.md`, "Shards") rather than all run by one leader.
    pub sharding: bool,
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
    /// The most this replica's clock may differ from the run ledger's (Redis `TIME`) for it to
    /// lead; 0 turns the check off.
    #[serde(with = "duration_serde")]
    pub max_clock_skew: Duration,
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
