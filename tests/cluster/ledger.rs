//! The Redis run ledger against a real redis-server: one claim wins, epochs fence stale
//! leaders, take-over settles what a dead leader left, counts move once, the pool stays
//! within its size and an unreachable Redis answers with an error in time.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use chronflow::leader::Term;
use chronflow::ledger::{
    Counts, Ledger, Mark, RedisLedger, RedisSettings, RunState, TakeOver, Verdict,
};
use chronflow::run::{RunId, TaskId, TaskKey};
use chrono::{DateTime, TimeZone, Utc};
use futures::future::join_all;

use crate::support::receiver::{Behavior, Receiver};
use crate::support::{eventually, test_env};

#[path = "../support/engine_core.rs"]
#[allow(dead_code)] // shared with tests/engine.rs, which uses the rest
mod engine_core;

/// A redis-server of the test's own (to stop and restart) and a ledger on it that gives up
/// within 500 ms.
fn own_redis_ledger() -> (crate::failover::OwnRedis, RedisLedger) {
    let redis = crate::failover::OwnRedis::start();
    let ledger = RedisLedger::new(&RedisSettings {
        url: redis.url(),
        max_connections: 4,
        timeout: Duration::from_millis(500),
        cluster: false,
        ca: None,
        wait_replicas: 0,
    })
    .expect("a ledger");
    (redis, ledger)
}

fn ledger(max_connections: usize) -> RedisLedger {
    RedisLedger::new(&RedisSettings {
        url: test_env().redis_url.clone(),
        max_connections,
        timeout: Duration::from_secs(5),
        cluster: false,
        ca: None,
        wait_replicas: 0,
    })
    .expect("a ledger")
}

fn term(epoch: u64, holder: &str) -> Term {
    Term {
        holder: holder.into(),
        epoch,
    }
}

/// A task no other test uses.
fn task(prefix: &str) -> TaskId {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    TaskId::new(
        TaskKey::new(
            format!("ledger-{}", std::process::id()),
            format!("{prefix}-{n}"),
        ),
        format!("uid-{n}"),
    )
}

fn at(second: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(1_800_000_000 + second, 0).unwrap()
}

fn state(verdict: &Verdict) -> Option<RunState> {
    match verdict {
        Verdict::Held(record) => Some(record.state),
        _ => None,
    }
}

async fn claim(ledger: &RedisLedger, run: &RunId, term: &Term) -> Verdict {
    ledger.claim(run, term).await.expect("redis answers")
}

async fn mark(ledger: &RedisLedger, run: &RunId, term: &Term, mark: Mark) -> Verdict {
    ledger
        .mark(run, term, mark)
        .await
        .expect("redis answers")
        .verdict
}

/// The task's counts, without their revision.
async fn counts(ledger: &RedisLedger, task: &TaskId, term: &Term) -> Counts {
    let taken: TakeOver = ledger
        .take_over(task, term, &[], None)
        .await
        .expect("redis answers");
    plain(taken.counts.expect("redis keeps counts"))
}

fn plain(counts: Counts) -> Counts {
    Counts {
        revision: 0,
        ..counts
    }
}

/// A start whose run is over within a minute.
const STARTED: Mark = Mark::Started {
    window: Duration::from_secs(60),
};
const ALONE: Mark = Mark::StartedAlone {
    window: Duration::from_secs(60),
};
const DONE: Mark = Mark::Finished { succeeded: true };
const FAILED: Mark = Mark::Finished { succeeded: false };

#[tokio::test]
async fn of_many_concurrent_claims_of_one_run_exactly_one_wins() {
    let ledger = ledger(8);
    let task = task("race");
    let (a, b) = (term(1, "a"), term(1, "b"));
    for second in 0..5 {
        let run = RunId::new(&task, at(second));
        let claims = (0..40).map(|i| claim(&ledger, &run, if i % 2 == 0 { &a } else { &b }));
        let verdicts = join_all(claims).await;
        let won = verdicts.iter().filter(|v| **v == Verdict::Accepted).count();
        assert_eq!(won, 1, "{verdicts:?}");
        assert!(
            verdicts
                .iter()
                .all(|v| *v == Verdict::Accepted || state(v) == Some(RunState::Claimed))
        );
    }
}

/// Claims and marks of many tasks asked at once travel together (a few script calls, not one
/// per operation), and each gets its own answer: another term's claim is held, ends are
/// counted on their own task. A task's keys all keep their TTL once its first run ended, the
/// set of open runs included (its last run removed from it).
#[tokio::test]
async fn operations_of_many_tasks_share_script_calls_and_each_gets_its_own_answer() {
    let (redis, ledger) = own_redis_ledger();
    let mut probe = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let (mine, theirs) = (term(1, "a"), term(1, "b"));
    let tasks: Vec<TaskId> = (0..300).map(|i| task(&format!("many-{i}"))).collect();
    let runs: Vec<RunId> = tasks.iter().map(|task| RunId::new(task, at(0))).collect();
    for run in runs.iter().step_by(3) {
        assert_eq!(claim(&ledger, run, &theirs).await, Verdict::Accepted);
    }
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(&mut probe)
        .await
        .unwrap();

    let verdicts = join_all(runs.iter().map(|run| claim(&ledger, run, &mine))).await;
    for (i, verdict) in verdicts.iter().enumerate() {
        match i % 3 {
            0 => assert_eq!(
                state(verdict),
                Some(RunState::Claimed),
                "task {i}: {verdict:?}"
            ),
            _ => assert_eq!(*verdict, Verdict::Accepted, "task {i}"),
        }
    }
    let mine_only = || runs.iter().enumerate().filter(|(i, _)| i % 3 != 0);
    let started = join_all(mine_only().map(|(_, run)| mark(&ledger, run, &mine, STARTED))).await;
    assert!(
        started.iter().all(|v| *v == Verdict::Accepted),
        "{started:?}"
    );
    let ends = mine_only().map(|(i, run)| {
        let end = if i % 2 == 0 { DONE } else { FAILED };
        ledger.mark(run, &mine, end)
    });
    for ((i, _), marked) in mine_only().zip(join_all(ends).await) {
        let marked = marked.unwrap();
        assert_eq!(marked.verdict, Verdict::Accepted);
        let counts = marked.counts.expect("an end's counts");
        assert_eq!((counts.runs, counts.succeeded), (1, (i % 2 == 0) as u64));
    }

    let stats: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut probe)
        .await
        .unwrap();
    let calls: u64 = stats
        .lines()
        .find_map(|line| line.strip_prefix("cmdstat_evalsha:calls="))
        .and_then(|rest| rest.split(',').next()?.parse().ok())
        .expect("script calls in INFO commandstats");
    let operations = runs.len() + 2 * mine_only().count();
    assert!(
        calls * 20 <= operations as u64,
        "{calls} script calls for {operations} operations asked at once"
    );

    let kept = chronflow::ledger::redis::KEY_TTL.as_secs() as i64;
    let tag = format!("chronflow:{{{}/{}}}", tasks[1].key, tasks[1].uid);
    for key in ["epoch", "runs", "order", "counts", "open"] {
        let ttl: i64 = redis::cmd("TTL")
            .arg(format!("{tag}:{key}"))
            .query_async(&mut probe)
            .await
            .unwrap();
        assert!(kept - 60 <= ttl && ttl <= kept, "TTL {ttl} s of {key}");
    }
}

#[tokio::test]
async fn a_take_over_fences_the_old_leader_settles_its_runs_and_adopts_its_claims() {
    fencing_scenario(&ledger(4), task("fence")).await;
}

/// Claims, starts and a take-over by a newer epoch: what the old leader may still do, what the
/// new one adopts, and the counts.
async fn fencing_scenario(ledger: &RedisLedger, task: TaskId) {
    let (old, new) = (term(1, "old"), term(2, "new"));
    let started = RunId::new(&task, at(0));
    let claimed = RunId::new(&task, at(1));
    let later = RunId::new(&task, at(2));
    assert_eq!(claim(ledger, &started, &old).await, Verdict::Accepted);
    assert_eq!(
        mark(ledger, &started, &old, STARTED).await,
        Verdict::Accepted
    );
    assert_eq!(claim(ledger, &claimed, &old).await, Verdict::Accepted);
    // A run-now request claimed and never started: its leader may have recorded it handled
    // (the storm with Redis failovers found one whose miss never landed, claimed for good).
    let asked = RunId::manual(&task, "rq-1", at(1));
    assert_eq!(claim(ledger, &asked, &old).await, Verdict::Accepted);

    // The new leader takes the task over: the unstarted claims are handed over; the started run
    // may still be in flight in the old leader's process.
    let taken = ledger.take_over(&task, &new, &[], None).await.unwrap();
    assert_eq!(taken.newest, Some(at(1)));
    let mut unstarted: Vec<String> = taken.unstarted.iter().map(|r| r.to_string()).collect();
    unstarted.sort();
    let mut expected = vec![claimed.to_string(), asked.to_string()];
    expected.sort();
    assert_eq!(unstarted, expected);
    // The old leader can no longer start either.
    for run in [&claimed, &asked] {
        let refused = mark(ledger, run, &old, STARTED).await;
        assert!(matches!(refused, Verdict::Fenced { .. }), "{refused:?}");
    }
    assert_eq!(taken.in_flight, [RunId::new(&task, at(0))]);
    assert_eq!(taken.counts, Some(Counts::default()));
    // Once it cannot be running any more, it is settled failed (its outcome is unknown, and it
    // never runs again).
    let taken = ledger
        .take_over(&task, &new, &taken.in_flight, None)
        .await
        .unwrap();
    assert!(taken.in_flight.is_empty());
    let settled = Counts {
        runs: 1,
        succeeded: 0,
        failed: 1,
        missed: 0,
        manual: 0,
        ..Counts::default()
    };
    assert_eq!(taken.counts.map(plain), Some(settled));

    // The old leader wakes up: it can neither claim, nor start, nor mark missed.
    let fenced = Verdict::Fenced { epoch: 2 };
    assert_eq!(claim(ledger, &later, &old).await, fenced);
    assert_eq!(mark(ledger, &claimed, &old, STARTED).await, fenced);
    assert_eq!(
        mark(ledger, &later, &old, Mark::Missed { count: 1 }).await,
        fenced
    );
    // Its late report of the settled run is refused: counted once, as failed.
    assert_eq!(mark(ledger, &started, &old, DONE).await, fenced);

    // The claim the old one never started is the new leader's now: it runs it once.
    assert_eq!(
        state(&claim(ledger, &claimed, &new).await),
        Some(RunState::Claimed)
    );
    assert_eq!(
        mark(ledger, &claimed, &new, STARTED).await,
        Verdict::Accepted
    );
    assert_eq!(mark(ledger, &claimed, &new, DONE).await, Verdict::Accepted);
    assert_eq!(
        state(&mark(ledger, &claimed, &new, DONE).await),
        Some(RunState::Succeeded)
    );
    assert_eq!(
        state(&claim(ledger, &claimed, &new).await),
        Some(RunState::Succeeded)
    );

    // So is the run-now request: it runs once, counted manual.
    assert_eq!(mark(ledger, &asked, &new, STARTED).await, Verdict::Accepted);
    assert_eq!(mark(ledger, &asked, &new, DONE).await, Verdict::Accepted);

    let expected = Counts {
        runs: 3,
        succeeded: 2,
        failed: 1,
        missed: 0,
        manual: 1,
        ..Counts::default()
    };
    assert_eq!(counts(ledger, &task, &new).await, expected);
    // Nothing is left open.
    assert!(
        ledger
            .take_over(&task, &term(3, "next"), &[], None)
            .await
            .unwrap()
            .unstarted
            .is_empty()
    );
}

#[tokio::test]
async fn a_run_started_before_a_newer_epoch_acted_finishes_and_is_counted_once() {
    let ledger = ledger(4);
    let task = task("in-flight");
    let (old, new) = (term(1, "old"), term(2, "new"));
    let run = RunId::new(&task, at(0));
    claim(&ledger, &run, &old).await;
    mark(&ledger, &run, &old, STARTED).await;
    // The new leader claims the next instant: the task is in epoch 2 from now on.
    assert_eq!(
        claim(&ledger, &RunId::new(&task, at(1)), &new).await,
        Verdict::Accepted
    );
    // The old leader's run did happen: its outcome is recorded and counted, once.
    let marked = ledger.mark(&run, &old, FAILED).await.unwrap();
    assert_eq!(marked.verdict, Verdict::Accepted);
    let once = Counts {
        runs: 1,
        succeeded: 0,
        failed: 1,
        missed: 0,
        manual: 0,
        ..Counts::default()
    };
    assert_eq!(marked.counts.map(plain), Some(once));
    assert_eq!(
        state(&mark(&ledger, &run, &old, FAILED).await),
        Some(RunState::Failed)
    );
    assert_eq!(counts(&ledger, &task, &new).await, once);
}

#[tokio::test]
async fn missed_instants_are_counted_once_and_never_run() {
    let ledger = ledger(4);
    let task = task("missed");
    let leader = term(1, "a");
    let run = RunId::new(&task, at(0));
    let one = Mark::Missed { count: 1 };
    assert_eq!(mark(&ledger, &run, &leader, one).await, Verdict::Accepted);
    assert_eq!(
        state(&mark(&ledger, &run, &leader, one).await),
        Some(RunState::Missed)
    );
    assert_eq!(
        state(&claim(&ledger, &run, &leader).await),
        Some(RunState::Missed)
    );
    // A claimed run that could not start (a full queue) becomes missed too.
    let queued = RunId::new(&task, at(1));
    claim(&ledger, &queued, &leader).await;
    assert_eq!(
        mark(&ledger, &queued, &leader, one).await,
        Verdict::Accepted
    );
    // A catch-up skipping 50 instants records them at the newest.
    let skipped = RunId::new(&task, at(60));
    let many = Mark::Missed { count: 50 };
    assert_eq!(
        mark(&ledger, &skipped, &leader, many).await,
        Verdict::Accepted
    );
    let expected = Counts {
        runs: 0,
        succeeded: 0,
        failed: 0,
        missed: 52,
        manual: 0,
        ..Counts::default()
    };
    assert_eq!(counts(&ledger, &task, &leader).await, expected);
    let taken = ledger
        .take_over(&task, &term(2, "b"), &[], None)
        .await
        .unwrap();
    assert_eq!(
        taken.newest,
        Some(at(60)),
        "a take-over resumes after the skipped instants"
    );
}

/// A start Redis applied but whose answer never came (`redis.wait_replicas` timed out, a reset
/// connection) is reported as not started: the action never began. Its abandonment lands over
/// the start, or the run stays open for good (the fault checker found starts left so after the
/// drain, by a replica that kept its shards to the end). Only the process that started it may
/// abandon it; a plain miss never lands over a start (it may come from a claim whose answer was
/// lost, of a run that did start later).
#[tokio::test]
async fn a_start_whose_answer_never_came_is_abandoned_by_its_own_term_only() {
    let ledger = ledger(4);
    let task = task("unconfirmed");
    let me = term(1, "a#1");
    let run = RunId::new(&task, at(0));
    assert_eq!(claim(&ledger, &run, &me).await, Verdict::Accepted);
    assert_eq!(mark(&ledger, &run, &me, STARTED).await, Verdict::Accepted);
    let missed = Mark::Missed { count: 1 };
    assert_eq!(
        state(&mark(&ledger, &run, &me, missed).await),
        Some(RunState::Started),
        "a plain miss over a start"
    );
    let restarted = term(1, "a#2");
    assert_eq!(
        state(&mark(&ledger, &run, &restarted, Mark::Abandoned).await),
        Some(RunState::Started),
        "another process abandons a start"
    );
    assert_eq!(
        mark(&ledger, &run, &me, Mark::Abandoned).await,
        Verdict::Accepted
    );
    let taken = ledger
        .take_over(&task, &term(2, "b#1"), &[], None)
        .await
        .unwrap();
    assert!(taken.in_flight.is_empty(), "{:?}", taken.in_flight);
    let counted = plain(taken.counts.unwrap());
    assert_eq!((counted.runs, counted.missed), (0, 1));
}

#[tokio::test]
async fn records_past_the_retention_are_pruned_and_their_instants_stay_handled() {
    let ledger = ledger(4);
    let task = task("prune");
    let leader = term(1, "a");
    let old = RunId::new(&task, at(0));
    claim(&ledger, &old, &leader).await;
    let retention = chronflow::ledger::redis::RETENTION.as_secs() as i64;
    let new = RunId::new(&task, at(retention + 60));
    assert_eq!(claim(&ledger, &new, &leader).await, Verdict::Accepted);
    let taken = ledger
        .take_over(&task, &term(2, "b"), &[], None)
        .await
        .unwrap();
    assert_eq!(
        taken.unstarted,
        [RunId::new(&task, at(retention + 60))],
        "the old claim is pruned"
    );
    // A long catch-up asking for the pruned instant again is told it was handled.
    assert_eq!(
        state(&claim(&ledger, &old, &term(2, "b")).await),
        Some(RunState::Unknown)
    );
}

/// Connections to database `db`, as `CLIENT LIST` shows them.
async fn connections_to(probe: &mut redis::aio::MultiplexedConnection, db: u32) -> usize {
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(probe)
        .await
        .unwrap();
    list.lines()
        .filter(|line| line.contains(&format!(" db={db} ")))
        .count()
}

#[tokio::test]
async fn the_ledger_never_opens_more_connections_than_max_connections() {
    // Database 13 is this test's alone, so CLIENT LIST tells its connections apart.
    let base = test_env().redis_url.trim_end_matches("/0").to_string();
    let ledger = RedisLedger::new(&RedisSettings {
        url: format!("{base}/13"),
        max_connections: 3,
        timeout: Duration::from_secs(5),
        cluster: false,
        ca: None,
        wait_replicas: 0,
    })
    .unwrap();
    let task = task("pool");
    let leader = term(1, "a");
    let mut probe = redis::Client::open(format!("{base}/0"))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    assert_eq!(connections_to(&mut probe, 13).await, 0);

    let claims = (0..300).map(|i| {
        let run = RunId::new(&task, at(i));
        let (ledger, leader) = (&ledger, &leader);
        async move { ledger.claim(&run, leader).await }
    });
    let mut probe_during = probe.clone();
    let sampling = async {
        let mut most = 0;
        for _ in 0..30 {
            most = most.max(connections_to(&mut probe_during, 13).await);
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        most
    };
    let (results, most) = tokio::join!(join_all(claims), sampling);
    assert!(results.iter().all(|r| *r == Ok(Verdict::Accepted)));
    let after = connections_to(&mut probe, 13).await;
    assert!(
        most <= 3 && (1..=3).contains(&after),
        "at most 3 expected: {most} during, {after} after"
    );
    assert_eq!(ledger.connection_count(), 3);
}

/// Every connection answers the first operation after Redis restarted, whether it was idle
/// while Redis was down (its socket closed under it) or failed an operation meanwhile.
#[tokio::test]
async fn after_a_redis_restart_the_first_operations_on_every_connection_succeed() {
    let (mut redis, ledger) = own_redis_ledger(); // four connections
    let task = task("restart");
    let leader = term(1, "a");
    let claim = |i| {
        let (ledger, run, leader) = (&ledger, RunId::new(&task, at(i)), &leader);
        async move { ledger.claim(&run, leader).await }
    };
    for i in 0..4 {
        assert_eq!(claim(i).await, Ok(Verdict::Accepted));
    }
    redis.kill();
    for i in 4..6 {
        assert!(claim(i).await.is_err(), "Redis is down");
    }
    // Down long enough for the connections' own attempts to connect again to fail too: an
    // outage, not a wait for something to happen.
    tokio::time::sleep(Duration::from_secs(2)).await;
    redis.restart();
    for i in 6..14 {
        assert_eq!(claim(i).await, Ok(Verdict::Accepted), "claim {i}");
    }
}

#[tokio::test]
async fn an_unreachable_redis_is_an_error_within_the_timeout() {
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let ledger = RedisLedger::new(&RedisSettings {
        url: format!("redis://127.0.0.1:{port}/0"),
        max_connections: 2,
        timeout: Duration::from_millis(500),
        cluster: false,
        ca: None,
        wait_replicas: 0,
    })
    .unwrap();
    let started = std::time::Instant::now();
    let run = RunId::new(&task("down"), at(0));
    let error = ledger.claim(&run, &term(1, "a")).await.unwrap_err();
    assert!(error.0.starts_with("redis: "), "{error}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn the_ledger_works_on_a_three_master_redis_cluster() {
    let ledger = RedisLedger::new(&RedisSettings {
        url: crate::support::redis_cluster_url(),
        max_connections: 4,
        timeout: Duration::from_secs(5),
        cluster: true,
        ca: None,
        wait_replicas: 0,
    })
    .unwrap();
    // Twelve tasks: their hash tags spread over the three masters' slots.
    let tasks: Vec<TaskId> = (0..12).map(|_| task("cluster")).collect();
    join_all(tasks.iter().map(|t| fencing_scenario(&ledger, t.clone()))).await;
    // One winner per run there too.
    let run = RunId::new(&tasks[0], at(100));
    let leader = term(3, "next");
    let verdicts = join_all((0..20).map(|_| claim(&ledger, &run, &leader))).await;
    let won = verdicts.iter().filter(|v| **v == Verdict::Accepted).count();
    assert_eq!(won, 1, "{verdicts:?}");
}

#[tokio::test]
async fn without_leader_election_a_restarted_process_takes_over_the_previous_one_s_runs() {
    let ledger = ledger(4);
    let task = task("solo");
    // Every process of a replica without leader election is in epoch 0; its name tells them
    // apart.
    let (before, after) = (Term::single("before"), Term::single("after"));
    let started = RunId::new(&task, at(0));
    let claimed = RunId::new(&task, at(1));
    claim(&ledger, &started, &before).await;
    mark(&ledger, &started, &before, STARTED).await;
    claim(&ledger, &claimed, &before).await;

    let taken = ledger.take_over(&task, &after, &[], None).await.unwrap();
    assert_eq!(
        taken.unstarted,
        [RunId::new(&task, at(1))],
        "the unstarted claim is the new process's now"
    );
    assert_eq!(taken.in_flight, [RunId::new(&task, at(0))]);
    // The old process, were it still alive, can no longer start that claim.
    let refused = mark(&ledger, &claimed, &before, STARTED).await;
    assert_eq!(state(&refused), Some(RunState::Claimed));
    assert_eq!(
        mark(&ledger, &claimed, &after, STARTED).await,
        Verdict::Accepted
    );
    // Two processes claiming the same instant in epoch 0 (a misconfiguration): one wins.
    let race = RunId::new(&task, at(2));
    assert_eq!(claim(&ledger, &race, &before).await, Verdict::Accepted);
    assert_eq!(
        state(&claim(&ledger, &race, &after).await),
        Some(RunState::Claimed)
    );
}

#[tokio::test]
async fn backfill_claims_run_what_never_ran_and_requests_are_claimed_by_name() {
    let ledger = &ledger(4);
    let task = task("past");
    let leader = term(1, "a");
    // 10 ran, 11 was missed when due, 12 was never seen.
    let ran = RunId::new(&task, at(10));
    assert_eq!(claim(ledger, &ran, &leader).await, Verdict::Accepted);
    assert_eq!(mark(ledger, &ran, &leader, DONE).await, Verdict::Accepted);
    let missed = RunId::new(&task, at(11));
    let skipped = Mark::Missed { count: 1 };
    assert_eq!(
        mark(ledger, &missed, &leader, skipped).await,
        Verdict::Accepted
    );
    let newest = RunId::new(&task, at(20));
    assert_eq!(claim(ledger, &newest, &leader).await, Verdict::Accepted);

    let past = async |run: &RunId| ledger.claim_past(run, &leader).await.unwrap();
    assert_eq!(state(&past(&ran).await), Some(RunState::Succeeded));
    assert_eq!(past(&missed).await, Verdict::Accepted);
    let never = RunId::new(&task, at(12));
    assert_eq!(past(&never).await, Verdict::Accepted);
    assert_eq!(state(&past(&never).await), Some(RunState::Claimed));
    // A scheduled claim never re-runs a missed instant; a backfill just did, once.
    assert_eq!(
        state(&claim(ledger, &missed, &leader).await),
        Some(RunState::Claimed)
    );

    // A request is claimed by its name, whenever and by whomever it is seen.
    let request = RunId::manual(&task, "2026-11-29T09:00:00Z", at(30));
    assert_eq!(claim(ledger, &request, &leader).await, Verdict::Accepted);
    let seen_later = RunId::manual(&task, "2026-11-29T09:00:00Z", at(40));
    assert_eq!(
        state(&claim(ledger, &seen_later, &leader).await),
        Some(RunState::Claimed)
    );
    assert_eq!(
        mark(ledger, &request, &leader, STARTED).await,
        Verdict::Accepted
    );
    assert_eq!(
        mark(ledger, &request, &leader, DONE).await,
        Verdict::Accepted
    );
    let after = counts(ledger, &task, &leader).await;
    // 11, claimed by the backfill, is no longer counted missed.
    assert_eq!((after.runs, after.manual, after.missed), (2, 1, 0));
    // The request does not move where the schedule resumes after a take-over.
    let taken = ledger
        .take_over(&task, &term(2, "b"), &[], None)
        .await
        .unwrap();
    assert_eq!(taken.newest, Some(at(20)));
}

#[tokio::test]
async fn a_new_leader_adopts_a_started_job_run_and_records_its_end_once() {
    let ledger = ledger(4);
    let task = task("adopt");
    let (old, new) = (term(1, "old"), term(2, "new"));
    let run = RunId::new(&task, at(0));
    claim(&ledger, &run, &old).await;
    mark(&ledger, &run, &old, STARTED).await;
    let taken = ledger.take_over(&task, &new, &[], None).await.unwrap();
    assert_eq!(taken.in_flight, vec![run.clone()]);

    // The new leader takes the run over (its Job runs on); a second adoption is refused.
    let adopt = |term: Term| {
        let (ledger, run) = (&ledger, &run);
        async move { ledger.adopt(run, &term).await.unwrap().verdict }
    };
    assert_eq!(adopt(new.clone()).await, Verdict::Accepted);
    assert_eq!(state(&adopt(new.clone()).await), Some(RunState::Started));
    // The old leader is fenced from then on; the new one records the end, counted once.
    assert_eq!(adopt(old.clone()).await, Verdict::Fenced { epoch: 2 });
    let marked = ledger.mark(&run, &new, DONE).await.unwrap();
    assert_eq!(marked.verdict, Verdict::Accepted);
    assert_eq!(marked.counts.map(|c| (c.runs, c.succeeded)), Some((1, 1)));
    // Settling no longer counts it failed, and a finished run is never adopted again.
    let settled = ledger
        .take_over(&task, &new, std::slice::from_ref(&run), None)
        .await
        .unwrap();
    assert!(settled.in_flight.is_empty());
    assert_eq!(settled.counts.map(|c| (c.runs, c.failed)), Some((1, 0)));
    assert_eq!(
        state(&adopt(term(3, "later")).await),
        Some(RunState::Succeeded)
    );
}

/// Keys named by uid: a task created again under its name has none of the old one's records or
/// counts; a deleted task is fenced at once and its keys go after the grace; every key lives
/// `KEY_TTL` from its last write, so nothing is kept forever.
#[tokio::test]
async fn records_belong_to_one_incarnation_expire_and_are_forgotten_with_it() {
    let ledger = ledger(2);
    let old = task("incarnation");
    let new = TaskId::new(old.key.clone(), format!("{}-again", old.uid));
    let leader = term(1, "a");
    let run = RunId::new(&old, at(0));
    assert_eq!(claim(&ledger, &run, &leader).await, Verdict::Accepted);
    mark(&ledger, &run, &leader, STARTED).await;
    mark(&ledger, &run, &leader, DONE).await;
    assert_eq!(counts(&ledger, &old, &leader).await.runs, 1);
    assert_eq!(counts(&ledger, &new, &leader).await, Counts::default());
    assert_eq!(
        claim(&ledger, &RunId::new(&new, at(0)), &leader).await,
        Verdict::Accepted,
        "the same instant of another incarnation is another run"
    );

    let mut redis = redis::Client::open(test_env().redis_url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let runs_key = format!("chronflow:{{{}/{}}}:runs", old.key, old.uid);
    let ttl: i64 = redis::cmd("TTL")
        .arg(&runs_key)
        .query_async(&mut redis)
        .await
        .unwrap();
    let kept = chronflow::ledger::redis::KEY_TTL.as_secs() as i64;
    assert!(kept - 60 <= ttl && ttl <= kept, "TTL {ttl} s of {runs_key}");

    ledger.forget(&old, Duration::from_secs(30)).await.unwrap();
    let later = term(7, "b");
    let verdict = claim(&ledger, &RunId::new(&old, at(1)), &later).await;
    assert!(
        matches!(verdict, Verdict::Fenced { .. }),
        "a deleted task runs nothing: {verdict:?}"
    );
    let ttl: i64 = redis::cmd("TTL")
        .arg(&runs_key)
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!(
        0 < ttl && ttl <= 30,
        "forgotten keys go after the grace: TTL {ttl}"
    );
}

/// A ledger with no counts of a task (records keyed by name before this release, a Redis
/// flushed or evicted) starts from the counts its status shows; one that has counts keeps them.
#[tokio::test]
async fn a_take_over_seeds_counts_the_ledger_lost_from_the_status() {
    let ledger = ledger(2);
    let task = task("seed");
    let shown = Counts {
        runs: 40,
        succeeded: 38,
        failed: 2,
        missed: 3,
        manual: 1,
        ..Counts::default()
    };
    let taken = ledger
        .take_over(&task, &term(1, "a"), &[], Some(shown))
        .await
        .unwrap();
    assert_eq!(taken.counts.map(plain), Some(shown));
    let run = RunId::new(&task, at(0));
    claim(&ledger, &run, &term(1, "a")).await;
    mark(&ledger, &run, &term(1, "a"), STARTED).await;
    mark(&ledger, &run, &term(1, "a"), DONE).await;
    let stale = Counts::default();
    let taken = ledger
        .take_over(&task, &term(2, "b"), &[], Some(stale))
        .await
        .unwrap();
    let after = taken.counts.unwrap();
    assert_eq!((after.runs, after.succeeded), (41, 39), "{after:?}");
}

/// Epochs for new terms come from one counter: each above the last, and never below the floor
/// a Lease asks for.
#[tokio::test]
async fn new_epochs_rise_above_every_earlier_one_and_the_floor() {
    let ledger = ledger(2);
    let first = ledger.next_epoch(1).await.unwrap();
    let second = ledger.next_epoch(1).await.unwrap();
    assert!(second > first);
    let floor = second + 1000;
    let third = ledger.next_epoch(floor).await.unwrap();
    assert!(third >= floor);
    let drawn = join_all((0..20).map(|_| ledger.next_epoch(1))).await;
    let mut drawn: Vec<u64> = drawn.into_iter().map(Result::unwrap).collect();
    drawn.sort_unstable();
    drawn.dedup();
    assert_eq!(drawn.len(), 20, "concurrent draws are all different");
    assert!(drawn[0] > third);
}

/// The fence reaches every attempt: a leader whose run failed its first attempt and waits to
/// retry sends no retry once a newer term took the task over (the woken old leader of a
/// failover), and every request it sent carried its epoch.
#[tokio::test]
async fn no_attempt_is_sent_once_a_newer_term_took_the_task_over() {
    use chronflow::executor::RetryPolicy;
    use chronflow::policy::Backoff;
    use std::sync::Arc;

    let receiver = Receiver::start(Behavior {
        status: 503,
        delay: Duration::ZERO,
    })
    .await;
    let ledger = Arc::new(ledger(4));
    let epoch = ledger.next_epoch(1).await.unwrap();
    let leader = term(epoch, "old");
    let core = engine_core::Core::start_with(4, 16, ledger.clone() as Arc<dyn Ledger>, leader);
    let id = task("fenced-retry");
    let retry = RetryPolicy {
        max_retries: 3,
        backoff: Backoff::Fixed,
        initial_delay: Duration::from_secs(2),
        max_delay: Duration::from_secs(2),
    };
    let engine_task = http_task(&id, Duration::from_secs(30), &receiver, retry);
    core.engine.upsert(engine_task).await;
    eventually("the first attempt", || async {
        (receiver.count() >= 1).then_some(())
    })
    .await;
    // A newer term takes the task over while the run waits 2 s for its retry.
    let newer = term(ledger.next_epoch(1).await.unwrap(), "new");
    ledger.take_over(&id, &newer, &[], None).await.unwrap();
    // Absence is seen over a window: two retry delays.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let hits = receiver.hits();
    assert_eq!(
        hits.iter().map(|h| h.attempt).collect::<Vec<_>>(),
        [1],
        "attempts sent: {hits:?}"
    );
    assert_eq!(
        hits[0].epoch, epoch,
        "the request carried its leader's epoch"
    );
    core.stop();
}

/// A run's first attempt follows its start, which the ledger accepted for the term: the term is
/// asked again only before a retry, not at the cost of a round trip for every run.
#[tokio::test]
async fn only_a_retry_asks_the_ledger_whether_the_term_still_holds() {
    use chronflow::executor::RetryPolicy;
    use std::sync::Arc;

    let receiver = Receiver::start(Behavior {
        status: 200,
        delay: Duration::ZERO,
    })
    .await;
    let (redis, ledger) = own_redis_ledger();
    let ledger = Arc::new(ledger);
    let leader = term(ledger.next_epoch(1).await.unwrap(), "one");
    let core = engine_core::Core::start_with(4, 16, ledger.clone() as Arc<dyn Ledger>, leader);
    let id = task("first-attempt");
    let engine_task = http_task(
        &id,
        Duration::from_secs(30),
        &receiver,
        RetryPolicy::default(),
    );
    core.engine.upsert(engine_task).await;
    eventually("the run", || async {
        (receiver.count() >= 1).then_some(())
    })
    .await;
    let mut probe = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    // Any check before the attempt was made before the receiver saw it.
    let stats: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut probe)
        .await
        .unwrap();
    assert!(
        !stats.contains("cmdstat_mget:"),
        "a term check for a run whose first attempt went out: {stats}"
    );
    core.stop();
}

/// A task every `every` from now (its first instant due at once), calling `receiver` with a
/// 5 s timeout under `Forbid`.
fn http_task(
    id: &TaskId,
    every: Duration,
    receiver: &Receiver,
    retry: chronflow::executor::RetryPolicy,
) -> chronflow::engine::EngineTask {
    use chronflow::executor::http::SuccessCodes;
    use chronflow::executor::{Action, HttpAction, RunSpec};
    use chronflow::policy::{CatchUpPolicy, ConcurrencyPolicy, FollowRedirects};
    use chronflow::schedule::{IntervalAnchor, Schedule};

    chronflow::engine::EngineTask {
        id: id.clone(),
        generation: 1,
        paused: None,
        schedule: Schedule::interval(every, IntervalAnchor::Start(Utc::now())).unwrap(),
        jitter: None,
        catch_up: CatchUpPolicy::Skip,
        catch_up_from: Some(Utc::now() - chrono::Duration::seconds(1)),
        run: std::sync::Arc::new(RunSpec {
            action: Action::Http(Box::new(HttpAction {
                url: chronflow::executor::http::Target::Url(receiver.url("/hook").parse().unwrap()),
                method: reqwest::Method::POST,
                headers: Vec::new(),
                body: None,
                success_codes: SuccessCodes::parse(&[]).unwrap(),
                follow_redirects: FollowRedirects::Never,
                tls: Default::default(),
            })),
            timeout: Duration::from_secs(5),
            retry,
            concurrency: ConcurrencyPolicy::Forbid,
            max_concurrent_runs: 1,
            starting_deadline: None,
        }),
        run_now: None,
        backfills: Vec::new(),
        adopt: Vec::new(),
        counts: None,
    }
}

/// A dead leader's started run is settled (counted failed) once it cannot be running any more,
/// even when the ledger refused the first attempt to settle it (Redis away): the run was left
/// started for good before.
#[tokio::test]
async fn a_dead_leader_s_run_is_settled_after_redis_refused_the_first_attempt() {
    use chronflow::executor::RetryPolicy;
    use std::sync::Arc;

    let (mut redis, ledger) = own_redis_ledger();
    let ledger = Arc::new(ledger);
    let receiver = Receiver::start(Behavior {
        status: 200,
        delay: Duration::ZERO,
    })
    .await;
    let id = task("settle-retried");
    // The dead leader started a run of an hour ago (one that may last 5 s) and never finished it.
    let old = term(ledger.next_epoch(1).await.unwrap(), "old");
    let start = Mark::Started {
        window: Duration::from_secs(5),
    };
    let started = RunId::new(&id, Utc::now() - chrono::Duration::hours(1));
    assert_eq!(claim(&ledger, &started, &old).await, Verdict::Accepted);
    assert_eq!(
        mark(&ledger, &started, &old, start).await,
        Verdict::Accepted
    );

    let new = term(ledger.next_epoch(1).await.unwrap(), "new");
    let core = engine_core::Core::start_with(2, 16, ledger.clone() as Arc<dyn Ledger>, new);
    let hour = Duration::from_secs(3600);
    let engine_task = http_task(&id, hour, &receiver, RetryPolicy::default());
    core.engine.upsert(engine_task).await;
    // Taken over (the old term fenced): the run is held for its 5 s, then settled.
    eventually("the take-over", || async {
        (!ledger.holds(&id, &old).await.ok()?).then_some(())
    })
    .await;
    redis.kill();
    tokio::time::sleep(Duration::from_secs(7)).await;
    redis.restart();
    eventually("the run settled", || async {
        record_of(&redis.url(), &started)
            .await
            .filter(|r| r.starts_with("failed "))
    })
    .await;
    core.stop();
}

/// `run`'s record, read from Redis at `url` without a leader's term.
async fn record_of(url: &str, run: &RunId) -> Option<String> {
    let task = run.task_id();
    let runs = format!(
        "chronflow:{{{}/{}/{}}}:runs",
        task.key.namespace, task.key.name, task.uid
    );
    let client = redis::Client::open(url).ok()?;
    let mut connection = client.get_multiplexed_async_connection().await.ok()?;
    redis::cmd("HGET")
        .arg(runs)
        .arg(run.instant().timestamp_millis())
        .query_async(&mut connection)
        .await
        .ok()?
}

/// A run found in flight is settled once the window its start recorded is over, not the
/// task's current spec's (edited since to a shorter timeout): settling it sooner would let
/// a `Forbid` task run twice at once while the old leader's run goes on.
#[tokio::test]
async fn a_run_in_flight_is_held_for_the_window_its_start_recorded() {
    use chronflow::executor::RetryPolicy;
    use std::sync::Arc;

    let ledger = Arc::new(ledger(4));
    let receiver = Receiver::start(Behavior {
        status: 200,
        delay: Duration::ZERO,
    })
    .await;
    let id = task("settle-window");
    // The old leader started a run that may last 12 s (a spec with a longer timeout).
    let old = term(ledger.next_epoch(1).await.unwrap(), "old");
    let started = RunId::new(&id, Utc::now() - chrono::Duration::hours(1));
    assert_eq!(claim(&ledger, &started, &old).await, Verdict::Accepted);
    let window = Duration::from_secs(12);
    let start = Mark::Started { window };
    assert_eq!(
        mark(&ledger, &started, &old, start).await,
        Verdict::Accepted
    );

    // The new leader's spec says 5 s.
    let new = term(ledger.next_epoch(1).await.unwrap(), "new");
    let core = engine_core::Core::start_with(2, 16, ledger.clone() as Arc<dyn Ledger>, new);
    let hour = Duration::from_secs(3600);
    let engine_task = http_task(&id, hour, &receiver, RetryPolicy::default());
    core.engine.upsert(engine_task).await;
    eventually("the take-over", || async {
        (!ledger.holds(&id, &old).await.ok()?).then_some(())
    })
    .await;
    let url = &test_env().redis_url;
    // Past the spec's 5 s (and well short of 12 s), the run is still held.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let record = record_of(url, &started).await;
    assert!(
        record.as_deref().is_some_and(|r| r.starts_with("started ")),
        "settled before its window was over: {record:?}"
    );
    eventually("the run settled", || async {
        record_of(url, &started)
            .await
            .filter(|r| r.starts_with("failed "))
    })
    .await;
    core.stop();
}

/// A run-now request whose claim the ledger could not answer (Redis away) is asked again while
/// the term lasts and runs once Redis is back; it was counted missed and never run before.
#[tokio::test]
async fn a_run_now_request_claimed_during_an_outage_runs_once_redis_is_back() {
    use chronflow::engine::RunNow;
    use chronflow::executor::RetryPolicy;
    use std::sync::Arc;

    let (mut redis, ledger) = own_redis_ledger();
    let ledger = Arc::new(ledger);
    let receiver = Receiver::start(Behavior {
        status: 200,
        delay: Duration::ZERO,
    })
    .await;
    let leader = term(ledger.next_epoch(1).await.unwrap(), "leader");
    let core = engine_core::Core::start_with(2, 16, ledger.clone() as Arc<dyn Ledger>, leader);
    let id = task("run-now-outage");
    let hour = Duration::from_secs(3600);
    let mut engine_task = http_task(&id, hour, &receiver, RetryPolicy::default());
    core.engine.upsert(engine_task.clone()).await;
    // Taken over: its first instant ran.
    eventually("the first run", || async {
        (receiver.count() >= 1).then_some(())
    })
    .await;

    redis.kill();
    engine_task.run_now = Some(RunNow {
        request: "during-outage".into(),
        while_paused: false,
    });
    core.engine.upsert(engine_task).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    redis.restart();
    eventually("the request run", || async {
        let hits = receiver.hits();
        let runs = hits
            .iter()
            .filter(|h| h.idempotency_key.contains("during-outage"))
            .count();
        (runs > 0).then_some(runs)
    })
    .await;
    core.stop();
}

/// A `finished` or `missed` mark Redis could not take is kept and lands once Redis is back (the
/// run stayed `started` and uncounted before); the missed marks of a long outage coalesce into
/// a bounded backlog, and every instant is still counted.
#[tokio::test]
async fn marks_refused_during_an_outage_land_once_redis_is_back() {
    use chronflow::ledger::{KEPT_PER_TASK, RetriedMarks};
    use chronflow::run::Report;
    use std::sync::Arc;

    let (mut redis, inner) = own_redis_ledger();
    let (reports_tx, mut reports) = tokio::sync::mpsc::unbounded_channel::<Report>();
    let leader = term(1, "a");
    let marks = RetriedMarks::new(Arc::new(inner), Arc::new(reports_tx));
    let task = task("kept");
    let run = RunId::new(&task, at(0));
    assert_eq!(claim_in(&*marks, &run, &leader).await, Verdict::Accepted);
    let started = marks.mark(&run, &leader, STARTED).await.unwrap();
    assert_eq!(started.verdict, Verdict::Accepted);

    redis.kill();
    assert!(marks.mark(&run, &leader, DONE).await.is_err());
    // Well past the backlog's bound; each refusal waits out the client's reconnect delay (about
    // 150 ms), and a task's missed marks go one at a time.
    let outage: i64 = 200;
    for second in 1..=outage {
        let missed = RunId::new(&task, at(second));
        let refused = marks
            .mark(&missed, &leader, Mark::Missed { count: 1 })
            .await;
        assert!(refused.is_err());
    }
    assert!(
        marks.pending() <= KEPT_PER_TASK + 2,
        "{} marks kept for one task",
        marks.pending()
    );
    redis.restart();
    let counts = tokio::time::timeout(crate::support::timeout(), async {
        loop {
            match reports.recv().await {
                Some(Report::Counts { counts, .. })
                    if counts.missed == outage as u64 && counts.runs == 1 =>
                {
                    return counts;
                }
                Some(_) => {}
                None => panic!("the reports ended"),
            }
        }
    })
    .await
    .expect("the kept marks landed");
    assert_eq!((counts.succeeded, counts.failed), (1, 0), "{counts:?}");
    assert_eq!(marks.pending(), 0);
}

/// An instant the ledger could not claim (Redis away) is recorded missed before any later
/// instant of the task is claimed. The next leader resumes after the newest record: a miss
/// still waiting in memory when the term ends, behind a later record, would be neither run
/// nor counted (the fault checker's seed 0x2910 found one).
#[tokio::test]
async fn an_instant_that_could_not_be_claimed_is_recorded_before_any_later_one() {
    use chronflow::leader::Terms;
    use chronflow::ledger::{RecordMissed, RetriedMarks};
    use chronflow::run::{MissKind, Report, ReportSink, Trigger};
    use std::sync::Arc;

    let (mut redis, inner) = own_redis_ledger();
    let inner = Arc::new(inner);
    let (reports, _received) = tokio::sync::mpsc::unbounded_channel::<Report>();
    let reports: Arc<dyn ReportSink> = Arc::new(reports);
    let old = term(inner.next_epoch(1).await.unwrap(), "old");
    let (leader, watch) = tokio::sync::watch::channel(Terms::all(old.clone()));
    let marks = RetriedMarks::new(inner.clone(), reports.clone());
    // The engine's sink: it reports what it could not claim.
    let sink = RecordMissed {
        ledger: marks.clone(),
        leader: watch,
        inner: reports,
    };
    let task = task("claim-order");
    let run = |second| RunId::new(&task, at(second));

    redis.kill();
    assert!(marks.claim(&run(0), &old).await.is_err());
    sink.record(Report::Missed {
        task: task.clone(),
        count: 1,
        run: run(0),
        trigger: Trigger::Schedule,
        kind: MissKind::Claim,
        reason: "cannot claim the run".into(),
    });
    // Past the first retries of what was kept, so no retry lands it by chance meanwhile.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    // The term ends (the Lease deleted) while a batch of its claims is still on its way (the
    // long run with Redis failovers found one): the batch's claim lands after the kept miss.
    leader.send_replace(Terms::default());
    redis.restart();
    assert_eq!(claim_in(&*marks, &run(1), &old).await, Verdict::Accepted);

    // The next leader resumes after the newest record.
    let new = term(inner.next_epoch(1).await.unwrap(), "new");
    leader.send_replace(Terms::all(new.clone()));
    let took = inner.take_over(&task, &new, &[], None).await.unwrap();
    assert_eq!(took.newest, Some(at(1)));
    let counts = took.counts.unwrap();
    assert_eq!(
        counts.missed, 1,
        "the instant before the newest record is counted: {counts:?}"
    );
}

async fn claim_in(ledger: &dyn Ledger, run: &RunId, term: &Term) -> Verdict {
    ledger.claim(run, term).await.expect("redis answers")
}

/// Backfilling an instant that was counted missed moves it from missed to its outcome: one
/// missed on its own, or one of those a coalesced miss (a catch-up) counted without a record.
/// An instant that was never counted missed leaves the count alone.
#[tokio::test]
async fn a_backfilled_instant_that_was_missed_moves_from_missed_to_its_outcome() {
    let ledger = ledger(2);
    let task = task("backfill-missed");
    let leader = term(1, "a");
    let run = |second| RunId::new(&task, at(second));
    for second in [0, 4] {
        assert_eq!(
            claim(&ledger, &run(second), &leader).await,
            Verdict::Accepted
        );
        mark(&ledger, &run(second), &leader, STARTED).await;
        mark(&ledger, &run(second), &leader, DONE).await;
    }
    // A catch-up missed 1, 2 and 3: one mark, recorded at the newest.
    mark(&ledger, &run(3), &leader, Mark::Missed { count: 3 }).await;
    let before = counts(&ledger, &task, &leader).await;
    assert_eq!((before.runs, before.missed), (2, 3));

    for (second, missed) in [(2, 2), (3, 1), (1, 0)] {
        let past = ledger.claim_past(&run(second), &leader).await.unwrap();
        assert_eq!(past, Verdict::Accepted, "instant {second}");
        mark(&ledger, &run(second), &leader, STARTED).await;
        let done = ledger.mark(&run(second), &leader, DONE).await.unwrap();
        let counts = done.counts.unwrap();
        assert_eq!(
            counts.missed, missed,
            "after backfilling instant {second}: {counts:?}"
        );
        assert_eq!(counts.runs, counts.succeeded + counts.failed);
    }
    // Never counted missed: a backfill before the first record.
    assert_eq!(
        ledger.claim_past(&run(-5), &leader).await.unwrap(),
        Verdict::Accepted
    );
    assert!(state(&ledger.claim_past(&run(2), &leader).await.unwrap()).is_some());
    let after = counts(&ledger, &task, &leader).await;
    assert_eq!((after.runs, after.missed), (5, 0), "{after:?}");
}

/// `Forbid` across processes of one epoch: a start is refused while another process's run of
/// the task is in flight, and accepted once it finished.
#[tokio::test]
async fn a_start_alone_is_refused_while_another_process_runs_the_task() {
    let ledger = ledger(2);
    let task = task("alone");
    let (a, b) = (Term::single("a#1"), Term::single("b#2"));
    let (first, second) = (RunId::new(&task, at(0)), RunId::new(&task, at(1)));
    assert_eq!(claim(&ledger, &first, &a).await, Verdict::Accepted);
    assert_eq!(mark(&ledger, &first, &a, ALONE).await, Verdict::Accepted);
    assert_eq!(claim(&ledger, &second, &b).await, Verdict::Accepted);
    let busy = mark(&ledger, &second, &b, ALONE).await;
    assert!(
        matches!(&busy, Verdict::Busy(r) if r.holder == "a#1"),
        "{busy:?}"
    );
    // Not refused for runs that need not run alone, nor once the other one finished.
    mark(&ledger, &first, &a, DONE).await;
    assert_eq!(mark(&ledger, &second, &b, ALONE).await, Verdict::Accepted);
}

/// `redis.wait_replicas`: a claim counts as made once the replicas have it (`WAIT`), so a
/// replica promoted after a failover knows every claim acted on; without them, it is an error
/// in time, and the run is not started.
#[tokio::test]
async fn claims_wait_for_the_replicas_they_ask_for() {
    let primary = crate::failover::OwnRedis::start();
    let mut replica = crate::failover::OwnRedis::start_replica_of(&primary);
    let ledger = RedisLedger::new(&RedisSettings {
        url: primary.url(),
        max_connections: 2,
        timeout: Duration::from_millis(1500),
        cluster: false,
        ca: None,
        wait_replicas: 1,
    })
    .unwrap();
    let task = task("replicated");
    let leader = term(1, "a");
    eventually("the replica in sync", || async {
        let claimed = ledger.claim(&RunId::new(&task, at(0)), &leader).await;
        claimed.ok().map(|_| ())
    })
    .await;
    replica.kill();
    let started = tokio::time::Instant::now();
    let error = ledger
        .claim(&RunId::new(&task, at(1)), &leader)
        .await
        .expect_err("no replica has it");
    assert!(error.0.contains("0 of 1 replicas"), "{error}");
    assert!(started.elapsed() < Duration::from_secs(4));

    // Redis applied that claim; only its answer failed. Asked again by the same term once the
    // replica is back, it is that term's claim (a backfill or run-now retry runs it), and no
    // one else's.
    replica.restart();
    let again = eventually("the replica back in sync", || async {
        ledger.claim(&RunId::new(&task, at(1)), &leader).await.ok()
    })
    .await;
    assert!(
        matches!(&again, Verdict::Held(r) if r.holder == "a"),
        "{again:?}"
    );
    assert_eq!(again.clone().asked_again(&leader), Verdict::Accepted);
    let other = term(1, "b");
    assert_ne!(again.asked_again(&other), Verdict::Accepted);
}
