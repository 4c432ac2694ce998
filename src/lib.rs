//! chronflow: a Kubernetes operator that runs scheduled work with seconds precision.
//!
//! Module map (one concern each):
//! - [`crd`]: the `ChronTask` resource (spec, status, CRD generation).
//! - [`schedule`]: schedule math (cron, intervals, one-shots, time zones); free of `kube`.
//! - [`config`]: the operator configuration (YAML file + `SCHEDULER__` environment).
//! - [`cli`]: the command line (`run`, `next`, `crd`, `check-config`).
//! - [`error`]: the crate's error type and exit codes.

pub mod cli;
pub mod config;
pub mod crd;
pub mod error;
pub mod schedule;

pub use crd::ChronTask;
pub use error::{Error, Result};
