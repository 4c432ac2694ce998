//! ChronTask status: the only place that writes it. Three parts:
//! - [`index`]: each task's status in memory, updated synchronously by the controller, engine
//!   and executor (pure, never waits);
//! - [`writer`]: writes changed statuses with server-side apply under a global budget that
//!   adapts to the apiserver ([`budget`]);
//! - [`events`]: Kubernetes Events from a bounded queue, rate-limited per task and reason.
//!
//! [`conditions`] holds the pure computations (phase, Ready, success rate, recent runs).

pub mod budget;
pub mod conditions;
pub mod events;
pub mod index;
pub mod writer;

pub use events::reasons;
pub use index::{Observed, StatusIndex};
pub use writer::{FIELD_MANAGER, StatusWriter, WriterConfig};
