//! Replicas announce themselves with a Lease each and agree on the ring of shards (issue 32's
//! first steps, `src/members.rs`): against the real apiserver, every member sees the same
//! members and owners, one that dies leaves once its Lease expired (and the others delete it),
//! one that stops leaves at once, and only the leaver's shards move.

use std::time::Duration;

use chronflow::leader::{Identity, Timings};
use chronflow::members::{Ack, MEMBER_OF, Members, View};
use chronflow::shard::{Ring, moves};
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::ListParams;
use kube::{Api, Client};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::support::{eventually, namespace, test_env};

const GROUP: &str = "chronflow-leader";
const LEASE: Duration = Duration::from_secs(4);

struct Member {
    view: watch::Receiver<View>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Member {
    fn start(client: &Client, ns: &str, pod: &str) -> Member {
        let timings = Timings {
            lease_duration: LEASE,
            renew_deadline: Duration::from_secs(3),
            retry_period: Duration::from_millis(200),
            max_clock_skew: Duration::ZERO,
        };
        let members = Members::new(
            Api::namespaced(client.clone(), ns),
            GROUP,
            Identity::new(pod),
            timings,
        );
        let (tx, view) = watch::channel(View::default());
        let stop = CancellationToken::new();
        let task = tokio::spawn({
            let stop = stop.clone();
            // Says nothing: the handshake is `src/handover.rs`'s.
            let (_said, ack) = watch::channel(Ack::default());
            async move { members.run(tx, ack, stop).await }
        });
        Member { view, stop, task }
    }

    fn ring(&self) -> Ring {
        self.view.borrow().ring.clone()
    }

    fn members(&self) -> Vec<String> {
        let ring = self.ring();
        ring.members().iter().map(|m| m.to_string()).collect()
    }
}

async fn all_see(members: &[&Member], expected: &[&str]) {
    eventually(&format!("every member to see {expected:?}"), || async {
        members
            .iter()
            .all(|m| m.members() == expected)
            .then_some(())
    })
    .await;
}

#[tokio::test]
async fn replicas_agree_on_the_ring_and_a_leaver_moves_only_its_own_shards() {
    let client = test_env().client().await;
    let ns = namespace(&client, "members").await;
    let a = Member::start(&client, &ns, "chronflow-a");
    let b = Member::start(&client, &ns, "chronflow-b");
    let c = Member::start(&client, &ns, "chronflow-c");
    all_see(
        &[&a, &b, &c],
        &["chronflow-a", "chronflow-b", "chronflow-c"],
    )
    .await;
    let three = a.ring();
    for other in [&b, &c] {
        assert!(
            moves(&three, &other.ring()).is_empty(),
            "one owner per shard everywhere"
        );
    }
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    let listed = leases
        .list(&ListParams::default().labels(&format!("{MEMBER_OF}={GROUP}")))
        .await
        .unwrap();
    let mut names: Vec<_> = listed
        .items
        .iter()
        .map(|l| l.metadata.name.clone().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "chronflow-leader-chronflow-a",
            "chronflow-leader-chronflow-b",
            "chronflow-leader-chronflow-c"
        ]
    );

    // Killed: nothing deletes its Lease; the others wait for it to expire.
    c.task.abort();
    let killed = Instant::now();
    all_see(&[&a, &b], &["chronflow-a", "chronflow-b"]).await;
    let gone_after = killed.elapsed();
    assert!(
        gone_after >= LEASE - Duration::from_secs(1),
        "left {gone_after:?} after it died: before its Lease expired"
    );
    let two = a.ring();
    let moved = moves(&three, &two);
    assert!(!moved.is_empty());
    assert!(
        moved
            .iter()
            .all(|m| m.from.as_deref() == Some("chronflow-c")),
        "only the dead replica's shards move: {moved:?}"
    );
    // The others delete its expired Lease: a replica starting later does not wait for it.
    eventually("the dead replica's Lease deleted", || async {
        let lease = leases.get_opt("chronflow-leader-chronflow-c").await.ok()?;
        lease.is_none().then_some(())
    })
    .await;

    // Stopped: it deletes its Lease and leaves at once.
    b.stop.cancel();
    let stopped = Instant::now();
    b.task.await.unwrap();
    all_see(&[&a], &["chronflow-a"]).await;
    assert!(
        stopped.elapsed() < LEASE / 2,
        "left {:?} after it stopped",
        stopped.elapsed()
    );
    assert!(
        leases
            .get_opt("chronflow-leader-chronflow-b")
            .await
            .unwrap()
            .is_none()
    );
    a.stop.cancel();
}

/// Two processes of one pod (a container restarted in place while its earlier self still
/// runs, a second pod under one name): one holds the pod's member Lease, and with it the pod's
/// shards; the other waits until the first stopped renewing for the renew deadline. Both used to
/// renew it, each taking the pod's shards (the fault checker saw three runs of a task allowed
/// two, from three terms of one pod).
#[tokio::test]
async fn of_two_processes_of_one_pod_one_holds_its_member_lease_at_a_time() {
    let client = test_env().client().await;
    let ns = namespace(&client, "members-surge").await;
    let renewed = |m: &Member| m.view.borrow().renewed;
    let first = Member::start(&client, &ns, "chronflow-a");
    eventually("the first process to renew", || async {
        renewed(&first).then_some(())
    })
    .await;
    let second = Member::start(&client, &ns, "chronflow-a");
    let until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < until {
        assert!(renewed(&first), "the first process lost its Lease");
        assert!(
            !renewed(&second),
            "two processes of one pod renew its Lease"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The first dies without a word: the second takes the Lease once it went unrenewed.
    first.task.abort();
    let died = Instant::now();
    eventually("the second process to renew", || async {
        renewed(&second).then_some(())
    })
    .await;
    assert!(
        died.elapsed() >= Duration::from_secs(2),
        "taken {:?} after the first died",
        died.elapsed()
    );
    second.stop.cancel();
}

/// The operator runs it: two `chronflow run` replicas list each other in `/stats` and in
/// `kubectl get leases`, and a task's status names the leader; the leader stopped with SIGTERM
/// deletes its Lease on its way out, and the other names itself.
#[tokio::test]
async fn replicas_of_the_operator_list_each_other_and_a_stopped_one_leaves() {
    use crate::failover::{Replica, holder};
    use crate::observability::{free_address, get};
    use crate::operator::{create, status_where};
    use chronflow::ChronTask;

    let client = test_env().client().await;
    let ns = namespace(&client, "members-op").await;
    let dir = tempfile::tempdir().unwrap();
    let redis = &test_env().redis_url;
    let endpoints = [free_address(), free_address()];
    let names = ["m0", "m1"];
    let mut replicas = [0, 1].map(|i| {
        let bind = endpoints[i].to_string();
        let env = [("SCHEDULER__METRICS__BIND", bind.as_str())];
        Replica::start_with(&ns, names[i], redis, &dir, "", &test_env().kubeconfig, &env)
    });
    let members_at = |address| async move {
        let (_, stats) = get(address, "/stats").await?;
        let stats: serde_json::Value = serde_json::from_str(&stats).ok()?;
        Some(stats["members"].clone())
    };
    for address in endpoints {
        eventually("each replica to list both", || async {
            members_at(address)
                .await
                .filter(|m| *m == serde_json::json!(names))
        })
        .await;
    }
    let (_, metrics) = get(endpoints[0], "/metrics").await.unwrap();
    assert!(
        metrics.lines().any(|line| line == "chronflow_members 2"),
        "{metrics}"
    );
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    for name in ["chronflow-leader-m0", "chronflow-leader-m1"] {
        assert!(leases.get_opt(name).await.unwrap().is_some(), "{name}");
    }

    let tasks: Api<ChronTask> = Api::namespaced(client.clone(), &ns);
    let spec = serde_json::json!({
        "schedule": {"interval": "1h"},
        "action": {"http": {"url": "http://127.0.0.1:9/never"}}
    });
    create(&tasks, "named", spec).await;
    let leader = eventually("a leader", || async { holder(&ns).await }).await;
    status_where(&tasks, "named", "the leader's name", |s| {
        s.replica.as_deref() == Some(leader.as_str())
    })
    .await;

    let (stopped, other) = if leader == names[0] { (0, 1) } else { (1, 0) };
    assert!(
        replicas[stopped].terminate().success(),
        "{}",
        replicas[stopped].logs()
    );
    // Deleted on its way out, not left to expire.
    let gone = format!("chronflow-leader-{}", names[stopped]);
    assert!(leases.get_opt(&gone).await.unwrap().is_none());
    eventually("the other to list itself only", || async {
        members_at(endpoints[other])
            .await
            .filter(|m| *m == serde_json::json!([names[other]]))
    })
    .await;
    status_where(&tasks, "named", "the new leader's name", |s| {
        s.replica.as_deref() == Some(names[other])
    })
    .await;
    assert!(
        replicas[other].terminate().success(),
        "{}",
        replicas[other].logs()
    );
}
