//! What to do when more than one instant of a task is due at once: after the operator was down,
//! or when the engine fell behind. Always bounded: never a storm of hundreds of runs, and never
//! a walk over every instant of a long outage (the newest due instant is found by bisection,
//! and the instants missed are counted exactly from the schedule, day by day:
//! [`Schedule::count_after`]).

use chrono::{DateTime, TimeDelta, Utc};

use crate::policy::CatchUpPolicy;
use crate::schedule::Schedule;

/// `catchUp: All` runs at most this many missed instants; the rest are counted as missed.
pub const MAX_CATCH_UP_RUNS: usize = 100;

/// The due instants of one task, split into runs and misses.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    /// Instants to run, oldest first.
    pub run: Vec<DateTime<Utc>>,
    /// How many due instants are not run.
    pub missed: u64,
    /// The newest instant not run.
    pub latest_missed: Option<DateTime<Utc>>,
    /// The first instant that is not due yet (`None`: the schedule has ended).
    pub next: Option<DateTime<Utc>>,
}

/// Plans the instants of `schedule` from `first` (itself due) on. `is_due` says whether an
/// instant's time to start has come (its jittered fire time is not in the future); due instants
/// form a prefix of the schedule.
pub fn plan(
    schedule: &Schedule,
    first: DateTime<Utc>,
    now: DateTime<Utc>,
    policy: CatchUpPolicy,
    is_due: impl Fn(DateTime<Utc>) -> bool,
) -> Plan {
    let second = schedule.next_after(first);
    let Some(second) = second.filter(|t| is_due(*t)) else {
        // The normal case: exactly one instant is due.
        return Plan {
            run: vec![first],
            next: second,
            ..Plan::default()
        };
    };
    // The newest instant at or before now whose fire time has come. Jitter is shorter than the
    // gap between instants, so at most one step back is needed; the loop guards the rest.
    let mut newest = latest_at_or_before(schedule, second, now);
    while !is_due(newest) && newest > second {
        newest = latest_at_or_before(schedule, second, newest - TimeDelta::nanoseconds(1));
    }
    let next = schedule.next_after(newest);
    let count = 1 + schedule.count_after(first, newest);
    let (run, latest_missed) = match policy {
        CatchUpPolicy::Skip => (Vec::new(), Some(newest)),
        CatchUpPolicy::Latest => {
            let before = latest_at_or_before(schedule, first, newest - TimeDelta::nanoseconds(1));
            (vec![newest], Some(before))
        }
        CatchUpPolicy::All => {
            let mut run = vec![first];
            while run.len() < MAX_CATCH_UP_RUNS {
                match run.last().and_then(|t| schedule.next_after(*t)) {
                    Some(t) if t <= newest => run.push(t),
                    _ => break,
                }
            }
            let all_run = run.last() == Some(&newest);
            (run, (!all_run).then_some(newest))
        }
    };
    Plan {
        missed: count.saturating_sub(run.len() as u64),
        run,
        latest_missed,
        next,
    }
}

/// The newest instant of `schedule` in `[lower, at]`, where `lower` is itself an instant.
/// Bisection over time with `next_after`: about 2·log2((at - lower) / 1ns) calls, however many
/// instants lie between.
pub fn latest_at_or_before(
    schedule: &Schedule,
    lower: DateTime<Utc>,
    at: DateTime<Utc>,
) -> DateTime<Utc> {
    // Invariant: `lo` is an instant <= at, and no instant lies in (hi, at].
    let (mut lo, mut hi) = (lower, at);
    loop {
        match schedule.next_after(lo) {
            Some(next) if next <= hi => {}
            _ => return lo,
        }
        let mid = lo + (hi - lo) / 2;
        match schedule.next_after(mid) {
            Some(next) if next <= hi => lo = next,
            _ => hi = mid,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::IntervalAnchor;
    use chrono::TimeZone;
    use chrono_tz::Tz;
    use std::time::Duration;

    fn t(second: i64) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap() + chrono::Duration::seconds(second)
    }

    fn every_second() -> Schedule {
        Schedule::interval(Duration::from_secs(1), IntervalAnchor::Start(t(0))).unwrap()
    }

    fn plan_at(first: i64, now: i64, policy: CatchUpPolicy) -> Plan {
        plan(&every_second(), t(first), t(now), policy, |x| x <= t(now))
    }

    #[test]
    fn a_single_due_instant_runs_whatever_the_policy() {
        for policy in [
            CatchUpPolicy::Skip,
            CatchUpPolicy::Latest,
            CatchUpPolicy::All,
        ] {
            assert_eq!(
                plan_at(5, 5, policy),
                Plan {
                    run: vec![t(5)],
                    missed: 0,
                    latest_missed: None,
                    next: Some(t(6)),
                }
            );
        }
    }

    #[test]
    fn skip_runs_nothing_and_counts_every_instant() {
        let plan = plan_at(1, 10, CatchUpPolicy::Skip);
        assert_eq!((plan.run, plan.missed), (vec![], 10));
        assert_eq!(plan.latest_missed, Some(t(10)));
        assert_eq!(plan.next, Some(t(11)));
    }

    #[test]
    fn latest_runs_the_newest_and_counts_the_others() {
        let plan = plan_at(1, 10, CatchUpPolicy::Latest);
        assert_eq!((plan.run, plan.missed), (vec![t(10)], 9));
        assert_eq!(plan.latest_missed, Some(t(9)));
    }

    #[test]
    fn all_runs_at_most_the_cap_oldest_first() {
        let small = plan_at(1, 10, CatchUpPolicy::All);
        assert_eq!(small.run, (1..=10).map(t).collect::<Vec<_>>());
        assert_eq!((small.missed, small.latest_missed), (0, None));
        let large = plan_at(1, 1000, CatchUpPolicy::All);
        assert_eq!(large.run.len(), MAX_CATCH_UP_RUNS);
        assert_eq!(large.run[0], t(1));
        assert_eq!(large.missed, 900);
        assert_eq!(large.latest_missed, Some(t(1000)));
    }

    #[test]
    fn a_long_outage_runs_the_newest_instant_and_counts_every_miss() {
        // 30 hours of a 1 s cron: the run is the instant at the restart, not one from hours
        // before it (the old walk stopped at 100 000 instants and ran that one).
        let cron = Schedule::cron("* * * * * *", Tz::UTC).unwrap();
        let outage = 30 * 3600;
        let started = std::time::Instant::now();
        let plan = plan(&cron, t(1), t(outage), CatchUpPolicy::Latest, |x| {
            x <= t(outage)
        });
        assert_eq!(plan.run, vec![t(outage)]);
        assert_eq!(plan.missed, outage as u64 - 1);
        assert_eq!(plan.next, Some(t(outage + 1)));
        // Generous: the point is "not a walk of 108 000 instants inside the engine loop".
        assert!(started.elapsed() < Duration::from_millis(500));
    }

    #[test]
    fn an_irregular_long_outage_is_counted_exactly_without_a_walk() {
        // Seconds 0-9 of every minute: ten instants, then a 50 s gap.
        let cron = Schedule::cron("0-9 * * * * *", Tz::UTC).unwrap();
        let days = 3;
        let now = t(days * 86_400 - 1);
        let minutes = plan(&cron, t(0), now, CatchUpPolicy::Skip, |x| x <= now);
        assert_eq!(minutes.missed, (days * 1440 * 10) as u64);
        // Office hours only, across a day-long outage: 10 h of seconds, not 24 h of them
        // extrapolated from the first 10 000 (which gave 90 000).
        let office = Schedule::cron("* * 8-17 * * *", Tz::UTC).unwrap();
        let first = t(8 * 3600);
        let now = first + chrono::Duration::days(1);
        let started = std::time::Instant::now();
        let office = plan(&office, first, now, CatchUpPolicy::Skip, |x| x <= now);
        assert_eq!(
            office.missed,
            36_000 + 1,
            "one day's 36 000 and the next 08:00:00"
        );
        assert!(started.elapsed() < Duration::from_millis(500));
    }

    #[test]
    fn instants_whose_jittered_fire_time_has_not_come_are_not_due() {
        // Instant 10 is at or before now, but with its jitter it fires at 10.8 > now = 10.5.
        let now = t(10) + chrono::Duration::milliseconds(500);
        let is_due = |x: DateTime<Utc>| {
            let jitter = if x == t(10) { 800 } else { 100 };
            x + chrono::Duration::milliseconds(jitter) <= now
        };
        let plan = plan(&every_second(), t(8), now, CatchUpPolicy::Latest, is_due);
        assert_eq!((plan.run, plan.missed), (vec![t(9)], 1));
        assert_eq!(plan.next, Some(t(10)), "instant 10 is still to fire");
    }

    #[test]
    fn latest_at_or_before_finds_the_newest_instant() {
        let cron = Schedule::cron("0 30 2 * * *", Tz::UTC).unwrap();
        let first = Utc.with_ymd_and_hms(2026, 1, 1, 2, 30, 0).unwrap();
        let at = Utc.with_ymd_and_hms(2026, 7, 4, 1, 0, 0).unwrap();
        assert_eq!(
            latest_at_or_before(&cron, first, at),
            Utc.with_ymd_and_hms(2026, 7, 3, 2, 30, 0).unwrap()
        );
        assert_eq!(latest_at_or_before(&cron, first, first), first);
    }
}
