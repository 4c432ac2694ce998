//! The Redis run ledger against a real redis-server: one claim wins, epochs fence stale
//! leaders, take-over settles what a dead leader left, counts move once, the pool stays
//! within its size and an unreachable Redis answers with an error in time.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use chronflow::ledger::{Counts, Mark, RedisLedger, RedisSettings, RunState, Verdict};
use chronflow::run::{RunId, TaskKey};
use chrono::{DateTime, TimeZone, Utc};
use futures::future::join_all;

use crate::support::test_env;

fn ledger(max_connections: usize) -> RedisLedger {
    RedisLedger::new(&RedisSettings {
        url: test_env().redis_url.clone(),
        max_connections,
        timeout: Duration::from_secs(5),
    })
    .expect("a ledger")
}

/// A task no other test uses.
fn task(prefix: &str) -> TaskKey {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    TaskKey::new(
        format!("ledger-{}", std::process::id()),
        format!("{prefix}-{n}"),
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

#[tokio::test]
async fn of_many_concurrent_claims_of_one_run_exactly_one_wins() {
    let ledger = ledger(8);
    let task = task("race");
    for second in 0..5 {
        let run = RunId::new(&task, at(second));
        let claims = (0..40).map(|i| ledger.claim(&run, 1, if i % 2 == 0 { "a" } else { "b" }));
        let verdicts: Vec<Verdict> = join_all(claims)
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
        let won = verdicts.iter().filter(|v| **v == Verdict::Accepted).count();
        assert_eq!(won, 1, "{verdicts:?}");
        assert!(
            verdicts
                .iter()
                .all(|v| *v == Verdict::Accepted || state(v) == Some(RunState::Claimed))
        );
    }
}

#[tokio::test]
async fn a_newer_epoch_fences_the_old_leader_but_counts_the_run_it_had_started() {
    let ledger = ledger(4);
    let task = task("fence");
    let started = RunId::new(&task, at(0));
    let claimed = RunId::new(&task, at(1));
    let later = RunId::new(&task, at(2));
    assert_eq!(
        ledger.claim(&started, 1, "old").await.unwrap(),
        Verdict::Accepted
    );
    assert_eq!(
        ledger
            .mark(&started, 1, "old", Mark::Started)
            .await
            .unwrap(),
        Verdict::Accepted
    );
    assert_eq!(
        ledger.claim(&claimed, 1, "old").await.unwrap(),
        Verdict::Accepted
    );

    // The new leader takes the task over: nothing of epoch 1 is open but `claimed`.
    let open = ledger.open(&task, at(0), 2, "new").await.unwrap();
    let states: Vec<RunState> = open.iter().map(|(_, record)| record.state).collect();
    assert_eq!(states, [RunState::Failed, RunState::Claimed], "{open:?}");

    // The old leader wakes up: it can neither claim, nor start, nor mark missed.
    let fenced = Verdict::Fenced { epoch: 2 };
    assert_eq!(ledger.claim(&later, 1, "old").await.unwrap(), fenced);
    assert_eq!(
        ledger
            .mark(&claimed, 1, "old", Mark::Started)
            .await
            .unwrap(),
        fenced
    );
    assert_eq!(
        ledger.mark(&later, 1, "old", Mark::Missed).await.unwrap(),
        fenced
    );
    // The run it started was settled as failed at take-over; its late report changes nothing.
    let late = ledger
        .mark(&started, 1, "old", Mark::Finished { succeeded: true })
        .await
        .unwrap();
    assert_eq!(state(&late), Some(RunState::Failed));

    // The new leader adopts the claim the old one never started, and runs it once.
    assert_eq!(
        ledger.claim(&claimed, 2, "new").await.unwrap(),
        Verdict::Accepted
    );
    assert_eq!(
        ledger
            .mark(&claimed, 2, "new", Mark::Started)
            .await
            .unwrap(),
        Verdict::Accepted
    );
    let done = Mark::Finished { succeeded: true };
    assert_eq!(
        ledger.mark(&claimed, 2, "new", done).await.unwrap(),
        Verdict::Accepted
    );
    assert_eq!(
        state(&ledger.mark(&claimed, 2, "new", done).await.unwrap()),
        Some(RunState::Succeeded)
    );
    assert_eq!(
        state(&ledger.claim(&claimed, 2, "new").await.unwrap()),
        Some(RunState::Succeeded)
    );

    let counts = ledger.counts(&task).await.unwrap();
    assert_eq!(
        counts,
        Counts {
            runs: 2,
            succeeded: 1,
            failed: 1,
            missed: 0
        }
    );
}

#[tokio::test]
async fn a_run_started_before_a_newer_epoch_acted_finishes_and_is_counted_once() {
    let ledger = ledger(4);
    let task = task("in-flight");
    let run = RunId::new(&task, at(0));
    ledger.claim(&run, 1, "old").await.unwrap();
    ledger.mark(&run, 1, "old", Mark::Started).await.unwrap();
    // The new leader claims the next instant: the task is in epoch 2 from now on.
    let next = RunId::new(&task, at(1));
    assert_eq!(
        ledger.claim(&next, 2, "new").await.unwrap(),
        Verdict::Accepted
    );
    // The old leader's run did happen: its outcome is recorded and counted, once.
    let done = Mark::Finished { succeeded: false };
    assert_eq!(
        ledger.mark(&run, 1, "old", done).await.unwrap(),
        Verdict::Accepted
    );
    assert_eq!(
        state(&ledger.mark(&run, 1, "old", done).await.unwrap()),
        Some(RunState::Failed)
    );
    let counts = ledger.counts(&task).await.unwrap();
    assert_eq!(
        counts,
        Counts {
            runs: 1,
            succeeded: 0,
            failed: 1,
            missed: 0
        }
    );
}

#[tokio::test]
async fn a_missed_instant_is_counted_once_and_never_runs() {
    let ledger = ledger(4);
    let task = task("missed");
    let run = RunId::new(&task, at(0));
    assert_eq!(
        ledger.mark(&run, 1, "a", Mark::Missed).await.unwrap(),
        Verdict::Accepted
    );
    assert_eq!(
        state(&ledger.mark(&run, 1, "a", Mark::Missed).await.unwrap()),
        Some(RunState::Missed)
    );
    assert_eq!(
        state(&ledger.claim(&run, 1, "a").await.unwrap()),
        Some(RunState::Missed)
    );
    // A claimed run that could not start (a full queue) becomes missed too.
    let queued = RunId::new(&task, at(1));
    ledger.claim(&queued, 1, "a").await.unwrap();
    assert_eq!(
        ledger.mark(&queued, 1, "a", Mark::Missed).await.unwrap(),
        Verdict::Accepted
    );
    assert_eq!(
        ledger.counts(&task).await.unwrap(),
        Counts {
            runs: 0,
            succeeded: 0,
            failed: 0,
            missed: 2
        }
    );
}

#[tokio::test]
async fn records_past_the_retention_are_pruned_and_their_instants_stay_handled() {
    let ledger = ledger(4);
    let task = task("prune");
    let old = RunId::new(&task, at(0));
    ledger.claim(&old, 1, "a").await.unwrap();
    let retention = chronflow::ledger::redis::RETENTION.as_secs() as i64;
    let new = RunId::new(&task, at(retention + 60));
    assert_eq!(ledger.claim(&new, 1, "a").await.unwrap(), Verdict::Accepted);
    let open = ledger.open(&task, at(-1), 1, "a").await.unwrap();
    assert_eq!(open.len(), 1, "the old record is pruned: {open:?}");
    // A long catch-up asking for the pruned instant again is told it was handled.
    assert_eq!(
        state(&ledger.claim(&old, 1, "a").await.unwrap()),
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
async fn the_pool_never_opens_more_connections_than_its_size() {
    // Database 13 is this test's alone, so CLIENT LIST tells its connections apart.
    let base = test_env().redis_url.trim_end_matches("/0").to_string();
    let ledger = RedisLedger::new(&RedisSettings {
        url: format!("{base}/13"),
        max_connections: 3,
        timeout: Duration::from_secs(5),
    })
    .unwrap();
    let task = task("pool");
    let mut probe = redis::Client::open(format!("{base}/0"))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    assert_eq!(connections_to(&mut probe, 13).await, 0);

    let claims = (0..300).map(|i| {
        let run = RunId::new(&task, at(i));
        let ledger = &ledger;
        async move { ledger.claim(&run, 1, "a").await }
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
    assert_eq!(ledger.pool_status().0, 3);
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
    })
    .unwrap();
    let started = std::time::Instant::now();
    let error = ledger
        .claim(&RunId::new(&task("down"), at(0)), 1, "a")
        .await
        .unwrap_err();
    assert!(error.0.starts_with("redis: "), "{error}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}
