//! Leader election through a `coordination.k8s.io/v1` Lease, as client-go's leaderelection does,
//! with one difference: leadership is a [`Term`], not a bool. Each acquisition takes a new
//! epoch from the run ledger ([`Ledger::next_epoch`]: a Redis counter that only goes up), at
//! least one above what the Lease shows (`leaseTransitions` and the [`EPOCH_ANNOTATION`] of the
//! last term), and writes it into the Lease. The run ledger refuses claims from an older epoch,
//! so a leader that was frozen past its lease and wakes up cannot run anything (fencing, see
//! `docs/operations.md`); and since epochs come from the ledger, deleting the Lease, moving it to
//! another namespace or renaming it never hands out an epoch the ledger has already seen.
//!
//! Written here rather than with `kube-lease-manager`, whose API hands out a bool: the epoch
//! must belong to the very update that won the Lease. Every write is a `replace` carrying the
//! `resourceVersion` read just before, so of two candidates exactly one wins (the loser's epoch
//! is never used).
//!
//! Expiry is judged on the local clock, from when this process last saw the Lease change (as
//! client-go does), never by comparing the holder's timestamps with ours: clocks may disagree.

use std::sync::Arc;
use std::sync::atomic::AtomicI64;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::Api;
use kube::api::PostParams;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::LeaderElectionConfig;
use crate::ledger::Ledger;
use crate::skew::ClockCheck;

pub use crate::run::Term;
pub use crate::shard::Terms;

/// The Lease annotation that carries the current term's epoch: the next candidate starts above
/// it even when the ledger lost its counter (a Redis restarted empty).
pub const EPOCH_ANNOTATION: &str = "chronflow.io/epoch";

/// Timings, in the meaning of client-go's (`lease_duration > renew_deadline > retry_period`).
#[derive(Clone, Debug)]
pub struct Timings {
    /// How long a Lease stays valid without renewal.
    pub lease_duration: Duration,
    /// How long the leader keeps trying to renew before it steps down.
    pub renew_deadline: Duration,
    /// The pause between attempts to acquire or renew.
    pub retry_period: Duration,
    /// The most the local clock may differ from the ledger's for this replica to lead (zero:
    /// no check).
    pub max_clock_skew: Duration,
}

impl From<&LeaderElectionConfig> for Timings {
    fn from(config: &LeaderElectionConfig) -> Self {
        Self {
            lease_duration: config.lease_duration,
            renew_deadline: config.renew_deadline,
            retry_period: config.retry_period,
            max_clock_skew: config.max_clock_skew,
        }
    }
}

/// Competes for one Lease under one identity.
pub struct Elector {
    api: Api<Lease>,
    name: String,
    identity: Identity,
    timings: Timings,
    epochs: Arc<dyn Ledger>,
    clock: ClockCheck,
    draining: CancellationToken,
}

/// This process among the replicas: its pod's name and a nonce drawn at start, so a container
/// restarted in place (same `POD_NAME`) or a second pod under one name is another holder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// `POD_NAME`, or a name made from the process id.
    pub name: String,
    /// Drawn at start.
    pub nonce: String,
}

impl Identity {
    /// `name` with a fresh nonce.
    pub fn new(name: &str) -> Self {
        use std::hash::{BuildHasher, Hasher};
        // std's hasher keys are random per process; the clock and pid make two draws differ
        // even where they are not.
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_i64(chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default());
        hasher.write_u32(std::process::id());
        Self {
            name: name.to_string(),
            nonce: format!("{:08x}", hasher.finish() as u32),
        }
    }

    /// Whether `holder` (a Lease's or a ledger record's) is an earlier process of this pod.
    pub fn earlier_self(&self, holder: &str) -> bool {
        holder
            .rsplit_once('#')
            .is_some_and(|(name, nonce)| name == self.name && nonce != self.nonce)
    }
}

/// The pod name in a holder (`POD_NAME#nonce`, a Lease's or a ledger record's); the whole
/// holder when it carries no nonce.
pub fn pod_name(holder: &str) -> &str {
    holder.rsplit_once('#').map_or(holder, |(pod, _)| pod)
}

impl std::fmt::Display for Identity {
    /// `name#nonce`: the Lease's holder and the ledger's.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}#{}", self.name, self.nonce)
    }
}

/// What this process last saw of the Lease, and when it saw it change.
struct Observed {
    spec: Option<LeaseSpec>,
    changed_at: Instant,
}

impl Elector {
    /// An elector for the Lease `name` of `api`'s namespace, acting as `identity`, whose terms'
    /// epochs come from `epochs`.
    pub fn new(
        api: Api<Lease>,
        name: &str,
        identity: Identity,
        timings: Timings,
        epochs: Arc<dyn Ledger>,
    ) -> Self {
        let clock = ClockCheck::new(epochs.clone(), timings.max_clock_skew);
        Self {
            api,
            name: name.to_string(),
            identity,
            timings,
            epochs,
            clock,
            draining: CancellationToken::new(),
        }
    }

    /// This replica is shutting down: a leader keeps its term (renewing) until [`Elector::run`]
    /// stops, so no standby acts before its runs drained; a standby no longer competes, so it
    /// begins no term it could not act in (it would hold the Lease, idle, until it exits).
    pub fn drain(&self) {
        self.draining.cancel();
    }

    /// The local clock minus the ledger's, in milliseconds, as last measured (0 before).
    pub fn clock_skew(&self) -> Arc<AtomicI64> {
        self.clock.skew()
    }

    /// Competes until `stop` is cancelled, publishing the current term (`None` while another
    /// replica leads or nobody does); `on_first_round` is called once the Lease has been read
    /// (or won) once. Does not release the Lease: call [`Elector::release`] once runs have
    /// drained, so a standby leads only after this replica stopped acting.
    pub async fn run(
        &self,
        term: watch::Sender<Terms>,
        stop: CancellationToken,
        on_first_round: impl FnOnce(),
    ) {
        let mut on_first_round = Some(on_first_round);
        let mut observed: Option<Observed> = None;
        let mut renewed_at: Option<Instant> = None;
        let mut skewed = false;
        loop {
            match self.clock.check().await {
                Err(problem) => {
                    renewed_at = None;
                    let stepped_down = !term.send_replace(Terms::default()).is_empty();
                    if stepped_down || !skewed {
                        warn!(%problem, stepped_down, "clock skew; not leading");
                    }
                    skewed = true;
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(self.timings.retry_period) => continue,
                    }
                }
                Ok(()) if skewed => {
                    info!("this replica's clock agrees with the Redis ledger's again");
                    skewed = false;
                }
                Ok(()) => {}
            }
            let leading = !term.borrow().is_empty();
            if self.draining.is_cancelled() && !leading {
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(self.timings.retry_period) => continue,
                }
            }
            // A hung apiserver must not keep a leader acting past its renew deadline.
            let budget = match renewed_at {
                Some(at) if leading => {
                    (at + self.timings.renew_deadline).saturating_duration_since(Instant::now())
                }
                _ => self.timings.renew_deadline,
            };
            let outcome = if budget.is_zero() {
                // Woken after a freeze (SIGSTOP, a starved node): too late to renew.
                Err("the renew deadline passed before this replica could renew".to_string())
            } else {
                let current = term.borrow().newest().cloned();
                let attempt = self.attempt(&mut observed, current);
                match tokio::time::timeout(budget, attempt).await {
                    Ok(outcome) => outcome,
                    Err(_) => Err(format!(
                        "no answer from the apiserver or the ledger within {budget:?}"
                    )),
                }
            };
            if outcome.is_ok()
                && let Some(first) = on_first_round.take()
            {
                first();
            }
            match outcome {
                Ok(Some(won)) => {
                    renewed_at = Some(Instant::now());
                    if term.borrow().newest() != Some(&won) {
                        info!(holder = %won.holder, epoch = won.epoch, "leading");
                        term.send_replace(Terms::all(won));
                    }
                }
                Ok(None) => {
                    renewed_at = None;
                    if !term.send_replace(Terms::default()).is_empty() {
                        warn!("lost the lease to another replica; stopped firing");
                    }
                }
                Err(error) => {
                    let overdue =
                        renewed_at.is_some_and(|at| at.elapsed() >= self.timings.renew_deadline);
                    if overdue {
                        renewed_at = None;
                        term.send_replace(Terms::default());
                        warn!(%error, "could not renew the lease within renew_deadline; stopped firing");
                    } else {
                        debug!(%error, "lease update failed; retrying");
                    }
                }
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(self.timings.retry_period) => {}
            }
        }
    }

    /// One round: read the Lease, then renew it (if ours), take it (if free or expired), or
    /// stand by. `Ok(Some(term))` when this replica leads afterwards.
    async fn attempt(
        &self,
        observed: &mut Option<Observed>,
        current: Option<Term>,
    ) -> Result<Option<Term>, String> {
        let api_error = |error: kube::Error| error.to_string();
        let Some(lease) = self.api.get_opt(&self.name).await.map_err(api_error)? else {
            let epoch = self.new_epoch(1).await?;
            return self.create(epoch).await.map(Some).map_err(api_error);
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let now = Instant::now();
        if observed
            .as_ref()
            .is_none_or(|seen| seen.spec.as_ref() != Some(&spec))
        {
            *observed = Some(Observed {
                spec: Some(spec.clone()),
                changed_at: now,
            });
        }
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let transitions = spec.lease_transitions.unwrap_or(0).max(0) as u64;
        if let Some(term) = current.filter(|_| holder == self.identity.to_string()) {
            self.write(lease, transitions, None)
                .await
                .map_err(api_error)?;
            return Ok(Some(term));
        }
        let duration = spec
            .lease_duration_seconds
            .map_or(self.timings.lease_duration, |s| {
                Duration::from_secs(s.max(0) as u64)
            });
        let changed_at = observed.as_ref().map_or(now, |seen| seen.changed_at);
        let silent = now.duration_since(changed_at);
        let expired = holder.is_empty() || silent >= duration;
        // A Lease held by this process after it stepped down is taken at once, in a new term.
        // One held by an earlier process of this pod (a container restarted in place) once it
        // went unrenewed for renew_deadline, not a whole lease: by then a holder still alive has
        // stepped down by its own rule, so two live processes under one name never take it from
        // each other (they used to, back and forth, each time in a new term).
        let earlier = self.identity.earlier_self(&holder) && silent >= self.timings.renew_deadline;
        let mine = holder == self.identity.to_string() || earlier;
        if !(expired || mine) {
            return Ok(None);
        }
        let shown = lease
            .metadata
            .annotations
            .as_ref()
            .and_then(|annotations| annotations.get(EPOCH_ANNOTATION))
            .and_then(|epoch| epoch.parse::<u64>().ok())
            .unwrap_or(0);
        let epoch = self.new_epoch(shown.max(transitions) + 1).await?;
        self.write(lease, transitions + 1, Some(epoch))
            .await
            .map_err(api_error)?;
        Ok(Some(self.term(epoch)))
    }

    /// A new term's epoch, from the ledger.
    async fn new_epoch(&self, floor: u64) -> Result<u64, String> {
        self.epochs
            .next_epoch(floor)
            .await
            .map_err(|error| format!("cannot draw a new epoch from the ledger: {error}"))
    }

    fn term(&self, epoch: u64) -> Term {
        Term {
            holder: Arc::from(self.identity.to_string()),
            epoch,
        }
    }

    /// Creates the Lease held by this replica, in `epoch`.
    async fn create(&self, epoch: u64) -> Result<Term, kube::Error> {
        let mut lease = Lease {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                ..ObjectMeta::default()
            },
            spec: Some(self.spec(1, None)),
        };
        annotate(&mut lease, epoch);
        self.api.create(&PostParams::default(), &lease).await?;
        Ok(self.term(epoch))
    }

    /// Replaces the Lease (guarded by its resourceVersion) with this replica as holder:
    /// acquired in a new term when `acquired` has its epoch, else renewed.
    async fn write(
        &self,
        mut lease: Lease,
        transitions: u64,
        acquired: Option<u64>,
    ) -> Result<(), kube::Error> {
        let since = match acquired {
            Some(epoch) => {
                annotate(&mut lease, epoch);
                None
            }
            None => lease
                .spec
                .as_ref()
                .and_then(|spec| spec.acquire_time.clone()),
        };
        lease.spec = Some(self.spec(transitions, since));
        self.api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
            .map(|_| ())
    }

    fn spec(&self, transitions: u64, acquired: Option<MicroTime>) -> LeaseSpec {
        let now = MicroTime(k8s_openapi::jiff::Timestamp::now());
        LeaseSpec {
            holder_identity: Some(self.identity.to_string()),
            lease_duration_seconds: Some(self.timings.lease_duration.as_secs().max(1) as i32),
            acquire_time: Some(acquired.unwrap_or_else(|| now.clone())),
            renew_time: Some(now),
            lease_transitions: Some(i32::try_from(transitions).unwrap_or(i32::MAX)),
            ..LeaseSpec::default()
        }
    }

    /// Gives the Lease up, if this replica still holds it, so a standby leads at once: the
    /// holder is cleared and the epoch kept (the next leader raises it).
    pub async fn release(&self) -> Result<(), kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            return Ok(());
        };
        let Some(spec) = lease.spec.as_mut() else {
            return Ok(());
        };
        if spec.holder_identity.as_deref() != Some(self.identity.to_string().as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.renew_time = Some(MicroTime(k8s_openapi::jiff::Timestamp::now()));
        self.api
            .replace(&self.name, &PostParams::default(), &lease)
            .await?;
        info!("released the lease");
        Ok(())
    }
}

/// Writes the term's epoch into the Lease, for the next candidate and for whoever reads it.
fn annotate(lease: &mut Lease, epoch: u64) {
    lease
        .metadata
        .annotations
        .get_or_insert_default()
        .insert(EPOCH_ANNOTATION.to_string(), epoch.to_string());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_identity_knows_its_earlier_processes_and_no_one_else() {
        let me = Identity::new("chronflow-0");
        let again = Identity::new("chronflow-0");
        assert_ne!(me.nonce, again.nonce, "each start draws a nonce");
        assert!(again.earlier_self(&me.to_string()));
        assert!(!me.earlier_self(&me.to_string()), "not itself");
        assert!(!me.earlier_self(&Identity::new("chronflow-1").to_string()));
        assert!(!me.earlier_self("chronflow-0"), "a holder without a nonce");
        assert!(!me.earlier_self(""));
        assert_eq!(pod_name(&me.to_string()), "chronflow-0");
        assert_eq!(
            pod_name("chronflow-0"),
            "chronflow-0",
            "a holder without a nonce"
        );
    }
}
