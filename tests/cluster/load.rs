//! Load on the real apiserver: many tasks due every second, the operator, apiserver and etcd
//! sharing this machine. Not part of the suite (it takes about a minute and all the CPU); run it
//! to reproduce the figures in the README and the closing notes:
//!
//! ```sh
//! CHRONFLOW_TEST_BIN_DIR=$(scripts/test-deps --bin-dir) cargo test --release --test cluster \
//!     load:: -- --ignored --nocapture
//! ```
//!
//! Settings (environment): `CHRONFLOW_LOAD_TASKS` (1000), `CHRONFLOW_LOAD_SECONDS` (45), and the
//! operator's `CHRONFLOW_LOAD_WORKERS` (64) and `CHRONFLOW_LOAD_QUEUE` (10000).
//!
//! It prints how many instants ran, how late they started, which seconds saw no run, what
//! status says, and how many status writes a second the apiserver received. It uses only
//! `chronflow::operator::run` and the CRD, so it runs unchanged against older commits.
//!
//! `load::jobs_per_second` (`CHRONFLOW_JOB_TASKS`, default 20) does the same with Job tasks on
//! the Job tier. Measured here (2 cores shared by the operator, apiserver, etcd,
//! kube-controller-manager, kube-scheduler and kwok; 30 s windows): 20, 50 and 100 tasks a second
//! were created on time (20.0, 50.0, 100.0 Jobs/s, 0 missed); 200 gave 194/s in the window and
//! every Job created, 0 missed. The control plane completed 19, 38 and 23 Jobs/s (10/s under 200):
//! above about 40 Jobs/s its Job controller, not chronflow, is the limit.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use chronflow::ChronTask;
use chronflow::config::{Namespace, OperatorConfig};
use futures::StreamExt;
use kube::api::{ListParams, PostParams};
use kube::{Api, Client};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::support::receiver::{Behavior, Receiver};
use crate::support::{namespace, test_env};

fn setting(name: &str, default: i64) -> i64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Status writes (server-side apply to chrontasks/status) the apiserver has served so far.
async fn status_writes(client: &Client) -> f64 {
    let request = http::Request::get("/metrics").body(Vec::new()).unwrap();
    let text = client.request_text(request).await.unwrap();
    text.lines()
        .filter(|line| {
            line.starts_with("apiserver_request_total{")
                && line.contains("resource=\"chrontasks\"")
                && line.contains("subresource=\"status\"")
                && (line.contains("verb=\"APPLY\"") || line.contains("verb=\"PATCH\""))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn percentile(sorted: &[i64], p: f64) -> i64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::test]
#[ignore = "load measurement: run by hand (see the module doc)"]
async fn many_tasks_every_second() {
    let tasks = setting("CHRONFLOW_LOAD_TASKS", 1000) as usize;
    let seconds = setting("CHRONFLOW_LOAD_SECONDS", 45);
    let client = test_env().client().await;
    let ns = namespace(&client, "load").await;
    let api: Api<ChronTask> = Api::namespaced(client.clone(), &ns);
    let receiver = Receiver::start(Behavior::default()).await;

    let lead = chrono::Duration::seconds(30 + tasks as i64 / 100);
    let start = chrono::Utc::now() + lead;
    let end = start + chrono::Duration::seconds(seconds - 1);
    futures::stream::iter(0..tasks)
        .map(|n| {
            let api = api.clone();
            let url = receiver.url(&format!("/t{n}"));
            async move {
                let task: ChronTask = serde_json::from_value(json!({
                    "apiVersion": "chronflow.io/v1alpha1",
                    "kind": "ChronTask",
                    "metadata": {"name": format!("t{n}")},
                    "spec": {
                        "schedule": {"interval": "1s", "startAt": start.to_rfc3339(),
                                     "endAt": end.to_rfc3339()},
                        "action": {"http": {"url": url}}
                    }
                }))
                .unwrap();
                api.create(&PostParams::default(), &task).await.unwrap();
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<()>>()
        .await;

    let mut config = OperatorConfig {
        watch_namespaces: vec![Namespace::new(ns.clone()).expect("test namespaces are valid")],
        max_workers: setting("CHRONFLOW_LOAD_WORKERS", 64) as usize,
        queue_size: setting("CHRONFLOW_LOAD_QUEUE", 10_000) as usize,
        ..Default::default()
    };
    config.log.log_task_success = false;
    // One namespace has every task: all workers are its share.
    config.limits.max_workers_per_namespace = Some(config.max_workers);
    config.metrics.bind = "127.0.0.1:0".parse().unwrap();
    let shutdown = CancellationToken::new();
    let operator = tokio::spawn(chronflow::operator::run(
        config,
        test_env().client().await,
        shutdown.clone(),
    ));

    let wait = (start - chrono::Utc::now()).to_std().unwrap_or_default();
    tokio::time::sleep(wait).await;
    let writes_before = status_writes(&client).await;
    let window = Duration::from_secs(seconds as u64);
    tokio::time::sleep(window).await;
    let writes_after = status_writes(&client).await;
    // Stragglers: runs of the last instants may still be on their way (missed ones never come).
    let expected = tasks * seconds as usize;
    let settle = tokio::time::Instant::now() + Duration::from_secs(10);
    while receiver.count() < expected && tokio::time::Instant::now() < settle {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    shutdown.cancel();
    operator.await.unwrap().unwrap();

    let hits = receiver.hits();
    let mut lags: Vec<i64> = hits
        .iter()
        .map(|h| (h.arrived - h.scheduled).num_milliseconds())
        .collect();
    lags.sort_unstable();
    let mut per_second: BTreeMap<i64, usize> = BTreeMap::new();
    let mut keys: HashMap<&str, usize> = HashMap::new();
    for hit in &hits {
        *per_second.entry(hit.scheduled.timestamp()).or_default() += 1;
        *keys.entry(hit.idempotency_key.as_str()).or_default() += 1;
    }
    let silent: Vec<i64> = (0..seconds)
        .filter(|s| !per_second.contains_key(&(start.timestamp() + s)))
        .collect();
    let repeated = keys.values().filter(|n| **n > 1).count();
    let (mut successful, mut missed) = (0u64, 0u64);
    for task in api.list(&ListParams::default()).await.unwrap() {
        let status = task.status.unwrap_or_default();
        successful += status.successful_runs;
        missed += status.missed_runs;
    }
    println!(
        "load: {tasks} tasks x 1 s for {seconds} s = {expected} instants ({} workers, queue {})",
        setting("CHRONFLOW_LOAD_WORKERS", 64),
        setting("CHRONFLOW_LOAD_QUEUE", 10_000)
    );
    println!(
        "load: received {} ({repeated} run ids more than once); status: {successful} succeeded, {missed} missed",
        hits.len()
    );
    if !lags.is_empty() {
        println!(
            "load: start lag (scheduled -> request received) p50 {} ms, p99 {} ms, max {} ms",
            percentile(&lags, 0.5),
            percentile(&lags, 0.99),
            percentile(&lags, 1.0)
        );
    }
    println!("load: seconds with no run: {silent:?}");
    println!(
        "load: status writes {:.0}/s during the window",
        (writes_after - writes_before) / window.as_secs_f64()
    );
    assert_eq!(
        hits.len() as u64 + missed,
        expected as u64,
        "every instant runs or is counted missed"
    );
}

/// Jobs a second: `CHRONFLOW_JOB_TASKS` (20) Job tasks due every second for
/// `CHRONFLOW_LOAD_SECONDS` (45), on the Job tier (kube-controller-manager, kube-scheduler, kwok
/// on this machine). Prints the Jobs the operator created per second against the target, and how
/// fast the control plane completed them, so one can tell whose limit is reached.
#[tokio::test]
#[ignore = "load measurement: run by hand (see the module doc)"]
async fn jobs_per_second() {
    use k8s_openapi::api::batch::v1::Job;
    use kube::runtime::{WatchStreamExt, watcher};

    let tasks = setting("CHRONFLOW_JOB_TASKS", 20) as usize;
    let seconds = setting("CHRONFLOW_LOAD_SECONDS", 45);
    let env = crate::support::job_env();
    let client = env.client().await;
    let ns = namespace(&client, "job-load").await;
    let api: Api<ChronTask> = Api::namespaced(client.clone(), &ns);
    let start = chrono::Utc::now() + chrono::Duration::seconds(10 + tasks as i64 / 50);
    let end = start + chrono::Duration::seconds(seconds - 1);
    for n in 0..tasks {
        let task: ChronTask = serde_json::from_value(json!({
            "apiVersion": "chronflow.io/v1alpha1",
            "kind": "ChronTask",
            "metadata": {"name": format!("j{n}")},
            "spec": {
                "schedule": {"interval": "1s", "startAt": start.to_rfc3339(),
                             "endAt": end.to_rfc3339()},
                "concurrencyPolicy": "Allow", "maxConcurrentRuns": 100, "timeout": "5m",
                "action": {"job": {"template": {"spec": {"template": {"spec": {
                    "restartPolicy": "Never",
                    "containers": [{"name": "w", "image": "busybox"}]}}}}}}
            }
        }))
        .unwrap();
        api.create(&PostParams::default(), &task).await.unwrap();
    }
    // Every Job as it is created and as it completes (pruning deletes most of them later).
    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns);
    let seen = std::sync::Arc::new(std::sync::Mutex::new(
        HashMap::<String, (i64, Option<i64>)>::new(),
    ));
    let watching = {
        let seen = seen.clone();
        tokio::spawn(async move {
            let mut events = watcher(jobs, watcher::Config::default())
                .applied_objects()
                .boxed();
            while let Some(Ok(job)) = events.next().await {
                let name = job.metadata.name.clone().unwrap_or_default();
                let created = job
                    .metadata
                    .creation_timestamp
                    .as_ref()
                    .map_or(0, |t| t.0.as_second());
                let complete = job.status.as_ref().and_then(|s| {
                    s.conditions
                        .iter()
                        .flatten()
                        .find(|c| c.type_ == "Complete" && c.status == "True")
                        .and_then(|c| c.last_transition_time.as_ref().map(|t| t.0.as_second()))
                });
                let mut seen = seen.lock().unwrap();
                let entry = seen.entry(name).or_insert((created, None));
                entry.1 = entry.1.or(complete);
            }
        })
    };
    let mut config = OperatorConfig {
        watch_namespaces: vec![Namespace::new(ns.clone()).expect("test namespaces are valid")],
        max_workers: setting("CHRONFLOW_LOAD_WORKERS", 64) as usize,
        ..Default::default()
    };
    config.jobs.enabled = true;
    config.metrics.bind = "127.0.0.1:0".parse().unwrap();
    let shutdown = CancellationToken::new();
    let operator = tokio::spawn(chronflow::operator::run(
        config,
        client.clone(),
        shutdown.clone(),
    ));

    let wait = (start - chrono::Utc::now()).to_std().unwrap_or_default();
    tokio::time::sleep(wait + Duration::from_secs(seconds as u64)).await;
    // Let the control plane finish what was created, up to a minute.
    let settle = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let open = seen
            .lock()
            .unwrap()
            .values()
            .filter(|(_, done)| done.is_none())
            .count();
        if open == 0 || tokio::time::Instant::now() > settle {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    shutdown.cancel();
    operator.await.unwrap().unwrap();
    watching.abort();

    let seen = seen.lock().unwrap().clone();
    let in_window = |t: i64| t >= start.timestamp() && t <= end.timestamp();
    let created = seen.values().filter(|(c, _)| in_window(*c)).count();
    let completed = seen
        .values()
        .filter(|(_, d)| d.is_some_and(in_window))
        .count();
    let mut took: Vec<i64> = seen
        .values()
        .filter_map(|(c, d)| Some(d.as_ref()? - c))
        .collect();
    took.sort_unstable();
    let (mut runs, mut missed) = (0u64, 0u64);
    for task in api.list(&ListParams::default()).await.unwrap() {
        let status = task.status.unwrap_or_default();
        runs += status.total_runs;
        missed += status.missed_runs;
    }
    let expected = tasks * seconds as usize;
    println!("jobs: {tasks} Job tasks x 1 s for {seconds} s = {expected} runs due");
    println!(
        "jobs: created in the window {created} ({:.1}/s, target {tasks}/s); completed in the window {completed} ({:.1}/s); {} Jobs created in all",
        created as f64 / seconds as f64,
        completed as f64 / seconds as f64,
        seen.len()
    );
    if !took.is_empty() {
        println!(
            "jobs: created -> Complete p50 {} s, p99 {} s, max {} s (1 s resolution)",
            percentile(&took, 0.5),
            percentile(&took, 0.99),
            percentile(&took, 1.0)
        );
    }
    println!("jobs: status: {runs} runs recorded, {missed} missed");
}

/// Requests the apiserver has served so far, all resources and verbs.
async fn apiserver_requests(client: &Client) -> f64 {
    let request = http::Request::get("/metrics").body(Vec::new()).unwrap();
    let text = client.request_text(request).await.unwrap();
    text.lines()
        .filter(|line| line.starts_with("apiserver_request_total{"))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A line of `/proc/PID/status` in kB (`VmRSS`, `VmHWM`).
fn memory_kb(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|line| line.starts_with(field))
        .and_then(|line| line.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// The operator at scale: `CHRONFLOW_SCALE_TASKS` (1000) ChronTasks due every second, spread
/// over the second, with `CHRONFLOW_SCALE_WRITES` (50) status writes a second at most, and `chronflow run` as a process of its own (release build when the tests
/// are). Prints the time from its start until every task is Scheduled with a nextRunTime, its
/// memory, the status writes and apiserver requests a second over `CHRONFLOW_LOAD_SECONDS` (45),
/// and how many runs status counts lag behind what the receiver got.
#[tokio::test]
#[ignore = "load measurement: run by hand (see the module doc)"]
async fn operator_at_scale() {
    let tasks = setting("CHRONFLOW_SCALE_TASKS", 1000) as usize;
    let budget = setting("CHRONFLOW_SCALE_WRITES", 50);
    let seconds = setting("CHRONFLOW_LOAD_SECONDS", 45) as u64;
    let client = test_env().client().await;
    let ns = namespace(&client, "scale").await;
    let api: Api<ChronTask> = Api::namespaced(client.clone(), &ns);
    let receiver = Receiver::start(Behavior::default()).await;
    let creating = std::time::Instant::now();
    futures::stream::iter(0..tasks)
        .map(|n| {
            let (api, url) = (api.clone(), receiver.url(&format!("/t{n}")));
            async move {
                let task: ChronTask = serde_json::from_value(json!({
                    "apiVersion": "chronflow.io/v1alpha1",
                    "kind": "ChronTask",
                    "metadata": {"name": format!("t{n}")},
                    "spec": {"schedule": {"interval": "1s"}, "action": {"http": {"url": url}}}
                }))
                .unwrap();
                api.create(&PostParams::default(), &task).await.unwrap();
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<()>>()
        .await;
    let created_in = creating.elapsed();

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("chronflow.yaml");
    let metrics = crate::observability::free_address();
    std::fs::write(
        &config,
        format!(
            "watch_namespaces: [{ns}]\nmax_workers: 64\nqueue_size: 10000\n\
             metrics:\n  bind: {metrics}\nlog:\n  format: json\n  level: warn\n\
             status:\n  max_writes_per_second: {budget}\n"
        ),
    )
    .unwrap();
    let started = std::time::Instant::now();
    let mut operator = std::process::Command::new(env!("CARGO_BIN_EXE_chronflow"))
        .args(["run", "-f"])
        .arg(&config)
        .env("KUBECONFIG", &test_env().kubeconfig)
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = operator.id();
    let scheduled_in = loop {
        let list = api.list(&ListParams::default()).await.unwrap();
        let scheduled = list
            .items
            .iter()
            .filter_map(|t| t.status.as_ref())
            // Running: a run was in flight when the status was written; scheduled all the same.
            .filter(|s| {
                use chronflow::crd::Phase::{Running, Scheduled};
                matches!(s.phase, Some(Scheduled | Running)) && s.next_run_time.is_some()
            })
            .count();
        if scheduled == tasks {
            break started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "{scheduled} of {tasks} scheduled"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let rss_scheduled = memory_kb(pid, "VmRSS");

    let (writes_before, requests_before) = (
        status_writes(&client).await,
        apiserver_requests(&client).await,
    );
    let received_before = receiver.count();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let (writes_after, requests_after) = (
        status_writes(&client).await,
        apiserver_requests(&client).await,
    );
    let received = receiver.count() - received_before;
    // Staleness: runs the receiver got that status does not count yet, per task.
    let hits = receiver.hits();
    let list = api.list(&ListParams::default()).await.unwrap();
    let mut per_task: HashMap<String, i64> = HashMap::new();
    for hit in &hits {
        let task = hit
            .idempotency_key
            .split(['/', '@'])
            .nth(1)
            .unwrap_or_default();
        *per_task.entry(task.to_string()).or_default() += 1;
    }
    let mut behind: Vec<i64> = list
        .items
        .iter()
        .map(|t| {
            let counted = t.status.as_ref().map_or(0, |s| s.total_runs as i64);
            per_task
                .get(&t.metadata.name.clone().unwrap_or_default())
                .copied()
                .unwrap_or(0)
                - counted
        })
        .collect();
    behind.sort_unstable();
    let (rss, peak) = (memory_kb(pid, "VmRSS"), memory_kb(pid, "VmHWM"));
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let _ = operator.wait();

    let window = seconds as f64;
    println!("scale: {tasks} ChronTasks x 1 s (created in {created_in:.1?})");
    println!(
        "scale: all Scheduled with a nextRunTime {scheduled_in:.1?} after the operator started"
    );
    println!(
        "scale: operator RSS {} MB when scheduled, {} MB after the window (peak {} MB)",
        rss_scheduled / 1024,
        rss / 1024,
        peak / 1024
    );
    println!(
        "scale: runs received {:.0}/s (target {tasks}/s); status writes {:.1}/s (budget status.max_writes_per_second {budget}); apiserver requests {:.1}/s (all clients)",
        received as f64 / window,
        (writes_after - writes_before) / window,
        (requests_after - requests_before) / window
    );
    println!(
        "scale: status counts behind the receiver, in runs (= seconds at 1/s): p50 {}, p99 {}, max {}",
        percentile(&behind, 0.5),
        percentile(&behind, 0.99),
        percentile(&behind, 1.0)
    );
}
