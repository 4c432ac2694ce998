//! The engine and executor without a cluster (as standalone mode will run them), calling a
//! real HTTP receiver on loopback: catch-up after downtime, starting deadlines, the bounded
//! queue, and completion of one-shot tasks.

#[path = "support/engine_core.rs"]
mod engine_core;
#[path = "support/receiver.rs"]
mod receiver;

use std::sync::Arc;
use std::time::Duration;

use chronflow::engine::EngineTask;
use chronflow::executor::http::{HeaderValue, SuccessCodes};
use chronflow::executor::{Action, HttpAction, RetryPolicy, RunSpec};
use chronflow::policy::{CatchUpPolicy, ConcurrencyPolicy};
use chronflow::run::{Report, ScheduleState, TaskId, TaskKey};
use chronflow::schedule::{IntervalAnchor, Schedule};
use chrono::{DateTime, Utc};
use engine_core::Core;
use receiver::{Behavior, Receiver};
use tokio::sync::mpsc;

fn task(
    name: &str,
    schedule: Schedule,
    url: String,
    catch_up: CatchUpPolicy,
    deadline: Option<Duration>,
    catch_up_from: Option<DateTime<Utc>>,
) -> EngineTask {
    EngineTask {
        id: TaskId::new(TaskKey::new("test", name), format!("uid-{name}")),
        generation: 1,
        paused: None,
        schedule,
        jitter: None,
        catch_up,
        catch_up_from,
        run: Arc::new(RunSpec {
            action: Action::Http(HttpAction {
                url: url.parse().unwrap(),
                method: reqwest::Method::POST,
                headers: vec![("X-Test".into(), HeaderValue::Literal("1".into()))],
                body: None,
                success_codes: SuccessCodes::parse(&[]).unwrap(),
            }),
            timeout: Duration::from_secs(5),
            retry: RetryPolicy::default(),
            concurrency: ConcurrencyPolicy::Allow,
            max_concurrent_runs: 10,
            starting_deadline: deadline,
        }),
    }
}

/// Collects reports until `done` says enough, within a generous bound.
async fn collect(
    reports: &mut mpsc::UnboundedReceiver<Report>,
    done: impl Fn(&[Report]) -> bool,
) -> Vec<Report> {
    let mut seen = Vec::new();
    let outcome = tokio::time::timeout(Duration::from_secs(30), async {
        while !done(&seen) {
            match reports.recv().await {
                Some(report) => seen.push(report),
                None => break,
            }
        }
    })
    .await;
    assert!(outcome.is_ok(), "timed out; reports so far: {seen:#?}");
    seen
}

fn finished(reports: &[Report]) -> usize {
    reports
        .iter()
        .filter(|r| matches!(r, Report::Finished { .. }))
        .count()
}

fn missed(reports: &[Report]) -> u64 {
    reports
        .iter()
        .map(|r| {
            if let Report::Missed { count, .. } = r {
                *count
            } else {
                0
            }
        })
        .sum()
}

/// An every-second interval whose last run was `down` seconds ago.
fn after_downtime(down: i64) -> (Schedule, DateTime<Utc>) {
    let last = Utc::now() - chrono::Duration::seconds(down);
    let schedule = Schedule::interval(Duration::from_secs(1), IntervalAnchor::Start(last)).unwrap();
    (schedule, last)
}

#[tokio::test]
async fn catch_up_latest_runs_the_newest_missed_instant_once() {
    let receiver = Receiver::start(Behavior::default()).await;
    let mut core = Core::start(4, 100);
    let (schedule, last) = after_downtime(10);
    core.engine
        .upsert(task(
            "latest",
            schedule,
            receiver.url("/x"),
            CatchUpPolicy::Latest,
            None,
            Some(last),
        ))
        .await;
    let reports = collect(&mut core.reports, |r| finished(r) >= 1 && missed(r) >= 1).await;
    assert_eq!(
        missed(&reports),
        9,
        "instants 1..=9 s after the last run are missed"
    );
    let first = receiver.hits()[0].scheduled;
    assert!(
        Utc::now() - first < chrono::Duration::seconds(3),
        "the run was the newest instant"
    );
}

#[tokio::test]
async fn catch_up_all_runs_every_missed_instant_oldest_first_but_honours_the_deadline() {
    let receiver = Receiver::start(Behavior::default()).await;
    let mut core = Core::start(4, 100);
    let (schedule, last) = after_downtime(8);
    let deadline = Some(Duration::from_millis(3500));
    core.engine
        .upsert(task(
            "all",
            schedule,
            receiver.url("/x"),
            CatchUpPolicy::All,
            deadline,
            Some(last),
        ))
        .await;
    // Instants 1..=8 s after `last` are due at once: those more than 3.5 s late are missed by
    // the deadline, the rest run.
    let reports = collect(&mut core.reports, |r| finished(r) + missed(r) as usize >= 8).await;
    let late: Vec<_> = reports
        .iter()
        .filter_map(|r| match r {
            Report::Missed { reason, .. } => Some(reason.clone()),
            _ => None,
        })
        .collect();
    assert!(
        late.iter()
            .all(|reason| reason.contains("starting deadline")),
        "{late:?}"
    );
    assert!((4..=5).contains(&late.len()), "{late:?}");
    let scheduled: Vec<_> = receiver.hits().iter().map(|h| h.scheduled).collect();
    assert!(
        scheduled.windows(2).all(|w| w[0] < w[1]),
        "oldest first: {scheduled:?}"
    );
}

#[tokio::test]
async fn catch_up_skip_runs_nothing_of_the_outage() {
    let receiver = Receiver::start(Behavior::default()).await;
    let mut core = Core::start(4, 100);
    let (schedule, last) = after_downtime(6);
    core.engine
        .upsert(task(
            "skip",
            schedule,
            receiver.url("/x"),
            CatchUpPolicy::Skip,
            None,
            Some(last),
        ))
        .await;
    let reports = collect(&mut core.reports, |r| missed(r) >= 1 && finished(r) >= 1).await;
    assert_eq!(missed(&reports), 6);
    assert!(
        receiver
            .hits()
            .iter()
            .all(|h| h.scheduled > Utc::now() - chrono::Duration::seconds(3))
    );
}

#[tokio::test]
async fn a_full_queue_counts_runs_as_missed() {
    let receiver = Receiver::start(Behavior {
        status: 200,
        delay: Duration::from_secs(3),
    })
    .await;
    let mut core = Core::start(1, 1);
    let (schedule, last) = after_downtime(5);
    core.engine
        .upsert(task(
            "crowded",
            schedule,
            receiver.url("/x"),
            CatchUpPolicy::All,
            None,
            Some(last),
        ))
        .await;
    let reports = collect(&mut core.reports, |r| missed(r) >= 1).await;
    let reason = reports
        .iter()
        .find_map(|r| match r {
            Report::Missed { reason, .. } => Some(reason.clone()),
            _ => None,
        })
        .unwrap();
    assert!(reason.contains("queue is full"), "{reason}");
}

#[tokio::test]
async fn a_one_shot_runs_once_then_reports_nothing_left() {
    let receiver = Receiver::start(Behavior::default()).await;
    let mut core = Core::start(4, 100);
    let at = Utc::now() + chrono::Duration::milliseconds(500);
    core.engine
        .upsert(task(
            "once",
            Schedule::at(at),
            receiver.url("/x"),
            CatchUpPolicy::Latest,
            None,
            None,
        ))
        .await;
    let next = |r: &Report| match r {
        Report::Schedule {
            state: ScheduleState::Scheduled { next, .. },
            ..
        } => Some(*next),
        _ => None,
    };
    let reports = collect(&mut core.reports, |r| {
        finished(r) == 1 && r.iter().any(|x| next(x) == Some(None))
    })
    .await;
    assert_eq!(receiver.count(), 1);
    assert_eq!(receiver.hits()[0].scheduled, at);
    assert_eq!(next(&reports[0]), Some(Some(at)));
}
