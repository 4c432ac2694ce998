//! Sharding with real processes (issue 32, `src/handover.rs`): `chronflow run` replicas with
//! `leader_election.sharding` split the tasks between them over a real redis-server, on the
//! real apiserver; a loopback receiver records every Idempotency-Key. One replica is killed
//! (-9), one joins, one is stopped (SIGTERM): each task runs every instant once, on one replica
//! at a time, and a stopped replica's tasks run on time elsewhere.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::failover::{Replica, assert_counted_once, every_second, instants, more_calls};
use crate::observability::{free_address, get};
use crate::operator::{setup, status_where};
use crate::support::eventually;
use crate::support::receiver::{Behavior, Hit, Receiver};
use crate::support::test_env;

/// Enough tasks that each of three replicas runs some (each misses all 40 with odds 3·(2/3)^40).
const TASKS: usize = 40;

/// The lease settings `docs/operations.md` gives for failover within 3 s (with a 250 ms retry
/// period, `failover::Replica`'s).
const LEASE_DURATION: Duration = Duration::from_secs(2);

/// A sharded replica, with the address of its `/stats`.
struct Sharded {
    replica: Replica,
    stats: SocketAddr,
}

impl Sharded {
    fn start(ns: &str, name: &str, dir: &tempfile::TempDir) -> Sharded {
        Sharded::start_with(ns, name, dir, &[])
    }

    /// With `env` set too.
    fn start_with(ns: &str, name: &str, dir: &tempfile::TempDir, env: &[(&str, &str)]) -> Sharded {
        let stats = free_address();
        let bind = stats.to_string();
        let mut all = vec![
            ("SCHEDULER__METRICS__BIND", bind.as_str()),
            ("SCHEDULER__LEADER_ELECTION__SHARDING", "true"),
            ("SCHEDULER__LEADER_ELECTION__LEASE_DURATION", "2s"),
            ("SCHEDULER__LEADER_ELECTION__RENEW_DEADLINE", "1500ms"),
        ];
        all.extend_from_slice(env);
        let (redis, kubeconfig) = (&test_env().redis_url, &test_env().kubeconfig);
        let replica = Replica::start_with(ns, name, redis, dir, "", kubeconfig, &all);
        Sharded { replica, stats }
    }

    /// How many shards it holds, from its `/stats`.
    async fn shards(&self) -> Option<u64> {
        self.stat("shards").await
    }

    /// A number of its `/stats`.
    async fn stat(&self, key: &str) -> Option<u64> {
        let (_, body) = get(self.stats, "/stats").await?;
        let stats: serde_json::Value = serde_json::from_str(&body).ok()?;
        stats[key].as_u64()
    }
}

/// Waits until the replicas hold every shard between them, each some.
async fn split(replicas: &[&Sharded]) -> Vec<u64> {
    eventually("the replicas to split the 256 shards", || async {
        let mut held = Vec::new();
        for replica in replicas {
            held.push(replica.shards().await?);
        }
        let whole = held.iter().sum::<u64>() == 256 && held.iter().all(|n| *n > 0);
        whole.then_some(held)
    })
    .await
}

/// The first run of `task` for an instant after `after`: when it arrived.
fn first_after(hits: &[Hit], ns: &str, task: &str, after: DateTime<Utc>) -> Option<Hit> {
    let prefix = format!("{ns}/{task}@");
    hits.iter()
        .filter(|h| h.idempotency_key.starts_with(&prefix) && h.scheduled > after)
        .min_by_key(|h| h.arrived)
        .cloned()
}

/// The most a run of the tasks in `tasks` for an instant in `from..=to` arrived after its
/// instant.
fn latest_arrival(
    hits: &[Hit],
    ns: &str,
    tasks: &BTreeSet<String>,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Duration {
    hits.iter()
        .filter(|h| h.scheduled >= from && h.scheduled <= to)
        .filter(|h| {
            let task = h
                .idempotency_key
                .strip_prefix(&format!("{ns}/"))
                .unwrap_or("");
            task.split_once('@')
                .is_some_and(|(name, _)| tasks.contains(name))
        })
        .map(|h| (h.arrived - h.scheduled).to_std().unwrap_or_default())
        .max()
        .unwrap_or_default()
}

// Several threads: the receiver answers while the test waits for a replica to exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sharded_replicas_split_the_tasks_and_hand_them_over_on_kill_join_and_sigterm() {
    let setup = setup("shards").await;
    let (api, ns) = (&setup.api, setup.ns.as_str());
    let receiver = Receiver::start(Behavior::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut replicas: Vec<Sharded> = ["s0", "s1", "s2"]
        .iter()
        .map(|name| Sharded::start(ns, name, &dir))
        .collect();
    let held = split(&replicas.iter().collect::<Vec<_>>()).await;
    eprintln!("three replicas hold {held:?} shards");
    let names: Vec<String> = (0..TASKS).map(|i| format!("t{i}")).collect();
    for name in &names {
        every_second(api, name, &receiver).await;
    }
    // Who runs what, as the tasks' statuses say.
    let mut runs_on: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for name in &names {
        let status = status_where(api, name, "a replica named", |s| s.replica.is_some()).await;
        let replica = status.replica.unwrap();
        runs_on.entry(replica).or_default().insert(name.clone());
    }
    let spread: Vec<(&String, usize)> = runs_on.iter().map(|(r, t)| (r, t.len())).collect();
    eprintln!("tasks per replica: {spread:?}");
    assert_eq!(
        runs_on.len(),
        3,
        "every replica runs some tasks: {spread:?}"
    );
    eventually("each task owned by one replica", || async {
        let mut owned = 0;
        for replica in &replicas {
            owned += replica.stat("owned_tasks").await?;
        }
        (owned == TASKS as u64).then_some(())
    })
    .await;
    more_calls(&receiver, 3 * TASKS).await;

    // kill -9: its tasks go to the others once its Lease expired; theirs never pause.
    let victim = runs_on
        .iter()
        .max_by_key(|(_, t)| t.len())
        .unwrap()
        .0
        .clone();
    let at = replicas
        .iter()
        .position(|r| r.replica.name == victim)
        .unwrap();
    let mut dead = replicas.remove(at);
    let killed = Utc::now();
    dead.replica.kill();
    let orphans = &runs_on[&victim];
    let mut failovers = Vec::new();
    for task in orphans {
        let hit = eventually("the killed replica's task to run elsewhere", || async {
            first_after(&receiver.hits(), ns, task, killed)
        })
        .await;
        failovers.push((hit.arrived - killed).to_std().unwrap_or_default());
    }
    split(&replicas.iter().collect::<Vec<_>>()).await;
    more_calls(&receiver, 2 * TASKS).await;
    let survivors: BTreeSet<String> = runs_on
        .iter()
        .filter(|(r, _)| **r != victim)
        .flat_map(|(_, t)| t.iter().cloned())
        .collect();
    let window = (killed, killed + chrono::Duration::seconds(6));
    let others_late = latest_arrival(&receiver.hits(), ns, &survivors, window.0, window.1);
    let slowest = failovers.iter().max().copied().unwrap_or_default();
    eprintln!(
        "kill -9: its {} tasks ran elsewhere after {slowest:?} at most; the others' runs came at most {others_late:?} late",
        orphans.len()
    );
    assert!(
        slowest <= LEASE_DURATION + Duration::from_secs(2),
        "a killed replica's task ran elsewhere only {slowest:?} after"
    );
    assert!(
        others_late < LEASE_DURATION,
        "the other replicas' tasks paused: a run {others_late:?} late"
    );

    // A replica joins: it takes its share once the others let go of it.
    replicas.push(Sharded::start(ns, "s3", &dir));
    let held = split(&replicas.iter().collect::<Vec<_>>()).await;
    eprintln!("after s3 joined: {held:?}");
    more_calls(&receiver, 2 * TASKS).await;

    // SIGTERM: it lets its shards go at once; the others run its next instants on time.
    let leaving = replicas.remove(0);
    let mut leaving = leaving;
    let asked = Utc::now();
    leaving.replica.signal("-TERM");
    split(&replicas.iter().collect::<Vec<_>>()).await;
    let handed = Utc::now() - asked;
    let status = leaving.replica.child.take().unwrap().wait().unwrap();
    assert!(status.success(), "{}", leaving.replica.logs());
    more_calls(&receiver, 2 * TASKS).await;
    let all: BTreeSet<String> = names.iter().cloned().collect();
    let window = (asked, asked + chrono::Duration::seconds(4));
    let late = latest_arrival(&receiver.hits(), ns, &all, window.0, window.1);
    eprintln!("SIGTERM: the others held every shard {handed:?} after; runs at most {late:?} late");
    assert!(
        late < Duration::from_millis(2500),
        "a run came {late:?} late across a SIGTERM handover"
    );

    // The last two stop one after the other; the last keeps its shards and writes the statuses.
    let mut last = replicas.pop().unwrap();
    assert!(replicas[0].replica.terminate().success());
    eventually("the last replica to hold every shard", || async {
        (last.shards().await? == 256).then_some(())
    })
    .await;
    more_calls(&receiver, 2 * TASKS).await;
    assert!(
        last.replica.terminate().success(),
        "{}",
        last.replica.logs()
    );
    // No key twice; every instant run, or counted failed or missed (on a loaded machine a
    // call may time out): none lost across the handovers.
    let hits = receiver.hits();
    let mut gaps = 0;
    for name in &names {
        let seen = instants(&hits, ns, name);
        let (first, last) = (seen.first().unwrap(), seen.last().unwrap());
        gaps += (*last - *first).num_seconds() + 1 - seen.len() as i64;
        assert_counted_once(api, name, &seen).await;
    }
    eprintln!("instants not received (counted failed or missed): {gaps}");
}

/// A replica whose clock is off (`leader_election.max_clock_skew`) stands by: it takes no shard,
/// so the others run its share, and it says why. Its clock would have it claim instants early.
#[tokio::test]
async fn a_sharded_replica_whose_clock_is_off_takes_no_shard() {
    let setup = setup("shards-clock").await;
    let ns = setup.ns.as_str();
    let dir = tempfile::tempdir().unwrap();
    let faketime = crate::failover::libfaketime();
    let ahead = [
        ("LD_PRELOAD", faketime.as_str()),
        ("FAKETIME", "+30"),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
    ];
    let skewed = Sharded::start_with(ns, "ahead", &dir, &ahead);
    let good = Sharded::start(ns, "good", &dir);
    eventually("the good replica to hold every shard", || async {
        (good.shards().await? == 256).then_some(())
    })
    .await;
    let logs = skewed.replica.logs();
    assert!(logs.contains("ms ahead of the Redis ledger"), "{logs}");
    assert_eq!(skewed.shards().await, Some(0), "{logs}");
    assert!(!logs.contains("took shards"), "{logs}");
}
