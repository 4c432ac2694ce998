//! The live replicas, for sharding (`docs/architecture.md`, "Shards"): each replica keeps a
//! `coordination.k8s.io/v1` Lease of its own, `<group>-<pod name>`, labelled
//! [`MEMBER_OF`]` = <group>` and renewed every retry period; each watches the group's Leases and
//! publishes a [`View`]: the [`Ring`] of the live members and what each acknowledged (the
//! handshake of `src/handover.rs`, carried in its Lease's annotations). A member is live while
//! its Lease changed within its `leaseDurationSeconds`, as this process saw it: expiry is
//! judged on the local clock from when the Lease was last seen to change, as the elector judges
//! its Lease (`src/leader.rs`), never by comparing another replica's timestamps with ours. A
//! replica that stops says so in its Lease (it leaves the ring at once), then deletes it; one
//! that dies leaves once its Lease expired (and the others delete it).
//!
//! On the ring a member is its pod name, not the process (`Identity`'s nonce): a container
//! restarted in place comes back to the shards it had.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{DeleteParams, ObjectMeta, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, ResourceExt};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::leader::{EPOCH_ANNOTATION, Identity, Timings, pod_name};
use crate::shard::Ring;

/// The label that makes a Lease a member of a group (its value: the group's name).
pub const MEMBER_OF: &str = "chronflow.io/member-of";

/// The annotation naming the ring a member acts on ([`Ring::id`], in hex): it runs no shard
/// another member owns on that ring.
pub const RING_ANNOTATION: &str = "chronflow.io/ring";

/// The annotation of a member off the ring (`"true"`): it is on its way out, or its clock is
/// off; it takes no shard and lets go of those it holds (`src/handover.rs`).
pub const STANDBY_ANNOTATION: &str = "chronflow.io/standby";

const FIELD_MANAGER: &str = "chronflow-members";

/// What a member says in its Lease.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ack {
    /// The ring it acts on; `None` before it acted on one (or while it holds nothing).
    pub ring: Option<u64>,
    /// The newest epoch it holds shards in (the floor of the next one drawn).
    pub epoch: u64,
    /// Off the ring: on its way out, or its clock is off.
    pub standby: bool,
}

/// The members as this replica sees them.
#[derive(Clone, Debug, Default)]
pub struct View {
    /// The ring of the live members not standing by.
    pub ring: Ring,
    /// What each live member (standing by or not) said last, by pod name.
    pub acks: BTreeMap<Arc<str>, Ack>,
    /// This replica renewed its Lease within the renew deadline: it may act on the ring.
    pub renewed: bool,
    /// How many times its renewals lapsed past the renew deadline (a freeze, an apiserver out
    /// of reach): the others may have taken its shards meanwhile, so it holds none from the
    /// lapse on, even if it renewed again before anyone looked.
    pub lapses: u64,
}

impl PartialEq for View {
    fn eq(&self, other: &Self) -> bool {
        self.ring.members() == other.ring.members()
            && self.acks == other.acks
            && self.renewed == other.renewed
            && self.lapses == other.lapses
    }
}

/// This replica's membership in `group`, in `api`'s namespace.
pub struct Members {
    api: Api<Lease>,
    group: String,
    identity: Identity,
    timings: Timings,
}

/// What this process last saw of a member's Lease, and when it saw it change.
struct Seen {
    lease: Lease,
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

    /// Renews this replica's Lease every retry period and at once when `ack` changes, watches
    /// the group's Leases (and lists them at each renewal: a watch can stall without an error)
    /// and publishes what it sees into `view`, until `stop`; then deletes its Lease.
    pub async fn run(
        &self,
        view: watch::Sender<View>,
        mut ack: watch::Receiver<Ack>,
        stop: CancellationToken,
    ) {
        let config = watcher::Config::default().labels(&self.selector());
        let mut events = watcher(self.api.clone(), config).default_backoff().boxed();
        let mut seen: HashMap<String, Seen> = HashMap::new();
        let mut listing: Option<HashSet<String>> = None;
        let mut tick = tokio::time::interval(self.timings.retry_period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut renewed_at: Option<Instant> = None;
        let mut lapses = 0;
        let mut ack_open = true;
        loop {
            let renew = tokio::select! {
                biased;
                () = stop.cancelled() => break,
                _ = tick.tick() => true,
                changed = ack.changed(), if ack_open => {
                    ack_open = changed.is_ok();
                    true
                }
                event = events.next() => {
                    match event {
                        Some(Ok(event)) => see(&mut seen, &mut listing, event),
                        Some(Err(error)) => warn!(%error, "watching the member Leases failed; retrying"),
                        None => break,
                    }
                    false
                }
            };
            // Woken after a freeze, it must not renew and carry on as if nothing happened.
            if renewed_at.is_some_and(|at| at.elapsed() >= self.timings.renew_deadline) {
                renewed_at = None;
                lapses += 1;
            }
            if renew {
                self.relist(&mut seen).await;
                self.forget_dead(&seen).await;
                let said = ack.borrow_and_update().clone();
                // Never longer than a retry period: the view must go on telling whether this
                // replica still renews.
                let renewal = self.renew(&said, &mut seen);
                match tokio::time::timeout(self.timings.retry_period, renewal).await {
                    Ok(Ok(())) => renewed_at = Some(Instant::now()),
                    Ok(Err(NotRenewed::OtherSelf(holder))) => {
                        debug!(%holder, "another process of this pod holds its member Lease")
                    }
                    Ok(Err(NotRenewed::Failed(error))) => {
                        warn!(%error, "could not renew this replica's member Lease")
                    }
                    Err(_) => warn!("no answer renewing this replica's member Lease"),
                }
            }
            let renewed = renewed_at.is_some_and(|at| at.elapsed() < self.timings.renew_deadline);
            let now = live(&seen, renewed, lapses);
            let ring = view.borrow().ring.id();
            view.send_if_modified(|view| {
                let same = *view == now;
                if !same {
                    *view = now;
                }
                !same
            });
            let view = view.borrow();
            if view.ring.id() != ring {
                info!(members = ?view.ring.members(), renewed, "the replicas changed");
            }
        }
        // Only its own: another process of the pod may hold it now.
        let me = self.identity.to_string();
        let own = seen.get(&self.lease_name()).filter(|known| {
            let spec = known.lease.spec.as_ref();
            spec.and_then(|s| s.holder_identity.as_deref()) == Some(me.as_str())
        });
        let Some(own) = own else {
            return;
        };
        let preconditions = Preconditions {
            resource_version: own.lease.resource_version(),
            uid: None,
        };
        let params = DeleteParams::default().preconditions(preconditions);
        match self.api.delete(&self.lease_name(), &params).await {
            Ok(_) => debug!("left the members"),
            Err(error) => warn!(%error, "could not delete this replica's member Lease"),
        }
    }

    /// Selects the group's Leases.
    fn selector(&self) -> String {
        format!("{MEMBER_OF}={}", self.group)
    }

    /// Takes in the group's Leases as the apiserver has them now, as a re-list of the watch
    /// would: a watch can stall without an error, and a live member must not look expired.
    async fn relist(&self, seen: &mut HashMap<String, Seen>) {
        let params = kube::api::ListParams::default().labels(&self.selector());
        let listed = tokio::time::timeout(self.timings.retry_period, self.api.list(&params));
        match listed.await {
            Ok(Ok(leases)) => {
                let mut relisting = None;
                see(seen, &mut relisting, watcher::Event::Init);
                for lease in leases.items {
                    see(seen, &mut relisting, watcher::Event::InitApply(lease));
                }
                see(seen, &mut relisting, watcher::Event::InitDone);
            }
            Ok(Err(error)) => warn!(%error, "could not list the member Leases"),
            Err(_) => warn!("no answer listing the member Leases"),
        }
    }

    /// Deletes the Leases of members that died (expired as this process saw them), so that a
    /// replica starting later, and `kubectl get leases`, see only live ones. What it saw is a
    /// precondition: a Lease renewed meanwhile stays.
    async fn forget_dead(&self, seen: &HashMap<String, Seen>) {
        let now = Instant::now();
        let own = self.lease_name();
        for (name, known) in seen {
            if *name == own || !expired(known, now) {
                continue;
            }
            let preconditions = Preconditions {
                resource_version: known.lease.resource_version(),
                uid: None,
            };
            let params = DeleteParams::default().preconditions(preconditions);
            match self.api.delete(name, &params).await {
                Ok(_) => info!(lease = %name, "deleted the member Lease of a replica that died"),
                Err(error) => {
                    debug!(lease = %name, %error, "could not delete an expired member Lease")
                }
            }
        }
    }

    /// Writes this replica's Lease, saying `ack`. The Lease is one process's at a time: another
    /// process of the pod (a container restarted in place, a second pod under one name) takes
    /// it only once it went unrenewed for the renew deadline, and every write is conditional
    /// on the version last seen, so of two processes exactly one renews.
    async fn renew(&self, ack: &Ack, seen: &mut HashMap<String, Seen>) -> Result<(), NotRenewed> {
        // `seen` was listed just before: a Lease it lacks is created, and a create of one that
        // exists after all is refused (renewed at the next attempt, as what it is).
        let name = self.lease_name();
        let known = seen.get(&name);
        let holder = known.and_then(|k| k.lease.spec.as_ref()?.holder_identity.clone());
        if let Some(holder) = holder.filter(|h| self.identity.earlier_self(h))
            && known.is_some_and(|k| k.changed_at.elapsed() < self.timings.renew_deadline)
        {
            return Err(NotRenewed::OtherSelf(holder));
        }
        let version = known.and_then(|k| k.lease.resource_version());
        let mut lease = self.lease(ack);
        let written = match version {
            Some(version) => {
                lease.metadata.resource_version = Some(version);
                let params = PatchParams::apply(FIELD_MANAGER).force();
                self.api.patch(&name, &params, &Patch::Apply(&lease)).await
            }
            None => self.api.create(&PostParams::default(), &lease).await,
        };
        let lease = written.map_err(NotRenewed::Failed)?;
        // Its next write is conditional on this one's version.
        let changed_at = Instant::now();
        seen.insert(name, Seen { lease, changed_at });
        Ok(())
    }

    /// This replica's Lease, saying `ack`.
    fn lease(&self, ack: &Ack) -> Lease {
        let mut annotations =
            BTreeMap::from([(EPOCH_ANNOTATION.to_string(), ack.epoch.to_string())]);
        if let Some(ring) = ack.ring {
            annotations.insert(RING_ANNOTATION.to_string(), format!("{ring:016x}"));
        }
        if ack.standby {
            annotations.insert(STANDBY_ANNOTATION.to_string(), "true".to_string());
        }
        Lease {
            metadata: ObjectMeta {
                name: Some(self.lease_name()),
                labels: Some([(MEMBER_OF.to_string(), self.group.clone())].into()),
                annotations: Some(annotations),
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
        }
    }
}

/// Why this process did not renew its member Lease.
enum NotRenewed {
    /// Another process of this pod holds it (the holder named).
    OtherSelf(String),
    Failed(kube::Error),
}

/// Takes in one watch event: a Lease seen changing is seen now; a re-list drops the Leases it
/// did not bring.
fn see(
    seen: &mut HashMap<String, Seen>,
    listing: &mut Option<HashSet<String>>,
    event: watcher::Event<Lease>,
) {
    let mut keep = |lease: Lease| {
        let name = lease.name_any();
        let now = Instant::now();
        match seen.get_mut(&name) {
            Some(known) if known.lease.resource_version() == lease.resource_version() => {}
            Some(known) => {
                known.lease = lease;
                known.changed_at = now;
            }
            None => {
                seen.insert(
                    name.clone(),
                    Seen {
                        lease,
                        changed_at: now,
                    },
                );
            }
        }
        name
    };
    match event {
        watcher::Event::Apply(lease) => {
            keep(lease);
        }
        watcher::Event::Delete(lease) => {
            seen.remove(&lease.name_any());
        }
        watcher::Event::Init => *listing = Some(HashSet::new()),
        watcher::Event::InitApply(lease) => {
            let name = keep(lease);
            listing.get_or_insert_default().insert(name);
        }
        watcher::Event::InitDone => {
            let listed = listing.take().unwrap_or_default();
            seen.retain(|name, _| listed.contains(name));
        }
    }
}

/// Whether a Lease went unchanged for its duration, as this process saw it.
fn expired(known: &Seen, now: Instant) -> bool {
    let spec = known.lease.spec.as_ref();
    let seconds = spec
        .and_then(|spec| spec.lease_duration_seconds)
        .unwrap_or(0);
    let duration = Duration::from_secs(u64::try_from(seconds).unwrap_or(0));
    now.duration_since(known.changed_at) >= duration
}

/// The live members of what was seen, and what they said.
fn live(seen: &HashMap<String, Seen>, renewed: bool, lapses: u64) -> View {
    let now = Instant::now();
    let mut acks: BTreeMap<Arc<str>, Ack> = BTreeMap::new();
    for known in seen.values().filter(|known| !expired(known, now)) {
        let lease = &known.lease;
        let Some(holder) = lease
            .spec
            .as_ref()
            .and_then(|s| s.holder_identity.as_deref())
        else {
            continue;
        };
        let annotation = |key| lease.annotations().get(key).map(String::as_str);
        let ack = Ack {
            ring: annotation(RING_ANNOTATION).and_then(|hex| u64::from_str_radix(hex, 16).ok()),
            epoch: annotation(EPOCH_ANNOTATION)
                .and_then(|e| e.parse().ok())
                .unwrap_or(0),
            standby: annotation(STANDBY_ANNOTATION) == Some("true"),
        };
        acks.insert(Arc::from(pod_name(holder)), ack);
    }
    let staying = acks.iter().filter(|(_, ack)| !ack.standby);
    View {
        ring: Ring::new(staying.map(|(member, _)| member.clone())),
        acks,
        renewed,
        lapses,
    }
}
