//! chronflow embedded in a web service: an axum server that schedules its own work and lets
//! operators look at it and pause it over HTTP (the counterpart of the Python predecessor's
//! FastAPI example).
//!
//! ```sh
//! cargo run --example embed             # serves on 127.0.0.1:3000
//! curl localhost:3000/tasks             # every task with its runs and success rate
//! curl -X POST localhost:3000/tasks/cleanup/pause
//! curl -X POST localhost:3000/tasks/cleanup/resume
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use chronflow::scheduler::{Scheduler, Task};

struct App {
    scheduler: Scheduler,
    heartbeats: AtomicU64,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let app = Arc::new(App {
        scheduler: Scheduler::builder().max_workers(4).start()?,
        heartbeats: AtomicU64::new(0),
    });

    // Work of the service itself, as async closures.
    let beat = app.clone();
    let heartbeat = Task::every("heartbeat", Duration::from_secs(5))?.run(move |_run| {
        let app = beat.clone();
        async move {
            let n = app.heartbeats.fetch_add(1, Ordering::SeqCst) + 1;
            Ok(format!("heartbeat {n}"))
        }
    });
    let cleanup = Task::cron_in("cleanup", "0 */1 * * * *", "Europe/Berlin")?
        .timeout(Duration::from_secs(10))
        .run(|run| async move { Ok(format!("cleaned up for {}", run.scheduled)) });
    app.scheduler.add(heartbeat).await?;
    app.scheduler.add(cleanup).await?;
    // And a task from the same manifest format the operator takes.
    app.scheduler
        .add_manifest(
            "apiVersion: chronflow.io/v1alpha1\nkind: ChronTask\nmetadata: {name: self-check}\n\
             spec:\n  schedule: {interval: 10s}\n  action: {http: {url: 'http://127.0.0.1:3000/', method: GET}}\n",
        )
        .await?;

    let routes = Router::new()
        .route("/", get(home))
        .route("/tasks", get(tasks))
        .route("/tasks/{name}/pause", post(pause))
        .route("/tasks/{name}/resume", post(resume))
        .with_state(app.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
    println!("serving on http://127.0.0.1:3000");
    axum::serve(listener, routes)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    // Runs in flight finish before the process exits.
    if let Ok(app) = Arc::try_unwrap(app) {
        app.scheduler.shutdown().await;
    }
    Ok(())
}

async fn home(State(app): State<Arc<App>>) -> String {
    format!("heartbeats: {}\n", app.heartbeats.load(Ordering::SeqCst))
}

async fn tasks(State(app): State<Arc<App>>) -> String {
    let mut out = String::new();
    for task in app.scheduler.tasks() {
        out.push_str(&format!(
            "{:<12} {:<28} {:<10} runs {:>4}  success {}\n",
            task.name,
            task.schedule.unwrap_or_default(),
            task.phase.map(|p| format!("{p:?}")).unwrap_or_default(),
            task.runs,
            task.success_rate.unwrap_or_else(|| "-".into()),
        ));
    }
    out
}

async fn pause(State(app): State<Arc<App>>, Path(name): Path<String>) -> (StatusCode, String) {
    match app.scheduler.pause(&name).await {
        Ok(()) => (StatusCode::OK, format!("{name} paused\n")),
        Err(error) => (StatusCode::NOT_FOUND, format!("{error}\n")),
    }
}

async fn resume(State(app): State<Arc<App>>, Path(name): Path<String>) -> (StatusCode, String) {
    match app.scheduler.resume(&name).await {
        Ok(()) => (StatusCode::OK, format!("{name} resumed\n")),
        Err(error) => (StatusCode::NOT_FOUND, format!("{error}\n")),
    }
}
