//! Leader election through a `coordination.k8s.io/v1` Lease, as client-go's leaderelection does,
//! with one difference: leadership is a [`Term`], not a bool. Each acquisition raises the
//! Lease's `leaseTransitions`, and that number is the term's epoch: the run ledger refuses
//! claims from an older epoch, so a leader that was frozen past its lease and wakes up cannot
//! run anything (fencing, see `docs/operations.md`).
//!
//! Written here rather than with `kube-lease-manager`, whose API hands out a bool: the epoch
//! must come from the very update that won the Lease. Every write is a `replace` carrying the
//! `resourceVersion` read just before, so of two candidates exactly one wins.
//!
//! Expiry is judged on the local clock, from when this process last saw the Lease change (as
//! client-go does), never by comparing the holder's timestamps with ours: clocks may disagree.

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

pub use crate::run::Term;

/// Timings, in the meaning of client-go's (`lease_duration > renew_deadline > retry_period`).
#[derive(Clone, Debug)]
pub struct Timings {
    /// How long a Lease stays valid without renewal.
    pub lease_duration: Duration,
    /// How long the leader keeps trying to renew before it steps down.
    pub renew_deadline: Duration,
    /// The pause between attempts to acquire or renew.
    pub retry_period: Duration,
}

impl From<&LeaderElectionConfig> for Timings {
    fn from(config: &LeaderElectionConfig) -> Self {
        Self {
            lease_duration: config.lease_duration,
            renew_deadline: config.renew_deadline,
            retry_period: config.retry_period,
        }
    }
}

/// Competes for one Lease under one identity.
pub struct Elector {
    api: Api<Lease>,
    name: String,
    identity: String,
    timings: Timings,
}

/// What this process last saw of the Lease, and when it saw it change.
struct Observed {
    spec: Option<LeaseSpec>,
    changed_at: Instant,
}

impl Elector {
    /// An elector for the Lease `name` of `api`'s namespace, acting as `identity`.
    pub fn new(api: Api<Lease>, name: &str, identity: &str, timings: Timings) -> Self {
        Self {
            api,
            name: name.to_string(),
            identity: identity.to_string(),
            timings,
        }
    }

    /// Competes until `stop` is cancelled, publishing the current term (`None` while another
    /// replica leads or nobody does); `on_first_round` is called once the Lease has been read
    /// (or won) once. Does not release the Lease: call [`Elector::release`] once runs have
    /// drained, so a standby leads only after this replica stopped acting.
    pub async fn run(
        &self,
        term: watch::Sender<Option<Term>>,
        stop: CancellationToken,
        on_first_round: impl FnOnce(),
    ) {
        let mut on_first_round = Some(on_first_round);
        let mut observed: Option<Observed> = None;
        let mut renewed_at: Option<Instant> = None;
        loop {
            let leading = term.borrow().is_some();
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
                let attempt = tokio::time::timeout(budget, self.attempt(&mut observed, leading));
                match attempt.await {
                    Ok(outcome) => outcome.map_err(|error| error.to_string()),
                    Err(_) => Err(format!("no answer from the apiserver within {budget:?}")),
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
                    if term.borrow().as_ref() != Some(&won) {
                        info!(holder = %won.holder, epoch = won.epoch, "leading");
                        term.send_replace(Some(won));
                    }
                }
                Ok(None) => {
                    renewed_at = None;
                    if term.send_replace(None).is_some() {
                        warn!("lost the lease to another replica; stopped firing");
                    }
                }
                Err(error) => {
                    let overdue =
                        renewed_at.is_some_and(|at| at.elapsed() >= self.timings.renew_deadline);
                    if overdue {
                        renewed_at = None;
                        term.send_replace(None);
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
        leading: bool,
    ) -> Result<Option<Term>, kube::Error> {
        let Some(lease) = self.api.get_opt(&self.name).await? else {
            return self.create().await.map(Some);
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
        let held_by_me = holder == self.identity;
        if held_by_me && leading {
            self.write(lease, transitions, false).await?;
            return Ok(Some(self.term(transitions)));
        }
        let duration = spec
            .lease_duration_seconds
            .map_or(self.timings.lease_duration, |s| {
                Duration::from_secs(s.max(0) as u64)
            });
        let changed_at = observed.as_ref().map_or(now, |seen| seen.changed_at);
        let expired = holder.is_empty() || now.duration_since(changed_at) >= duration;
        // A Lease naming this identity that this process does not hold is a previous life's
        // (a restart under the same POD_NAME): take it over at once, in a new term.
        if !(expired || held_by_me) {
            return Ok(None);
        }
        let epoch = transitions + 1;
        self.write(lease, epoch, true).await?;
        Ok(Some(self.term(epoch)))
    }

    fn term(&self, epoch: u64) -> Term {
        Term {
            holder: self.identity.clone(),
            epoch,
        }
    }

    /// Creates the Lease held by this replica, in epoch 1.
    async fn create(&self) -> Result<Term, kube::Error> {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                ..ObjectMeta::default()
            },
            spec: Some(self.spec(1, None)),
        };
        self.api.create(&PostParams::default(), &lease).await?;
        Ok(self.term(1))
    }

    /// Replaces the Lease (guarded by its resourceVersion) with this replica as holder.
    async fn write(&self, mut lease: Lease, epoch: u64, acquire: bool) -> Result<(), kube::Error> {
        let acquired = if acquire {
            None
        } else {
            lease
                .spec
                .as_ref()
                .and_then(|spec| spec.acquire_time.clone())
        };
        lease.spec = Some(self.spec(epoch, acquired));
        self.api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
            .map(|_| ())
    }

    fn spec(&self, epoch: u64, acquired: Option<MicroTime>) -> LeaseSpec {
        let now = MicroTime(k8s_openapi::jiff::Timestamp::now());
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.timings.lease_duration.as_secs().max(1) as i32),
            acquire_time: Some(acquired.unwrap_or_else(|| now.clone())),
            renew_time: Some(now),
            lease_transitions: Some(i32::try_from(epoch).unwrap_or(i32::MAX)),
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
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
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
