//! Lease leader election against the real apiserver: one leader at a time, a released Lease is
//! taken at once, an abandoned one after it expires and always in a higher epoch, and a leader
//! that cannot reach the apiserver stops acting within its renew deadline.

use std::sync::Arc;
use std::time::Duration;

use chronflow::leader::{Elector, Term, Timings};
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
    }
}

/// An elector running in the background, with its published term.
struct Candidate {
    elector: Arc<Elector>,
    term: watch::Receiver<Option<Term>>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Candidate {
    fn start(client: Client, ns: &str, identity: &str) -> Candidate {
        let api: Api<Lease> = Api::namespaced(client, ns);
        let elector = Arc::new(Elector::new(api, LEASE, identity, timings()));
        let (tx, term) = watch::channel(None);
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
        self.term.borrow().clone()
    }

    /// Stops competing (the loop ends; the Lease is left as it is).
    async fn halt(self) -> Option<Term> {
        self.stop.cancel();
        self.task.await.expect("elector task ends cleanly");
        self.term.borrow().clone()
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
    let (tx, term) = watch::channel(stale);
    let stop = CancellationToken::new();
    let woken = tokio::spawn({
        let (elector, stop) = (elector_a, stop.clone());
        async move { elector.run(tx, stop, || {}).await }
    });
    eventually("the woken leader to step down", || async {
        term.borrow().is_none().then_some(())
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
