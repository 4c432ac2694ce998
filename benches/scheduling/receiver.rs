//! The loopback HTTP receiver of the HTTP runs, in a process of its own
//! (`scheduling receiver`): it answers `200` at once, records each request's task, scheduled
//! instant (`X-Chronflow-Scheduled-Time`, which the peer's calls send too) and arrival, and
//! serves the window's summary at `/summary`, computed by the same code as the engine runs'.

use std::sync::{Arc, Mutex};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::routing::{get, post};
use chronflow::executor::http::SCHEDULED_TIME;
use chrono::DateTime;

use crate::measure::{self, Sample, Window};

type Hits = Arc<Mutex<Vec<(u32, i64, i64)>>>;

/// Serves until killed; prints `LISTENING <address>` once it accepts connections.
pub async fn serve() {
    let hits: Hits = Arc::new(Mutex::new(Vec::with_capacity(1 << 20)));
    let app = axum::Router::new()
        .route("/t/{task}", post(hit))
        .route("/summary", get(summary))
        .route("/hits", get(all_hits))
        .route("/count", get(count))
        .with_state(hits);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a loopback port");
    println!("LISTENING {}", listener.local_addr().expect("an address"));
    axum::serve(listener, app)
        .await
        .expect("the receiver serves");
}

async fn hit(State(hits): State<Hits>, Path(task): Path<u32>, headers: HeaderMap) -> StatusCode {
    let at = measure::now_ns();
    let Some(due) = headers
        .get(SCHEDULED_TIME)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| DateTime::parse_from_rfc3339(v).ok())
        .and_then(|t| t.timestamp_nanos_opt())
    else {
        return StatusCode::BAD_REQUEST;
    };
    hits.lock().expect("not poisoned").push((task, due, at));
    StatusCode::OK
}

/// `?t0_ns=…&seconds=…&tasks=…` (axum's query extractor is a feature chronflow leaves off).
async fn summary(State(hits): State<Hits>, uri: Uri) -> String {
    let param = |name: &str| -> i64 {
        uri.query()
            .unwrap_or("")
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == name)
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0)
    };
    let window = Window {
        t0_ns: param("t0_ns"),
        seconds: param("seconds") as u32,
    };
    let tasks = param("tasks") as usize;
    let samples: Vec<Sample> = hits
        .lock()
        .expect("not poisoned")
        .iter()
        .filter_map(|&(task, due, at)| {
            window.second_of(due).map(|second| Sample {
                task,
                second,
                lag_us: ((at - due).max(0) / 1000).min(u32::MAX as i64) as u32,
            })
        })
        .collect();
    serde_json::to_string(&measure::summarise(&samples, tasks, window.seconds))
        .expect("a summary serialises")
}

/// Every call so far, one per line: `task instant_ns arrival_ns`.
async fn all_hits(State(hits): State<Hits>) -> String {
    let hits = hits.lock().expect("not poisoned");
    let mut out = String::with_capacity(hits.len() * 40);
    for (task, due, at) in hits.iter() {
        out.push_str(&format!("{task} {due} {at}\n"));
    }
    out
}

/// How many calls so far.
async fn count(State(hits): State<Hits>) -> String {
    hits.lock().expect("not poisoned").len().to_string()
}
