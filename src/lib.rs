//! chronflow: a Kubernetes operator that runs scheduled work with seconds precision.
//!
//! Module map (one concern each):
//! - [`crd`]: the `ChronTask` resource (spec, status, CRD generation).
//! - [`schedule`]: schedule math (cron, intervals, one-shots, time zones); free of `kube`.
//! - [`run`]: run identities (`RunId` = `<ns>/<name>@<instant>`) and reports about runs.
//! - [`clock`]: the time source of the run path (system, or tokio's for tests).
//! - [`engine`]: the timer queue that fires due instants; catch-up after downtime.
//! - [`leader`]: Lease leader election; leadership is a term with a fencing epoch.
//! - [`ledger`]: the run ledger (claims, steps, counts; in memory, or Redis fenced by epoch).
//! - [`executor`]: bounded queue + worker pool, concurrency policies, HTTP action, retries.
//! - [`controller`]: watches ChronTasks, validates them, feeds the engine (the `kube` side).
//! - [`status`]: the status index (in memory), its budgeted writer and Events.
//! - [`metrics`]: Prometheus metrics (runs, start lag, queue, workers, status writes).
//! - [`server`]: `/metrics`, `/stats`, `/healthz`, `/readyz`.
//! - [`core`]: the run path assembled once (engine + executor over a ledger).
//! - [`operator`]: `chronflow run` wiring, supervision and shutdown order.
//! - [`standalone`]: `chronflow standalone`: manifests from files, without a cluster.
//! - [`scheduler`]: the embedding API: tasks from code (async closures) or manifests.
//! - [`telemetry`]: logging setup.
//! - [`config`]: the operator configuration (YAML file + `SCHEDULER__` environment).
//! - [`cli`]: the command line (`run`, `standalone`, `next`, `trigger`, `crd`, `check-config`).
//! - [`error`]: the crate's error type and exit codes.
//! - [`policy`]: run policies (concurrency, catch-up, backoff) shared by CRD, engine and executor.

#![warn(missing_docs)]

pub mod cli;
pub mod clock;
pub mod config;
pub mod controller;
pub mod core;
pub mod crd;
pub mod engine;
pub mod error;
pub mod executor;
pub mod handover;
pub mod leader;
pub mod ledger;
pub mod members;
pub mod metrics;
pub mod names;
pub mod operator;
pub mod policy;
pub mod run;
pub mod schedule;
pub mod scheduler;
pub mod server;
pub mod shard;
pub mod skew;
pub mod standalone;
pub mod status;
pub mod telemetry;

pub use crd::ChronTask;
pub use error::{Error, Result};
