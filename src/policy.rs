//! Run policies users choose in a ChronTask and the engine and executor apply. Plain data,
//! free of `kube`, so standalone mode shares them; the CRD schema derives from them.

use serde::{Deserialize, Serialize};

/// What to do when a run is due while the previous one is still running.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
pub enum ConcurrencyPolicy {
    /// Start the new run beside the old one.
    Allow,
    /// Do not start the new run; count it as missed.
    #[default]
    Forbid,
    /// Cancel the old run and start the new one.
    Replace,
}

/// What to do with instants missed while the operator was down.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
pub enum CatchUpPolicy {
    /// Run none of them; count them as missed.
    Skip,
    /// Run the most recent one; count the others as missed.
    #[default]
    Latest,
    /// Run them all, oldest first, at most 100; count the rest as missed.
    All,
}

/// Whether an HTTP action follows a redirect (a 3xx answer with a `Location`).
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
pub enum FollowRedirects {
    /// Never: the run fails, naming where it was sent.
    #[default]
    Never,
    /// Only to the same origin (scheme, host and port), with the same method, headers and body
    /// (a 303 becomes a GET without body); at most 10 in a row.
    SameOrigin,
}

/// How the delay between attempts grows.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
pub enum Backoff {
    /// initialDelay, 2x, 4x, ... up to maxDelay.
    #[default]
    Exponential,
    /// initialDelay every time.
    Fixed,
    /// initialDelay, 2x, 3x, ... up to maxDelay.
    Linear,
}
