//! Lease leader election against the real apiserver: one leader at a time, a released Lease is
//! taken at once, an abandoned one after it expires and always in a higher epoch, and a leader
//! that cannot reach the apiserver stops acting within its renew deadline.

use std::sync::Arc;
use std::time::Duration;

use chronflow::leader::{Elector, Identity, Term, Terms, Timings};
use chronflow::ledger::{Ledger, MemoryLedger};
use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::support::delay_proxy::DelayProxy;
use crate::support::{eventually, namespace, test_env};

const LEASE: &str = "chronflow-leader";

fn timings() -> Timings {
    Timings {
        lease_duration: Duration::from_secs(3),
        renew_deadline: Duration::from_secs(2),
        retry_period: Duration::from_millis(200),
        max_clock_skew: Duration::from_secs(2),
    }
}

/// An elector running in the background, with its published term.
struct Candidate {
    elector: Arc<Elector>,
    term: watch::Receiver<Terms>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Candidate {
    fn start(client: Client, ns: &str, name: &str) -> Candidate {
        let memory = Arc::new(MemoryLedger::new(MemoryLedger::IDLE));
        Candidate::start_with(client, ns, name, memory)
    }

    /// A candidate whose epochs come from `epochs`.
    fn start_with(client: Client, ns: &str, name: &str, epochs: Arc<dyn Ledger>) -> Candidate {
        let api: Api<Lease> = Api::namespaced(client, ns);
        let identity = Identity::new(name);
        let elector = Arc::new(Elector::new(api, LEASE, identity, timings(), epochs));
        let (tx, term) = watch::channel(Terms::default());
        let stop = CancellationToken::new();
        let task = tokio::spawn({
            let (elector, stop) = (elector.clone(), stop.clone());
            async move { elector.run(tx, stop, || {}).await }
        });
        Candidate {
            elector,
            term,
            stop,
            task,
        }
    }

    fn term(&self) -> Option<Term> {
        self.term.borrow().newest().cloned()
    }

    /// Stops competing (the loop ends; the Lease is left as it is).
    async fn halt(self) -> Option<Term> {
        self.stop.cancel();
        self.task.await.expect("elector task ends cleanly");
        self.term.borrow().newest().cloned()
    }
}

async fn leader_of(candidates: &[&Candidate]) -> (usize, Term) {
    eventually("a leader", || async {
        let leading: Vec<(usize, Term)> = candidates
            .iter()
            .enumerate()
            .filter_map(|(i, c)| c.term().map(|t| (i, t)))
            .collect();
        assert!(leading.len() <= 1, "two leaders at once: {leading:?}");
        leading.into_iter().next()
    })
    .await
}

#[tokio::test]
async fn one_candidate_leads_and_a_released_lease_is_taken_at_once_in_a_higher_epoch() {
    let client = test_env().client().await;
    let ns = namespace(&client, "leader-release").await;
    let a = Candidate::start(client.clone(), &ns, "replica-a");
    let b = Candidate::start(client.clone(), &ns, "replica-b");

    let (first, term) = leader_of(&[&a, &b]).await;
    assert_eq!(term.epoch, 1, "a new Lease starts in epoch 1");
    // The standby stays a standby for well over a lease duration.
    for _ in 0..20 {
        let (index, again) = leader_of(&[&a, &b]).await;
        assert_eq!((index, &again), (first, &term));
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    let (leader, standby) = if first == 0 { (a, b) } else { (b, a) };
    let elector = leader.elector.clone();
    leader.halt().await;
    let released = Instant::now();
    elector.release().await.expect("release the lease");
    let next = eventually("the standby to lead", || async { standby.term() }).await;
    let handover = released.elapsed();
    assert_eq!(next.epoch, 2, "{next:?}");
    assert_ne!(next.holder, term.holder);
    assert!(
        handover < Duration::from_secs(2),
        "a released lease is taken within a retry period or so, took {handover:?}"
    );
    standby.halt().await;
}

#[tokio::test]
async fn an_abandoned_lease_is_taken_after_it_expires_and_the_old_leader_steps_down() {
    let client = test_env().client().await;
    let ns = namespace(&client, "leader-expiry").await;
    let a = Candidate::start(client.clone(), &ns, "replica-a");
    let (_, first) = leader_of(&[&a]).await;
    let b = Candidate::start(client.clone(), &ns, "replica-b");

    // `a` stops renewing without releasing, like a crashed or frozen process.
    let elector_a = a.elector.clone();
    let stale = a.halt().await;
    assert_eq!(stale.as_ref(), Some(&first));
    let frozen = Instant::now();
    let second = eventually("the standby to take the expired lease", || async {
        b.term()
    })
    .await;
    let waited = frozen.elapsed();
    assert_eq!(second.epoch, first.epoch + 1);
    assert!(
        waited >= Duration::from_secs(2),
        "the lease was taken before it expired, after {waited:?}"
    );

    // `a` wakes up still believing in its old term; its first round shows it someone else's
    // Lease and it steps down.
    let (tx, term) = watch::channel(stale.map(Terms::all).unwrap_or_default());
    let stop = CancellationToken::new();
    let woken = tokio::spawn({
        let (elector, stop) = (elector_a, stop.clone());
        async move { elector.run(tx, stop, || {}).await }
    });
    eventually("the woken leader to step down", || async {
        term.borrow().is_empty().then_some(())
    })
    .await;
    assert_eq!(b.term(), Some(second));
    stop.cancel();
    woken.await.unwrap();
    b.halt().await;
}

#[tokio::test]
async fn a_leader_cut_off_from_the_apiserver_stops_acting_within_its_renew_deadline() {
    let client = test_env().client().await;
    let ns = namespace(&client, "leader-cutoff").await;
    let (proxy, slow_client) = DelayProxy::in_front_of_apiserver(Duration::ZERO).await;
    let a = Candidate::start(slow_client, &ns, "replica-a");
    let (_, term) = leader_of(&[&a]).await;

    // Every request now hangs far longer than the renew deadline.
    proxy.set_delay(Duration::from_secs(600));
    let cut = Instant::now();
    eventually("the cut-off leader to step down", || async {
        a.term().is_none().then_some(())
    })
    .await;
    let stepped_down = cut.elapsed();
    assert!(
        stepped_down < timings().lease_duration,
        "stepped down after {stepped_down:?}, not before the lease could expire"
    );

    // A standby with a working connection takes over once the lease expires, in a new epoch.
    let b = Candidate::start(client.clone(), &ns, "replica-b");
    let next = eventually("the standby to lead", || async { b.term() }).await;
    assert_eq!(next.epoch, term.epoch + 1);
    a.halt().await;
    b.halt().await;
}

/// Epochs come from the ledger, so they only go up whatever happens to the Lease: deleted after
/// several terms, or a second Lease elsewhere (a reinstall in another namespace, another
/// `lease_name`), never hands out an epoch a term already had. With epochs from
/// `leaseTransitions` the re-created Lease started at 1 again, below what the ledger had seen,
/// and every existing task stayed fenced.
#[tokio::test]
async fn epochs_only_go_up_when_the_lease_is_deleted_or_moved() {
    let client = test_env().client().await;
    let ns = namespace(&client, "leader-epochs").await;
    let redis: Arc<dyn Ledger> = Arc::new(
        chronflow::ledger::RedisLedger::new(&chronflow::ledger::RedisSettings {
            url: test_env().redis_url.clone(),
            cluster: false,
            ca: None,
            wait_replicas: 0,
            max_connections: 2,
            timeout: Duration::from_secs(5),
        })
        .unwrap(),
    );
    let mut seen = Vec::new();
    for round in 0..3 {
        let a = Candidate::start_with(client.clone(), &ns, "replica-a", redis.clone());
        let (_, term) = leader_of(&[&a]).await;
        seen.push(term.epoch);
        let elector = a.elector.clone();
        a.halt().await;
        if round < 2 {
            elector.release().await.unwrap();
        }
    }
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    let lease = leases.get(LEASE).await.unwrap();
    let transitions = lease.spec.unwrap().lease_transitions.unwrap();
    assert_eq!(transitions, 3, "three terms on this Lease");
    let annotation = lease.metadata.annotations.unwrap_or_default();
    assert_eq!(
        annotation.get(chronflow::leader::EPOCH_ANNOTATION),
        Some(&seen[2].to_string()),
        "the Lease shows its term's epoch"
    );
    leases
        .delete(LEASE, &Default::default())
        .await
        .expect("delete the lease");

    let b = Candidate::start_with(client.clone(), &ns, "replica-b", redis.clone());
    let (_, after_delete) = leader_of(&[&b]).await;
    b.halt().await;
    let elsewhere = namespace(&client, "leader-epochs-moved").await;
    let c = Candidate::start_with(client.clone(), &elsewhere, "replica-c", redis.clone());
    let (_, moved) = leader_of(&[&c]).await;
    c.halt().await;
    seen.extend([after_delete.epoch, moved.epoch]);
    assert!(
        seen.windows(2).all(|pair| pair[0] < pair[1]),
        "epochs of successive terms: {seen:?}"
    );
}

/// A container restarted in place keeps its POD_NAME but is another process: it takes the Lease
/// its earlier self held, in a new term, once that went unrenewed for `renew_deadline` (before
/// the lease expires). Two live processes under one name (a surge) never take it from each
/// other: they used to, back and forth, each time in a new term.
#[tokio::test]
async fn a_process_restarted_under_its_pod_name_takes_its_lease_in_a_new_term() {
    let client = test_env().client().await;
    let ns = namespace(&client, "leader-restart").await;
    let before = Candidate::start(client.clone(), &ns, "chronflow-0");
    let (_, old) = leader_of(&[&before]).await;
    // A second live process under the same name: it stays a standby.
    let twin = Candidate::start(client.clone(), &ns, "chronflow-0");
    for _ in 0..20 {
        let (index, again) = leader_of(&[&before, &twin]).await;
        assert_eq!((index, &again), (0, &old), "the twin took the Lease");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    twin.halt().await;
    before.halt().await; // killed: the Lease still names it
    let restarted = Instant::now();
    let after = Candidate::start(client.clone(), &ns, "chronflow-0");
    let (_, new) = leader_of(&[&after]).await;
    assert!(new.epoch > old.epoch, "{old:?} then {new:?}");
    assert_ne!(new.holder, old.holder, "each process is its own holder");
    eprintln!(
        "restart in place: led {:?} after the restart (lease {:?}, renew deadline {:?})",
        restarted.elapsed(),
        timings().lease_duration,
        timings().renew_deadline
    );
    after.halt().await;
}

/// A standby that begins to shut down competes no more: the Lease its leader released goes to
/// another replica, not to the one that is draining (it would lead, idle, until it exits).
#[tokio::test]
async fn a_draining_standby_begins_no_term() {
    let client = test_env().client().await;
    let ns = namespace(&client, "leader-drain").await;
    let a = Candidate::start(client.clone(), &ns, "replica-a");
    let (_, first) = leader_of(&[&a]).await;
    let b = Candidate::start(client.clone(), &ns, "replica-b");
    b.elector.drain();
    // Draining, a leader keeps its term.
    a.elector.drain();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(a.term(), Some(first));

    let elector_a = a.elector.clone();
    a.halt().await;
    elector_a.release().await.expect("release the lease");
    let c = Candidate::start(client.clone(), &ns, "replica-c");
    let next = eventually("the third replica to lead", || async { c.term() }).await;
    assert!(next.holder.starts_with("replica-c"), "{next:?}");
    assert_eq!(b.term(), None, "the draining standby led");
    b.halt().await;
    c.halt().await;
}
