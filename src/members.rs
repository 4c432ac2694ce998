//! The live replicas, for sharding (`docs/architecture.md`, "Shards"): each replica keeps a
//! `coordination.k8s.io/v1` Lease of its own, `<group>-<pod name>`, labelled
//! [`MEMBER_OF`]` = <group>` and renewed every retry period; each lists the group's Leases and
//! publishes the [`Ring`] of the live ones. A member is live while its Lease changed within its
//! `leaseDurationSeconds`, as this process saw it: expiry is judged on the local clock from
//! when the Lease was last seen to change, as the elector judges its Lease (`src/leader.rs`),
//! never by comparing another replica's timestamps with ours. A replica that stops deletes its
//! Lease, so the others see it leave at once; one that dies leaves after its Lease expired.
//!
//! On the ring a member is its pod name, not the process (`Identity`'s nonce): a container
//! restarted in place comes back to the shards it had.

use std::collections::HashMap;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{DeleteParams, ListParams, ObjectMeta, Patch, PatchParams};
use kube::{Api, ResourceExt};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::leader::{Identity, Timings, pod_name};
use crate::shard::Ring;

/// The label that makes a Lease a member of a group (its value: the group's name).
pub const MEMBER_OF: &str = "chronflow.io/member-of";

const FIELD_MANAGER: &str = "chronflow-members";

/// This replica's membership in `group`, in `api`'s namespace.
pub struct Members {
    api: Api<Lease>,
    group: String,
    identity: Identity,
    timings: Timings,
}

/// What this process last saw of a member's Lease, and when it saw it change.
struct Seen {
    resource_version: Option<String>,
    changed_at: Instant,
}

impl Members {
    /// Membership of `identity` in `group` (the leader election Lease's name serves).
    pub fn new(api: Api<Lease>, group: &str, identity: Identity, timings: Timings) -> Self {
        Self {
            api,
            group: group.to_string(),
            identity,
            timings,
        }
    }

    /// The name of this replica's own Lease.
    pub fn lease_name(&self) -> String {
        format!("{}-{}", self.group, self.identity.name)
    }

    /// Renews this replica's Lease and publishes the ring of the live members into `ring` every
    /// retry period until `stop`, then deletes its Lease.
    pub async fn run(&self, ring: watch::Sender<Ring>, stop: CancellationToken) {
        let mut seen: HashMap<String, Seen> = HashMap::new();
        let mut tick = tokio::time::interval(self.timings.retry_period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            if let Err(error) = self.renew().await {
                warn!(%error, "could not renew this replica's member Lease");
            }
            match self.live(&mut seen).await {
                Ok(live) => {
                    let changed = ring.send_if_modified(|ring| {
                        let same = ring
                            .members()
                            .iter()
                            .map(|m| &**m)
                            .eq(live.iter().map(String::as_str));
                        if !same {
                            *ring = Ring::new(&live);
                        }
                        !same
                    });
                    if changed {
                        info!(members = ?live, "the replicas changed");
                    }
                }
                // Keep the ring as it was: an apiserver that does not answer moves no shard.
                Err(error) => warn!(%error, "could not list the member Leases"),
            }
        }
        match self
            .api
            .delete(&self.lease_name(), &DeleteParams::default())
            .await
        {
            Ok(_) => debug!("left the members"),
            Err(error) => warn!(%error, "could not delete this replica's member Lease"),
        }
    }

    async fn renew(&self) -> Result<(), kube::Error> {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(self.lease_name()),
                labels: Some([(MEMBER_OF.to_string(), self.group.clone())].into()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(self.identity.to_string()),
                lease_duration_seconds: Some(
                    i32::try_from(self.timings.lease_duration.as_secs().max(1)).unwrap_or(i32::MAX),
                ),
                renew_time: Some(MicroTime(k8s_openapi::jiff::Timestamp::now())),
                ..LeaseSpec::default()
            }),
        };
        let params = PatchParams::apply(FIELD_MANAGER).force();
        self.api
            .patch(&self.lease_name(), &params, &Patch::Apply(&lease))
            .await?;
        Ok(())
    }

    /// The live members' pod names, sorted.
    async fn live(&self, seen: &mut HashMap<String, Seen>) -> Result<Vec<String>, kube::Error> {
        let selector = format!("{MEMBER_OF}={}", self.group);
        let leases = self
            .api
            .list(&ListParams::default().labels(&selector))
            .await?;
        let now = Instant::now();
        seen.retain(|name, _| leases.items.iter().any(|l| l.name_any() == *name));
        let mut live: Vec<String> = leases
            .items
            .iter()
            .filter_map(|lease| {
                let entry = seen.entry(lease.name_any()).or_insert_with(|| Seen {
                    resource_version: None,
                    changed_at: now,
                });
                if entry.resource_version != lease.metadata.resource_version {
                    entry.resource_version = lease.metadata.resource_version.clone();
                    entry.changed_at = now;
                }
                let spec = lease.spec.as_ref()?;
                let duration = Duration::from_secs(
                    u64::try_from(spec.lease_duration_seconds.unwrap_or(0)).unwrap_or(0),
                );
                let holder = spec.holder_identity.as_deref()?;
                (now.duration_since(entry.changed_at) < duration)
                    .then(|| pod_name(holder).to_string())
            })
            .collect();
        live.sort();
        live.dedup();
        Ok(live)
    }
}
