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
            action: Action::Http(Box::new(HttpAction {
                url: chronflow::executor::http::Target::Url(url.parse().unwrap()),
                method: reqwest::Method::POST,
                headers: vec![("X-Test".into(), HeaderValue::Literal("1".into()))],
                body: None,
                success_codes: SuccessCodes::parse(&[]).unwrap(),
                follow_redirects: chronflow::policy::FollowRedirects::Never,
                tls: Default::default(),
            })),
            timeout: Duration::from_secs(5),
            retry: RetryPolicy::default(),
            concurrency: ConcurrencyPolicy::Allow,
            max_concurrent_runs: 10,
            starting_deadline: deadline,
        }),
        run_now: None,
        backfills: Vec::new(),
        adopt: Vec::new(),
        counts: None,
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

/// An every-`every` interval task starting now, with a concurrency policy.
fn periodic(name: &str, every: Duration, url: String, policy: ConcurrencyPolicy) -> EngineTask {
    let schedule = Schedule::interval(every, IntervalAnchor::Start(Utc::now())).unwrap();
    let mut task = task(name, schedule, url, CatchUpPolicy::Skip, None, None);
    let run = Arc::make_mut(&mut task.run);
    run.concurrency = policy;
    run.timeout = Duration::from_secs(10);
    task
}

fn finished_messages(reports: &[Report]) -> Vec<String> {
    reports
        .iter()
        .filter_map(|r| match r {
            Report::Finished { run, .. } => run.message.clone(),
            _ => None,
        })
        .collect()
}

fn missed_reasons(reports: &[Report]) -> Vec<String> {
    reports
        .iter()
        .filter_map(|r| match r {
            Report::Missed { reason, .. } => Some(reason.clone()),
            _ => None,
        })
        .collect()
}

/// Whether the engine fired an instant of task `name`: after the fact it reports when the task
/// is added, a second one follows each firing.
fn fired(reports: &[Report], name: &str) -> bool {
    let facts = reports.iter().filter(|r| {
        matches!(r, Report::Schedule { task, state: ScheduleState::Scheduled { .. } } if task.key.name == name)
    });
    facts.count() >= 2
}

fn started(reports: &[Report], name: &str) -> usize {
    reports
        .iter()
        .filter(|r| matches!(r, Report::Started { task, .. } if task.key.name == name))
        .count()
}

#[tokio::test]
async fn a_misbehaving_task_does_not_keep_a_one_second_task_from_running() {
    // 100 ms, Allow, against a 3 s endpoint: it could fill every worker. It gets at most half.
    let slow = Receiver::start(Behavior {
        status: 200,
        delay: Duration::from_secs(3),
    })
    .await;
    let fast = Receiver::start(Behavior::default()).await;
    let mut core = Core::start(4, 100);
    let hog = periodic(
        "hog",
        Duration::from_millis(100),
        slow.url("/hog"),
        ConcurrencyPolicy::Allow,
    );
    core.engine.upsert(hog).await;
    let steady = periodic(
        "steady",
        Duration::from_secs(1),
        fast.url("/steady"),
        ConcurrencyPolicy::Forbid,
    );
    core.engine.upsert(steady).await;
    collect(&mut core.reports, |r| started(r, "steady") >= 7).await;
    let hits = fast.hits();
    assert!(hits.len() >= 6, "{} runs of the 1 s task", hits.len());
    for hit in &hits {
        let lag = hit.arrived - hit.scheduled;
        assert!(
            lag < chrono::Duration::milliseconds(500),
            "the 1 s task waited {lag} for a worker"
        );
    }
    assert!(
        slow.max_in_flight() <= 2,
        "the hog held {} workers",
        slow.max_in_flight()
    );
}

#[tokio::test]
async fn replace_with_a_single_worker_cancels_the_run_in_flight() {
    let slow = Receiver::start(Behavior {
        status: 200,
        delay: Duration::from_secs(5),
    })
    .await;
    let mut core = Core::start(1, 10);
    let task = periodic(
        "replace",
        Duration::from_secs(1),
        slow.url("/x"),
        ConcurrencyPolicy::Replace,
    );
    core.engine.upsert(task).await;
    let reports = collect(&mut core.reports, |r| {
        finished_messages(r)
            .iter()
            .filter(|m| m.starts_with("cancelled: replaced by"))
            .count()
            >= 2
    })
    .await;
    assert_eq!(missed(&reports), 0, "{:?}", missed_reasons(&reports));
}

#[tokio::test]
async fn catch_up_all_with_forbid_runs_every_instant_one_after_another() {
    let receiver = Receiver::start(Behavior {
        status: 200,
        delay: Duration::from_millis(50),
    })
    .await;
    let mut core = Core::start(4, 100);
    let (schedule, last) = after_downtime(5);
    let mut task = task(
        "all-forbid",
        schedule,
        receiver.url("/x"),
        CatchUpPolicy::All,
        None,
        Some(last),
    );
    Arc::make_mut(&mut task.run).concurrency = ConcurrencyPolicy::Forbid;
    core.engine.upsert(task).await;
    let reports = collect(&mut core.reports, |r| finished(r) >= 5).await;
    assert_eq!(missed(&reports), 0, "{:?}", missed_reasons(&reports));
    assert_eq!(receiver.max_in_flight(), 1, "one after another");
    let scheduled: Vec<_> = receiver.hits().iter().map(|h| h.scheduled).collect();
    assert!(scheduled.windows(2).all(|w| w[0] < w[1]), "{scheduled:?}");
}

/// A task whose every run holds the only worker for a while.
async fn blocked_core() -> (Core, Receiver, Receiver) {
    let slow = Receiver::start(Behavior {
        status: 200,
        delay: Duration::from_secs(4),
    })
    .await;
    let fast = Receiver::start(Behavior::default()).await;
    let mut core = Core::start(1, 10);
    let at = Utc::now() + chrono::Duration::milliseconds(200);
    let blocker = task(
        "blocker",
        Schedule::at(at),
        slow.url("/block"),
        CatchUpPolicy::Latest,
        None,
        None,
    );
    core.engine.upsert(blocker).await;
    collect(&mut core.reports, |r| started(r, "blocker") == 1).await;
    (core, slow, fast)
}

#[tokio::test]
async fn runs_waiting_for_a_worker_are_dropped_and_counted_when_their_task_pauses() {
    let (mut core, _slow, fast) = blocked_core().await;
    let waiting = periodic(
        "waiting",
        Duration::from_millis(200),
        fast.url("/x"),
        ConcurrencyPolicy::Forbid,
    );
    core.engine.upsert(waiting.clone()).await;
    // Its first instant fired and its run waits: the only worker is busy.
    collect(&mut core.reports, |r| fired(r, "waiting")).await;
    let mut paused = waiting;
    paused.paused = Some("maintenance".into());
    paused.generation += 1; // as `kubectl patch` does: the reason must still say "paused"
    core.engine.upsert(paused).await;
    let reports = collect(&mut core.reports, |r| {
        missed_reasons(r)
            .iter()
            .any(|m| m.contains("paused before the run started"))
    })
    .await;
    assert_eq!(started(&reports, "waiting"), 0);
    collect(&mut core.reports, |r| finished(r) >= 1).await; // the blocker ends
    assert_eq!(fast.count(), 0, "a paused task's queued run never runs");
}

#[tokio::test]
async fn an_invalid_edit_cancels_runs_in_flight_with_a_report() {
    let (mut core, _slow, _fast) = blocked_core().await;
    let id = TaskId::new(TaskKey::new("test", "blocker"), "uid-blocker");
    core.engine
        .invalidate(id, "spec.schedule.cron: bad".into())
        .await;
    let reports = collect(&mut core.reports, |r| finished(r) >= 1).await;
    let messages = finished_messages(&reports);
    assert_eq!(
        messages,
        ["cancelled: the spec became invalid: spec.schedule.cron: bad"]
    );
}

#[tokio::test]
async fn shutdown_reports_runs_waiting_and_runs_aborted_after_the_grace_period() {
    let (mut core, _slow, fast) = blocked_core().await;
    let waiting = periodic(
        "waiting",
        Duration::from_millis(100),
        fast.url("/x"),
        ConcurrencyPolicy::Forbid,
    );
    core.engine.upsert(waiting).await;
    collect(&mut core.reports, |r| fired(r, "waiting")).await; // a run of it is waiting
    core.stop();
    let reports = collect(&mut core.reports, |r| finished(r) >= 1 && missed(r) >= 1).await;
    assert!(
        missed_reasons(&reports)
            .iter()
            .any(|m| m == "chronflow shut down before the run started"),
        "{:?}",
        missed_reasons(&reports)
    );
    assert!(
        finished_messages(&reports)[0].starts_with("cancelled: chronflow shut down"),
        "the 4 s run outlasted the 1 s grace period"
    );
}

#[tokio::test]
async fn a_delete_racing_an_update_leaves_no_zombie() {
    let receiver = Receiver::start(Behavior::default()).await;
    let mut core = Core::start(2, 10);
    let zombie = periodic(
        "zombie",
        Duration::from_millis(200),
        receiver.url("/z"),
        ConcurrencyPolicy::Forbid,
    );
    // The delete lands first; the update of a reconcile that was still running comes after.
    core.engine.remove(zombie.id.clone()).await;
    core.engine.upsert(zombie).await;
    let marker = periodic(
        "marker",
        Duration::from_secs(1),
        receiver.url("/m"),
        ConcurrencyPolicy::Forbid,
    );
    core.engine.upsert(marker).await;
    // The engine takes commands in order: once the marker is scheduled, the zombie's update
    // was handled, and it scheduled nothing.
    let reports = collect(&mut core.reports, |r| started(r, "marker") >= 1).await;
    assert!(
        reports.iter().all(|r| r.task().key.name != "zombie"),
        "{reports:#?}"
    );
}

#[tokio::test]
async fn a_huge_jitter_never_panics_the_engine() {
    let receiver = Receiver::start(Behavior::default()).await;
    let mut core = Core::start(2, 10);
    let mut task = periodic(
        "jittery",
        Duration::from_millis(200),
        receiver.url("/j"),
        ConcurrencyPolicy::Forbid,
    );
    task.jitter = Some(Duration::from_secs(9_999_999_999 * 86_400));
    core.engine.upsert(task).await;
    let marker = periodic(
        "marker",
        Duration::from_millis(200),
        receiver.url("/m"),
        ConcurrencyPolicy::Forbid,
    );
    core.engine.upsert(marker).await;
    collect(&mut core.reports, |r| started(r, "marker") >= 2).await;
}
