//! The operator on the real control plane (issue #23, part 3): one `chronflow run` (this
//! binary's `chronflow` sub-command; memory ledger, no election, the configuration's status
//! budget) over N ChronTasks due every second that call the loopback receiver, on a kube-apiserver
//! and etcd of its own (`scripts/control-plane`). Measured: how long until the apiserver shows
//! every task past Pending, the operator's resident memory, and status writes and apiserver
//! requests per second (the apiserver's own `/metrics`) over a window once they all are.

use std::fmt::Write as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::failover::{Plane, wait_for};

const NS: &str = "bench-operator";

/// What one operator run measured.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct OperatorResult {
    pub tasks: usize,
    /// `kubectl create` of every ChronTask, seconds.
    pub create_s: f64,
    /// From the operator's start until the apiserver shows every task past Pending, seconds.
    pub scheduled_s: f64,
    /// The operator's resident memory once every task is scheduled, and per task.
    pub rss_bytes: u64,
    pub rss_per_task: f64,
    /// Over the window: status writes (the status subresource's PATCH/APPLY), every request the
    /// apiserver served (this measurement's own few included), and calls the receiver got.
    pub window_s: f64,
    pub status_writes_per_s: f64,
    pub apiserver_requests_per_s: f64,
    pub calls_per_s: f64,
    /// The window's whole seconds: instants due (tasks × seconds), those the receiver got
    /// (each task and instant once), tasks that got none, the most seconds in a row one task
    /// went without a run, and the start lag p99 (ms).
    #[serde(default)]
    pub instants_expected: u64,
    #[serde(default)]
    pub instants_fired: u64,
    #[serde(default)]
    pub never_fired: u64,
    #[serde(default)]
    pub longest_gap_s: u64,
    #[serde(default)]
    pub lag_p99_ms: f64,
    /// How far status trails the runs over the window: for each status write, how long the
    /// oldest change it carried had waited (p50, p99, from the operator's histogram: a bucket's
    /// upper bound), and the most the oldest unwritten change had waited, sampled each second.
    #[serde(default)]
    pub staleness_p50_s: f64,
    #[serde(default)]
    pub staleness_p99_s: f64,
    #[serde(default)]
    pub staleness_max_s: f64,
}

/// The operator's own `/metrics`: (upper bound, cumulative count) of the staleness histogram's
/// buckets.
fn staleness(metrics: &str) -> Result<Vec<(f64, f64)>, String> {
    let out = Command::new("curl")
        .args(["-sf", &format!("http://{metrics}/metrics")])
        .output()
        .map_err(|e| format!("curl: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let value = |line: &str| line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok());
    let mut buckets = Vec::new();
    for line in text.lines() {
        if let Some(rest) =
            line.strip_prefix("chronflow_status_write_staleness_seconds_bucket{le=\"")
        {
            let bound = rest.split('"').next().unwrap_or_default();
            let bound = if bound == "+Inf" {
                f64::INFINITY
            } else {
                bound.parse().unwrap_or(f64::NAN)
            };
            buckets.push((bound, value(line).unwrap_or(0.0)));
        }
    }
    if buckets.is_empty() {
        return Err("the operator's /metrics has no status staleness histogram".into());
    }
    Ok(buckets)
}

/// The oldest unwritten status change, seconds, from `/stats` (cheaper to serve each second
/// than `/metrics`, which carries every task's series).
fn oldest_unwritten(metrics: &str) -> Result<f64, String> {
    let out = Command::new("curl")
        .args(["-sf", &format!("http://{metrics}/stats")])
        .output()
        .map_err(|e| format!("curl: {e}"))?;
    let stats: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("/stats: {e}"))?;
    stats["status_writes"]["staleness_seconds"]
        .as_f64()
        .ok_or_else(|| "/stats has no status_writes.staleness_seconds".into())
}

/// The bucket bound under which `q` of the writes between two scrapes fall.
fn quantile(before: &[(f64, f64)], after: &[(f64, f64)], q: f64) -> f64 {
    let counts: Vec<(f64, f64)> = after
        .iter()
        .zip(before)
        .map(|((bound, a), (_, b))| (*bound, a - b))
        .collect();
    let total = counts.last().map_or(0.0, |(_, n)| *n);
    counts
        .iter()
        .find(|(_, n)| *n >= q * total && total > 0.0)
        .map_or(f64::NAN, |(bound, _)| *bound)
}

/// What the receiver got for the whole seconds from `from_s` (Unix) on, `seconds` of them:
/// (instants fired, tasks never fired, longest run of seconds one task went without a run,
/// lag p99 ms).
fn coverage(
    receiver: &str,
    tasks: usize,
    from_s: i64,
    seconds: i64,
) -> Result<(u64, u64, u64, f64), String> {
    let out = Command::new("curl")
        .args(["-sf", &format!("{receiver}/hits")])
        .output()
        .map_err(|e| format!("curl: {e}"))?;
    let mut fired = vec![vec![false; seconds as usize]; tasks];
    let mut lags = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let mut fields = line.split(' ').map(|f| f.parse::<i64>().unwrap_or(-1));
        let (Some(task), Some(due), Some(at)) = (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let second = due.div_euclid(1_000_000_000) - from_s;
        if let (Some(row), true) = (fired.get_mut(task as usize), (0..seconds).contains(&second)) {
            row[second as usize] = true;
            lags.push(at - due);
        }
    }
    let count = fired.iter().flatten().filter(|f| **f).count() as u64;
    let never = fired.iter().filter(|row| !row.contains(&true)).count() as u64;
    let longest_gap = fired
        .iter()
        .map(|row| row.split(|f| *f).map(<[bool]>::len).max().unwrap_or(0))
        .max()
        .unwrap_or(0) as u64;
    lags.sort_unstable();
    let p99 = lags
        .get(lags.len().saturating_sub(1) * 99 / 100)
        .map_or(f64::NAN, |ns| *ns as f64 / 1e6);
    Ok((count, never, longest_gap, p99))
}

/// The apiserver's request counters: (status writes of ChronTasks, all requests).
fn counters(plane: &Plane) -> Result<(f64, f64), String> {
    let metrics = plane.kubectl(&["get", "--raw", "/metrics"], None)?;
    let (mut status, mut total) = (0.0, 0.0);
    for line in metrics
        .lines()
        .filter(|l| l.starts_with("apiserver_request_total{"))
    {
        let value: f64 = line
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        total += value;
        let write = ["verb=\"PATCH\"", "verb=\"APPLY\"", "verb=\"PUT\""]
            .iter()
            .any(|v| line.contains(v));
        if write
            && line.contains("resource=\"chrontasks\"")
            && line.contains("subresource=\"status\"")
        {
            status += value;
        }
    }
    Ok((status, total))
}

fn rss(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn calls(receiver: &str) -> Result<usize, String> {
    let out = Command::new("curl")
        .args(["-sf", &format!("{receiver}/count")])
        .output()
        .map_err(|e| format!("curl: {e}"))?;
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .map_err(|e| format!("the receiver's count: {e}"))
}

/// One run with `tasks` ChronTasks and a measured window of `window` seconds.
pub fn run(tasks: usize, receiver: &str, window: u64) -> Result<OperatorResult, String> {
    let plane = Plane::with_crd(NS)?;
    let mut manifests = String::new();
    for i in 0..tasks {
        let _ = write!(
            manifests,
            "---\napiVersion: chronflow.io/v1alpha1\nkind: ChronTask\nmetadata: {{name: t-{i}, namespace: {NS}}}\n\
             spec:\n  schedule: {{cron: \"* * * * * *\"}}\n  timeout: 5s\n  \
             action: {{http: {{url: \"{receiver}/t/{i}\", method: POST}}}}\n"
        );
    }
    let created = Instant::now();
    plane.kubectl(&["create", "-f", "-", "-o", "name"], Some(&manifests))?;
    let create_s = created.elapsed().as_secs_f64();

    let config = plane.dir.join("operator.yaml");
    let metrics = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| e.to_string())?;
    // The configuration's defaults otherwise.
    std::fs::write(
        &config,
        format!(
            "watch_namespaces: [{NS}]\nmetrics:\n  bind: {metrics}\n\
             log:\n  format: json\n  log_task_success: false\n"
        ),
    )
    .map_err(|e| e.to_string())?;
    let log = std::fs::File::create(plane.dir.join("operator.log")).map_err(|e| e.to_string())?;
    let started = Instant::now();
    let mut operator = Command::new(std::env::current_exe().map_err(|e| e.to_string())?)
        .args(["chronflow", "run", "-f"])
        .arg(&config)
        .env("KUBECONFIG", &plane.kubeconfig)
        .env_remove("RUST_LOG")
        .stdout(log)
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("the operator: {e}"))?;
    let result = (|| {
        let jsonpath = "jsonpath={range .items[*]}{.status.phase}{\"\\n\"}{end}";
        wait_for("every task scheduled", Duration::from_secs(900), || {
            let phases = plane
                .kubectl(&["get", "chrontasks", "-n", NS, "-o", jsonpath], None)
                .ok()?;
            let past = phases
                .lines()
                .filter(|p| !p.is_empty() && *p != "Pending")
                .count();
            // Polling lists every object: not more often than every 2 s.
            std::thread::sleep(Duration::from_secs(2));
            (past >= tasks).then_some(())
        })?;
        let scheduled_s = started.elapsed().as_secs_f64();
        let rss_bytes = rss(operator.id());
        let (status0, total0) = counters(&plane)?;
        let calls0 = calls(receiver)?;
        let stale0 = staleness(&metrics.to_string())?;
        let at0 = Instant::now();
        // The window's whole seconds, and 6 s after it for their runs to arrive.
        let unix = || chrono::Utc::now().timestamp();
        let from_s = unix() + 1;
        let mut staleness_max_s: f64 = 0.0;
        while at0.elapsed() < Duration::from_secs(window) {
            std::thread::sleep(Duration::from_secs(1));
            staleness_max_s = staleness_max_s.max(oldest_unwritten(&metrics.to_string())?);
        }
        let stale1 = staleness(&metrics.to_string())?;
        let seconds = unix() - from_s;
        let (status1, total1) = counters(&plane)?;
        let calls1 = calls(receiver)?;
        let window_s = at0.elapsed().as_secs_f64();
        std::thread::sleep(Duration::from_secs(6));
        let (instants_fired, never_fired, longest_gap_s, lag_p99_ms) =
            coverage(receiver, tasks, from_s, seconds)?;
        Ok(OperatorResult {
            instants_expected: (tasks as i64 * seconds) as u64,
            instants_fired,
            never_fired,
            longest_gap_s,
            lag_p99_ms,
            staleness_p50_s: quantile(&stale0, &stale1, 0.5),
            staleness_p99_s: quantile(&stale0, &stale1, 0.99),
            staleness_max_s,
            tasks,
            create_s,
            scheduled_s,
            rss_bytes,
            rss_per_task: rss_bytes as f64 / tasks as f64,
            window_s,
            status_writes_per_s: (status1 - status0) / window_s,
            apiserver_requests_per_s: (total1 - total0) / window_s,
            calls_per_s: (calls1 - calls0) as f64 / window_s,
        })
    })();
    let _ = Command::new("kill")
        .args(["-TERM", &operator.id().to_string()])
        .status();
    let _ = operator.wait();
    result
}
