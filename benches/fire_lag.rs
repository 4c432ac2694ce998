//! How late runs start: many tasks due every second, fired by the real engine and executor,
//! calling a real HTTP receiver on loopback. Prints percentiles of two lags:
//! scheduled instant → worker start (the engine's precision), and scheduled instant → request
//! received (what a receiver sees). Run: `cargo bench --bench fire_lag [-- TASKS SECONDS]`.

#[path = "../tests/support/engine_core.rs"]
mod engine_core;
#[path = "../tests/support/receiver.rs"]
mod receiver;

use std::sync::Arc;
use std::time::Duration;

use chronflow::engine::EngineTask;
use chronflow::executor::http::SuccessCodes;
use chronflow::executor::{Action, HttpAction, RetryPolicy, RunSpec};
use chronflow::policy::{CatchUpPolicy, ConcurrencyPolicy};
use chronflow::run::{Report, TaskId, TaskKey};
use chronflow::schedule::{IntervalAnchor, Schedule};
use chrono::Utc;
use engine_core::Core;
use receiver::{Behavior, Receiver};

fn percentiles(label: &str, mut lags_ms: Vec<f64>) {
    lags_ms.sort_by(f64::total_cmp);
    let at = |p: f64| lags_ms[((lags_ms.len() - 1) as f64 * p).round() as usize];
    println!(
        "{label}: n={} p50={:.2}ms p90={:.2}ms p99={:.2}ms max={:.2}ms",
        lags_ms.len(),
        at(0.5),
        at(0.9),
        at(0.99),
        at(1.0)
    );
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let tasks: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(200);
    let seconds: i64 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(10);
    let _ = rustls::crypto::ring::default_provider().install_default();

    let receiver = Receiver::start(Behavior::default()).await;
    let mut core = Core::start(64, 10_000);
    let handle = core.engine.clone();

    let start = Utc::now() + chrono::Duration::seconds(1);
    let end = start + chrono::Duration::seconds(seconds - 1);
    for n in 0..tasks {
        let schedule = Schedule::interval(Duration::from_secs(1), IntervalAnchor::Start(start))
            .and_then(|s| s.with_bounds(None, Some(end)))
            .expect("a valid schedule");
        let action = HttpAction {
            url: receiver.url(&format!("/task-{n}")).parse().expect("a URL"),
            method: reqwest::Method::POST,
            headers: Vec::new(),
            body: None,
            success_codes: SuccessCodes::parse(&[]).expect("default codes"),
            follow_redirects: chronflow::policy::FollowRedirects::Never,
            tls: Default::default(),
        };
        handle
            .upsert(EngineTask {
                id: TaskId::new(
                    TaskKey::new("bench", format!("task-{n}")),
                    format!("uid-{n}"),
                ),
                generation: 1,
                paused: None,
                schedule,
                jitter: None,
                catch_up: CatchUpPolicy::Latest,
                catch_up_from: None,
                run: Arc::new(RunSpec {
                    action: Action::Http(action),
                    timeout: Duration::from_secs(5),
                    retry: RetryPolicy::default(),
                    concurrency: ConcurrencyPolicy::Forbid,
                    max_concurrent_runs: 1,
                    starting_deadline: None,
                }),
                run_now: None,
                backfills: Vec::new(),
                adopt: Vec::new(),
            })
            .await;
    }

    let expected = tasks * seconds as usize;
    let mut start_lags = Vec::with_capacity(expected);
    let mut finished = 0;
    let mut missed = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(seconds as u64 + 30);
    while finished + missed < expected {
        match tokio::time::timeout_at(deadline, core.reports.recv()).await {
            Ok(Some(Report::Started {
                scheduled, started, ..
            })) => {
                start_lags
                    .push((started - scheduled).num_microseconds().unwrap_or(0) as f64 / 1000.0);
            }
            Ok(Some(Report::Finished { .. })) => finished += 1,
            Ok(Some(Report::Missed { count, .. })) => missed += count as usize,
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => break,
        }
    }
    drop(core);
    println!(
        "fire_lag: {tasks} tasks due every second for {seconds} s: {finished} runs finished, {missed} missed, {expected} expected"
    );
    percentiles("scheduled -> worker start ", start_lags);
    let arrivals = receiver
        .hits()
        .iter()
        .map(|h| (h.arrived - h.scheduled).num_microseconds().unwrap_or(0) as f64 / 1000.0)
        .collect();
    percentiles("scheduled -> request received", arrivals);
}
