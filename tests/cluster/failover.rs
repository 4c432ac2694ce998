//! Exactly once across replicas, with real processes: several `chronflow run` binaries elect a
//! leader through the Lease (`leader_election.sharding: false`; sharded replicas are
//! `tests/cluster/shards.rs`' and the fault checker's) and share a real redis-server as their
//! run ledger; a loopback
//! receiver records every Idempotency-Key. Replicas are killed (-9), frozen (SIGSTOP past their
//! lease), stopped (SIGTERM), and Redis is killed and restarted; no key ever arrives twice and
//! status counts equal what the receiver saw.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use chronflow::ChronTask;
use chrono::{DateTime, Utc};
use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use serde_json::json;
use tokio::time::Instant;

use crate::observability::{free_address, get};
use crate::operator::{create, setup, status_where};
use crate::support::receiver::{Behavior, Hit, Receiver};
use crate::support::{OwnControlPlane, eventually, namespace, test_env};

pub(crate) const LEASE: &str = "chronflow-leader";
/// The test's lease duration: a standby may take over this long after the leader went silent.
const LEASE_DURATION: Duration = Duration::from_secs(3);

/// One `chronflow run` process, logging JSON to a file.
pub(crate) struct Replica {
    pub(crate) name: String,
    pub(crate) child: Option<Child>,
    log: PathBuf,
}

impl Replica {
    fn start(ns: &str, name: &str, redis_url: &str, dir: &tempfile::TempDir) -> Replica {
        Replica::start_with(ns, name, redis_url, dir, "", &test_env().kubeconfig, &[])
    }

    /// With `extra` appended to the configuration file and `env` set, against the apiserver
    /// of `kubeconfig`.
    pub(crate) fn start_with(
        ns: &str,
        name: &str,
        redis_url: &str,
        dir: &tempfile::TempDir,
        extra: &str,
        kubeconfig: &std::path::Path,
        env: &[(&str, &str)],
    ) -> Replica {
        let config = dir.path().join(format!("{name}.yaml"));
        let yaml = format!(
            "backend_type: redis\nwatch_namespaces: [{ns}]\n\
             redis:\n  url: {redis_url}\n  timeout: 1s\n\
             leader_election:\n  enabled: true\n  sharding: false\n  lease_namespace: {ns}\n  lease_duration: 3s\n  \
             renew_deadline: 2s\n  retry_period: 250ms\n\
             metrics:\n  bind: 127.0.0.1:0\nstatus:\n  flush_interval: 300ms\n\
             shutdown:\n  grace_period: 5s\nlog:\n  format: json\n{extra}"
        );
        std::fs::write(&config, yaml).unwrap();
        let log = dir.path().join(format!("{name}.log"));
        let child = Command::new(env!("CARGO_BIN_EXE_chronflow"))
            .args(["run", "-f"])
            .arg(&config)
            .env("KUBECONFIG", kubeconfig)
            .env("POD_NAME", name)
            .envs(env.iter().copied())
            .env_remove("RUST_LOG")
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("chronflow runs");
        Replica {
            name: name.to_string(),
            child: Some(child),
            log,
        }
    }

    pub(crate) fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        let status = Command::new("kill").args([signal, &pid]).status().unwrap();
        assert!(status.success(), "kill {signal} {pid}");
    }

    /// SIGTERM, then its exit status; a replica that has not exited within two minutes (far
    /// past any drain here) is killed and the test fails (its log shown as it drops), rather
    /// than waiting for ever.
    pub(crate) fn terminate(&mut self) -> std::process::ExitStatus {
        self.signal("-TERM");
        let mut child = self.child.take().unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{} did not exit within 2 min of SIGTERM", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub(crate) fn kill(&mut self) {
        self.signal("-KILL");
        let _ = self.child.take().unwrap().wait();
    }

    pub(crate) fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Replica {
    /// Kills it; when the test failed, shows what it logged.
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- {} logged:\n{}", self.name, self.logs());
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The Lease's holder, if any: the replica's name (its `POD_NAME`, without the process's nonce).
pub(crate) async fn holder(ns: &str) -> Option<String> {
    holder_in(test_env().client().await, ns).await
}

async fn holder_in(client: kube::Client, ns: &str) -> Option<String> {
    let leases: Api<Lease> = Api::namespaced(client, ns);
    let lease = leases.get_opt(LEASE).await.ok()??;
    let holder = lease.spec?.holder_identity.filter(|h| !h.is_empty())?;
    Some(chronflow::leader::pod_name(&holder).to_string())
}

async fn leader_among(ns: &str, names: &[&str]) -> String {
    eventually("a leader", || async {
        holder(ns).await.filter(|h| names.contains(&h.as_str()))
    })
    .await
}

/// Waits until the receiver has had `more` calls beyond those it has now.
pub(crate) async fn more_calls(receiver: &Receiver, more: usize) {
    let target = receiver.count() + more;
    let what = format!("{more} more calls");
    eventually(&what, || async {
        (receiver.count() >= target).then_some(())
    })
    .await;
}

/// Every instant of `task` the receiver saw, asserting none arrived twice.
pub(crate) fn instants(hits: &[Hit], ns: &str, task: &str) -> BTreeSet<DateTime<Utc>> {
    let prefix = format!("{ns}/{task}@");
    let mut seen = BTreeMap::new();
    for hit in hits
        .iter()
        .filter(|h| h.idempotency_key.starts_with(&prefix))
    {
        *seen.entry(hit.idempotency_key.clone()).or_insert(0) += 1;
    }
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "received more than once: {twice:?}");
    hits.iter()
        .filter(|h| h.idempotency_key.starts_with(&prefix))
        .map(|h| h.scheduled)
        .collect()
}

/// Asserts the instants are every second from the first to the last (no gap).
pub(crate) fn assert_contiguous(instants: &BTreeSet<DateTime<Utc>>, what: &str) {
    let (Some(first), Some(last)) = (instants.first(), instants.last()) else {
        panic!("{what}: nothing received");
    };
    let expected = (*last - *first).num_seconds() + 1;
    assert_eq!(
        instants.len() as i64,
        expected,
        "{what}: {} instants from {first} to {last}, expected every second",
        instants.len()
    );
}

/// After a crash the ledger cannot know whether a run the dead leader had started reached the
/// receiver: the take-over counts it failed and never runs it again (see docs/operations.md).
/// So every instant from the first to the last was received, or counted failed or missed (an
/// overloaded executor, the final shutdown), and status counts each received call once.
pub(crate) async fn assert_counted_once(
    api: &Api<ChronTask>,
    name: &str,
    seen: &BTreeSet<DateTime<Utc>>,
) {
    let (first, last) = (*seen.first().unwrap(), *seen.last().unwrap());
    let gaps = (last - first).num_seconds() + 1 - seen.len() as i64;
    let status = api.get(name).await.unwrap().status.unwrap_or_default();
    let received = seen.len() as u64;
    assert!(
        status.successful_runs <= received && received <= status.total_runs,
        "{name}: {received} received; status {} runs, {} succeeded",
        status.total_runs,
        status.successful_runs
    );
    assert!(
        gaps as u64 <= status.failed_runs + status.missed_runs,
        "{name}: {gaps} instants neither received nor counted ({} failed, {} missed)",
        status.failed_runs,
        status.missed_runs
    );
}

/// A 1 s task calling `receiver`, catching up every missed instant.
pub(crate) async fn every_second(api: &Api<ChronTask>, name: &str, receiver: &Receiver) {
    let spec = json!({
        "schedule": {"cron": "* * * * * *"},
        "catchUp": "All",
        "concurrencyPolicy": "Allow",
        "timeout": "2s",
        "action": {"http": {"url": receiver.url("/hook"), "method": "POST"}},
    });
    create(api, name, spec).await;
}

/// Waits until the status of `name` counts exactly the runs the receiver saw.
pub(crate) async fn status_matches(api: &Api<ChronTask>, name: &str, received: usize) {
    let what = format!("{name}'s status to count {received} runs");
    status_where(api, name, &what, |s| s.total_runs == received as u64).await;
}

#[tokio::test]
async fn three_replicas_run_every_instant_exactly_once() {
    let setup = setup("ha-three").await;
    let (api, ns) = (&setup.api, setup.ns.as_str());
    let receiver = Receiver::start(Behavior::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let redis = &test_env().redis_url;
    let mut replicas: Vec<Replica> = ["r0", "r1", "r2"]
        .iter()
        .map(|name| Replica::start(ns, name, redis, &dir))
        .collect();
    leader_among(ns, &["r0", "r1", "r2"]).await;
    let tasks = ["a", "b", "c"];
    for task in tasks {
        every_second(api, task, &receiver).await;
    }
    tokio::time::sleep(Duration::from_secs(60)).await;
    for replica in &mut replicas {
        assert!(replica.terminate().success(), "{}", replica.logs());
    }
    let hits = receiver.hits();
    for task in tasks {
        let seen = instants(&hits, ns, task);
        assert!(seen.len() >= 55, "{task}: only {} runs in 60 s", seen.len());
        assert_contiguous(&seen, task);
        status_matches(api, task, seen.len()).await;
    }
}

#[tokio::test]
async fn killing_the_leader_five_times_loses_and_repeats_nothing() {
    let setup = setup("ha-kill").await;
    let (api, ns) = (&setup.api, setup.ns.as_str());
    let receiver = Receiver::start(Behavior::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let redis = &test_env().redis_url;
    let mut replicas: Vec<Replica> = (0..3)
        .map(|i| Replica::start(ns, &format!("k{i}"), redis, &dir))
        .collect();
    leader_among(ns, &["k0", "k1", "k2"]).await;
    for task in ["a", "b"] {
        every_second(api, task, &receiver).await;
    }
    more_calls(&receiver, 4).await;

    let mut takeovers = Vec::new();
    for trial in 0..5 {
        let living: Vec<String> = replicas_names(&replicas);
        let living: Vec<&str> = living.iter().map(String::as_str).collect();
        let leader = leader_among(ns, &living).await;
        let index = replicas.iter().position(|r| r.name == leader).unwrap();
        let mut dead = replicas.remove(index);
        dead.kill();
        let killed = Instant::now();
        // A replacement joins as a standby, as a Deployment would start one.
        replicas.push(Replica::start(ns, &format!("k{}", trial + 3), redis, &dir));
        let names: Vec<String> = replicas_names(&replicas);
        let candidates: Vec<&str> = names.iter().map(String::as_str).collect();
        let next = leader_among(ns, &candidates).await;
        let took = killed.elapsed();
        assert_ne!(next, leader);
        assert!(
            took <= LEASE_DURATION + Duration::from_secs(2),
            "trial {trial}: a standby led {took:?} after the leader was killed"
        );
        takeovers.push(took);
        // The new leader runs the tasks before the next kill.
        more_calls(&receiver, 4).await;
    }
    for replica in &mut replicas {
        assert!(replica.terminate().success(), "{}", replica.logs());
    }
    let hits = receiver.hits();
    for task in ["a", "b"] {
        // catchUp: All: every instant of every gap was run, once.
        let seen = instants(&hits, ns, task);
        assert_counted_once(api, task, &seen).await;
    }
    eprintln!("failover after kill -9: standby led after {takeovers:?}");
}

fn replicas_names(replicas: &[Replica]) -> Vec<String> {
    replicas.iter().map(|r| r.name.clone()).collect()
}

#[tokio::test]
async fn a_leader_frozen_past_its_lease_is_fenced_when_it_wakes() {
    let setup = setup("ha-freeze").await;
    let (api, ns) = (&setup.api, setup.ns.as_str());
    // Slow calls and two workers: runs queue up, so the frozen leader holds runs it claimed
    // and has not started; on waking it tries to start them, and the ledger refuses.
    let receiver = Receiver::start(Behavior {
        status: 200,
        delay: Duration::from_millis(1500),
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let redis = &test_env().redis_url;
    let two_workers = "max_workers: 2\nlimits:\n  max_workers_per_namespace: 2\n";
    // Each replica serves /stats on a known port, to see its queue.
    let endpoints = [free_address(), free_address()];
    let mut replicas = [("f0", endpoints[0]), ("f1", endpoints[1])].map(|(name, address)| {
        let bind = address.to_string();
        let env = [("SCHEDULER__METRICS__BIND", bind.as_str())];
        let kubeconfig = &test_env().kubeconfig;
        Replica::start_with(ns, name, redis, &dir, two_workers, kubeconfig, &env)
    });
    let leader = leader_among(ns, &["f0", "f1"]).await;
    let at = replicas.iter().position(|r| r.name == leader).unwrap();
    let frozen = &replicas[at];

    for task in ["a", "b", "c"] {
        every_second(api, task, &receiver).await;
    }
    // Freeze it while it holds a run claimed and waiting for a worker.
    eventually("a run waiting in the leader's queue", || async {
        let (_, stats) = get(endpoints[at], "/stats").await?;
        let stats: serde_json::Value = serde_json::from_str(&stats).ok()?;
        (stats["queue_size"].as_u64()? > 0).then_some(())
    })
    .await;
    frozen.signal("-STOP");
    let standby = eventually("the standby to lead", || async {
        holder(ns).await.filter(|h| *h != leader)
    })
    .await;
    // The standby takes every task over (its timers wait for that) and runs them, while the
    // old leader sleeps.
    let led = chrono::Utc::now();
    eventually("the standby to run every task", || async {
        let hits = receiver.hits();
        ["a", "b", "c"]
            .iter()
            .all(|task| {
                let key = format!("{ns}/{task}@");
                hits.iter()
                    .any(|h| h.idempotency_key.starts_with(&key) && h.arrived > led)
            })
            .then_some(())
    })
    .await;
    // It wakes believing it leads, with timers long due: the ledger refuses it.
    frozen.signal("-CONT");
    eventually("the woken leader's queued runs to be refused", || async {
        frozen
            .logs()
            .contains("the ledger refused its start")
            .then_some(())
    })
    .await;
    assert_eq!(holder(ns).await.as_deref(), Some(standby.as_str()));

    for replica in &mut replicas {
        assert!(replica.terminate().success(), "{}", replica.logs());
    }
    let hits = receiver.hits();
    for task in ["a", "b", "c"] {
        let seen = instants(&hits, ns, task);
        assert_counted_once(api, task, &seen).await;
    }
}

#[tokio::test]
async fn sigterm_to_the_leader_finishes_its_runs_and_hands_over_at_once() {
    let setup = setup("ha-term").await;
    let (api, ns) = (&setup.api, setup.ns.as_str());
    // Each call takes 1.5 s: at any moment a run is in flight.
    let receiver = Receiver::start(Behavior {
        status: 200,
        delay: Duration::from_millis(1500),
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let redis = &test_env().redis_url;
    let mut replicas = [
        Replica::start(ns, "t0", redis, &dir),
        Replica::start(ns, "t1", redis, &dir),
    ];
    let leader = leader_among(ns, &["t0", "t1"]).await;
    every_second(api, "slow", &receiver).await;
    eventually("a run in flight", || async {
        (receiver.max_in_flight() > 0).then_some(())
    })
    .await;
    // A few instants before the handover, so the contiguity check spans it.
    more_calls(&receiver, 2).await;

    let index = replicas.iter().position(|r| r.name == leader).unwrap();
    replicas[index].signal("-TERM");
    let asked = Instant::now();
    let standby = eventually("the standby to lead", || async {
        holder(ns).await.filter(|h| *h != leader)
    })
    .await;
    let handover = asked.elapsed();
    let status = replicas[index].child.take().unwrap().wait().unwrap();
    assert!(status.success(), "{}", replicas[index].logs());
    assert!(
        handover < Duration::from_secs(3),
        "the standby ({standby}) led {handover:?} after SIGTERM"
    );
    more_calls(&receiver, 2).await;
    let other = 1 - index;
    assert!(replicas[other].terminate().success());

    let hits = receiver.hits();
    let seen = instants(&hits, ns, "slow");
    assert_contiguous(&seen, "slow");
    status_matches(api, "slow", seen.len()).await;
    let logs = replicas[index].logs();
    assert!(logs.contains("released the lease"), "{logs}");
    eprintln!("SIGTERM handover: the standby led {handover:?} after the signal");
}

/// A redis-server of the test's own, with an append-only file synced on every write, as a
/// production ledger should be: killed with -9, it comes back with everything.
#[derive(Debug)]
pub(crate) struct OwnRedis {
    pub(crate) port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// The primary's port while this one is its replica (kept across restarts).
    pub(crate) replica_of: Option<u16>,
}

impl OwnRedis {
    pub(crate) fn start() -> OwnRedis {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut redis = OwnRedis {
            port,
            dir: tempfile::tempdir().unwrap(),
            child: None,
            replica_of: None,
        };
        redis.restart();
        redis
    }

    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// A replica of `primary`.
    pub(crate) fn start_replica_of(primary: &OwnRedis) -> OwnRedis {
        let mut redis = OwnRedis::start();
        redis.follow(Some(primary.port));
        redis
    }

    /// Becomes a replica of the server on `primary` (`REPLICAOF`), or a primary (`None`:
    /// `REPLICAOF NO ONE`, a failover's promotion); kept across restarts.
    pub(crate) fn follow(&mut self, primary: Option<u16>) {
        let target = match primary {
            Some(port) => vec!["127.0.0.1".to_string(), port.to_string()],
            None => vec!["NO".to_string(), "ONE".to_string()],
        };
        let status = Command::new("redis-cli")
            .args(["-p", &self.port.to_string(), "REPLICAOF"])
            .args(target)
            .stdout(Stdio::null())
            .status()
            .expect("redis-cli runs");
        assert!(status.success());
        self.replica_of = primary;
    }

    /// A replica whose link to its primary is up and done with its first sync: what Sentinel
    /// requires of a replica it promotes.
    pub(crate) fn in_sync(&self) -> bool {
        let info = Command::new("redis-cli")
            .args(["-p", &self.port.to_string(), "INFO", "replication"])
            .output()
            .map(|out| String::from_utf8_lossy(&out.stdout).to_string())
            .unwrap_or_default();
        info.contains("master_link_status:up") && info.contains("master_sync_in_progress:0")
    }

    /// Where its append-only file is.
    pub(crate) fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    pub(crate) fn restart(&mut self) {
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args([
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ])
            .arg("--dir")
            .arg(self.dir.path())
            .args(self.replica_of.iter().flat_map(|port| {
                [
                    "--replicaof".to_string(),
                    "127.0.0.1".to_string(),
                    port.to_string(),
                ]
            }))
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server runs");
        self.child = Some(child);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "redis-server did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub(crate) fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

#[tokio::test]
async fn redis_down_for_ten_seconds_repeats_nothing_counts_the_gap_and_recovers() {
    let setup = setup("ha-redis").await;
    let (api, ns) = (&setup.api, setup.ns.as_str());
    let receiver = Receiver::start(Behavior::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut redis = OwnRedis::start();
    let mut replicas = [
        Replica::start(ns, "d0", &redis.url(), &dir),
        Replica::start(ns, "d1", &redis.url(), &dir),
    ];
    leader_among(ns, &["d0", "d1"]).await;
    every_second(api, "steady", &receiver).await;
    more_calls(&receiver, 3).await;

    redis.kill();
    let before = receiver.count();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let during = receiver.count() - before;
    redis.restart();
    // Service resumes by itself.
    more_calls(&receiver, 3).await;
    // The instants that could not be claimed are counted missed once Redis is back.
    let status = status_where(api, "steady", "the outage counted missed", |s| {
        s.missed_runs >= 5
    })
    .await;
    for replica in &mut replicas {
        assert!(replica.terminate().success(), "{}", replica.logs());
    }
    let hits = receiver.hits();
    let seen = instants(&hits, ns, "steady");
    status_matches(api, "steady", seen.len()).await;
    assert!(
        during <= 2,
        "{during} runs started while Redis was down: nothing runs that cannot be claimed"
    );
    eprintln!(
        "Redis down 10 s: {during} runs during, {} counted missed, {} received in all",
        status.missed_runs,
        seen.len()
    );
}

#[tokio::test]
async fn an_apiserver_restart_repeats_nothing_and_catches_up_the_gap() {
    // A control plane of this test's own: the shared one serves every other test.
    let plane = OwnControlPlane::start("apiserver-restart");
    let client = plane.0.client().await;
    let ns = namespace(&client, "ha-apiserver").await;
    let api: Api<ChronTask> = Api::namespaced(client.clone(), &ns);
    let receiver = Receiver::start(Behavior::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let redis = &test_env().redis_url;
    let kubeconfig = &plane.0.kubeconfig;
    let mut replicas = [
        Replica::start_with(&ns, "s0", redis, &dir, "", kubeconfig, &[]),
        Replica::start_with(&ns, "s1", redis, &dir, "", kubeconfig, &[]),
    ];
    eventually("a leader", || async {
        holder_in(client.clone(), &ns).await
    })
    .await;
    every_second(&api, "steady", &receiver).await;
    more_calls(&receiver, 3).await;

    let restarted = Instant::now();
    let plane = tokio::task::spawn_blocking(move || {
        plane.restart_apiserver();
        plane
    })
    .await
    .unwrap();
    let down_for = restarted.elapsed();
    more_calls(&receiver, 3).await;
    let back_after = restarted.elapsed();
    for replica in &mut replicas {
        assert!(replica.terminate().success(), "{}", replica.logs());
    }
    // catchUp: All: the instants due while no replica could lead were run, once each.
    let seen = instants(&receiver.hits(), &ns, "steady");
    assert_contiguous(&seen, "steady");
    status_matches(&api, "steady", seen.len()).await;
    eprintln!(
        "apiserver restart: {down_for:?} to restart, runs resumed {back_after:?} after it began; \
         {} instants, none twice, none lost",
        seen.len()
    );
    drop(plane);
}

#[tokio::test]
async fn a_second_signal_exits_at_once_without_draining() {
    let setup = setup("second-signal").await;
    let (api, ns) = (&setup.api, setup.ns.as_str());
    // Each call takes 20 s: the drain (5 s grace) would wait for it.
    let receiver = Receiver::start(Behavior {
        status: 200,
        delay: Duration::from_secs(20),
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let mut replica = Replica::start(ns, "solo", &test_env().redis_url, &dir);
    leader_among(ns, &["solo"]).await;
    every_second(api, "slow", &receiver).await;
    eventually("a run in flight", || async {
        (receiver.max_in_flight() > 0).then_some(())
    })
    .await;
    replica.signal("-TERM");
    eventually("the first signal's drain to begin", || async {
        replica.logs().contains("shutting down").then_some(())
    })
    .await;
    let second = Instant::now();
    replica.signal("-TERM");
    let status = replica.child.take().unwrap().wait().unwrap();
    let took = second.elapsed();
    assert_eq!(status.code(), Some(130), "{}", replica.logs());
    assert!(
        took < Duration::from_secs(2),
        "exited {took:?} after the second signal"
    );
    assert!(replica.logs().contains("second signal: exiting at once"));
}

#[tokio::test]
async fn forbid_holds_across_a_failover_while_the_old_leader_may_still_run() {
    let setup = setup("ha-forbid").await;
    let (api, ns) = (&setup.api, setup.ns.as_str());
    // Each call takes 7 s; the task forbids two at once.
    let receiver = Receiver::start(Behavior {
        status: 200,
        delay: Duration::from_secs(7),
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let redis = &test_env().redis_url;
    let replicas = [
        Replica::start(ns, "p0", redis, &dir),
        Replica::start(ns, "p1", redis, &dir),
    ];
    let leader = leader_among(ns, &["p0", "p1"]).await;
    let spec = json!({
        "schedule": {"cron": "* * * * * *"},
        "concurrencyPolicy": "Forbid",
        "timeout": "10s",
        "action": {"http": {"url": receiver.url("/forbid"), "method": "POST"}},
    });
    create(api, "one-at-a-time", spec).await;
    eventually("a run in flight", || async {
        (receiver.max_in_flight() > 0).then_some(())
    })
    .await;
    // The leader freezes with its call in flight; the standby takes over and must not start
    // another run while that call may still be running (up to its 10 s timeout).
    let frozen = replicas.iter().find(|r| r.name == leader).unwrap();
    frozen.signal("-STOP");
    eventually("the standby to lead", || async {
        holder(ns).await.filter(|h| *h != leader)
    })
    .await;
    let taken = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    frozen.signal("-CONT");
    eventually("the new leader to run the task", || async {
        (receiver.count() >= 2).then_some(())
    })
    .await;
    let held = taken.elapsed();
    assert_eq!(
        receiver.max_in_flight(),
        1,
        "two runs at once across the failover"
    );
    assert!(
        held >= Duration::from_secs(5),
        "the new leader ran after {held:?}"
    );
    let hits = receiver.hits();
    instants(&hits, ns, "one-at-a-time");
    eprintln!("Forbid across a failover: the new leader's first run came {held:?} after it led");
}

#[tokio::test]
async fn a_lone_replica_killed_and_restarted_takes_over_from_the_ledger() {
    let setup = setup("ha-restart").await;
    let (api, ns) = (&setup.api, setup.ns.as_str());
    // Calls take 2 s: when the replica dies, runs are in flight.
    let receiver = Receiver::start(Behavior {
        status: 200,
        delay: Duration::from_secs(2),
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let redis = &test_env().redis_url;
    // One replica, the Redis ledger, no leader election: it leads from its first moment, before
    // it knows any task.
    let solo = [("SCHEDULER__LEADER_ELECTION__ENABLED", "false")];
    let kubeconfig = &test_env().kubeconfig;
    let mut first = Replica::start_with(ns, "first", redis, &dir, "", kubeconfig, &solo);
    let spec = json!({
        "schedule": {"cron": "* * * * * *"},
        "catchUp": "All",
        "concurrencyPolicy": "Allow",
        "timeout": "5s",
        "action": {"http": {"url": receiver.url("/restart"), "method": "POST"}},
    });
    create(api, "steady", spec).await;
    eventually("runs in flight", || async {
        (receiver.count() >= 4).then_some(())
    })
    .await;
    first.kill();
    // The new process takes each task over from the ledger as it learns it: the runs the dead
    // one had in flight are counted once they cannot be running any more (5 s), never sent
    // again, and the instants due meanwhile are caught up.
    let mut second = Replica::start_with(ns, "second", redis, &dir, "", kubeconfig, &solo);
    let status = status_where(api, "steady", "the dead replica's runs settled", |st| {
        st.failed_runs >= 1
    })
    .await;
    more_calls(&receiver, 3).await;
    assert!(second.terminate().success(), "{}", second.logs());
    let seen = instants(&receiver.hits(), ns, "steady");
    assert_counted_once(api, "steady", &seen).await;
    assert!(
        status.failed_runs <= 3,
        "only the runs in flight at the kill: {status:?}"
    );
}

#[tokio::test]
async fn a_run_now_request_runs_once_across_failovers() {
    let setup = setup("ha-run-now").await;
    let (api, ns) = (&setup.api, setup.ns.as_str());
    // Calls take 2 s: a leader killed right after the call started dies with the run in flight.
    let receiver = Receiver::start(Behavior {
        status: 200,
        delay: Duration::from_secs(2),
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let redis = &test_env().redis_url;
    let names = ["r0", "r1", "r2"];
    let mut replicas: BTreeMap<String, Replica> = names
        .iter()
        .map(|name| (name.to_string(), Replica::start(ns, name, redis, &dir)))
        .collect();
    let spec = json!({"schedule": {"cron": "0 0 0 1 1 *"}, "timeout": "5s",
                      "action": {"http": {"url": receiver.url("/now")}}});
    create(api, "now", spec).await;
    status_where(api, "now", "Scheduled", |st| st.next_run_time.is_some()).await;
    let calls = |request: &str| {
        let key = format!("{ns}/now@manual:{request}");
        receiver
            .hits()
            .iter()
            .filter(|h| h.idempotency_key == key)
            .count()
    };
    let annotate = |request: &'static str| async move {
        let patch = kube::api::Patch::Merge(
            json!({"metadata": {"annotations": {"chronflow.io/run-now": request}}}),
        );
        api.patch("now", &kube::api::PatchParams::default(), &patch)
            .await
            .unwrap();
    };

    // The leader dies as the request arrives: whether it saw it, claimed it or started it, the
    // request is counted once and sent at most once. The next leader runs it unless the ledger
    // recorded its start: a kill between that record and the call leaves it unsent, and the next
    // leader, which cannot know, counts it failed once it cannot be running any more.
    let first = leader_among(ns, &names).await;
    annotate("at-the-kill").await;
    replicas.get_mut(&first).unwrap().kill();
    let others: Vec<&str> = names.iter().copied().filter(|n| *n != first).collect();
    let second = eventually("a new leader", || async {
        holder(ns).await.filter(|h| others.contains(&h.as_str()))
    })
    .await;
    // Finished (Forbid would skip a request while it runs).
    let status = status_where(api, "now", "the first request counted", |st| {
        st.manual_runs == 1
    })
    .await;
    match calls("at-the-kill") {
        1 => {}
        0 => {
            assert_eq!(status.failed_runs, 1, "{status:?}");
            eprintln!("the first leader died between the request's start and its call");
        }
        sent => panic!("the request was sent {sent} times"),
    }

    // The next leader dies with the run in flight: its successor never sends it again, and
    // counts it once it cannot be running any more (outcome unknown: failed).
    annotate("in-flight").await;
    eventually("the call in flight", || async {
        (calls("in-flight") == 1).then_some(())
    })
    .await;
    replicas.get_mut(&second).unwrap().kill();
    let status = status_where(api, "now", "both requests counted", |st| {
        st.manual_runs == 2 && st.last_run_now.as_deref() == Some("in-flight")
    })
    .await;
    assert_eq!(status.total_runs, 2, "{status:?}");
    assert!(calls("at-the-kill") <= 1);
    assert_eq!(calls("in-flight"), 1);
    for replica in replicas.values_mut().filter(|r| r.child.is_some()) {
        assert!(replica.terminate().success(), "{}", replica.logs());
    }
}

/// A Job outlives the leader that created it: the next leader adopts the run from the ledger
/// and records the Job's end once; no second Job is created.
#[tokio::test]
async fn a_job_in_flight_when_the_leader_dies_is_recorded_once_by_the_next() {
    let env = crate::support::job_env();
    let client = env.client().await;
    let ns = namespace(&client, "ha-job").await;
    let tasks: Api<ChronTask> = Api::namespaced(client.clone(), &ns);
    let dir = tempfile::tempdir().unwrap();
    let start = |name: &str| {
        let jobs = "jobs:\n  enabled: true\n";
        Replica::start_with(&ns, name, &env.redis_url, &dir, jobs, &env.kubeconfig, &[])
    };
    let mut replicas = vec![start("j0"), start("j1")];
    let leader = eventually("a leader", || async {
        holder_in(client.clone(), &ns).await
    })
    .await;
    let at = (Utc::now() + chrono::Duration::seconds(2)).to_rfc3339();
    let spec = json!({"schedule": {"interval": "1h", "startAt": at}, "timeout": "2m",
                      "action": crate::jobs::job_action("10s", false)});
    create(&tasks, "nightly", spec).await;
    let running = status_where(&tasks, "nightly", "the Job in flight", |st| {
        !st.active.is_empty()
    })
    .await;
    let job = running.active[0].job_name.clone().unwrap();
    let index = replicas.iter().position(|r| r.name == leader).unwrap();
    replicas.remove(index).kill();

    crate::jobs::recorded_once(&tasks, "nightly", &job).await;
    let jobs: Api<k8s_openapi::api::batch::v1::Job> = Api::namespaced(client, &ns);
    assert_eq!(jobs.list(&Default::default()).await.unwrap().items.len(), 1);
    for replica in &mut replicas {
        assert!(replica.terminate().success(), "{}", replica.logs());
    }
}

/// `kubectl delete lease` after a few terms: the replicas compete for a new Lease, and the term
/// that wins draws its epoch from the ledger, above every earlier one, so the existing task
/// goes on (within about a failover interval) and no instant runs twice. Its epoch used to
/// restart at 1 with the Lease's `leaseTransitions`, and every existing task stayed fenced.
#[tokio::test]
async fn deleting_the_lease_keeps_every_task_running_and_runs_nothing_twice() {
    let setup = setup("ha-lease-deleted").await;
    let (api, ns) = (&setup.api, setup.ns.as_str());
    let receiver = Receiver::start(Behavior::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let redis = &test_env().redis_url;
    let mut replicas = vec![
        Replica::start(ns, "l0", redis, &dir),
        Replica::start(ns, "l1", redis, &dir),
    ];
    let first = leader_among(ns, &["l0", "l1"]).await;
    every_second(api, "kept", &receiver).await;
    more_calls(&receiver, 2).await;
    // A second term (SIGTERM hands over at once), so the ledger has seen an epoch above 1.
    let index = replicas.iter().position(|r| r.name == first).unwrap();
    assert!(replicas[index].terminate().success());
    let second = eventually("the standby to lead", || async {
        holder(ns).await.filter(|h| *h != first)
    })
    .await;
    replicas[index] = Replica::start(ns, &first, redis, &dir);
    more_calls(&receiver, 2).await;

    let leases: Api<Lease> = Api::namespaced(test_env().client().await, ns);
    leases.delete(LEASE, &Default::default()).await.unwrap();
    let deleted = Utc::now();
    // A run arrives for an instant after the deletion, then a few more.
    eventually(
        "a run of an instant after the Lease was deleted",
        || async {
            receiver
                .hits()
                .iter()
                .any(|hit| hit.scheduled > deleted + chrono::Duration::seconds(1))
                .then_some(())
        },
    )
    .await;
    more_calls(&receiver, 3).await;
    for replica in &mut replicas {
        assert!(replica.terminate().success(), "{}", replica.logs());
    }
    let hits = receiver.hits();
    let seen = instants(&hits, ns, "kept");
    assert_counted_once(api, "kept", &seen).await;
    // Every request carried its leader's epoch, and the term after the deletion's is above
    // every earlier one.
    assert!(hits.iter().all(|hit| hit.epoch > 0), "{hits:?}");
    let before = hits
        .iter()
        .filter(|h| h.arrived < deleted)
        .map(|h| h.epoch)
        .max();
    let after = hits
        .iter()
        .filter(|h| h.scheduled > deleted + chrono::Duration::seconds(1))
        .map(|h| h.epoch)
        .min();
    assert!(after > before, "epochs {before:?} then {after:?}");
    let logs: String = replicas.iter().map(Replica::logs).collect();
    assert!(!logs.contains("fenced"), "a term was fenced: {logs}");
    eprintln!("lease deleted under {second}: runs went on");
}

/// A task deleted and created again under its name is another task: its counts and records
/// start from nothing (the ledger is keyed by the object's uid). They used to be the old
/// task's, so a task with 15 runs showed 16 after its first run again.
#[tokio::test]
async fn a_task_created_again_under_its_name_starts_from_zero() {
    let setup = setup("ha-recreated").await;
    let (api, ns) = (&setup.api, setup.ns.as_str());
    let receiver = Receiver::start(Behavior::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut replica = Replica::start(ns, "u0", &test_env().redis_url, &dir);
    leader_among(ns, &["u0"]).await;
    every_second(api, "again", &receiver).await;
    let old = status_where(api, "again", "15 runs", |s| s.total_runs >= 15).await;
    api.delete("again", &Default::default()).await.unwrap();
    eventually("the task gone", || async {
        api.get_opt("again").await.unwrap().is_none().then_some(())
    })
    .await;

    every_second(api, "again", &receiver).await;
    let created = Instant::now();
    let fresh = status_where(api, "again", "a run of the new task", |s| s.total_runs >= 1).await;
    let bound = created.elapsed().as_secs() + 2;
    assert!(
        fresh.total_runs <= bound,
        "{} runs {:?} after it was created again (the old one had {})",
        fresh.total_runs,
        created.elapsed(),
        old.total_runs
    );
    assert!(replica.terminate().success(), "{}", replica.logs());
}

/// Without leader election, a container restarted in place under the same POD_NAME is another
/// process: what its earlier self started and never finished is settled (counted failed, its
/// outcome unknown) once it cannot be running any more. It used to count as the new process's
/// own and stay open, uncounted, forever.
#[tokio::test]
async fn a_process_restarted_under_its_pod_name_settles_what_its_earlier_self_started() {
    let setup = setup("ha-restart-in-place").await;
    let (api, ns) = (&setup.api, setup.ns.as_str());
    // Each call takes 3 s: the kill lands while one is in flight.
    let receiver = Receiver::start(Behavior {
        status: 200,
        delay: Duration::from_secs(3),
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let redis = &test_env().redis_url;
    let kubeconfig = &test_env().kubeconfig;
    let alone = [("SCHEDULER__LEADER_ELECTION__ENABLED", "false")];
    let start = || Replica::start_with(ns, "same", redis, &dir, "", kubeconfig, &alone);
    let mut replica = start();
    let spec = json!({
        "schedule": {"cron": "*/5 * * * * *"},
        "concurrencyPolicy": "Forbid",
        "timeout": "4s",
        "action": {"http": {"url": receiver.url("/hook"), "method": "POST"}},
    });
    create(api, "slow", spec).await;
    more_calls(&receiver, 1).await;
    replica.kill();
    let hits = receiver.hits();
    let killed_run = hits.last().unwrap().idempotency_key.clone();

    let mut replica = start();
    // Settled once it cannot be running any more (its timeout), then counted failed; later
    // instants run.
    let status = status_where(api, "slow", "the earlier run settled", |s| {
        s.failed_runs >= 1
    })
    .await;
    more_calls(&receiver, 1).await;
    assert!(replica.terminate().success(), "{}", replica.logs());
    assert_eq!(
        status.total_runs,
        status.successful_runs + status.failed_runs,
        "{status:?}"
    );
    let keys: Vec<_> = receiver
        .hits()
        .into_iter()
        .map(|h| h.idempotency_key)
        .collect();
    assert_eq!(
        keys.iter().filter(|k| **k == killed_run).count(),
        1,
        "the killed run was sent once: {keys:?}"
    );
}

/// A standby that leads after a failover writes what the old leader wrote, not its own view of
/// the task (as old as its start): the run history and the handled run-now request stay. Its
/// first write used to replace recentRuns with the runs of its own term only.
#[tokio::test]
async fn a_new_leader_keeps_the_history_the_old_one_wrote() {
    let setup = setup("ha-history").await;
    let (api, ns) = (&setup.api, setup.ns.as_str());
    let receiver = Receiver::start(Behavior::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let redis = &test_env().redis_url;
    let mut replicas = vec![
        Replica::start(ns, "h0", redis, &dir),
        Replica::start(ns, "h1", redis, &dir),
    ];
    let leader = leader_among(ns, &["h0", "h1"]).await;
    let spec = json!({
        "schedule": {"cron": "* * * * * *"},
        "timeout": "2s",
        "history": {"successfulRunsLimit": 50},
        "action": {"http": {"url": receiver.url("/hook"), "method": "POST"}},
    });
    create(api, "kept", spec).await;
    crate::run_now::annotate(api, "kept", json!({"chronflow.io/run-now": "req-1"})).await;
    let before = status_where(api, "kept", "5 runs and the request", |s| {
        s.total_runs >= 5 && s.last_run_now.as_deref() == Some("req-1")
    })
    .await;
    let index = replicas.iter().position(|r| r.name == leader).unwrap();
    replicas[index].kill();
    let killed = Utc::now();
    let after = status_where(api, "kept", "runs of the next leader", |s| {
        s.total_runs >= before.total_runs + 3
    })
    .await;
    for replica in &mut replicas {
        if replica.child.is_some() {
            assert!(replica.terminate().success(), "{}", replica.logs());
        }
    }
    let old: Vec<&str> = after
        .recent_runs
        .iter()
        .filter(|run| run.scheduled_time < killed - chrono::Duration::seconds(1))
        .map(|run| run.run_id.as_str())
        .collect();
    assert!(
        old.len() >= 4,
        "runs of the first leader's term kept in recentRuns: {old:?}"
    );
    assert_eq!(after.last_run_now.as_deref(), Some("req-1"));
    assert!(after.manual_runs >= 1, "{after:?}");
}

/// A run-now request is handled once its run is recorded started, not at its claim: a leader
/// killed while the request's run waits for a worker leaves it to the next leader, which runs
/// it once. It used to be marked handled at the claim, and the request was lost.
#[tokio::test]
async fn a_run_now_request_queued_when_the_leader_dies_runs_on_the_next_one() {
    let setup = setup("ha-run-now-queued").await;
    let (api, ns) = (&setup.api, setup.ns.as_str());
    let slow = Receiver::start(Behavior {
        status: 200,
        delay: Duration::from_secs(30),
    })
    .await;
    let fast = Receiver::start(Behavior::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let (redis, kubeconfig) = (&test_env().redis_url, &test_env().kubeconfig);
    // One worker: the blocker's run holds it, the request's run waits behind it.
    let one_worker = "max_workers: 1\n";
    let mut replicas: Vec<Replica> = ["q0", "q1"]
        .iter()
        .map(|name| Replica::start_with(ns, name, redis, &dir, one_worker, kubeconfig, &[]))
        .collect();
    let leader = leader_among(ns, &["q0", "q1"]).await;
    // Due once a year: every call is a requested one.
    let yearly = |url: String| {
        json!({"schedule": {"cron": "0 0 0 1 1 *"}, "timeout": "60s",
               "action": {"http": {"url": url, "method": "POST"}}})
    };
    create(api, "blocker", yearly(slow.url("/slow"))).await;
    create(api, "wanted", yearly(fast.url("/fast"))).await;
    crate::run_now::annotate(api, "blocker", json!({"chronflow.io/run-now": "b1"})).await;
    more_calls(&slow, 1).await;
    crate::run_now::annotate(api, "wanted", json!({"chronflow.io/run-now": "w1"})).await;
    // The request is claimed in the ledger and waits for the worker.
    let uid = api.get("wanted").await.unwrap().metadata.uid.unwrap();
    let runs = format!("chronflow:{{{ns}/wanted/{uid}}}:runs");
    let ledger = redis::Client::open(redis.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    eventually("the request claimed", || {
        let (runs, mut ledger) = (runs.clone(), ledger.clone());
        async move {
            let record: Option<String> = redis::cmd("HGET")
                .arg(&runs)
                .arg("m:w1")
                .query_async(&mut ledger)
                .await
                .ok()?;
            record.filter(|r| r.starts_with("claimed "))
        }
    })
    .await;
    assert_eq!(fast.count(), 0, "the request waits behind the blocker");
    let index = replicas.iter().position(|r| r.name == leader).unwrap();
    replicas[index].kill();

    more_calls(&fast, 1).await;
    let status = status_where(api, "wanted", "the request handled", |s| {
        s.last_run_now.as_deref() == Some("w1") && s.manual_runs == 1
    })
    .await;
    for replica in &mut replicas {
        if replica.child.is_some() {
            assert!(replica.terminate().success(), "{}", replica.logs());
        }
    }
    let keys: Vec<String> = fast.hits().into_iter().map(|h| h.idempotency_key).collect();
    assert_eq!(keys, [format!("{ns}/wanted@manual:w1")], "{status:?}");
}

/// libfaketime's library for multithreaded programs (`scripts/test-deps` installs it).
pub(crate) fn libfaketime() -> String {
    let found = std::fs::read_dir("/usr/lib")
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path().join("faketime/libfaketimeMT.so.1"))
        .find(|path| path.exists());
    let path = found.expect("libfaketime (scripts/test-deps installs the faketime package)");
    path.display().to_string()
}

/// A replica whose clock is ahead of the Redis ledger's by more than
/// `leader_election.max_clock_skew` never leads: it would claim instants before they are due,
/// and every later leader would stay silent for the difference. It says why, and a replica
/// whose clock agrees leads instead.
#[tokio::test]
async fn a_replica_whose_clock_is_off_does_not_lead() {
    let setup = setup("ha-clock").await;
    let ns = setup.ns.as_str();
    let dir = tempfile::tempdir().unwrap();
    let (redis, kubeconfig) = (&test_env().redis_url, &test_env().kubeconfig);
    let faketime = libfaketime();
    let ahead = [
        ("LD_PRELOAD", faketime.as_str()),
        ("FAKETIME", "+30"),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
    ];
    let mut skewed = Replica::start_with(ns, "ahead", redis, &dir, "", kubeconfig, &ahead);
    eventually("the skew reported", || async {
        skewed.logs().contains("clock skew").then_some(())
    })
    .await;
    // Alone, for more than a lease duration: the Lease stays free.
    tokio::time::sleep(LEASE_DURATION + Duration::from_secs(1)).await;
    assert_eq!(holder(ns).await, None, "{}", skewed.logs());
    let mut good = Replica::start(ns, "good", redis, &dir);
    assert_eq!(leader_among(ns, &["ahead", "good"]).await, "good");
    let logs = skewed.logs();
    assert!(logs.contains("ms ahead of the Redis ledger"), "{logs}");
    assert!(good.terminate().success());
    assert!(skewed.terminate().success(), "{}", skewed.logs());
}

/// Without leader election, two live processes (a rolling update with surge: the new pod starts
/// before the old one stops) both fire; `Forbid` holds across them: the ledger refuses a run's
/// start while the other process's run of the task is in flight, and counts it missed. Each
/// process used to apply Forbid to its own runs only, and their calls overlapped.
///
/// Which process claims an instant first is a race, and under load the same one can win every
/// time: the new pod's clock runs half a second ahead, so it claims every instant first while it
/// runs, and it is frozen with its call in flight, so the old pod claims the next instant.
#[tokio::test]
async fn forbid_holds_across_two_live_processes_without_leader_election() {
    let setup = setup("ha-surge").await;
    let (api, ns) = (&setup.api, setup.ns.as_str());
    // Each call takes 2.5 s: the old pod's next claims come while the new pod's call is in flight.
    let receiver = Receiver::start(Behavior {
        status: 200,
        delay: Duration::from_millis(2500),
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let (redis, kubeconfig) = (&test_env().redis_url, &test_env().kubeconfig);
    let faketime = libfaketime();
    let alone = [("SCHEDULER__LEADER_ELECTION__ENABLED", "false")];
    let ahead = [
        alone[0],
        ("LD_PRELOAD", faketime.as_str()),
        ("FAKETIME", "+0.5"),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
    ];
    let mut old = Replica::start_with(ns, "old-pod", redis, &dir, "", kubeconfig, &alone);
    let mut new = Replica::start_with(ns, "new-pod", redis, &dir, "", kubeconfig, &ahead);
    let spec = json!({
        "schedule": {"cron": "* * * * * *"},
        "concurrencyPolicy": "Forbid",
        "timeout": "5s",
        "action": {"http": {"url": receiver.url("/hook"), "method": "POST"}},
    });
    create(api, "alone", spec).await;
    // Both took the task over before any run, so neither learns of the other's runs but from
    // the ledger.
    status_where(api, "alone", "Scheduled", |st| st.next_run_time.is_some()).await;
    more_calls(&receiver, 1).await;
    new.signal("-STOP");
    eventually("the old pod refused a start", || async {
        old.logs()
            .contains("in flight in another process")
            .then_some(())
    })
    .await;
    new.signal("-CONT");
    // Both fire on for a while, then the old one stops, as a rollout ends.
    more_calls(&receiver, 3).await;
    assert!(old.terminate().success(), "{}", old.logs());
    more_calls(&receiver, 1).await;
    assert!(new.terminate().success(), "{}", new.logs());

    let arrivals: Vec<String> = receiver
        .hits()
        .iter()
        .map(|h| format!("{} {}", h.arrived.format("%S%.3f"), h.idempotency_key))
        .collect();
    assert_eq!(
        receiver.max_in_flight(),
        1,
        "two calls of a Forbid task at once: {arrivals:#?}\n{}\n{}",
        old.logs(),
        new.logs()
    );
    let hits = receiver.hits();
    let seen = instants(&hits, ns, "alone");
    let status = status_where(api, "alone", "the skipped instants counted", |s| {
        s.missed_runs > 0
    })
    .await;
    assert_eq!(
        status.total_runs,
        status.successful_runs + status.failed_runs
    );
    eprintln!("surge: {} calls, {status:?}", seen.len());
}

/// A Redis whose `maxmemory-policy` may evict the ledger's keys (an evicted record can let an
/// instant run twice) is named in a warning at start; `noeviction` is not.
#[tokio::test]
async fn a_redis_that_may_evict_the_ledger_is_warned_about_at_start() {
    let setup = setup("ha-evicting").await;
    let ns = setup.ns.as_str();
    let redis = OwnRedis::start();
    let dir = tempfile::tempdir().unwrap();
    let quiet = Replica::start(ns, "quiet", &redis.url(), &dir);
    let mut probe = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    eventually("the replica ready", || async {
        quiet
            .logs()
            .contains("chronflow operator started")
            .then_some(())
    })
    .await;
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory-policy")
        .arg("allkeys-lru")
        .query_async(&mut probe)
        .await
        .unwrap();
    let warned = Replica::start(ns, "warned", &redis.url(), &dir);
    let warning = "maxmemory-policy may evict its keys";
    eventually("the warning", || async {
        warned.logs().contains("allkeys-lru").then_some(())
    })
    .await;
    assert!(warned.logs().contains(warning), "{}", warned.logs());
    assert!(!quiet.logs().contains(warning), "{}", quiet.logs());
}
