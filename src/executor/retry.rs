//! Retry policy: how many attempts a run gets and how long to wait between them.

use std::time::Duration;

use crate::policy::Backoff;

/// Attempts after the first one, and the delays between them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts after the first one.
    pub max_retries: u32,
    /// How the delay grows from one retry to the next.
    pub backoff: Backoff,
    /// The delay before the first retry.
    pub initial_delay: Duration,
    /// No delay is longer than this.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    /// No retry: one attempt.
    fn default() -> Self {
        Self {
            max_retries: 0,
            backoff: Backoff::Exponential,
            initial_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(60),
        }
    }
}

impl RetryPolicy {
    /// Total attempts a run may make.
    pub fn max_attempts(&self) -> u32 {
        self.max_retries.saturating_add(1)
    }

    /// The wait before retry number `retry` (1 for the first retry).
    pub fn delay(&self, retry: u32) -> Duration {
        let factor = match self.backoff {
            Backoff::Fixed => 1,
            Backoff::Linear => retry.max(1),
            Backoff::Exponential => 2u32.saturating_pow(retry.saturating_sub(1)),
        };
        self.initial_delay
            .saturating_mul(factor)
            .min(self.max_delay)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(backoff: Backoff) -> RetryPolicy {
        RetryPolicy {
            max_retries: 5,
            backoff,
            initial_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(10),
        }
    }

    fn delays(policy: &RetryPolicy) -> Vec<u64> {
        (1..=5).map(|n| policy.delay(n).as_secs()).collect()
    }

    #[test]
    fn backoffs_grow_as_documented_and_stop_at_max_delay() {
        assert_eq!(delays(&policy(Backoff::Fixed)), [1, 1, 1, 1, 1]);
        assert_eq!(delays(&policy(Backoff::Linear)), [1, 2, 3, 4, 5]);
        assert_eq!(delays(&policy(Backoff::Exponential)), [1, 2, 4, 8, 10]);
        assert_eq!(
            policy(Backoff::Exponential).delay(200),
            Duration::from_secs(10)
        );
        assert_eq!(policy(Backoff::Fixed).max_attempts(), 6);
    }
}
