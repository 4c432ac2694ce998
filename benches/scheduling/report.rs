//! The Markdown report and its SVG chart, from the runs' results.

use std::fmt::Write as _;
use std::path::Path;

use plotters::prelude::*;

use crate::contenders::{Contender, Kind, RunResult, Shape};
use crate::failover::FailoverResult;
use crate::operator::OperatorResult;

/// Where and how the benchmark ran (for the report's header).
#[derive(serde::Serialize, serde::Deserialize)]
pub struct Context {
    pub started: String,
    pub command: String,
    pub machine: Vec<String>,
    pub versions: Vec<String>,
    pub seconds: u32,
    pub warmup: u32,
    pub workers: usize,
}

fn name(r: &RunResult) -> &'static str {
    match r.params.contender {
        Contender::Chronflow => "chronflow",
        Contender::Peer => "tokio-cron-scheduler",
    }
}

fn shape(r: &RunResult) -> &'static str {
    match r.params.shape {
        Shape::Spread => "spread",
        Shape::Aligned => "aligned",
    }
}

fn ms(v: f64) -> String {
    if v.is_nan() {
        "–".into()
    } else if v < 10.0 {
        format!("{v:.2}")
    } else if v < 100.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.0}")
    }
}

fn per_task_bytes(r: &RunResult) -> f64 {
    r.rss_idle.saturating_sub(r.rss_before) as f64 / r.params.tasks as f64
}

fn mib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / 1048576.0)
}

fn table(out: &mut String, runs: &[&RunResult], http: bool) {
    let _ = writeln!(
        out,
        "| scheduler | shape | tasks | fired / expected | never fired | duplicates | {}p50 ms | p90 ms | p99 ms | max ms | drift µs/s ± std. error (p50 ms 1st → last s) | CPU µs / fire | CPU % of a core | RSS / idle task B | RSS idle → end MiB | adding s |",
        if http {
            "failed | "
        } else {
            "reported missed | "
        }
    );
    let _ = writeln!(
        out,
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for r in runs {
        let s = &r.summary;
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} / {} ({:.2} %) | {} | {} | {} | {} | {} | {} | {} | {:.0} ± {:.0} ({} → {}) | {:.2} | {:.1} | {:.0} | {} → {} | {:.2} |",
            name(r),
            shape(r),
            r.params.tasks,
            s.fired,
            s.expected,
            100.0 * s.fired as f64 / s.expected.max(1) as f64,
            s.never_fired,
            s.duplicates,
            if http { r.failed } else { r.reported_missed },
            ms(s.p50_ms),
            ms(s.p90_ms),
            ms(s.p99_ms),
            ms(s.max_ms),
            s.drift_us_per_s,
            s.drift_stderr_us_per_s,
            ms(s.first_second_p50_ms),
            ms(s.last_second_p50_ms),
            r.cpu_us_per_fire,
            100.0 * r.cpu_share,
            per_task_bytes(r),
            mib(r.rss_idle),
            mib(r.rss_end),
            r.add_seconds,
        );
    }
}

fn find(
    runs: &[RunResult],
    c: Contender,
    kind: Kind,
    shape: Shape,
    n: usize,
) -> Option<&RunResult> {
    runs.iter().find(|r| {
        r.params.contender == c
            && r.params.kind == kind
            && r.params.shape == shape
            && r.params.tasks == n
    })
}

fn ratio(peer: f64, ours: f64) -> String {
    if peer.is_nan() || ours.is_nan() {
        "–".into()
    } else if ours <= 0.0 {
        "∞".into()
    } else {
        format!("{:.1}×", peer / ours)
    }
}

fn ratios(out: &mut String, runs: &[RunResult], kind: Kind) {
    let mut sizes: Vec<usize> = runs
        .iter()
        .filter(|r| r.params.kind == kind)
        .map(|r| r.params.tasks)
        .collect();
    sizes.sort_unstable();
    sizes.dedup();
    let mut rows = String::new();
    for n in sizes {
        let (Some(ours), Some(peer)) = (
            find(runs, Contender::Chronflow, kind, Shape::Aligned, n),
            find(runs, Contender::Peer, kind, Shape::Aligned, n),
        ) else {
            continue;
        };
        let (o, p) = (&ours.summary, &peer.summary);
        // The peer's lags are lower bounds once some of its fires came a second late or more.
        let bound = if lower_bound(peer) { "≥ " } else { "" };
        let _ = writeln!(
            rows,
            "| {n} | {:.2} % vs {:.2} % | {bound}{} | {bound}{} | {bound}{} | {} | {} |",
            100.0 * p.fired as f64 / p.expected.max(1) as f64,
            100.0 * o.fired as f64 / o.expected.max(1) as f64,
            ratio(p.p50_ms, o.p50_ms),
            ratio(p.p99_ms, o.p99_ms),
            ratio(p.max_ms, o.max_ms),
            ratio(peer.cpu_us_per_fire, ours.cpu_us_per_fire),
            ratio(per_task_bytes(peer), per_task_bytes(ours)),
        );
    }
    if !rows.is_empty() {
        let _ = writeln!(
            out,
            "\nRatios, tokio-cron-scheduler ÷ chronflow (aligned, same run; above 1× chronflow is better):\n"
        );
        let _ = writeln!(
            out,
            "| tasks | fired, peer vs chronflow | p50 lag | p99 lag | max lag | CPU / fire | RSS / idle task |"
        );
        let _ = writeln!(out, "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
        out.push_str(&rows);
    }
}

/// Whether a run's lags understate: the peer's fires are attributed to the whole second they
/// land in, so a fire a second late or more looks like an on-time duplicate of a later second.
fn lower_bound(r: &RunResult) -> bool {
    r.params.contender == Contender::Peer && r.summary.duplicates > 0
}

/// One target: what it says, what was measured, whether it holds.
struct Target {
    what: String,
    measured: String,
    met: bool,
}

fn label(r: &RunResult) -> String {
    format!("{} {}", shape(r), r.params.tasks)
}

/// A target met when `value` is at most `limit` in every run of `runs`.
fn check(
    t: &mut Vec<Target>,
    what: &str,
    runs: Vec<&RunResult>,
    value: &dyn Fn(&RunResult) -> f64,
    limit: f64,
    unit: &str,
) {
    if runs.is_empty() {
        return;
    }
    let measured: Vec<String> = runs
        .iter()
        .map(|r| format!("{}: {:.2} {unit}", label(r), value(r)))
        .collect();
    t.push(Target {
        what: what.into(),
        measured: measured.join("; "),
        met: runs.iter().all(|r| value(r) <= limit),
    });
}

fn targets(runs: &[RunResult]) -> Vec<Target> {
    let ours = |kind: Kind| {
        runs.iter()
            .filter(move |r| r.params.contender == Contender::Chronflow && r.params.kind == kind)
    };
    let mut t = Vec::new();
    for kind in [Kind::Engine, Kind::Http] {
        let part = if kind == Kind::Engine {
            "engine"
        } else {
            "HTTP"
        };
        let all: Vec<&RunResult> = ours(kind).collect();
        if all.is_empty() {
            continue;
        }
        let short: Vec<String> = all
            .iter()
            .filter(|r| r.summary.fired < r.summary.expected || r.reported_missed > 0)
            .map(|r| {
                format!(
                    "{}: {} / {}, {} reported missed",
                    label(r),
                    r.summary.fired,
                    r.summary.expected,
                    r.reported_missed
                )
            })
            .collect();
        t.push(Target {
            what: format!("{part}: 100 % of fires at every N"),
            measured: if short.is_empty() {
                "every run 100 %".into()
            } else {
                short.join("; ")
            },
            met: short.is_empty(),
        });
        let starved: u64 = all.iter().map(|r| r.summary.never_fired).sum();
        t.push(Target {
            what: format!("{part}: no task never fired"),
            measured: format!("{starved} tasks never fired"),
            met: starved == 0,
        });
    }
    let engine: Vec<&RunResult> = ours(Kind::Engine).collect();
    let p99 = |r: &RunResult| r.summary.p99_ms;
    check(
        &mut t,
        "engine: spread p99 ≤ 2 ms up to 10 000 fires/s",
        engine
            .iter()
            .copied()
            .filter(|r| r.params.shape == Shape::Spread && r.params.tasks <= 10_000)
            .collect(),
        &p99,
        2.0,
        "ms",
    );
    check(
        &mut t,
        "engine: aligned 10 000 p99 ≤ 50 ms",
        engine
            .iter()
            .copied()
            .filter(|r| r.params.shape == Shape::Aligned && r.params.tasks == 10_000)
            .collect(),
        &p99,
        50.0,
        "ms",
    );
    check(
        &mut t,
        "engine: ≤ 10 µs CPU per fire",
        engine.clone(),
        &|r| r.cpu_us_per_fire,
        10.0,
        "µs",
    );
    check(
        &mut t,
        "engine: ≤ 1 KB resident per idle task (N ≥ 10 000; smaller N is page noise)",
        engine
            .iter()
            .copied()
            .filter(|r| r.params.tasks >= 10_000)
            .collect(),
        &per_task_bytes,
        1024.0,
        "B",
    );
    // No drift: the lag does not grow over the window beyond noise, i.e. the slope of each
    // second's median lag adds up to less than 1 ms over the window, or is within two standard
    // errors of zero.
    if !engine.is_empty() {
        let drifts = |r: &RunResult| {
            let s = &r.summary;
            let growth_ms = s.drift_us_per_s.abs() * r.params.seconds as f64 / 1000.0;
            growth_ms < 1.0 || s.drift_us_per_s.abs() <= 2.0 * s.drift_stderr_us_per_s
        };
        t.push(Target {
            what: "engine: no drift (each second's p50 grows < 1 ms over the window, or its slope is within 2 standard errors of 0)".into(),
            measured: engine
                .iter()
                .map(|r| {
                    format!(
                        "{}: {:.0} ± {:.0} µs/s",
                        label(r),
                        r.summary.drift_us_per_s,
                        r.summary.drift_stderr_us_per_s
                    )
                })
                .collect::<Vec<_>>()
                .join("; "),
            met: engine.iter().all(|r| drifts(r)),
        });
    }
    let http: Vec<&RunResult> = ours(Kind::Http).collect();
    let pick = |shape: Shape, n: usize| -> Vec<&RunResult> {
        http.iter()
            .copied()
            .filter(|r| r.params.shape == shape && r.params.tasks == n)
            .collect()
    };
    check(
        &mut t,
        "HTTP: aligned 1 000 p99 ≤ 100 ms",
        pick(Shape::Aligned, 1000),
        &p99,
        100.0,
        "ms",
    );
    check(
        &mut t,
        "HTTP: aligned 10 000 p99 ≤ 500 ms",
        pick(Shape::Aligned, 10_000),
        &p99,
        500.0,
        "ms",
    );
    check(
        &mut t,
        "HTTP: spread 1 000/s p99 ≤ 10 ms",
        pick(Shape::Spread, 1000),
        &p99,
        10.0,
        "ms",
    );
    check(
        &mut t,
        "HTTP: ≤ 30 µs CPU per HTTP fire",
        http.clone(),
        &|r| r.cpu_us_per_fire,
        30.0,
        "µs",
    );
    t
}

/// Writes `report.md` and `lag.svg` into `dir`; returns the report.
pub fn write(
    dir: &Path,
    context: &Context,
    all: &[RunResult],
    operator: &[OperatorResult],
    failover: Option<&FailoverResult>,
    errors: &[String],
) -> std::io::Result<String> {
    std::fs::create_dir_all(dir)?;
    let (redis, runs): (Vec<RunResult>, Vec<RunResult>) =
        all.iter().cloned().partition(|r| r.params.redis.is_some());
    let runs = &runs[..];
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Scheduling benchmark: chronflow and tokio-cron-scheduler\n"
    );
    let _ = writeln!(out, "Run {} with `{}`.\n", context.started, context.command);
    for line in context.machine.iter().chain(&context.versions) {
        let _ = writeln!(out, "- {line}");
    }
    let _ = writeln!(
        out,
        "- every task is due every second; {} s measured after {} s of warm-up; chronflow: `max_workers` {}, the default `queue_size` (100 000), memory ledger; tokio-cron-scheduler: `* * * * * *` async jobs, channels of 4 N, the aligned shape only (its instants are whole seconds, which it checks every 500 ms)\n",
        context.seconds, context.warmup, context.workers
    );
    let _ = writeln!(out, "![start lag against the number of tasks](lag.svg)\n");
    for (kind, title) in [
        (
            Kind::Engine,
            "## Engine: a no-op action, lag measured when it is called",
        ),
        (
            Kind::Http,
            "## HTTP: a POST to a receiver in its own process, lag measured when it arrives",
        ),
    ] {
        let part: Vec<&RunResult> = runs.iter().filter(|r| r.params.kind == kind).collect();
        if part.is_empty() {
            continue;
        }
        let _ = writeln!(out, "{title}\n");
        table(&mut out, &part, kind == Kind::Http);
        ratios(&mut out, runs, kind);
        out.push('\n');
    }
    redis_section(&mut out, &redis, runs);
    operator_section(&mut out, operator);
    if let Some(f) = failover {
        failover_section(&mut out, f);
    }
    let targets = targets(runs);
    if !targets.is_empty() {
        let _ = writeln!(out, "## Targets (chronflow)\n");
        let _ = writeln!(out, "| target | measured | met |\n| --- | --- | --- |");
    }
    for t in targets {
        let _ = writeln!(
            out,
            "| {} | {} | {} |",
            t.what,
            t.measured,
            if t.met { "yes" } else { "**no**" }
        );
    }
    let notes: Vec<String> = runs
        .iter()
        .filter(|r| lower_bound(r))
        .map(|r| {
            format!(
                "tokio-cron-scheduler {} {}: {} fires came a second late or more (counted as duplicates of a later second) and {} instants had no fire within their second: its lags here are lower bounds; its real p99 is at least {} ms",
                kind_name(r.params.kind),
                r.params.tasks,
                r.summary.duplicates,
                r.summary.expected - r.summary.fired,
                ms(r.summary.p99_ms)
            )
        })
        .chain(runs.iter().flat_map(|r| {
            r.notes.iter().map(move |n| {
                format!(
                    "{} {} {} {}: {n}",
                    name(r),
                    kind_name(r.params.kind),
                    shape(r),
                    r.params.tasks
                )
            })
        }))
        .collect();
    let notes: Vec<String> = errors
        .iter()
        .map(|e| format!("a run that gave no result: {e}"))
        .chain(notes)
        .collect();
    if !notes.is_empty() {
        let _ = writeln!(out, "\n## Notes\n");
        for n in notes {
            let _ = writeln!(out, "- {n}");
        }
    }
    std::fs::write(dir.join("report.md"), &out)?;
    chart(&dir.join("lag.svg"), runs).map_err(|e| std::io::Error::other(e.to_string()))?;
    Ok(out)
}

/// The Redis-ledger part: chronflow alone (the peer has no shared ledger), tasks spread over
/// the second at rising rates, beside the memory ledger's runs of the same run.
fn redis_section(out: &mut String, redis: &[RunResult], runs: &[RunResult]) {
    if redis.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "## Redis ledger: chronflow, a no-op action, tasks spread over each second\n\nA redis-server of the benchmark's own on loopback (no persistence), emptied before each rate; the ledger's defaults (10 connections, 2 s per operation); `max_workers` {} (a run holds its worker across two round trips to Redis: its start and its end are recorded). tokio-cron-scheduler has no shared ledger: the comparison is chronflow's memory ledger in the same run.\n",
        redis[0].params.workers
    );
    let _ = writeln!(
        out,
        "| runs/s | ledger | fired / expected | never fired | reported missed | p50 ms | p90 ms | p99 ms | max ms | chronflow CPU µs / run | RSS / idle task B | Redis round trips / run | Redis commands / run (in scripts too) | Redis CPU µs / run |"
    );
    let _ = writeln!(
        out,
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    let memory = |n: usize| {
        runs.iter().find(|r| {
            r.params.contender == Contender::Chronflow
                && r.params.kind == Kind::Engine
                && r.params.shape == Shape::Spread
                && r.params.tasks == n
        })
    };
    let row = |out: &mut String, r: &RunResult, ledger: &str| {
        let s = &r.summary;
        let opt = |v: Option<f64>| v.map_or("–".into(), |v| format!("{v:.2}"));
        let _ = writeln!(
            out,
            "| {} | {ledger} | {} / {} ({:.2} %) | {} | {} | {} | {} | {} | {} | {:.2} | {:.0} | {} | {} | {} |",
            r.params.tasks,
            s.fired,
            s.expected,
            100.0 * s.fired as f64 / s.expected.max(1) as f64,
            s.never_fired,
            r.reported_missed,
            ms(s.p50_ms),
            ms(s.p90_ms),
            ms(s.p99_ms),
            ms(s.max_ms),
            r.cpu_us_per_fire,
            per_task_bytes(r),
            opt(r.redis_round_trips_per_fire),
            opt(r.redis_commands_per_fire),
            opt(r.redis_cpu_us_per_fire),
        );
    };
    for r in redis {
        row(out, r, "Redis");
        if let Some(m) = memory(r.params.tasks) {
            row(out, m, "memory");
        }
    }
    let holds = |r: &&RunResult| {
        r.summary.fired == r.summary.expected && r.reported_missed == 0 && r.summary.p99_ms <= 10.0
    };
    let best = redis.iter().filter(holds).map(|r| r.params.tasks).max();
    let tried: Vec<String> = redis.iter().map(|r| r.params.tasks.to_string()).collect();
    let _ = writeln!(
        out,
        "\nHighest sustained rate with every run fired and start lag p99 ≤ 10 ms: {} (rates tried: {}; the part stops at the first rate that misses runs).",
        best.map_or("none of the rates tried".into(), |n| format!("{n} runs/s")),
        tried.join(", ")
    );
    if let Some(r) = redis.iter().find(|r| r.params.tasks == 1000) {
        let _ = write!(
            out,
            "At 1 000 runs/s: p50 {} ms, p99 {} ms, max {} ms",
            ms(r.summary.p50_ms),
            ms(r.summary.p99_ms),
            ms(r.summary.max_ms)
        );
        if let Some(m) = memory(1000) {
            let _ = write!(
                out,
                " (memory ledger, same run: p50 {} ms, p99 {} ms)",
                ms(m.summary.p50_ms),
                ms(m.summary.p99_ms)
            );
        }
        let _ = writeln!(out, ".");
    }
    out.push('\n');
}

fn operator_section(out: &mut String, runs: &[OperatorResult]) {
    if runs.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "## The operator on a real control plane\n\nOne `chronflow run` (memory ledger, no election; the configuration's defaults: the status write budget adapts to the apiserver, at most 500 writes a second) on a kube-apiserver and etcd of its own (`scripts/control-plane`), over N ChronTasks due every second (`* * * * * *`) that POST to the loopback receiver. \"Scheduled\" is when the apiserver shows every task past `Pending` (listed every 2 s), counted from the operator's start; the rates are over a window after that, from the apiserver's `apiserver_request_total` (this measurement's own few requests included); the instants are the window's whole seconds, as the receiver got them (every task is due at the same instant: each second is a burst of N runs), with the most seconds in a row one task went without a run. Status staleness: for each status write of the window, how long the oldest change it carried had waited (p50 and p99, a bucket's upper bound of the operator's histogram), and the most the oldest unwritten change waited (sampled each second).\n"
    );
    let _ = writeln!(
        out,
        "| ChronTasks | created in s | all scheduled after s | operator RSS MiB (÷ N, KB) | status writes/s | apiserver requests/s | calls received/s | window s | instants run / due | tasks never run | longest gap s | start lag p99 ms | status staleness p50 / p99 / max s |\n| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for r in runs {
        let _ = writeln!(
            out,
            "| {} | {:.1} | {:.1} | {:.0} ({:.1}) | {:.1} | {:.0} | {:.0} | {:.0} | {} / {} | {} | {} | {:.0} | {} / {} / {:.0} |",
            r.tasks,
            r.create_s,
            r.scheduled_s,
            r.rss_bytes as f64 / 1048576.0,
            r.rss_per_task / 1024.0,
            r.status_writes_per_s,
            r.apiserver_requests_per_s,
            r.calls_per_s,
            r.window_s,
            r.instants_fired,
            r.instants_expected,
            r.never_fired,
            r.longest_gap_s,
            r.lag_p99_ms,
            r.staleness_p50_s,
            r.staleness_p99_s,
            r.staleness_max_s
        );
    }
    out.push('\n');
}

fn failover_section(out: &mut String, f: &FailoverResult) {
    let list = |v: &[f64]| {
        v.iter()
            .map(|s| format!("{s:.1}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let max = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    let _ = writeln!(
        out,
        "## Failover: kill -9 on the leader, {} times\n\nThree `chronflow run` replicas (the same library as the binary) on a real kube-apiserver and etcd (`scripts/control-plane`), sharing a real redis-server as their ledger; {} tasks due every second (`catchUp: All`, `concurrencyPolicy: Allow`) call the loopback receiver. The leader is killed with SIGKILL, a replacement standby joins, and the next kill waits 5 s after a new leader holds the Lease. Lease timing: the configuration's defaults, `lease_duration` {}, `renew_deadline` {}, `retry_period` {}.\n",
        f.kills, f.tasks, f.lease_duration, f.renew_deadline, f.retry_period
    );
    let _ = writeln!(
        out,
        "| measured | value |\n| --- | --- |\n| a standby holds the Lease, s after the kill (each kill) | {} (max {:.1}) |\n| first run received, s after the kill (each kill) | {} (max {:.1}) |\n| instants received | {} |\n| instants lost (between each task's first and last) | {} |\n| instants run twice | {} |\n| largest lag, scheduled → received (the gap's catch-up) | {:.1} s |\n",
        list(&f.lease_taken_s),
        max(&f.lease_taken_s),
        list(&f.first_run_s),
        max(&f.first_run_s),
        f.received,
        f.lost,
        f.duplicated,
        f.max_lag_s
    );
}

fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Engine => "engine",
        Kind::Http => "http",
    }
}

/// p50 and p99 against the number of tasks, log-log, one panel per part.
fn chart(path: &Path, runs: &[RunResult]) -> Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::new(path, (1200, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((1, 2));
    let series = [
        (
            Contender::Chronflow,
            Shape::Spread,
            "chronflow, spread",
            RGBColor(31, 119, 180),
        ),
        (
            Contender::Chronflow,
            Shape::Aligned,
            "chronflow, aligned",
            RGBColor(44, 160, 44),
        ),
        (
            Contender::Peer,
            Shape::Aligned,
            "tokio-cron-scheduler, aligned",
            RGBColor(214, 39, 40),
        ),
    ];
    for (panel, kind, title) in [
        (&panels[0], Kind::Engine, "Engine (no-op action): start lag"),
        (
            &panels[1],
            Kind::Http,
            "HTTP (loopback receiver): scheduled → received",
        ),
    ] {
        let part: Vec<&RunResult> = runs.iter().filter(|r| r.params.kind == kind).collect();
        if part.is_empty() {
            continue;
        }
        let floor = 0.1;
        let lag = |v: f64| if v.is_nan() { floor } else { v.max(floor) };
        let max_n = part.iter().map(|r| r.params.tasks).max().unwrap_or(10) as f64;
        let min_n = part.iter().map(|r| r.params.tasks).min().unwrap_or(1) as f64;
        let max_lag = part
            .iter()
            .map(|r| lag(r.summary.max_ms))
            .fold(1.0, f64::max);
        let mut chart = ChartBuilder::on(panel)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(
                ((min_n / 2.0)..(max_n * 2.0)).log_scale(),
                // Head room above the lines for the legend.
                (floor..max_lag * 40.0).log_scale(),
            )?;
        chart
            .configure_mesh()
            .x_desc("tasks due every second")
            .y_desc("lag, ms (log)")
            // Powers of ten only: a log axis over less than a decade labels every step.
            .x_label_formatter(&|v| {
                let exponent = v.log10();
                if (exponent - exponent.round()).abs() < 1e-9 {
                    format!("{v:.0}")
                } else {
                    String::new()
                }
            })
            .max_light_lines(4)
            .y_label_formatter(&|v| format!("{v}"))
            .draw()?;
        for (contender, shape, label, color) in series {
            let mut points: Vec<&RunResult> = part
                .iter()
                .copied()
                .filter(|r| r.params.contender == contender && r.params.shape == shape)
                .collect();
            points.sort_by_key(|r| r.params.tasks);
            if points.is_empty() {
                continue;
            }
            let p99: Vec<(f64, f64)> = points
                .iter()
                .map(|r| (r.params.tasks as f64, lag(r.summary.p99_ms)))
                .collect();
            let p50: Vec<(f64, f64)> = points
                .iter()
                .map(|r| (r.params.tasks as f64, lag(r.summary.p50_ms)))
                .collect();
            chart
                .draw_series(LineSeries::new(p99.clone(), color.stroke_width(2)))?
                .label(format!("{label} p99"))
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
            chart.draw_series(p99.iter().map(|&p| Circle::new(p, 4, color.filled())))?;
            chart
                .draw_series(DashedLineSeries::new(
                    p50.clone(),
                    6,
                    4,
                    color.stroke_width(1),
                ))?
                .label(format!("{label} p50"))
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(1))
                });
            chart.draw_series(p50.iter().map(|&p| TriangleMarker::new(p, 4, color)))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 12))
            .draw()?;
    }
    root.present()?;
    Ok(())
}
