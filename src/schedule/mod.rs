//! Schedule math: when a task is due. Pure functions of time; no I/O and no `kube`, so the
//! engine can run the same schedules without a cluster (standalone mode).

pub mod duration;

pub use duration::{format_duration, parse_duration};
