//! Schedule math: when a task is due. Pure functions of time; no I/O and no `kube`, so the
//! engine can run the same schedules without a cluster (standalone mode).
//!
//! [`Schedule`] is a cron expression read in an IANA time zone, a fixed-rate interval, or a
//! one-shot instant, with optional inclusive bounds; [`Schedule::next_after`] is the one question
//! the engine asks. The rules are those of PRODUCT.md "Time semantics", written up for users in
//! `docs/schedule.md`. Submodules: [`cron`] parses expressions and matches local wall times,
//! `zone` applies the daylight-saving rule, [`jitter`] spreads runs deterministically, and
//! [`duration`] reads humane durations.

pub mod cron;
pub mod duration;
pub mod jitter;
mod zone;

use std::time::Duration;

use chrono::{DateTime, SecondsFormat, TimeDelta, Utc};
use chrono_tz::Tz;

pub use cron::CronExpr;
pub use duration::{format_duration, parse_duration};

/// The shortest interval accepted. Below it a task would be a busy loop rather than a schedule,
/// and the operator's timer and status updates could not keep up.
pub const MIN_INTERVAL: Duration = Duration::from_millis(100);

/// The longest interval accepted: a year, leap day included. Longer ones are a typo or a misuse
/// (`at` says "once"), and would put instants past what RFC 3339 and Kubernetes can store.
pub const MAX_INTERVAL: Duration = duration::MAX_DURATION;

/// The last instant RFC 3339 (four-digit years) and so Kubernetes can hold: nothing is due after
/// 9999-12-31T23:59:59Z, so `status.nextRunTime` is always writable.
pub const LAST_INSTANT: DateTime<Utc> = match DateTime::from_timestamp(253_402_300_799, 0) {
    Some(instant) => instant,
    None => DateTime::<Utc>::MAX_UTC,
};

/// A schedule the user wrote is invalid: which field, and why. Displays as `{field}: {reason}`,
/// e.g. `minute: 61 is out of range 0-59`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct ScheduleError {
    /// The offending field: a cron field (`second`, `minute`, `hour`, `day-of-month`, `month`,
    /// `day-of-week`), `cron` for the expression as a whole, or a spec field such as `timezone`,
    /// `interval`, `endAt`.
    pub field: String,
    /// What is wrong, in words the user can act on.
    pub reason: String,
}

impl ScheduleError {
    fn new(field: &str, reason: impl Into<String>) -> ScheduleError {
        ScheduleError {
            field: field.to_string(),
            reason: reason.into(),
        }
    }
}

/// Where the fixed-rate grid of an interval schedule starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IntervalAnchor {
    /// `startAt` was given: due at `start + k·every` for k = 0, 1, 2, …
    Start(DateTime<Utc>),
    /// No `startAt`: due at `created + k·every` for k = 1, 2, … (not at creation itself).
    Created(DateTime<Utc>),
}

/// When a task is due. Built by [`Schedule::cron`], [`Schedule::interval`] or [`Schedule::at`],
/// optionally narrowed by [`Schedule::with_bounds`].
#[derive(Clone, Debug, PartialEq)]
pub struct Schedule {
    kind: Kind,
    start_at: Option<DateTime<Utc>>,
    end_at: Option<DateTime<Utc>>,
}

#[derive(Clone, Debug, PartialEq)]
enum Kind {
    Cron {
        expr: CronExpr,
        tz: Tz,
    },
    Interval {
        every: Duration,
        anchor: IntervalAnchor,
    },
    At(DateTime<Utc>),
}

impl Schedule {
    /// A cron schedule: 5 fields (`m h dom mon dow`), 6 fields (seconds first) or a macro, read
    /// in local wall time of `tz`. Rejects expressions that can never fire (`0 0 30 2 *`).
    pub fn cron(expr: &str, tz: Tz) -> Result<Schedule, ScheduleError> {
        Ok(Schedule::unbounded(Kind::Cron {
            expr: CronExpr::parse(expr)?,
            tz,
        }))
    }

    /// A fixed-rate schedule: elapsed time, so it ignores daylight saving and never drifts
    /// however long runs take. `every` must be at least [`MIN_INTERVAL`] (100ms) and at most
    /// [`MAX_INTERVAL`] (366d).
    pub fn interval(every: Duration, anchor: IntervalAnchor) -> Result<Schedule, ScheduleError> {
        if every.is_zero() {
            return Err(ScheduleError::new("interval", "must be greater than 0"));
        }
        if every < MIN_INTERVAL {
            let shown = if every.subsec_nanos().is_multiple_of(1_000_000) {
                format_duration(every)
            } else {
                format!("{every:?}")
            };
            return Err(ScheduleError::new(
                "interval",
                format!(
                    "{shown} is shorter than the minimum {}",
                    format_duration(MIN_INTERVAL)
                ),
            ));
        }
        if every > MAX_INTERVAL {
            return Err(ScheduleError::new(
                "interval",
                format!(
                    "{} is longer than the maximum {}",
                    format_duration(every),
                    format_duration(MAX_INTERVAL)
                ),
            ));
        }
        Ok(Schedule::unbounded(Kind::Interval { every, anchor }))
    }

    /// A one-shot schedule, due once at `instant`.
    pub fn at(instant: DateTime<Utc>) -> Schedule {
        Schedule::unbounded(Kind::At(instant))
    }

    fn unbounded(kind: Kind) -> Schedule {
        Schedule {
            kind,
            start_at: None,
            end_at: None,
        }
    }

    /// Restricts the schedule to `[start_at, end_at]`; both bounds are inclusive. `end_at`
    /// before `start_at` is an error on field `endAt`.
    pub fn with_bounds(
        self,
        start_at: Option<DateTime<Utc>>,
        end_at: Option<DateTime<Utc>>,
    ) -> Result<Schedule, ScheduleError> {
        if let (Some(start), Some(end)) = (start_at, end_at)
            && end < start
        {
            return Err(ScheduleError::new(
                "endAt",
                format!(
                    "{} is before startAt {}",
                    rfc3339_utc(end),
                    rfc3339_utc(start)
                ),
            ));
        }
        Ok(Schedule {
            start_at,
            end_at,
            ..self
        })
    }

    /// The first instant strictly after `after` at which the task is due, or `None` if it is never
    /// due again (the `at` instant passed, or past `endAt` or [`LAST_INSTANT`]): the task is then
    /// complete. Checked arithmetic throughout: any `after` chrono can represent, no panic.
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        // `startAt` is inclusive: asking for "after startAt - 1ns" admits startAt itself.
        let after = match self.start_at {
            Some(start) if start > after => start.checked_sub_signed(TimeDelta::nanoseconds(1))?,
            _ => after,
        };
        let next = match &self.kind {
            Kind::Cron { expr, tz } => zone::next_after(expr, *tz, after)?,
            Kind::Interval { every, anchor } => next_interval(*every, *anchor, after)?,
            Kind::At(instant) => Some(*instant).filter(|instant| *instant > after)?,
        };
        let end = self
            .end_at
            .map_or(LAST_INSTANT, |end| end.min(LAST_INSTANT));
        (next <= end).then_some(next)
    }

    /// How many instants lie in `(after, until]`, counted without listing them: an interval by
    /// arithmetic, a cron day by day from its expression (only a day whose UTC offset changes,
    /// a daylight-saving day, is walked instant by instant), so a year of a one-second
    /// schedule costs a few hundred steps.
    pub fn count_after(&self, after: DateTime<Utc>, until: DateTime<Utc>) -> u64 {
        let until = self.end_at.map_or(until, |end| end.min(until));
        let Some(first) = self.next_after(after).filter(|first| *first <= until) else {
            return 0;
        };
        match &self.kind {
            Kind::Interval { every, .. } => {
                let every = TimeDelta::from_std(*every).unwrap_or(TimeDelta::MAX);
                let nanos = |d: TimeDelta| i128::from(d.num_nanoseconds().unwrap_or(i64::MAX));
                let steps = nanos(until - first) / nanos(every).max(1);
                1 + u64::try_from(steps).unwrap_or(u64::MAX)
            }
            Kind::Cron { expr, tz } => {
                zone::count_between(expr, *tz, first, until).unwrap_or_else(|| {
                    // A time zone table without a local midnight: walk.
                    let mut count = 1;
                    let mut at = first;
                    while let Some(next) = self.next_after(at).filter(|t| *t <= until) {
                        (at, count) = (next, count + 1);
                    }
                    count
                })
            }
            Kind::At(_) => 1,
        }
    }

    /// The instants from `start` to `end`, both inclusive, oldest first; `Err(limit)` when there
    /// are more than `limit` (a backfill's bound), found without listing them all.
    pub fn between(
        &self,
        start: DateTime<Utc>,
        end: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<DateTime<Utc>>, usize> {
        let mut instants = Vec::new();
        let mut next = start
            .checked_sub_signed(TimeDelta::nanoseconds(1))
            .and_then(|before| self.next_after(before));
        while let Some(instant) = next.filter(|t| *t <= end) {
            if instants.len() == limit {
                return Err(limit);
            }
            instants.push(instant);
            next = self.next_after(instant);
        }
        Ok(instants)
    }

    /// A lower bound of the time between two consecutive instants, to keep a jitter shorter
    /// than it: an interval's period; for cron, [`CronExpr::min_gap`] (from the expression's
    /// fields); `None` for a one-shot, which has no second instant.
    ///
    /// For cron the bound is in local wall time. A daylight-saving change can bring two instants
    /// closer in real time: at a spring forward, `30 1,2 * * *` in New York runs at 01:30 and,
    /// for the missing 02:30, at 03:00, 30 minutes later, where this says one hour.
    pub fn min_gap(&self) -> Option<Duration> {
        match &self.kind {
            Kind::Cron { expr, .. } => Some(expr.min_gap()),
            Kind::Interval { every, .. } => Some(*every),
            Kind::At(_) => None,
        }
    }

    /// The instant of a one-shot (`at`) schedule.
    pub fn one_shot(&self) -> Option<DateTime<Utc>> {
        match self.kind {
            Kind::At(instant) => Some(instant),
            _ => None,
        }
    }

    /// A short description for status and `kubectl get`: `*/5 * * * * * (Asia/Shanghai)`,
    /// `every 30s`, `at 2026-12-01T01:00:00Z`.
    pub fn describe(&self) -> String {
        match &self.kind {
            Kind::Cron { expr, tz } => format!("{} ({})", expr.text(), tz.name()),
            Kind::Interval { every, .. } => format!("every {}", format_duration(*every)),
            Kind::At(instant) => format!("at {}", rfc3339_utc(*instant)),
        }
    }
}

/// The first point of the grid `anchor + k·every` strictly after `after`. Arithmetic in i128
/// nanoseconds: exact for any interval and any distance chrono can represent.
fn next_interval(
    every: Duration,
    anchor: IntervalAnchor,
    after: DateTime<Utc>,
) -> Option<DateTime<Utc>> {
    let every = i128::try_from(every.as_nanos()).ok()?;
    let (origin, first_k) = match anchor {
        IntervalAnchor::Start(start) => (start, 0),
        IntervalAnchor::Created(created) => (created, 1),
    };
    let first = add_nanos(origin, first_k * every)?;
    if first > after {
        return Some(first);
    }
    let steps = nanos_between(first, after) / every + 1;
    add_nanos(first, steps.checked_mul(every)?)
}

/// `to - from` in nanoseconds.
fn nanos_between(from: DateTime<Utc>, to: DateTime<Utc>) -> i128 {
    let seconds = i128::from(to.timestamp()) - i128::from(from.timestamp());
    let nanos = i128::from(to.timestamp_subsec_nanos()) - i128::from(from.timestamp_subsec_nanos());
    seconds * 1_000_000_000 + nanos
}

fn add_nanos(instant: DateTime<Utc>, nanos: i128) -> Option<DateTime<Utc>> {
    let seconds = i64::try_from(nanos.div_euclid(1_000_000_000)).ok()?;
    let rest = i64::try_from(nanos.rem_euclid(1_000_000_000)).ok()?;
    instant
        .checked_add_signed(TimeDelta::try_seconds(seconds)?)?
        .checked_add_signed(TimeDelta::nanoseconds(rest))
}

fn rfc3339_utc(instant: DateTime<Utc>) -> String {
    instant.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

/// Reads an IANA time zone name (`Europe/Berlin`, `UTC`); the error is on field `timezone`.
pub fn parse_timezone(name: &str) -> Result<Tz, ScheduleError> {
    name.parse::<Tz>()
        .map_err(|_| ScheduleError::new("timezone", format!("{name:?} is not an IANA time zone")))
}

/// Reads an RFC 3339 instant (`2026-12-01T09:00:00+08:00`); the error names `field`.
pub fn parse_instant(field: &str, text: &str) -> Result<DateTime<Utc>, ScheduleError> {
    DateTime::parse_from_rfc3339(text)
        .map(|instant| instant.with_timezone(&Utc))
        .map_err(|_| {
            ScheduleError::new(
                field,
                format!("{text:?} is not an RFC 3339 instant (e.g. 2026-12-01T09:00:00+08:00)"),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(text: &str) -> DateTime<Utc> {
        parse_instant("test", text).expect("test instant")
    }

    #[test]
    fn describe_is_short_and_names_the_zone() {
        let shanghai = parse_timezone("Asia/Shanghai").expect("zone");
        let cron = Schedule::cron("*/5  *  * * * *", shanghai).expect("valid");
        assert_eq!(cron.describe(), "*/5 * * * * * (Asia/Shanghai)");
        let every = Schedule::interval(
            Duration::from_secs(30),
            IntervalAnchor::Created(utc("2026-01-01T00:00:00Z")),
        );
        assert_eq!(every.expect("valid").describe(), "every 30s");
        assert_eq!(
            Schedule::at(utc("2026-12-01T09:00:00+08:00")).describe(),
            "at 2026-12-01T01:00:00Z"
        );
        assert_eq!(
            Schedule::cron("@daily", Tz::UTC).expect("valid").describe(),
            "@daily (UTC)"
        );
    }

    #[test]
    fn errors_display_field_and_reason() {
        let error = Schedule::cron("61 * * * *", Tz::UTC).expect_err("invalid");
        assert_eq!(error.to_string(), "minute: 61 is out of range 0-59");
        let error = parse_timezone("Mars/Base").expect_err("invalid");
        assert_eq!(
            error.to_string(),
            "timezone: \"Mars/Base\" is not an IANA time zone"
        );
        let error = Schedule::interval(
            Duration::from_millis(50),
            IntervalAnchor::Created(utc("2026-01-01T00:00:00Z")),
        );
        assert_eq!(
            error.expect_err("too short").to_string(),
            "interval: 50ms is shorter than the minimum 100ms"
        );
    }

    #[test]
    fn interval_grid_survives_far_instants() {
        let schedule = Schedule::interval(
            Duration::from_millis(700),
            IntervalAnchor::Start(utc("1970-01-01T00:00:00Z")),
        )
        .expect("valid");
        let next = schedule
            .next_after(utc("9999-12-31T23:59:58Z"))
            .expect("representable");
        assert!(next > utc("9999-12-31T23:59:58Z"));
        assert_eq!(
            nanos_between(utc("1970-01-01T00:00:00Z"), next) % 700_000_000,
            0
        );
    }

    #[test]
    fn min_gap_is_a_lower_bound_between_two_instants() {
        let secs = |n: u64| Some(Duration::from_secs(n));
        let cron = |expr: &str| Schedule::cron(expr, Tz::UTC).expect(expr).min_gap();
        let start = IntervalAnchor::Start(utc("2026-01-01T00:00:00Z"));
        let every = |d: Duration| Schedule::interval(d, start).expect("valid").min_gap();
        assert_eq!(every(Duration::from_millis(100)), Some(MIN_INTERVAL));
        assert_eq!(every(Duration::from_secs(90)), secs(90));
        assert_eq!(Schedule::at(utc("2026-12-01T00:00:00Z")).min_gap(), None);
        // Seconds with several values: the smallest distance, around the minute too.
        assert_eq!(cron("*/5 * * * * *"), secs(5));
        assert_eq!(cron("*/7 * * * * *"), secs(4), "56 to 0 of the next minute");
        assert_eq!(cron("5-10 * * * * *"), secs(1));
        assert_eq!(cron("0,50 * * * * *"), secs(10));
        assert_eq!(cron("0,30 0 0 1 1 *"), secs(30));
        // One second: minutes decide, then hours, then whole days.
        assert_eq!(cron("*/15 * * * *"), secs(15 * 60));
        assert_eq!(cron("10,50 9 * * *"), secs(20 * 60));
        assert_eq!(cron("0 9,17 * * *"), secs(8 * 3600));
        assert_eq!(cron("0 */5 * * *"), secs(4 * 3600), "20:00 to 00:00");
        assert_eq!(cron("@hourly"), secs(3600));
        assert_eq!(cron("30 2 * * *"), secs(86_400));
        assert_eq!(
            cron("@yearly"),
            secs(86_400),
            "a lower bound, not the exact gap"
        );
        // Bounds do not change the rhythm.
        let bounded = Schedule::cron("*/5 * * * * *", Tz::UTC)
            .and_then(|s| s.with_bounds(Some(utc("2026-01-01T00:00:00Z")), None))
            .expect("valid");
        assert_eq!(bounded.min_gap(), secs(5));
    }

    #[test]
    fn min_gap_holds_on_a_brute_force_scan() {
        // Outside daylight-saving changes the bound is never beaten: scan two days in UTC.
        for expr in [
            "*/7 * * * * *",
            "0,50 */3 * * * *",
            "13 5,55 * * * *",
            "0 */5 * * *",
            "0 9,17 * * MON-FRI",
            "0 22,1 * * *",
        ] {
            let schedule = Schedule::cron(expr, Tz::UTC).expect(expr);
            let gap = schedule.min_gap().expect("cron has a gap");
            let mut previous = schedule
                .next_after(utc("2026-01-01T00:00:00Z"))
                .expect("due");
            let end = utc("2026-01-03T00:00:00Z");
            let mut smallest = None::<TimeDelta>;
            while previous < end {
                let next = schedule.next_after(previous).expect("due");
                let step = next - previous;
                smallest = Some(smallest.map_or(step, |s| s.min(step)));
                previous = next;
            }
            let smallest = smallest
                .expect("several instants")
                .to_std()
                .expect("positive");
            assert!(gap <= smallest, "{expr}: bound {gap:?} above {smallest:?}");
        }
    }

    #[test]
    fn interval_arithmetic_is_checked_at_every_extreme() {
        let (min, max) = (DateTime::<Utc>::MIN_UTC, DateTime::<Utc>::MAX_UTC);
        let everies = [
            Duration::from_nanos(1),
            MIN_INTERVAL,
            MAX_INTERVAL,
            Duration::from_secs(u64::MAX),
            Duration::MAX,
        ];
        for every in everies {
            for anchor in [min, max, utc("2026-01-01T00:00:00Z")] {
                for kind in [
                    IntervalAnchor::Start(anchor),
                    IntervalAnchor::Created(anchor),
                ] {
                    for after in [min, max, utc("2026-01-01T00:00:00Z")] {
                        if let Some(next) = next_interval(every, kind, after) {
                            assert!(next > after, "{every:?} {kind:?} {after}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn nothing_is_due_after_the_last_rfc3339_instant() {
        // Year 10000 cannot be written in RFC 3339, and Kubernetes refuses it in status.
        let every = Duration::from_secs(366 * 86_400);
        let start = utc("9999-06-01T00:00:00Z");
        let interval = Schedule::interval(every, IntervalAnchor::Start(start)).expect("valid");
        assert_eq!(interval.next_after(start), None);
        let leap = Schedule::cron("0 0 29 2 *", Tz::UTC).expect("valid");
        assert_eq!(leap.next_after(utc("9999-03-01T00:00:00Z")), None);
        assert_eq!(
            Schedule::cron("* * * * * *", Tz::UTC)
                .expect("valid")
                .next_after(utc("9999-12-31T23:59:58Z")),
            Some(LAST_INSTANT)
        );
        let huge = Schedule::interval(Duration::from_secs(u64::MAX), IntervalAnchor::Start(start));
        assert!(huge.is_err(), "an interval beyond the maximum is refused");
    }
}
