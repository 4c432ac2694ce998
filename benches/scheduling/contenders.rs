//! The two schedulers under the same load: chronflow's core (engine + bounded executor +
//! memory ledger, as standalone mode builds it) and tokio-cron-scheduler. Each run happens in a
//! process of its own (`scheduling run ...`), so CPU and memory are that scheduler's.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chronflow::clock::Clock;
use chronflow::core::{Core, CoreParts};
use chronflow::engine::EngineTask;
use chronflow::executor::http::{NoValues, SCHEDULED_TIME, SuccessCodes};
use chronflow::executor::{Action, CallAction, ExecutorConfig, HttpAction, RetryPolicy, RunSpec};
use chronflow::leader::{Term, Terms};
use chronflow::ledger::MemoryLedger;
use chronflow::ledger::redis::{RedisLedger, RedisSettings};
use chronflow::policy::{CatchUpPolicy, ConcurrencyPolicy, FollowRedirects};
use chronflow::run::{Outcome, Report, ReportSink, TaskId, TaskKey};
use chronflow::schedule::{IntervalAnchor, Schedule};
use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::measure::{self, Recorder, Summary, Window};

/// Which scheduler.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
pub enum Contender {
    Chronflow,
    /// tokio-cron-scheduler.
    Peer,
}

/// When the tasks are due within each second.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
pub enum Shape {
    /// Task i at i/N of every second.
    Spread,
    /// Every task at the start of every second.
    Aligned,
}

/// What a fire does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
pub enum Kind {
    /// Nothing (an in-process call that records the fire).
    Engine,
    /// A POST to a receiver in another process, which records the fire.
    Http,
}

/// One run's parameters (also the `run` sub-command's flags).
#[derive(Clone, Debug, Serialize, Deserialize, clap::Args)]
pub struct RunParams {
    #[arg(long, value_enum)]
    pub contender: Contender,
    #[arg(long, value_enum)]
    pub kind: Kind,
    #[arg(long, value_enum)]
    pub shape: Shape,
    #[arg(long)]
    pub tasks: usize,
    #[arg(long)]
    pub seconds: u32,
    #[arg(long)]
    pub warmup: u32,
    /// chronflow's `max_workers`.
    #[arg(long)]
    pub workers: usize,
    /// The receiver's base URL (HTTP runs).
    #[arg(long)]
    pub receiver: Option<String>,
    /// chronflow's ledger: Redis at this URL, else memory.
    #[serde(default)]
    #[arg(long)]
    pub redis: Option<String>,
}

/// One run's result.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunResult {
    pub params: RunParams,
    pub summary: Summary,
    /// Runs the scheduler itself reported missed (chronflow) in the whole run.
    pub reported_missed: u64,
    /// Runs that failed (HTTP errors) in the whole run.
    pub failed: u64,
    /// Fires before their instant.
    pub early: u64,
    /// CPU time of the scheduler's process over the window, per fire achieved, µs.
    pub cpu_us_per_fire: f64,
    /// CPU time over the window as a share of one core.
    pub cpu_share: f64,
    /// Resident memory before adding tasks, after adding them (idle), and at the window's end.
    pub rss_before: u64,
    pub rss_idle: u64,
    pub rss_end: u64,
    /// How long adding the tasks took, seconds.
    pub add_seconds: f64,
    /// Anything the reader must know about this run.
    pub notes: Vec<String>,
    /// With the Redis ledger, per fire over the window: round trips (commands clients sent:
    /// scripts, batched reads, pings, connection setup), commands Redis ran
    /// (those its Lua scripts call included), and Redis's own CPU in µs.
    #[serde(default)]
    pub redis_round_trips_per_fire: Option<f64>,
    #[serde(default)]
    pub redis_commands_per_fire: Option<f64>,
    #[serde(default)]
    pub redis_cpu_us_per_fire: Option<f64>,
}

const NS: i64 = 1_000_000_000;

/// Runs one contender under `params` and measures it.
pub async fn run(params: RunParams) -> RunResult {
    match params.contender {
        Contender::Chronflow => run_chronflow(params).await,
        Contender::Peer => run_peer(params).await,
    }
}

/// Counts what the core reports; records nothing else (the fires are recorded by the action,
/// or by the receiver).
#[derive(Default)]
struct Counts {
    scheduled: AtomicU64,
    missed: AtomicU64,
    failed: AtomicU64,
}

impl ReportSink for Counts {
    fn record(&self, report: Report) {
        match report {
            Report::Schedule { .. } => {
                self.scheduled.fetch_add(1, Ordering::Relaxed);
            }
            Report::Missed { count, .. } => {
                self.missed.fetch_add(count, Ordering::Relaxed);
            }
            Report::Finished { run, .. } if run.outcome == Outcome::Failed => {
                self.failed.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
    }
}

/// Where the first instant goes: far enough ahead for every task to be added first.
fn first_instant(tasks: usize) -> i64 {
    // Adding runs at well over 10 000 tasks/s on this machine; half a second to spare.
    let ready = measure::now_ns() + NS / 2 + tasks as i64 * NS / 10_000;
    (ready / NS + 1) * NS
}

fn task_url(base: &str, task: usize) -> String {
    format!("{base}/t/{task}")
}

async fn run_chronflow(params: RunParams) -> RunResult {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let n = params.tasks;
    let base = first_instant(n);
    let window = Window {
        t0_ns: base + params.warmup as i64 * NS,
        seconds: params.seconds,
    };
    let recorder = Arc::new(Recorder::new(n, params.seconds));
    recorder.set_start(window.t0_ns);
    let counts = Arc::new(Counts::default());
    let (_leader_tx, leader) = watch::channel(Terms::all(Term::single("bench")));
    let mut core = Core::build(CoreParts {
        executor: ExecutorConfig {
            max_workers: params.workers,
            // The configuration's default: an aligned second waits in the queue whole.
            queue_size: chronflow::config::OperatorConfig::default().queue_size,
            log_success: false,
        },
        max_runs_per_namespace: 0,
        // One namespace: every worker is its share.
        max_workers_per_namespace: params.workers,
        backfill_per_second: 10,
        http: chronflow::executor::http::client().expect("an HTTP client"),
        values: Arc::new(NoValues),
        jobs: Arc::new(chronflow::executor::job::NoJobs),
        ledger: match &params.redis {
            None => Arc::new(MemoryLedger::new(Duration::from_secs(3600))),
            // The configuration's defaults: 10 connections, 2 s per operation.
            Some(url) => Arc::new(
                RedisLedger::new(&RedisSettings {
                    url: url.clone(),
                    cluster: false,
                    ca: None,
                    wait_replicas: 0,
                    max_connections: 10,
                    timeout: Duration::from_secs(2),
                })
                .expect("a Redis ledger"),
            ),
        },
        sink: counts.clone(),
        leader,
        clock: Clock::System,
    });
    let stop = CancellationToken::new();
    let mut tasks = JoinSet::new();
    core.spawn(&mut tasks, &stop, Duration::from_secs(5));
    tokio::time::sleep(Duration::from_millis(200)).await;

    let rss_before = measure::rss_bytes();
    let added = measure::now_ns();
    let end = DateTime::from_timestamp_nanos(window.t0_ns + params.seconds as i64 * NS - 1);
    for i in 0..n {
        let action = match &params.receiver {
            None => {
                let recorder = recorder.clone();
                let task = i as u32;
                Action::Call(CallAction(Arc::new(move |run| {
                    let at = measure::now_ns();
                    let due = run.scheduled.timestamp_nanos_opt().unwrap_or(0);
                    recorder.record(task, due, at);
                    Box::pin(async { Ok(String::new()) })
                })))
            }
            Some(receiver) => Action::Http(Box::new(HttpAction {
                url: chronflow::executor::http::Target::Url(
                    task_url(receiver, i).parse().expect("a URL"),
                ),
                method: reqwest::Method::POST,
                headers: Vec::new(),
                body: None,
                success_codes: SuccessCodes::parse(&[]).expect("default codes"),
                follow_redirects: FollowRedirects::Never,
                tls: Default::default(),
            })),
        };
        core.engine
            .upsert(engine_task(i, n, params.shape, base, end, action))
            .await;
    }
    // Each task is scheduled once the engine reports it so.
    while counts.scheduled.load(Ordering::Relaxed) < n as u64 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let add_seconds = (measure::now_ns() - added) as f64 / 1e9;
    let rss_idle = measure::rss_bytes();
    let mut notes = Vec::new();
    if measure::now_ns() > base {
        notes.push("adding the tasks overran the first instant".into());
    }

    // One connection for both readings, opened before the window: only the first INFO counts.
    let mut redis_before = None;
    if let Some(url) = &params.redis {
        let client = redis::Client::open(url.as_str()).expect("a Redis URL");
        let mut connection = client
            .get_multiplexed_async_connection()
            .await
            .expect("Redis answers");
        measure::sleep_until_ns(window.t0_ns).await;
        let before = redis_stats(&mut connection).await;
        redis_before = Some((connection, before));
    }
    let (cpu, rss_end) = measure_window(window).await;
    let mut redis_used = None;
    if let Some((mut connection, before)) = redis_before {
        let after = redis_stats(&mut connection).await;
        // The first INFO is counted once, as a command and as a round trip.
        redis_used = Some(RedisStats {
            round_trips: after.round_trips - before.round_trips - 1.0,
            commands: after.commands - before.commands - 1.0,
            cpu_us: after.cpu_us - before.cpu_us,
        });
    }
    // Runs of the window's last second may still be in flight (its lags are milliseconds).
    measure::sleep_until_ns(window.t0_ns + (params.seconds as i64 + 1) * NS).await;
    let summary = match &params.receiver {
        None => measure::summarise(&recorder.samples(), n, params.seconds),
        Some(receiver) => fetch_summary(receiver, window, n).await,
    };
    stop.cancel();
    let fired = summary.fired.max(1) as f64;
    let mut result = finish(
        params,
        summary,
        counts.missed.load(Ordering::Relaxed),
        counts.failed.load(Ordering::Relaxed),
        recorder.early.load(Ordering::Relaxed),
        cpu,
        (rss_before, rss_idle, rss_end),
        add_seconds,
        notes,
    );
    if let Some(used) = redis_used {
        result.redis_round_trips_per_fire = Some(used.round_trips / fired);
        result.redis_commands_per_fire = Some(used.commands / fired);
        result.redis_cpu_us_per_fire = Some(used.cpu_us / fired);
    }
    result
}

/// What Redis has done so far.
struct RedisStats {
    /// Commands clients sent (each a round trip).
    round_trips: f64,
    /// Commands run, those Lua scripts call included.
    commands: f64,
    /// Its CPU time, user + system, µs.
    cpu_us: f64,
}

/// Commands a client sends itself; the rest of what Redis counts is called from scripts
/// (`INFO commandstats` counts both).
const CLIENT_COMMANDS: [&str; 13] = [
    "eval",
    "evalsha",
    "eval_ro",
    "evalsha_ro",
    "fcall",
    "ping",
    "hello",
    "select",
    "auth",
    "info",
    "multi",
    "exec",
    // The term checks before attempts, batched (no script calls it).
    "mget",
];

async fn redis_stats(connection: &mut redis::aio::MultiplexedConnection) -> RedisStats {
    let info: String = redis::cmd("INFO")
        .arg("everything")
        .query_async(connection)
        .await
        .expect("INFO");
    let field = |name: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let round_trips = info
        .lines()
        .filter_map(|l| l.strip_prefix("cmdstat_")?.split_once(':'))
        .filter(|(name, _)| {
            let family = name.split('|').next().unwrap_or(name);
            CLIENT_COMMANDS.contains(&family) || family == "client" || family == "script"
        })
        .filter_map(|(_, stats)| {
            stats
                .strip_prefix("calls=")?
                .split(',')
                .next()?
                .parse::<f64>()
                .ok()
        })
        .sum();
    RedisStats {
        round_trips,
        commands: field("total_commands_processed"),
        cpu_us: (field("used_cpu_user") + field("used_cpu_sys")) * 1e6,
    }
}

/// Task `i` of `n`: due every second from `base` (plus its offset when spread) until `end`.
fn engine_task(
    i: usize,
    n: usize,
    shape: Shape,
    base: i64,
    end: DateTime<Utc>,
    action: Action,
) -> EngineTask {
    let offset = match shape {
        Shape::Aligned => 0,
        Shape::Spread => i as i64 * NS / n as i64,
    };
    let anchor = DateTime::from_timestamp_nanos(base + offset);
    let schedule = Schedule::interval(Duration::from_secs(1), IntervalAnchor::Start(anchor))
        .and_then(|s| s.with_bounds(None, Some(end)))
        .expect("a valid schedule");
    EngineTask {
        id: TaskId::new(TaskKey::new("bench", format!("t-{i}")), format!("uid-{i}")),
        generation: 1,
        paused: None,
        schedule,
        jitter: None,
        catch_up: CatchUpPolicy::Skip,
        catch_up_from: None,
        run: Arc::new(RunSpec {
            action,
            timeout: Duration::from_secs(10),
            retry: RetryPolicy::default(),
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

/// Where an idle task's memory goes: the sizes of what the engine keeps per task, and the
/// resident memory of `n` tasks as the engine receives them (boxed), before the engine, the
/// ledger and the executor add their own entries.
pub fn sizes(n: usize) {
    use std::mem::size_of;
    println!(
        "size_of: EngineTask {} B, Schedule {} B, RunSpec {} B, Action {} B, TaskId {} B",
        size_of::<EngineTask>(),
        size_of::<Schedule>(),
        size_of::<RunSpec>(),
        size_of::<Action>(),
        size_of::<TaskId>()
    );
    let before = measure::rss_bytes();
    let end = DateTime::from_timestamp_nanos(i64::MAX / 2);
    let tasks: Vec<Box<EngineTask>> = (0..n)
        .map(|i| {
            let action = Action::Call(CallAction(Arc::new(move |_| {
                Box::pin(async move { Ok(i.to_string()) })
            })));
            Box::new(engine_task(i, n, Shape::Spread, 0, end, action))
        })
        .collect();
    let after = measure::rss_bytes();
    println!(
        "{n} boxed EngineTasks with a call action: {:.0} B resident per task",
        after.saturating_sub(before) as f64 / n as f64
    );
    drop(tasks);
}

/// CPU used between the window's start and end, and the resident memory at its end.
async fn measure_window(window: Window) -> (u64, u64) {
    measure::sleep_until_ns(window.t0_ns).await;
    let cpu0 = measure::cpu_us();
    measure::sleep_until_ns(window.t0_ns + window.seconds as i64 * NS).await;
    let cpu = measure::cpu_us() - cpu0;
    (cpu, measure::rss_bytes())
}

#[allow(clippy::too_many_arguments)]
fn finish(
    params: RunParams,
    summary: Summary,
    reported_missed: u64,
    failed: u64,
    early: u64,
    cpu: u64,
    (rss_before, rss_idle, rss_end): (u64, u64, u64),
    add_seconds: f64,
    notes: Vec<String>,
) -> RunResult {
    let seconds = params.seconds as f64;
    RunResult {
        cpu_us_per_fire: cpu as f64 / summary.fired.max(1) as f64,
        cpu_share: cpu as f64 / 1e6 / seconds,
        params,
        summary,
        reported_missed,
        failed,
        early,
        rss_before,
        rss_idle,
        rss_end,
        add_seconds,
        notes,
        redis_round_trips_per_fire: None,
        redis_commands_per_fire: None,
        redis_cpu_us_per_fire: None,
    }
}

async fn fetch_summary(receiver: &str, window: Window, tasks: usize) -> Summary {
    let url = format!(
        "{receiver}/summary?t0_ns={}&seconds={}&tasks={tasks}",
        window.t0_ns, window.seconds
    );
    let response = reqwest::Client::new()
        .get(url)
        .send()
        .await
        .expect("the receiver answers");
    serde_json::from_slice(&response.bytes().await.expect("a summary")).expect("a summary")
}

/// The instant a peer fire belongs to: tokio-cron-scheduler keeps whole-second instants and,
/// when late, computes the next one from now (it skips rather than queues), so a fire belongs
/// to the latest whole second at or before it. A fire more than 1 s late is therefore counted as
/// its instant not firing plus an on-time-looking fire of a later second: this errs in the
/// peer's favour.
fn peer_instant(at_ns: i64) -> i64 {
    at_ns.div_euclid(NS) * NS
}

async fn run_peer(params: RunParams) -> RunResult {
    use tokio_cron_scheduler::{Job, JobScheduler};

    let _ = rustls::crypto::ring::default_provider().install_default();
    let n = params.tasks;
    let mut notes = Vec::new();
    if params.shape == Shape::Spread {
        // Its instants are whole seconds (stored as Unix seconds): every task is aligned.
        notes.push("the peer cannot express a spread: its instants are whole seconds".into());
    }
    // Its channels are broadcast channels (200 by default): a receiver that falls behind by
    // more than that loses activations. Give it room for every task's activation and
    // notifications.
    let scheduler = JobScheduler::new_with_channel_size((n * 4).max(200))
        .await
        .expect("a scheduler");
    let failed = Arc::new(AtomicU64::new(0));
    let client = reqwest::Client::new();
    // Allocated before measuring memory, like chronflow's; the window starts after the warm-up.
    let recorder = Arc::new(Recorder::new(n, params.seconds));
    tokio::time::sleep(Duration::from_millis(200)).await;

    let rss_before = measure::rss_bytes();
    let added = measure::now_ns();
    for i in 0..n {
        let recorder = recorder.clone();
        let task = i as u32;
        let job = match &params.receiver {
            None => Job::new_async("* * * * * *", move |_, _| {
                let at = measure::now_ns();
                recorder.record(task, peer_instant(at), at);
                Box::pin(async {})
            }),
            Some(receiver) => {
                let url = task_url(receiver, i);
                let client = client.clone();
                let failed = failed.clone();
                Job::new_async("* * * * * *", move |_, _| {
                    let due =
                        DateTime::<Utc>::from_timestamp_nanos(peer_instant(measure::now_ns()));
                    let request = client.post(&url).header(
                        SCHEDULED_TIME,
                        due.to_rfc3339_opts(SecondsFormat::AutoSi, true),
                    );
                    let failed = failed.clone();
                    Box::pin(async move {
                        match request.send().await {
                            Ok(r) if r.status().is_success() => {}
                            _ => {
                                failed.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    })
                })
            }
        }
        .expect("a job");
        scheduler.add(job).await.expect("added");
    }
    let add_seconds = (measure::now_ns() - added) as f64 / 1e9;
    let rss_idle = measure::rss_bytes();
    scheduler.start().await.expect("started");
    // Same warm-up as chronflow's, counted from the first whole second after the start.
    let t0 = (measure::now_ns() / NS + 1 + params.warmup as i64) * NS;
    let window_at = Window {
        t0_ns: t0,
        seconds: params.seconds,
    };
    recorder.set_start(t0);

    let (cpu, rss_end) = measure_window(window_at).await;
    measure::sleep_until_ns(t0 + (params.seconds as i64 + 2) * NS).await;
    let mut scheduler = scheduler;
    let _ = scheduler.shutdown().await;
    let summary = match &params.receiver {
        None => measure::summarise(&recorder.samples(), n, params.seconds),
        Some(receiver) => fetch_summary(receiver, window_at, n).await,
    };
    finish(
        params,
        summary,
        0,
        failed.load(Ordering::Relaxed),
        recorder.early.load(Ordering::Relaxed),
        cpu,
        (rss_before, rss_idle, rss_end),
        add_seconds,
        notes,
    )
}
