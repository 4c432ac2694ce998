//! What to do when more than one instant of a task is due at once: after the operator was down,
//! or when the engine fell behind. Always bounded: never a storm of hundreds of runs.

use chrono::{DateTime, Utc};

use crate::policy::CatchUpPolicy;
use crate::schedule::Schedule;

/// `catchUp: All` runs at most this many missed instants; the rest are counted as missed.
pub const MAX_CATCH_UP_RUNS: usize = 100;

/// Counting missed instants stops here; a longer outage reports "at least" this many.
const MAX_COUNTED: u64 = 100_000;

/// The due instants of one task, split into runs and misses.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    /// Instants to run, oldest first.
    pub run: Vec<DateTime<Utc>>,
    /// How many due instants are not run.
    pub missed: u64,
    /// The newest instant not run.
    pub latest_missed: Option<DateTime<Utc>>,
}

/// Plans the instants of `schedule` from `first` (itself due) up to `now`, inclusive.
pub fn plan(
    schedule: &Schedule,
    first: DateTime<Utc>,
    now: DateTime<Utc>,
    policy: CatchUpPolicy,
) -> Plan {
    // Keep at most the oldest MAX_CATCH_UP_RUNS and the newest instant; count the rest.
    let mut oldest = Vec::new();
    let mut newest = first;
    let mut before_newest = None;
    let mut count: u64 = 0;
    let mut next = Some(first);
    while let Some(instant) = next.filter(|t| *t <= now) {
        count += 1;
        if oldest.len() < MAX_CATCH_UP_RUNS {
            oldest.push(instant);
        }
        if count > 1 {
            before_newest = Some(newest);
        }
        newest = instant;
        if count >= MAX_COUNTED {
            break;
        }
        next = schedule.next_after(instant);
    }
    if count <= 1 {
        // The normal case: exactly one instant is due.
        return Plan {
            run: oldest,
            ..Plan::default()
        };
    }
    let (run, latest_missed) = match policy {
        CatchUpPolicy::Skip => (Vec::new(), Some(newest)),
        CatchUpPolicy::Latest => (vec![newest], before_newest),
        CatchUpPolicy::All => {
            let latest_missed = (count as usize > oldest.len()).then_some(newest);
            (oldest, latest_missed)
        }
    };
    Plan {
        missed: count - run.len() as u64,
        run,
        latest_missed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::IntervalAnchor;
    use chrono::TimeZone;
    use std::time::Duration;

    fn t(second: i64) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap() + chrono::Duration::seconds(second)
    }

    fn every_second() -> Schedule {
        Schedule::interval(Duration::from_secs(1), IntervalAnchor::Start(t(0))).unwrap()
    }

    #[test]
    fn a_single_due_instant_runs_whatever_the_policy() {
        for policy in [
            CatchUpPolicy::Skip,
            CatchUpPolicy::Latest,
            CatchUpPolicy::All,
        ] {
            let plan = plan(&every_second(), t(5), t(5), policy);
            assert_eq!(
                plan,
                Plan {
                    run: vec![t(5)],
                    missed: 0,
                    latest_missed: None
                }
            );
        }
    }

    #[test]
    fn skip_runs_nothing_and_counts_every_instant() {
        let plan = plan(&every_second(), t(1), t(10), CatchUpPolicy::Skip);
        assert_eq!(
            plan,
            Plan {
                run: vec![],
                missed: 10,
                latest_missed: Some(t(10))
            }
        );
    }

    #[test]
    fn latest_runs_the_newest_and_counts_the_others() {
        let plan = plan(&every_second(), t(1), t(10), CatchUpPolicy::Latest);
        assert_eq!(
            plan,
            Plan {
                run: vec![t(10)],
                missed: 9,
                latest_missed: Some(t(9))
            }
        );
    }

    #[test]
    fn all_runs_at_most_the_cap_oldest_first() {
        let small = plan(&every_second(), t(1), t(10), CatchUpPolicy::All);
        assert_eq!(small.run, (1..=10).map(t).collect::<Vec<_>>());
        assert_eq!(small.missed, 0);
        let large = plan(&every_second(), t(1), t(1000), CatchUpPolicy::All);
        assert_eq!(large.run.len(), MAX_CATCH_UP_RUNS);
        assert_eq!(large.run[0], t(1));
        assert_eq!(large.missed, 900);
        assert_eq!(large.latest_missed, Some(t(1000)));
    }

    #[test]
    fn very_long_outages_stop_counting() {
        let plan = plan(&every_second(), t(1), t(10_000_000), CatchUpPolicy::Skip);
        assert_eq!(plan.missed, MAX_COUNTED);
    }
}
