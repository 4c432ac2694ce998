//! From local wall times to instants: the daylight-saving rule of PRODUCT.md "Time semantics"
//! (classic Vixie cron, applied to 5- and 6-field expressions alike).
//!
//! - A *periodic* schedule fires at every real instant whose local wall time matches: both
//!   occurrences of a repeated time (fall back), none of a missing one (spring forward).
//! - A *wall-clock* schedule fires once per matching wall time: at the first occurrence of a
//!   repeated time, and at the first instant after the gap for a missing one. All wall times in
//!   one gap collapse onto that single instant, so nothing fires twice.
//!
//! Everything here works in whole seconds since the Unix epoch (`i64`), because cron instants are
//! whole seconds and it keeps the arithmetic checked and panic-free.

use chrono::offset::LocalResult;
use chrono::{DateTime, NaiveDateTime, Offset, TimeZone, Utc};
use chrono_tz::{GapInfo, Tz};

use super::cron::CronExpr;

/// Probe distance when looking for an offset change. No time zone changes its offset twice
/// within six hours and back again, so probing at this pace cannot step over a transition.
const PROBE_SECONDS: i64 = 6 * 3600;

/// Upper bound on search rounds, a guard against a malformed time zone table; real searches
/// need one round per offset change crossed (two a year), far below this.
const MAX_ROUNDS: usize = 10_000;

/// The first instant strictly after `after` at which `expr`, read in `tz`, fires.
pub fn next_after(expr: &CronExpr, tz: Tz, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
    // Cron instants are whole seconds: the first candidate is the next whole second.
    let from = after.timestamp().checked_add(1)?;
    let next = if expr.is_wall_clock() {
        wall_clock_from(expr, tz, from)?
    } else {
        periodic_from(expr, tz, from)?
    };
    DateTime::from_timestamp(next, 0)
}

/// Periodic: walk the time line in stretches of constant UTC offset. Within one stretch local
/// time is instant + offset, a bijection, so the first matching wall time is the answer unless
/// the offset changes before it; then restart at the change with the new offset.
fn periodic_from(expr: &CronExpr, tz: Tz, mut from: i64) -> Option<i64> {
    for _ in 0..MAX_ROUNDS {
        let offset = offset_at(tz, from);
        let local = naive(from.checked_add(offset)?)?;
        let found = expr.next_local(local)?;
        let instant = found.and_utc().timestamp().checked_sub(offset)?;
        match first_change(tz, from, instant, offset) {
            Some(change) => from = change,
            None => return Some(instant),
        }
    }
    None
}

/// Wall-clock: every matching wall time maps to one instant (its first occurrence, or the end of
/// the gap it falls in), and that map never goes backwards in time. So the answer is the image
/// of the first matching wall time at or after `start`, where `start` is the earliest wall time
/// whose image is not before `from`.
fn wall_clock_from(expr: &CronExpr, tz: Tz, from: i64) -> Option<i64> {
    let offset = offset_at(tz, from);
    let mut start = naive(from.checked_add(offset)?)?;
    let offset_before = offset_at(tz, from - 1);
    if offset_before < offset {
        // `from` is the first instant after a gap: the missing wall times all map onto `from`.
        start = naive(from.checked_add(offset_before)?)?;
    } else if let LocalResult::Ambiguous(first, _) = tz.from_local_datetime(&start)
        && first.timestamp() < from
    {
        // `from` is in the repeat of a fall-back: the repeated wall times already fired at their
        // first occurrence, so resume at the wall time where the repeat ends.
        let first = first.timestamp();
        if let Some(change) = first_change(tz, first, from, offset_at(tz, first)) {
            start = naive(change.checked_add(offset_at(tz, change - 1))?)?;
        }
    }
    for _ in 0..MAX_ROUNDS {
        let found = expr.next_local(start)?;
        match resolve_wall_clock(tz, found) {
            Some(instant) if instant >= from => return Some(instant),
            // Unreachable by the argument above; kept so a surprise costs a step, not a panic.
            _ => start = found.checked_add_signed(chrono::TimeDelta::seconds(1))?,
        }
    }
    None
}

/// The instant a wall-clock schedule fires for local wall time `local`.
fn resolve_wall_clock(tz: Tz, local: NaiveDateTime) -> Option<i64> {
    match tz.from_local_datetime(&local) {
        LocalResult::Single(instant) => Some(instant.timestamp()),
        LocalResult::Ambiguous(first, _) => Some(first.timestamp()),
        LocalResult::None => GapInfo::new(&local, &tz)
            .and_then(|gap| gap.end)
            .map(|end| end.timestamp()),
    }
}

/// UTC offset of `tz` at `instant`, in seconds east of UTC.
fn offset_at(tz: Tz, instant: i64) -> i64 {
    DateTime::from_timestamp(instant, 0)
        .map(|utc| {
            i64::from(
                tz.offset_from_utc_datetime(&utc.naive_utc())
                    .fix()
                    .local_minus_utc(),
            )
        })
        .unwrap_or(0)
}

fn naive(seconds: i64) -> Option<NaiveDateTime> {
    DateTime::from_timestamp(seconds, 0).map(|utc| utc.naive_utc())
}

/// The first instant in `(lo, hi]` whose offset differs from `offset` (the offset at `lo`).
fn first_change(tz: Tz, lo: i64, hi: i64, offset: i64) -> Option<i64> {
    let mut before = lo;
    while before < hi {
        let mut after = before.saturating_add(PROBE_SECONDS).min(hi);
        if offset_at(tz, after) != offset {
            // Bisect: `before` still has the old offset, `after` the new one.
            while after - before > 1 {
                let middle = before + (after - before) / 2;
                if offset_at(tz, middle) == offset {
                    before = middle;
                } else {
                    after = middle;
                }
            }
            return Some(after);
        }
        before = after;
    }
    None
}
/// How many instants of `expr` in `tz` lie in `[first, until]`, `first` one of them. A local
/// day of one UTC offset is counted from the expression (its matching times up to a time of
/// day, from the bit sets); a day whose offset changes (daylight saving) is walked instant by
/// instant. `None` when the zone table has a day without a local midnight.
pub fn count_between(
    expr: &CronExpr,
    tz: Tz,
    first: DateTime<Utc>,
    until: DateTime<Utc>,
) -> Option<u64> {
    use chrono::{Days, Timelike};
    // Whole seconds: `lower` is excluded, `upper` included.
    let (lower, upper) = (first.timestamp() - 1, until.timestamp());
    let midnight = |date: chrono::NaiveDate| -> Option<i64> {
        let local = tz
            .from_local_datetime(&date.and_hms_opt(0, 0, 0)?)
            .earliest()?;
        Some(local.timestamp())
    };
    let time_of_day = |second: i64| -> Option<(u32, u32, u32)> {
        let local = DateTime::from_timestamp(second, 0)?.with_timezone(&tz);
        Some((local.hour(), local.minute(), local.second()))
    };
    let offset = |second: i64| -> Option<i32> {
        let utc = DateTime::from_timestamp(second, 0)?.naive_utc();
        Some(tz.offset_from_utc_datetime(&utc).fix().local_minus_utc())
    };
    let mut count = 0u64;
    let mut date = DateTime::from_timestamp(lower + 1, 0)?
        .with_timezone(&tz)
        .date_naive();
    loop {
        let start = midnight(date)?;
        let next_day = date.checked_add_days(Days::new(1))?;
        let end = midnight(next_day)? - 1;
        let (from, to) = (lower.max(start - 1), upper.min(end));
        if from < to {
            if offset(start)? == offset(end)? {
                if expr.fires_on(date) {
                    let before = if from < start {
                        None
                    } else {
                        time_of_day(from)
                    };
                    count += expr.times_until(time_of_day(to)) - expr.times_until(before);
                }
            } else {
                let mut at = DateTime::from_timestamp(from, 0)?;
                while let Some(next) = next_after(expr, tz, at).filter(|t| t.timestamp() <= to) {
                    (at, count) = (next, count + 1);
                }
            }
        }
        if end >= upper {
            return Some(count);
        }
        date = next_day;
    }
}
