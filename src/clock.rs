//! The time source of the run path. Production reads the system clock; tests use a clock driven
//! by tokio's (paused) time, so engine, executor and status tests advance hours in milliseconds
//! and never sleep for real. Free of `kube`.

use chrono::{DateTime, Utc};

/// Where "now" comes from.
#[derive(Clone, Copy, Debug)]
pub enum Clock {
    /// The system's wall clock: instants are wall-clock instants, as schedules are.
    System,
    /// `origin` plus the tokio time elapsed since `start`: follows `tokio::time::pause` and
    /// `advance`, for tests.
    Tokio {
        /// The wall-clock instant the clock read when it was made.
        origin: DateTime<Utc>,
        /// The tokio instant it was made at.
        start: tokio::time::Instant,
    },
}

impl Clock {
    /// A clock that reads `origin` now and moves with tokio's time (paused or not).
    pub fn tokio_at(origin: DateTime<Utc>) -> Clock {
        Clock::Tokio {
            origin,
            start: tokio::time::Instant::now(),
        }
    }

    /// The current instant.
    pub fn now(&self) -> DateTime<Utc> {
        match self {
            Clock::System => Utc::now(),
            Clock::Tokio { origin, start } => {
                let elapsed = chrono::Duration::from_std(start.elapsed()).unwrap_or_default();
                *origin + elapsed
            }
        }
    }

    /// Sleeps until `at` by this clock (returns at once if it has passed). With the system clock
    /// a wall-clock step can wake it early or late: callers re-read [`Clock::now`] on waking.
    pub async fn sleep_until(&self, at: DateTime<Utc>) {
        let wait = (at - self.now()).to_std().unwrap_or_default();
        tokio::time::sleep(wait).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn tokio_clock_follows_paused_time() {
        let origin = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
        let clock = Clock::tokio_at(origin);
        assert_eq!(clock.now(), origin);
        tokio::time::advance(Duration::from_secs(90)).await;
        assert_eq!(clock.now(), origin + chrono::Duration::seconds(90));
        let target = origin + chrono::Duration::hours(5);
        clock.sleep_until(target).await;
        assert_eq!(clock.now(), target);
    }
}
