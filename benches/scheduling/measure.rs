//! What a run records and how it is summarised: one sample per fire (task, instant, lag), the
//! process's CPU time and resident memory from /proc, and the summary every contender gets from
//! the same code.

use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Nanoseconds since the Unix epoch, from the system clock (what both schedulers read).
pub fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// Sleeps until the wall-clock instant `at_ns`.
pub async fn sleep_until_ns(at_ns: i64) {
    let wait = at_ns - now_ns();
    if wait > 0 {
        tokio::time::sleep(Duration::from_nanos(wait as u64)).await;
    }
}

/// The window of instants that count: `seconds` whole seconds from `t0_ns`.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct Window {
    /// First instant measured (ns since the epoch).
    pub t0_ns: i64,
    /// Seconds measured.
    pub seconds: u32,
}

impl Window {
    /// The second of the window an instant falls in, if it does.
    pub fn second_of(&self, due_ns: i64) -> Option<u32> {
        let offset = due_ns.saturating_sub(self.t0_ns);
        (offset >= 0 && offset < self.seconds as i64 * 1_000_000_000)
            .then_some((offset / 1_000_000_000) as u32)
    }
}

/// One fire: which task, which second of the window its instant is in, how late it came.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    pub task: u32,
    pub second: u32,
    pub lag_us: u32,
}

/// A lock-free log of fires, allocated (and touched) before the tasks are added, so recording
/// allocates nothing and the memory measured per task is the scheduler's own.
pub struct Recorder {
    /// The window's first instant; nothing is recorded until it is set.
    t0_ns: AtomicI64,
    seconds: u32,
    slots: Vec<AtomicU64>,
    next: AtomicUsize,
    /// Fires that came before their instant (never expected; counted, not hidden).
    pub early: AtomicU64,
}

impl Recorder {
    pub fn new(tasks: usize, seconds: u32) -> Recorder {
        // Room for two fires per instant: duplicates are counted, not lost.
        let capacity = tasks * seconds as usize * 2 + 1024;
        let slots: Vec<AtomicU64> = (0..capacity).map(|_| AtomicU64::new(u64::MAX)).collect();
        Recorder {
            t0_ns: AtomicI64::new(i64::MAX),
            seconds,
            slots,
            next: AtomicUsize::new(0),
            early: AtomicU64::new(0),
        }
    }

    /// Starts the window at `t0_ns`.
    pub fn set_start(&self, t0_ns: i64) {
        self.t0_ns.store(t0_ns, Ordering::Relaxed);
    }

    /// Records that `task`'s instant `due_ns` fired at `at_ns`; instants outside the window
    /// (warm-up, after the end) are ignored.
    pub fn record(&self, task: u32, due_ns: i64, at_ns: i64) {
        let window = Window {
            t0_ns: self.t0_ns.load(Ordering::Relaxed),
            seconds: self.seconds,
        };
        let Some(second) = window.second_of(due_ns) else {
            return;
        };
        if at_ns < due_ns {
            self.early.fetch_add(1, Ordering::Relaxed);
        }
        let lag_us = ((at_ns - due_ns).max(0) / 1000).min(u32::MAX as i64) as u64;
        let slot = self.next.fetch_add(1, Ordering::Relaxed);
        if let Some(cell) = self.slots.get(slot) {
            cell.store(
                (task as u64) << 44 | (second as u64) << 32 | lag_us,
                Ordering::Relaxed,
            );
        }
    }

    /// Every fire recorded so far.
    pub fn samples(&self) -> Vec<Sample> {
        let used = self.next.load(Ordering::Relaxed).min(self.slots.len());
        self.slots[..used]
            .iter()
            .map(|cell| cell.load(Ordering::Relaxed))
            .filter(|&v| v != u64::MAX)
            .map(|v| Sample {
                task: (v >> 44) as u32,
                second: ((v >> 32) & 0xfff) as u32,
                lag_us: v as u32,
            })
            .collect()
    }
}

/// JSON has no NaN nor infinity (serde_json writes null): read null back as NaN.
fn nullable<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// What a run measured; the same fields for every contender.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Summary {
    /// Fires expected in the window (tasks × seconds).
    pub expected: u64,
    /// Instants of the window that fired (each (task, instant) once).
    pub fired: u64,
    /// Fires beyond the first for one (task, instant).
    pub duplicates: u64,
    /// Tasks with no fire at all in the window.
    pub never_fired: u64,
    /// Start lag percentiles over the fires, in milliseconds.
    #[serde(deserialize_with = "nullable")]
    pub p50_ms: f64,
    #[serde(deserialize_with = "nullable")]
    pub p90_ms: f64,
    #[serde(deserialize_with = "nullable")]
    pub p99_ms: f64,
    #[serde(deserialize_with = "nullable")]
    pub max_ms: f64,
    /// Least-squares slope of each second's median lag over the window, µs per second, and
    /// its standard error (how much of the slope noise alone explains).
    #[serde(deserialize_with = "nullable")]
    pub drift_us_per_s: f64,
    #[serde(deserialize_with = "nullable")]
    pub drift_stderr_us_per_s: f64,
    /// Median lag of the first and of the last second, ms (the drift in plain numbers).
    #[serde(deserialize_with = "nullable")]
    pub first_second_p50_ms: f64,
    #[serde(deserialize_with = "nullable")]
    pub last_second_p50_ms: f64,
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize] as f64 / 1000.0
}

/// Summarises `samples` of `tasks` tasks over `seconds` seconds.
pub fn summarise(samples: &[Sample], tasks: usize, seconds: u32) -> Summary {
    let mut seen = vec![false; tasks * seconds as usize];
    let mut per_task = vec![0u32; tasks];
    let mut per_second: Vec<Vec<u32>> = vec![Vec::new(); seconds as usize];
    let mut lags = Vec::with_capacity(samples.len());
    let mut fired = 0u64;
    let mut duplicates = 0u64;
    for s in samples {
        let (task, second) = (s.task as usize, s.second as usize);
        if task >= tasks || second >= seconds as usize {
            continue;
        }
        let cell = &mut seen[task * seconds as usize + second];
        if *cell {
            duplicates += 1;
            continue;
        }
        *cell = true;
        fired += 1;
        per_task[task] += 1;
        per_second[second].push(s.lag_us);
        lags.push(s.lag_us);
    }
    lags.sort_unstable();
    let medians: Vec<(f64, f64)> = per_second
        .iter_mut()
        .enumerate()
        .filter(|(_, lags)| !lags.is_empty())
        .map(|(second, lags)| {
            lags.sort_unstable();
            (second as f64, lags[lags.len() / 2] as f64)
        })
        .collect();
    Summary {
        expected: tasks as u64 * seconds as u64,
        fired,
        duplicates,
        never_fired: per_task.iter().filter(|&&n| n == 0).count() as u64,
        p50_ms: percentile(&lags, 0.5),
        p90_ms: percentile(&lags, 0.9),
        p99_ms: percentile(&lags, 0.99),
        max_ms: percentile(&lags, 1.0),
        drift_us_per_s: slope(&medians).0,
        drift_stderr_us_per_s: slope(&medians).1,
        first_second_p50_ms: medians.first().map_or(f64::NAN, |m| m.1 / 1000.0),
        last_second_p50_ms: medians.last().map_or(f64::NAN, |m| m.1 / 1000.0),
    }
}

/// The least-squares slope of `points` and its standard error.
fn slope(points: &[(f64, f64)]) -> (f64, f64) {
    let n = points.len() as f64;
    if n < 3.0 {
        return (0.0, f64::INFINITY);
    }
    let mean_x = points.iter().map(|p| p.0).sum::<f64>() / n;
    let mean_y = points.iter().map(|p| p.1).sum::<f64>() / n;
    let cov: f64 = points.iter().map(|p| (p.0 - mean_x) * (p.1 - mean_y)).sum();
    let var: f64 = points.iter().map(|p| (p.0 - mean_x).powi(2)).sum();
    let b = cov / var;
    let a = mean_y - b * mean_x;
    let residuals: f64 = points.iter().map(|p| (p.1 - a - b * p.0).powi(2)).sum();
    (b, (residuals / (n - 2.0) / var).sqrt())
}

/// This process's CPU time (user + system, all threads), in microseconds.
pub fn cpu_us() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 of the file, 12 and 13 after the name and state.
    (ticks(11) + ticks(12)) * 1_000_000 / clock_ticks_per_second()
}

fn clock_ticks_per_second() -> u64 {
    // USER_HZ is 100 on every Linux architecture we run on; getconf would say the same.
    100
}

/// This process's resident memory, in bytes.
pub fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}
