//! Which shards this replica runs, and from when (`docs/architecture.md`, "Shards"): the
//! handshake by which a shard moves between replicas with neither a gap nor a double.
//!
//! Every replica acts on the ring of the live members it sees (`src/members.rs`). On a new ring
//! it first lets go of the shards the ring gives to others (the engine stops claiming their
//! tasks at once; runs in flight finish under the take-over rules), then says in its Lease that
//! it acts on that ring. A shard the ring gives it is taken only once every other live member
//! said the same: none of them runs it any more. A replica that died leaves the ring once its
//! Lease expired; one that stops, or whose clock is off, stands by: it leaves the ring at once
//! and lets go of its shards as soon as the others are ready to take them.
//!
//! The shards taken together get one new term, whose epoch comes from the run ledger
//! ([`Ledger::next_epoch`], above every epoch a member announced), so a replica that lost its
//! shards while frozen and still claims is fenced by the ledger, as a stale leader is.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::leader::Identity;
use crate::ledger::Ledger;
use crate::members::{Ack, View};
use crate::run::Term;
use crate::shard::{Shard, Terms};
use crate::skew::ClockCheck;

/// How long a replica stands by before it lets its shards go, at most (a retry period if
/// shorter).
pub const STANDBY_GRACE: Duration = Duration::from_millis(500);

/// This replica's side of the handshake.
pub struct Handover {
    identity: Identity,
    epochs: Arc<dyn Ledger>,
    clock: ClockCheck,
    /// How often the clock is checked, and the pause before an epoch the ledger could not give
    /// is asked again.
    retry: Duration,
}

/// What a handover did, for `/stats` and metrics.
#[derive(Clone, Debug, Default)]
pub struct Handovers {
    /// Shards taken since start.
    pub taken: u64,
    /// Shards let go since start.
    pub released: u64,
    /// From the ring's change to the shards taken, the last time shards were taken.
    pub last_duration: Option<Duration>,
}

/// What the handshake decides: the shards held (and their terms), what this replica's Lease
/// says, and the tally of handovers.
struct Outputs {
    terms: watch::Sender<Terms>,
    ack: watch::Sender<Ack>,
    handovers: watch::Sender<Handovers>,
}

impl Outputs {
    /// Holds only `kept`; returns how many shards it let go.
    fn keep_only(&self, kept: Vec<(Shard, Term)>) -> usize {
        let released = self.terms.borrow().held() - kept.len();
        if released > 0 {
            self.terms.send_replace(Terms::of_shards(kept));
            self.handovers
                .send_modify(|h| h.released += released as u64);
        }
        released
    }

    /// Says this replica acts on the ring `id`.
    fn acknowledge(&self, id: u64) {
        self.ack
            .send_if_modified(|ack| ack.ring.replace(id) != Some(id));
    }
}

impl Handover {
    /// The handshake of `identity`, drawing epochs from `epochs` and standing by while `clock`
    /// finds this replica's clock off; `retry` is how often the clock is checked and the pause
    /// before the ledger is asked again.
    pub fn new(
        identity: Identity,
        epochs: Arc<dyn Ledger>,
        clock: ClockCheck,
        retry: Duration,
    ) -> Self {
        Self {
            identity,
            epochs,
            clock,
            retry,
        }
    }

    /// Follows `view` into `terms` (the shards held and their terms) and `ack` (what this
    /// replica's Lease says) until `stop`. From `leave` on, it stands by: it takes no shard and
    /// lets go of its shards once the members that stay all act on the ring without it, so that
    /// they take them over at once; with no member staying it keeps them until `stop` (its runs
    /// drain and its last statuses are written, as one leader's would be). While its clock is
    /// off it stands by too, and lets go at once: it must run nothing.
    pub async fn run(
        &self,
        mut view: watch::Receiver<View>,
        terms: watch::Sender<Terms>,
        ack: watch::Sender<Ack>,
        handovers: watch::Sender<Handovers>,
        (leave, stop): (CancellationToken, CancellationToken),
    ) {
        let out = Outputs {
            terms,
            ack,
            handovers,
        };
        // When the ring last changed: a handover's duration counts from there.
        let mut ring_since = (0, Instant::now());
        // Checked before anything is taken: a replica whose clock is off must run nothing.
        let (mut lapses, mut leaving, mut skewed) = (0, false, self.skewed(false).await);
        let mut standing_since = None;
        let mut clock = tokio::time::interval_at(Instant::now() + self.retry, self.retry);
        clock.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let now = view.borrow_and_update().clone();
            if now.lapses != lapses {
                lapses = now.lapses;
                let released = out.keep_only(Vec::new());
                if released > 0 {
                    warn!(
                        released,
                        "this replica's member Lease lapsed (frozen, or the apiserver out of reach); stopped firing"
                    );
                }
            }
            if now.ring.id() != ring_since.0 {
                ring_since = (now.ring.id(), Instant::now());
            }
            let standby = leaving || skewed;
            out.ack
                .send_if_modified(|ack| std::mem::replace(&mut ack.standby, standby) != standby);
            if !standby {
                standing_since = None;
            }
            let pending = match standby {
                false => self.step(&now, &out, ring_since.1).await,
                true if skewed => self.step_standing_by(&now, &out, None),
                true => {
                    let since = *standing_since.get_or_insert_with(Instant::now);
                    self.step_standing_by(&now, &out, Some(since))
                }
            };
            // Standing by, it waits a grace at most; else an epoch the ledger could not give.
            let pause = match standby {
                true => STANDBY_GRACE.min(self.retry),
                false => self.retry,
            };
            tokio::select! {
                biased;
                () = stop.cancelled() => break,
                () = leave.cancelled(), if !leaving => {
                    leaving = true;
                    info!("leaving: the shards go to the other replicas once they are ready");
                }
                _ = clock.tick() => skewed = self.skewed(skewed).await,
                changed = view.changed() => if changed.is_err() {
                    break;
                },
                () = tokio::time::sleep(pause), if pending => {}
            }
        }
        // What it holds at `stop` it keeps: the last statuses are being written in its terms.
    }

    /// Whether this replica's clock is off now; `was`, the last judgement, stands while the
    /// ledger cannot answer.
    async fn skewed(&self, was: bool) -> bool {
        match tokio::time::timeout(self.retry, self.clock.check()).await {
            Ok(Err(problem)) => {
                if !was {
                    warn!(%problem, "clock skew; standing by");
                }
                true
            }
            Err(_) => was,
            Ok(Ok(())) => {
                if was {
                    info!("this replica's clock agrees with the Redis ledger's again");
                }
                false
            }
        }
    }

    /// Acts on one view; `true` when shards wait for an epoch the ledger could not give.
    async fn step(&self, view: &View, out: &Outputs, ring_since: Instant) -> bool {
        if !view.renewed {
            let released = out.keep_only(Vec::new());
            if released > 0 {
                warn!(
                    released,
                    "could not renew this replica's member Lease within renew_deadline; stopped firing"
                );
            }
            out.ack.send_if_modified(|ack| ack.ring.take().is_some());
            return false;
        }
        let ring = &view.ring;
        let mine = ring.shards_of(&self.identity.name);
        let held = out.terms.borrow().clone();
        let kept: Vec<(Shard, Term)> = mine
            .iter()
            .filter_map(|shard| Some((*shard, held.shard(*shard)?.clone())))
            .collect();
        let kept_count = kept.len();
        let released = out.keep_only(kept);
        if released > 0 {
            info!(
                released,
                kept = kept_count,
                "the ring gives shards to other replicas: stopped firing them"
            );
        }
        let id = ring.id();
        out.acknowledge(id);
        if kept_count == mine.len() {
            return false;
        }
        // Every other live member, leaving or not, must act on this ring: none runs a shard
        // this one takes.
        let me = &*self.identity.name;
        let waiting: Vec<&str> = view
            .acks
            .iter()
            .filter(|(member, ack)| ***member != *me && ack.ring != Some(id))
            .map(|(member, _)| &**member)
            .collect();
        if !waiting.is_empty() {
            debug!(
                ?waiting,
                "waiting for the other replicas to let go of their shards"
            );
            return false;
        }
        // Above every epoch a member (this one too) holds, even if the ledger lost its counter.
        let announced = view.acks.values().map(|ack| ack.epoch).max().unwrap_or(0);
        let floor = announced.max(out.ack.borrow().epoch) + 1;
        let epoch = match self.epochs.next_epoch(floor).await {
            Ok(epoch) => epoch,
            Err(error) => {
                warn!(%error, "cannot draw an epoch for the shards this replica takes; retrying");
                return true;
            }
        };
        let term = Term {
            holder: Arc::from(self.identity.to_string()),
            epoch,
        };
        let taken = mine.len() - kept_count;
        info!(taken, epoch, "took shards");
        let all = mine.into_iter().map(|shard| match held.shard(shard) {
            Some(kept) => (shard, kept.clone()),
            None => (shard, term.clone()),
        });
        out.terms.send_replace(Terms::of_shards(all));
        out.ack.send_modify(|ack| ack.epoch = ack.epoch.max(epoch));
        out.handovers.send_modify(|h| {
            h.taken += taken as u64;
            h.last_duration = Some(ring_since.elapsed());
        });
        false
    }

    /// Acts on one view while standing by (`since` then; `None`: let go at once): lets every
    /// shard go once the members on the ring all act on the ring without this one, and it stood
    /// by for a moment ([`STANDBY_GRACE`], a retry period at most: replicas stopped together,
    /// scaled to zero, all stand by before any lets go, and each keeps its shards); keeps them
    /// while no member is on the ring. `true` while the moment lasts.
    fn step_standing_by(&self, view: &View, out: &Outputs, since: Option<Instant>) -> bool {
        let grace = STANDBY_GRACE.min(self.retry);
        let waiting = since.is_some_and(|since| since.elapsed() < grace);
        let ring = &view.ring;
        let id = ring.id();
        let staying = ring.members();
        // Its own Lease says it is leaving once the ring leaves it out.
        let ready = !staying.is_empty()
            && !staying.iter().any(|member| **member == *self.identity.name)
            && staying.iter().all(|member| {
                view.acks
                    .get(member)
                    .is_some_and(|ack| ack.ring == Some(id))
            });
        if (ready && !waiting) || since.is_none() || out.terms.borrow().is_empty() {
            let released = out.keep_only(Vec::new());
            if released > 0 {
                info!(released, "standing by: let go of every shard");
            }
            out.acknowledge(id);
        }
        waiting
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::ledger::MemoryLedger;
    use crate::shard::{Ring, SHARDS};

    /// One replica's handshake, fed views by the test.
    struct Replica {
        view: watch::Sender<View>,
        terms: watch::Receiver<Terms>,
        ack: watch::Receiver<Ack>,
        leave: CancellationToken,
        stop: CancellationToken,
        task: tokio::task::JoinHandle<()>,
    }

    impl Replica {
        fn start(name: &str) -> Replica {
            let ledger = Arc::new(MemoryLedger::new(MemoryLedger::IDLE));
            let clock = ClockCheck::new(ledger.clone(), Duration::ZERO);
            let handover =
                Handover::new(Identity::new(name), ledger, clock, Duration::from_secs(1));
            let (view, views) = watch::channel(View::default());
            let (terms_tx, terms) = watch::channel(Terms::default());
            let (ack_tx, ack) = watch::channel(Ack::default());
            let (handovers, _) = watch::channel(Handovers::default());
            let (leave, stop) = (CancellationToken::new(), CancellationToken::new());
            let task = tokio::spawn({
                let stopping = (leave.clone(), stop.clone());
                async move {
                    handover
                        .run(views, terms_tx, ack_tx, handovers, stopping)
                        .await
                }
            });
            Replica {
                view,
                terms,
                ack,
                leave,
                stop,
                task,
            }
        }

        /// Shows it `members`, which said `acks`, and waits until it acted on them.
        async fn sees(&mut self, members: &[&str], acks: &[(&str, Ack)]) -> Terms {
            let acks: BTreeMap<Arc<str>, Ack> = acks
                .iter()
                .map(|(member, ack)| (Arc::from(*member), ack.clone()))
                .collect();
            let ring = Ring::new(members);
            let id = ring.id();
            let lapses = self.view.borrow().lapses;
            self.view.send_replace(View {
                ring,
                acks,
                renewed: true,
                lapses,
            });
            self.ack.wait_for(|ack| ack.ring == Some(id)).await.unwrap();
            tokio::task::yield_now().await;
            self.terms.borrow().clone()
        }
    }

    fn acked(members: &[&str], epoch: u64) -> Ack {
        Ack {
            ring: Some(Ring::new(members).id()),
            epoch,
            standby: false,
        }
    }

    #[tokio::test]
    async fn alone_a_replica_takes_every_shard_in_one_new_term() {
        let mut a = Replica::start("a");
        let terms = a.sees(&["a"], &[("a", Ack::default())]).await;
        assert_eq!(terms.held(), SHARDS);
        let term = terms.newest().unwrap().clone();
        assert!(Shard::all().all(|shard| terms.shard(shard) == Some(&term)));
        assert_eq!(a.ack.borrow().epoch, term.epoch);
    }

    #[tokio::test]
    async fn a_joining_replica_takes_its_shards_only_once_the_others_let_go() {
        let mut b = Replica::start("b");
        // `a` still acts on the ring it was alone on: it may run any shard.
        let old = acked(&["a"], 7);
        let terms = b
            .sees(&["a", "b"], &[("a", old), ("b", Ack::default())])
            .await;
        assert!(terms.is_empty(), "took shards `a` may still run");
        // `a` acted on the new ring: `b` takes its share, above every epoch announced.
        let new = acked(&["a", "b"], 7);
        let mut terms = b.terms.clone();
        b.view.send_modify(|view| {
            view.acks.insert("a".into(), new);
        });
        let terms = terms
            .wait_for(|terms| !terms.is_empty())
            .await
            .unwrap()
            .clone();
        let ring = Ring::new(["a", "b"]);
        assert_eq!(terms.held(), ring.shards_of("b").len());
        assert!(
            ring.shards_of("b")
                .iter()
                .all(|s| terms.shard(*s).is_some())
        );
        assert!(terms.newest().unwrap().epoch > 7);
    }

    #[tokio::test]
    async fn a_replica_lets_go_of_the_shards_the_ring_gives_others_before_it_says_so() {
        let mut a = Replica::start("a");
        let alone = a.sees(&["a"], &[("a", Ack::default())]).await;
        let term = alone.newest().unwrap().clone();
        // `b` joined and has not acted on anything yet: `a` keeps its own share, in its term.
        let terms = a.sees(&["a", "b"], &[("b", Ack::default())]).await;
        let ring = Ring::new(["a", "b"]);
        assert_eq!(terms.held(), ring.shards_of("a").len());
        assert!(
            ring.shards_of("a")
                .iter()
                .all(|s| terms.shard(*s) == Some(&term))
        );
        // `b` died: its shards come back to `a` once `a` acted on the ring without it.
        let said = a.ack.borrow().clone();
        a.sees(&["a"], &[("a", said)]).await;
        let back = a
            .terms
            .wait_for(|t| t.held() == SHARDS)
            .await
            .unwrap()
            .clone();
        assert!(back.newest().unwrap().epoch > term.epoch);
        assert!(
            ring.shards_of("a")
                .iter()
                .all(|s| back.shard(*s) == Some(&term))
        );
    }

    #[tokio::test]
    async fn a_replica_that_cannot_renew_runs_nothing() {
        let mut a = Replica::start("a");
        a.sees(&["a"], &[("a", Ack::default())]).await;
        a.view.send_modify(|view| view.renewed = false);
        let mut terms = a.terms.clone();
        terms.wait_for(Terms::is_empty).await.unwrap();
        assert_eq!(a.ack.borrow().ring, None);
    }

    #[tokio::test]
    async fn a_leaving_replica_lets_go_once_the_others_act_on_the_ring_without_it() {
        let mut b = Replica::start("b");
        let both = acked(&["b", "c"], 1);
        b.sees(&["b", "c"], &[("c", both.clone())]).await;
        let held = b.terms.borrow().held();
        assert!(held > 0);
        b.leave.cancel();
        let mut ack = b.ack.clone();
        ack.wait_for(|ack| ack.standby).await.unwrap();
        // Its Lease says so; `c` has not acted on the ring without it yet: it keeps its shards.
        let leaving = Ack {
            standby: true,
            ..both.clone()
        };
        b.view.send_replace(View {
            ring: Ring::new(["c"]),
            acks: [("b".into(), leaving.clone()), ("c".into(), both)].into(),
            renewed: true,
            lapses: 0,
        });
        tokio::task::yield_now().await;
        assert_eq!(b.terms.borrow().held(), held);
        // `c` acts on it: `b` lets go, then says it acts on it too (`c` takes the shards then).
        b.view.send_modify(|view| {
            view.acks.insert("c".into(), acked(&["c"], 1));
        });
        let mut terms = b.terms.clone();
        terms.wait_for(Terms::is_empty).await.unwrap();
        ack.wait_for(|ack| ack.ring == Some(Ring::new(["c"]).id()))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn a_replica_whose_lease_lapsed_takes_its_shards_again_in_a_new_term() {
        // Frozen past its renew deadline, it renewed on waking before anything else ran: the
        // others may have taken its shards meanwhile, so it must not go on in its old term
        // (the ledger would fence every claim of it, for good).
        let mut a = Replica::start("a");
        let before = a.sees(&["a"], &[("a", Ack::default())]).await;
        let old = before.newest().unwrap().epoch;
        let mut terms = a.terms.clone();
        a.view.send_modify(|view| view.lapses += 1);
        let after = terms
            .wait_for(|t| t.held() == SHARDS && t.newest().unwrap().epoch > old)
            .await
            .unwrap()
            .clone();
        assert!(Shard::all().all(|s| after.shard(s) == after.newest()));
    }

    #[tokio::test(start_paused = true)]
    async fn replicas_stopped_together_each_keep_their_shards() {
        let mut b = Replica::start("b");
        let both = acked(&["b", "c"], 1);
        b.sees(&["b", "c"], &[("c", both.clone())]).await;
        let held = b.terms.borrow().held();
        b.leave.cancel();
        let mut ack = b.ack.clone();
        let said = ack.wait_for(|ack| ack.standby).await.unwrap().clone();
        // `c` acts on the ring without `b` before its own SIGTERM shows...
        b.view.send_replace(View {
            ring: Ring::new(["c"]),
            acks: [("b".into(), said.clone()), ("c".into(), acked(&["c"], 1))].into(),
            renewed: true,
            lapses: 0,
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        // ...then stands by too, within the grace: nobody is left to take `b`'s shards.
        let standing = Ack {
            standby: true,
            ..acked(&["c"], 1)
        };
        b.view.send_replace(View {
            ring: Ring::default(),
            acks: [("b".into(), said), ("c".into(), standing)].into(),
            renewed: true,
            lapses: 0,
        });
        tokio::time::sleep(STANDBY_GRACE * 2).await;
        assert_eq!(
            b.terms.borrow().held(),
            held,
            "let go with nobody to take them"
        );
    }

    #[tokio::test]
    async fn the_last_replica_keeps_its_shards_until_it_stopped() {
        let mut a = Replica::start("a");
        a.sees(&["a"], &[("a", Ack::default())]).await;
        a.leave.cancel();
        let mut ack = a.ack.clone();
        let said = ack.wait_for(|ack| ack.standby).await.unwrap().clone();
        // Its Lease says it is leaving: no member stays.
        a.view.send_replace(View {
            ring: Ring::default(),
            acks: [("a".into(), said)].into(),
            renewed: true,
            lapses: 0,
        });
        tokio::task::yield_now().await;
        assert_eq!(a.terms.borrow().held(), SHARDS, "no one to take them");
        // Stopping, it keeps them: its last statuses are written in their terms.
        a.stop.cancel();
        a.task.await.unwrap();
        assert_eq!(a.terms.borrow().held(), SHARDS);
    }
}
