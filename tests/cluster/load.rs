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
