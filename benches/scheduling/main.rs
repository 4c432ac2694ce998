//! Scheduling benchmark (issue #23): chronflow's core and tokio-cron-scheduler under the same
//! load in the same run, each in a process of its own, and a Markdown report with an SVG chart.
//! `scripts/bench` runs it; docs/benchmarks.md explains the figures.
//!
//! - `scheduling [report] [--smoke] [--tasks ..] [--http-tasks ..] [--seconds S] [--out DIR]`:
//!   every run, one child process each, then `DIR/report.md` and `DIR/lag.svg`; exits 1 when a
//!   chronflow run missed an instant.
//! - `scheduling run ...`: one contender, one shape, one size; prints `RESULT <json>`.
//! - `scheduling receiver`: the HTTP runs' loopback receiver.

/// The allocator of the `chronflow` binary (`src/main.rs`), for every contender alike.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod contenders;
mod failover;
mod measure;
mod operator;
mod receiver;
mod report;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use contenders::{Contender, Kind, RunParams, RunResult, Shape};

#[derive(Parser)]
#[command(about = "chronflow and tokio-cron-scheduler under the same load")]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
    #[command(flatten)]
    report: ReportArgs,
}

#[derive(clap::Args, Clone)]
struct ReportArgs {
    /// A short run for the test suite: 1000 tasks, 3 s measured, both parts.
    #[arg(long)]
    smoke: bool,
    /// Task counts of the engine part (comma-separated; empty skips the part).
    #[arg(long, value_parser = sizes)]
    tasks: Option<Sizes>,
    /// Task counts of the HTTP part (comma-separated; empty skips the part).
    #[arg(long, value_parser = sizes)]
    http_tasks: Option<Sizes>,
    /// Seconds measured per run.
    #[arg(long)]
    seconds: Option<u32>,
    /// Seconds of warm-up before the measured ones.
    #[arg(long)]
    warmup: Option<u32>,
    /// Rates (tasks spread over each second) of the Redis-ledger part, chronflow only, against
    /// a redis-server of its own (comma-separated; empty skips the part; needs redis-server).
    #[arg(long, value_parser = sizes)]
    redis_rates: Option<Sizes>,
    /// Kill the leader of three `chronflow run` replicas this many times (part 5; needs the
    /// control plane of scripts/test-deps; 0 skips it).
    #[arg(long, default_value_t = 0)]
    failover: usize,
    /// Part 3: one `chronflow run` over this many ChronTasks due every second, each count a
    /// control plane of its own (comma-separated; needs scripts/test-deps' binaries).
    #[arg(long, value_parser = sizes)]
    operator: Option<Sizes>,
    /// Seconds measured in each operator run once every task is scheduled.
    #[arg(long, default_value_t = 20)]
    operator_window: u64,
    /// Tasks due every second during the failover run.
    #[arg(long, default_value_t = 10)]
    failover_tasks: usize,
    /// chronflow's max_workers (its configuration's default is 10).
    #[arg(long, default_value_t = 10)]
    workers: usize,
    /// chronflow's max_workers in the Redis-ledger part: each run holds its worker across two
    /// round trips to Redis (its start and its end are recorded), so the part measures the
    /// ledger, not a pool of 10 waiting on it.
    #[arg(long, default_value_t = 100)]
    redis_workers: usize,
    /// Skip tokio-cron-scheduler (the report then has no ratios).
    #[arg(long)]
    no_peer: bool,
    /// Where report.md, lag.svg and results.json go [default: $CARGO_TARGET_DIR/bench-report,
    /// else target/bench-report].
    #[arg(long)]
    out: Option<PathBuf>,
}

/// A comma-separated list of counts; empty means none.
#[derive(Clone)]
struct Sizes(Vec<usize>);

fn sizes(text: &str) -> Result<Sizes, String> {
    text.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().map_err(|e| format!("{s:?}: {e}")))
        .collect::<Result<_, _>>()
        .map(Sizes)
}

#[derive(Subcommand)]
enum Cmd {
    /// Every run, then the report (the default).
    Report,
    /// One run of one contender (a child of `report`).
    Run(RunParams),
    /// The HTTP runs' receiver (a child of `report`).
    Receiver,
    /// `chronflow ARGS…`: the chronflow binary's own command line (the failover's replicas).
    Chronflow {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Writes DIR/report.md and DIR/lag.svg again from DIR/results.json (no runs).
    Render { dir: PathBuf },
    /// Where an idle task's memory goes (the tasks alone, before the engine keeps them).
    Sizes {
        #[arg(long, default_value_t = 50_000)]
        tasks: usize,
    },
}

fn main() {
    // `cargo bench` passes `--bench`; it means nothing here.
    let args = std::env::args().filter(|a| a != "--bench");
    let cli = Cli::parse_from(args);
    match cli.command {
        Some(Cmd::Run(params)) => {
            let result = runtime().block_on(contenders::run(params));
            println!(
                "RESULT {}",
                serde_json::to_string(&result).expect("a result serialises")
            );
        }
        Some(Cmd::Receiver) => runtime().block_on(receiver::serve()),
        Some(Cmd::Sizes { tasks }) => contenders::sizes(tasks),
        Some(Cmd::Render { dir }) => {
            if let Err(e) = render(&dir) {
                eprintln!("cannot render {}: {e}", dir.display());
                std::process::exit(1);
            }
        }
        Some(Cmd::Chronflow { args }) => {
            let cli =
                chronflow::cli::Cli::parse_from(std::iter::once("chronflow".into()).chain(args));
            if let Err(e) = runtime().block_on(cli.run()) {
                eprintln!("chronflow: {e}");
                std::process::exit(e.exit_code().into());
            }
        }
        Some(Cmd::Report) | None => std::process::exit(report(cli.report)),
    }
}

/// tokio's default multi-threaded runtime (one worker per core), as both schedulers get it.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a runtime")
}

fn report(args: ReportArgs) -> i32 {
    let started = Instant::now();
    let (tasks, http_tasks, redis_rates, seconds, warmup) = if args.smoke {
        (vec![1000], vec![1000], vec![], 3, 1)
    } else {
        let rates = vec![1000, 2000, 5000, 10_000, 15_000, 20_000];
        (
            vec![100, 1000, 10_000, 50_000],
            vec![1000, 10_000],
            rates,
            20,
            5,
        )
    };
    let tasks = args.tasks.clone().map_or(tasks, |s| s.0);
    let http_tasks = args.http_tasks.clone().map_or(http_tasks, |s| s.0);
    let mut redis_rates = args.redis_rates.clone().map_or(redis_rates, |s| s.0);
    redis_rates.retain(|&n| n > 0);
    let redis = if redis_rates.is_empty() {
        None
    } else {
        match RedisServer::start() {
            Ok(server) => Some(server),
            Err(e) => {
                eprintln!("skipping the Redis-ledger part: {e}");
                None
            }
        }
    };
    let seconds = args.seconds.unwrap_or(seconds);
    let warmup = args.warmup.unwrap_or(warmup);
    let out = args.out.clone().unwrap_or_else(|| {
        PathBuf::from(std::env::var_os("CARGO_TARGET_DIR").unwrap_or_else(|| "target".into()))
            .join("bench-report")
    });

    let params = |contender, kind, shape, tasks| RunParams {
        contender,
        kind,
        shape,
        tasks,
        seconds,
        warmup,
        workers: args.workers,
        receiver: None,
        redis: None,
    };
    let mut plan = Vec::new();
    for (kind, sizes) in [(Kind::Engine, &tasks), (Kind::Http, &http_tasks)] {
        for &n in sizes.iter().filter(|&&n| n > 0) {
            for shape in [Shape::Spread, Shape::Aligned] {
                plan.push(params(Contender::Chronflow, kind, shape, n));
            }
            // The peer's instants are whole seconds: it has the aligned shape only.
            if !args.no_peer {
                plan.push(params(Contender::Peer, kind, Shape::Aligned, n));
            }
        }
    }
    if let Some(server) = &redis {
        for &n in &redis_rates {
            plan.push(RunParams {
                redis: Some(server.url()),
                workers: args.redis_workers,
                ..params(Contender::Chronflow, Kind::Engine, Shape::Spread, n)
            });
        }
    }

    let mut results = Vec::new();
    let mut errors = Vec::new();
    let mut broken = false;
    let mut redis_stopped = false;
    for params in plan {
        let (contender, kind, shape, n) =
            (params.contender, params.kind, params.shape, params.tasks);
        if let (Some(server), true) = (&redis, params.redis.is_some()) {
            // Every rate starts from an empty ledger.
            if let Err(e) = server.command("FLUSHALL") {
                eprintln!("Redis: {e}");
                return 1;
            }
        }
        let ledger = if params.redis.is_some() {
            " (Redis ledger)"
        } else {
            ""
        };
        if params.redis.is_some() && redis_stopped {
            continue;
        }
        match run_child(params) {
            Ok(r) => {
                let s = &r.summary;
                eprintln!(
                    "{:?} {:?} {:?} {n}{ledger}: fired {}/{} never {} dup {} missed {} failed {}; lag p50 {:.2} p99 {:.2} max {:.2} ms; {:.2} µs CPU/fire; {:.0} B/task",
                    contender,
                    kind,
                    shape,
                    s.fired,
                    s.expected,
                    s.never_fired,
                    s.duplicates,
                    r.reported_missed,
                    r.failed,
                    s.p50_ms,
                    s.p99_ms,
                    s.max_ms,
                    r.cpu_us_per_fire,
                    r.rss_idle.saturating_sub(r.rss_before) as f64 / n as f64
                );
                // A rate that did not keep up ends the Redis part: higher ones cannot.
                if r.params.redis.is_some() && r.summary.fired < r.summary.expected {
                    redis_stopped = true;
                }
                results.push(r);
            }
            Err(e) => {
                let what = format!("{contender:?} {kind:?} {shape:?} {n}{ledger}: {e}");
                eprintln!("{what}");
                // A chronflow run that yields no result fails the benchmark, except at the Redis
                // part's top rates, which look for where it stops keeping up.
                if contender == Contender::Chronflow && ledger.is_empty() {
                    broken = true;
                }
                errors.push(what);
                redis_stopped |= !ledger.is_empty();
            }
        }
    }

    let mut operator_runs = Vec::new();
    for &n in args.operator.as_ref().map_or(&[][..], |s| &s.0[..]) {
        match operator_run(n, args.operator_window) {
            Ok(r) => {
                // Issue 31: whatever the pool can start, no task starves under the bursts.
                if r.never_fired > 0 || r.longest_gap_s > 1 {
                    let starved = format!(
                        "operator {n}: {} tasks never ran, one went {} s without a run",
                        r.never_fired, r.longest_gap_s
                    );
                    eprintln!("{starved}");
                    errors.push(starved);
                    broken = true;
                }
                operator_runs.push(r);
            }
            Err(e) => {
                eprintln!("operator {n}: {e}");
                errors.push(format!("operator {n}: {e}"));
                broken = true;
            }
        }
    }
    let failover = if args.failover > 0 {
        match failover_run(&args) {
            Ok(f) => Some(f),
            Err(e) => {
                eprintln!("failover: {e}");
                errors.push(format!("failover: {e}"));
                broken = true;
                None
            }
        }
    } else {
        None
    };

    let context = report::Context {
        started: chrono::Utc::now().format("%Y-%m-%d %H:%M UTC").to_string(),
        command: command_line(&args),
        machine: machine(),
        versions: versions(),
        seconds,
        warmup,
        workers: args.workers,
    };
    if let Err(e) = report::write(
        &out,
        &context,
        &results,
        &operator_runs,
        failover.as_ref(),
        &errors,
    ) {
        eprintln!("cannot write the report into {}: {e}", out.display());
        return 1;
    }
    let _ = std::fs::write(
        out.join("results.json"),
        serde_json::to_string_pretty(&Saved {
            context,
            runs: results.clone(),
            operator: operator_runs.clone(),
            failover: failover.clone(),
            errors: errors.clone(),
        })
        .expect("results serialise"),
    );
    eprintln!(
        "report: {} ({} runs, {:.0} s)",
        out.join("report.md").display(),
        results.len(),
        started.elapsed().as_secs_f64()
    );
    // Every chronflow run must fire every instant: that is what the smoke run guards. The
    // Redis part looks for the highest rate that holds, so its top rates may not.
    let failures: Vec<&RunResult> = results
        .iter()
        .filter(|r| r.params.contender == Contender::Chronflow && r.params.redis.is_none())
        .filter(|r| {
            r.summary.fired < r.summary.expected
                || r.summary.never_fired > 0
                || r.reported_missed > 0
                || r.failed > 0
        })
        .collect();
    for r in &failures {
        eprintln!(
            "chronflow {:?} {:?} {}: {} of {} instants fired, {} reported missed, {} failed",
            r.params.kind,
            r.params.shape,
            r.params.tasks,
            r.summary.fired,
            r.summary.expected,
            r.reported_missed,
            r.failed
        );
    }
    let lost = failover
        .as_ref()
        .is_some_and(|f| f.lost > 0 || f.duplicated > 0);
    if lost {
        eprintln!("failover: instants lost or run twice");
    }
    i32::from(!failures.is_empty() || lost || broken)
}

/// What `results.json` holds: enough to write the report again (`scheduling render DIR`).
#[derive(serde::Serialize, serde::Deserialize)]
struct Saved {
    context: report::Context,
    runs: Vec<RunResult>,
    #[serde(default)]
    operator: Vec<operator::OperatorResult>,
    failover: Option<failover::FailoverResult>,
    #[serde(default)]
    errors: Vec<String>,
}

/// Writes `DIR/report.md` and `DIR/lag.svg` again from `DIR/results.json`.
fn render(dir: &std::path::Path) -> Result<(), String> {
    let text = std::fs::read_to_string(dir.join("results.json")).map_err(|e| e.to_string())?;
    let saved: Saved = serde_json::from_str(&text).map_err(|e| e.to_string())?;
    report::write(
        dir,
        &saved.context,
        &saved.runs,
        &saved.operator,
        saved.failover.as_ref(),
        &saved.errors,
    )
    .map(|_| ())
    .map_err(|e| e.to_string())
}

/// Part 3, with its own receiver.
fn operator_run(tasks: usize, window: u64) -> Result<operator::OperatorResult, String> {
    let mut child = myself()
        .arg("receiver")
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start the receiver: {e}"))?;
    let url = failover::receiver_address(&mut child)?;
    let _receiver = KillOnDrop(child);
    let r = operator::run(tasks, &url, window)?;
    eprintln!(
        "operator {tasks}: created in {:.1} s, all scheduled after {:.1} s, {:.0} MiB resident, {:.1} status writes/s, {:.0} apiserver requests/s, {:.0} calls/s; instants {}/{}, {} tasks never run, longest gap {} s, lag p99 {:.0} ms",
        r.create_s,
        r.scheduled_s,
        r.rss_bytes as f64 / 1048576.0,
        r.status_writes_per_s,
        r.apiserver_requests_per_s,
        r.calls_per_s,
        r.instants_fired,
        r.instants_expected,
        r.never_fired,
        r.longest_gap_s,
        r.lag_p99_ms
    );
    Ok(r)
}

/// Part 5, with its own receiver; the configuration's default lease timing.
fn failover_run(args: &ReportArgs) -> Result<failover::FailoverResult, String> {
    let mut child = myself()
        .arg("receiver")
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start the receiver: {e}"))?;
    let url = failover::receiver_address(&mut child)?;
    let _receiver = KillOnDrop(child);
    let result = failover::run(
        args.failover_tasks,
        args.failover,
        ("15s", "10s", "2s"),
        &url,
    )?;
    eprintln!(
        "failover: lease taken after {:?} s, first run after {:?} s; {} instants received, {} lost, {} run twice",
        result.lease_taken_s, result.first_run_s, result.received, result.lost, result.duplicated
    );
    Ok(result)
}

/// Kills the child when dropped (an interrupted benchmark leaves no process behind).
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn myself() -> Command {
    Command::new(std::env::current_exe().expect("the benchmark's own path"))
}

/// Runs one contender in a child process (and, for HTTP, a receiver in another).
fn run_child(mut params: RunParams) -> Result<RunResult, String> {
    let _receiver = if params.kind == Kind::Http {
        let mut child = myself()
            .arg("receiver")
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start the receiver: {e}"))?;
        let stdout = child.stdout.take().expect("piped");
        let guard = KillOnDrop(child);
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .map_err(|e| format!("the receiver: {e}"))?;
        let addr = line
            .trim()
            .strip_prefix("LISTENING ")
            .ok_or_else(|| format!("the receiver said {line:?}"))?;
        params.receiver = Some(format!("http://{addr}"));
        Some(guard)
    } else {
        None
    };
    let mut command = myself();
    command.args([
        "run",
        "--contender",
        enum_arg(&params.contender),
        "--kind",
        enum_arg(&params.kind),
        "--shape",
        enum_arg(&params.shape),
        "--tasks",
        &params.tasks.to_string(),
        "--seconds",
        &params.seconds.to_string(),
        "--warmup",
        &params.warmup.to_string(),
        "--workers",
        &params.workers.to_string(),
    ]);
    if let Some(url) = &params.receiver {
        command.args(["--receiver", url]);
    }
    if let Some(url) = &params.redis {
        command.args(["--redis", url]);
    }
    let mut child = command
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start the run: {e}"))?;
    let stdout = child.stdout.take().expect("piped");
    let mut guard = KillOnDrop(child);
    // A run that hangs must not hang the benchmark.
    let limit = Duration::from_secs(params.seconds as u64 + params.warmup as u64 + 120);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(json) = line.strip_prefix("RESULT ") {
                let _ = tx.send(json.to_string());
            }
        }
    });
    let json = rx
        .recv_timeout(limit)
        .map_err(|_| format!("no result within {} s", limit.as_secs()))?;
    let _ = guard.0.wait();
    serde_json::from_str(&json).map_err(|e| format!("an unreadable result: {e}"))
}

/// A redis-server of the benchmark's own on a free loopback port, without persistence;
/// stopped when dropped.
struct RedisServer {
    port: u16,
    _process: KillOnDrop,
}

impl RedisServer {
    fn start() -> Result<RedisServer, String> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("no free port: {e}"))?
            .port();
        let process = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "no", "--loglevel", "warning"])
            .stdout(Stdio::null())
            .spawn()
            .map_err(|e| {
                format!("cannot start redis-server (scripts/test-deps installs it): {e}")
            })?;
        let server = RedisServer {
            port,
            _process: KillOnDrop(process),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while server.command("PING").is_err() {
            if Instant::now() > deadline {
                return Err("redis-server did not answer PING within 10 s".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(server)
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Sends an inline command; Ok when Redis answers with a status reply.
    fn command(&self, command: &str) -> Result<(), String> {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", self.port))
            .map_err(|e| format!("redis-server: {e}"))?;
        stream
            .write_all(format!("{command}\r\n").as_bytes())
            .map_err(|e| format!("redis-server: {e}"))?;
        let mut answer = [0u8; 64];
        let read = stream
            .read(&mut answer)
            .map_err(|e| format!("redis-server: {e}"))?;
        match answer.first() {
            Some(b'+') => Ok(()),
            _ => Err(format!(
                "redis-server answered {command} with {:?}",
                String::from_utf8_lossy(&answer[..read])
            )),
        }
    }
}

fn enum_arg<T: clap::ValueEnum>(value: &T) -> &'static str {
    let name = value
        .to_possible_value()
        .expect("no skipped variants")
        .get_name()
        .to_string();
    Box::leak(name.into_boxed_str())
}

fn command_line(args: &ReportArgs) -> String {
    let mut line = String::from("scripts/bench");
    if args.smoke {
        line.push_str(" --smoke");
    }
    for a in std::env::args()
        .skip(1)
        .filter(|a| a != "--bench" && a != "--smoke")
    {
        line.push(' ');
        line.push_str(&a);
    }
    line
}

fn machine() -> Vec<String> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let memory = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or("?".into(), |kb| format!("{:.1} GiB", kb as f64 / 1048576.0));
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    vec![format!(
        "machine: {model}, {cores} cores, {memory} RAM, Linux {}; shared with other work, so absolute times move between runs: compare the ratios",
        kernel.trim()
    )]
}

fn versions() -> Vec<String> {
    let lock = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.lock"))
        .unwrap_or_default();
    let version = |name: &str| {
        let header = format!("name = \"{name}\"\nversion = \"");
        lock.find(&header)
            .map(|at| {
                let rest = &lock[at + header.len()..];
                rest[..rest.find('"').unwrap_or(0)].to_string()
            })
            .unwrap_or_else(|| "?".into())
    };
    let rustc = Command::new("rustc")
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "rustc ?".into());
    vec![format!(
        "versions: chronflow {} (git {}), tokio-cron-scheduler {}, tokio {}, reqwest {}, {rustc}, {} build",
        env!("CARGO_PKG_VERSION"),
        git_commit(),
        version("tokio-cron-scheduler"),
        version("tokio"),
        version("reqwest"),
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release (cargo bench profile)"
        }
    )]
}

fn git_commit() -> String {
    Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "?".into())
}
