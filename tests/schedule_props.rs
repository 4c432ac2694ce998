//! Property tests of cron schedules over generated expressions, in UTC and three daylight-saving
//! zones (America/New_York, Europe/Berlin, and Australia/Lord_Howe with its 30-minute shift):
//! every next instant is strictly later, fires by the contract, and no firing instant is skipped.
//!
//! The oracle is independent of the code under test: each expression is generated from a
//! structure whose value sets are expanded here, and "fires" is PRODUCT.md's rule evaluated by
//! brute force, one candidate instant at a time (every minute for 5 fields, every second for 6):
//! - periodic: the local wall time matches;
//! - wall-clock (minute and hour explicit): the local wall time matches and this is its first
//!   occurrence, or this instant ends a daylight-saving gap that swallowed a matching wall time.

use std::collections::BTreeSet;

use std::time::Duration;

use chronflow::schedule::{IntervalAnchor, Schedule, jitter, parse_duration};
use chrono::{DateTime, Datelike, NaiveDateTime, TimeDelta, TimeZone, Timelike, Utc};
use chrono_tz::Tz;
use proptest::prelude::*;

/// One list item of a field, as generated.
#[derive(Clone, Debug)]
enum Item {
    Star,
    StarStep(u32),
    Value(u32),
    ValueStep(u32, u32),
    Range(u32, u32),
    RangeStep(u32, u32, u32),
}

/// A field: its items and whether values are written as names (month, day-of-week).
#[derive(Clone, Debug)]
struct Field {
    items: Vec<Item>,
    names: bool,
}

const MONTHS: [&str; 12] = [
    "JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC",
];
const DAYS: [&str; 7] = ["sun", "Mon", "TUE", "wed", "Thu", "FRI", "sat"];

impl Field {
    fn text(&self, kind: Kind) -> String {
        let value = |v: u32| match kind {
            Kind::Month if self.names => MONTHS[(v - 1) as usize].to_string(),
            Kind::Weekday if self.names && v < 7 => DAYS[v as usize].to_string(),
            _ => v.to_string(),
        };
        let items: Vec<String> = self
            .items
            .iter()
            .map(|item| match item {
                Item::Star => "*".to_string(),
                Item::StarStep(step) => format!("*/{step}"),
                Item::Value(v) => value(*v),
                Item::ValueStep(v, step) => format!("{}/{step}", value(*v)),
                Item::Range(a, b) => format!("{}-{}", value(*a), value(*b)),
                Item::RangeStep(a, b, step) => format!("{}-{}/{step}", value(*a), value(*b)),
            })
            .collect();
        items.join(",")
    }

    /// The values the field selects, expanded from the structure (not parsed from text).
    fn values(&self, kind: Kind) -> BTreeSet<u32> {
        let (min, max) = kind.range();
        let mut out = BTreeSet::new();
        for item in &self.items {
            let (from, to, step) = match *item {
                Item::Star => (min, max, 1),
                Item::StarStep(step) => (min, max, step),
                Item::Value(v) => (v, v, 1),
                Item::ValueStep(v, step) => (v, max, step),
                Item::Range(a, b) => (a, b, 1),
                Item::RangeStep(a, b, step) => (a, b, step),
            };
            out.extend((from..=to).step_by(step as usize));
        }
        if kind == Kind::Weekday && out.remove(&7) {
            out.insert(0); // 7 is Sunday too
        }
        out
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Second,
    Minute,
    Hour,
    Day,
    Month,
    Weekday,
}

impl Kind {
    fn range(self) -> (u32, u32) {
        match self {
            Kind::Second | Kind::Minute => (0, 59),
            Kind::Hour => (0, 23),
            Kind::Day => (1, 31),
            Kind::Month => (1, 12),
            Kind::Weekday => (0, 7),
        }
    }
}

/// A generated expression with its expanded sets: the oracle.
#[derive(Clone, Debug)]
struct Spec {
    text: String,
    six_fields: bool,
    seconds: BTreeSet<u32>,
    minutes: BTreeSet<u32>,
    hours: BTreeSet<u32>,
    days: BTreeSet<u32>,
    months: BTreeSet<u32>,
    weekdays: BTreeSet<u32>,
    /// Vixie: if either day field starts with `*`, a day must match both; otherwise either.
    days_and: bool,
    wall_clock: bool,
}

impl Spec {
    fn new(second: Option<Field>, fields: [Field; 5]) -> Spec {
        let [minute, hour, day, month, weekday] = fields;
        let texts = [
            minute.text(Kind::Minute),
            hour.text(Kind::Hour),
            day.text(Kind::Day),
            month.text(Kind::Month),
            weekday.text(Kind::Weekday),
        ];
        let mut text = texts.join(" ");
        if let Some(second) = &second {
            text = format!("{} {text}", second.text(Kind::Second));
        }
        Spec {
            six_fields: second.is_some(),
            seconds: second.map_or_else(|| BTreeSet::from([0]), |s| s.values(Kind::Second)),
            minutes: minute.values(Kind::Minute),
            hours: hour.values(Kind::Hour),
            days: day.values(Kind::Day),
            months: month.values(Kind::Month),
            weekdays: weekday.values(Kind::Weekday),
            days_and: texts[2].starts_with('*') || texts[4].starts_with('*'),
            wall_clock: !texts[0].starts_with('*') && !texts[1].starts_with('*'),
            text,
        }
    }

    fn matches(&self, local: NaiveDateTime) -> bool {
        let dom = self.days.contains(&local.day());
        let dow = self
            .weekdays
            .contains(&local.weekday().num_days_from_sunday());
        let day = if self.days_and {
            dom && dow
        } else {
            dom || dow
        };
        day && self.months.contains(&local.month())
            && self.hours.contains(&local.hour())
            && self.minutes.contains(&local.minute())
            && self.seconds.contains(&local.second())
    }

    /// Seconds between candidate instants: a 5-field schedule fires on whole minutes only (all
    /// zones used here have whole-minute offsets).
    fn step(&self) -> i64 {
        if self.six_fields { 1 } else { 60 }
    }

    /// PRODUCT.md's rule for one candidate instant, by brute force.
    fn fires(&self, tz: Tz, instant: DateTime<Utc>) -> bool {
        let local = instant.with_timezone(&tz).naive_local();
        let matches = self.matches(local);
        if !self.wall_clock {
            return matches;
        }
        if matches
            && tz
                .from_local_datetime(&local)
                .earliest()
                .is_some_and(|first| first == instant)
        {
            return true;
        }
        let before = (instant - TimeDelta::seconds(1))
            .with_timezone(&tz)
            .naive_local();
        let mut probe = before + TimeDelta::seconds(1);
        // Wall times skipped just before this instant (a gap), if any: does one match?
        while probe < local {
            if self.matches(probe) {
                return true;
            }
            probe += TimeDelta::seconds(self.step());
        }
        false
    }
}

/// One list item with values in `min..=max` (a sub-range of the field's).
fn item(min: u32, max: u32, max_step: u32) -> BoxedStrategy<Item> {
    prop_oneof![
        (min..=max).prop_map(Item::Value),
        (min..=max, min..=max).prop_map(|(a, b)| Item::Range(a.min(b), a.max(b))),
        (min..=max, min..=max, 1..=max_step).prop_map(|(a, b, s)| Item::RangeStep(
            a.min(b),
            a.max(b),
            s
        )),
        (min..=max, 1..=max_step).prop_map(|(v, s)| Item::ValueStep(v, s)),
    ]
    .boxed()
}

/// A field. `star_weight` weights `*` so that schedules fire often enough to exercise the windows
/// scanned below; `focus` is a sub-range that lists are drawn from half of the time (the hours
/// where clocks change), so that explicit, wall-clock schedules meet daylight-saving changes.
fn field(kind: Kind, star_weight: u32, max_step: u32, focus: (u32, u32)) -> BoxedStrategy<Field> {
    let names = matches!(kind, Kind::Month | Kind::Weekday);
    let (min, max) = kind.range();
    prop_oneof![
        star_weight => Just(vec![Item::Star]),
        2 => (1..=max_step).prop_map(|step| vec![Item::StarStep(step)]),
        3 => prop::collection::vec(item(min, max, max_step), 1..=3),
        3 => prop::collection::vec(item(focus.0, focus.1, max_step), 1..=2),
    ]
    .prop_flat_map(move |items| (Just(items), any::<bool>()))
    .prop_map(move |(items, use_names)| Field {
        items,
        names: names && use_names,
    })
    .boxed()
}

fn spec(six_fields: bool) -> impl Strategy<Value = Spec> {
    let second = if six_fields {
        field(Kind::Second, 3, 30, (0, 59)).prop_map(Some).boxed()
    } else {
        Just(None).boxed()
    };
    (
        second,
        field(Kind::Minute, 3, 30, (0, 59)),
        field(Kind::Hour, 3, 12, (0, 3)),
        field(Kind::Day, 12, 15, (1, 31)),
        field(Kind::Month, 12, 6, (1, 12)),
        field(Kind::Weekday, 10, 3, (0, 7)),
    )
        .prop_map(|(second, minute, hour, day, month, weekday)| {
            Spec::new(second, [minute, hour, day, month, weekday])
        })
}

/// Zones with daylight saving and their 2026 changes, in UTC. Lord Howe shifts by 30 minutes.
const DST_ZONES: [(Tz, [i64; 2]); 3] = [
    (Tz::America__New_York, [1_772_953_200, 1_793_512_800]), // 2026-03-08T07:00Z spring, 2026-11-01T06:00Z fall
    (Tz::Europe__Berlin, [1_774_746_000, 1_792_890_000]), // 2026-03-29T01:00Z spring, 2026-10-25T01:00Z fall
    (Tz::Australia__Lord_Howe, [1_791_041_400, 1_775_314_800]), // 2026-10-03T15:30Z spring, 2026-04-04T15:00Z fall
];

/// A zone and an instant to ask from: mostly a daylight-saving zone, from `lead` seconds before
/// one of its changes to `lag` seconds after (so that most scanned windows contain the change);
/// otherwise anywhere in 2024-2030, in UTC or a daylight-saving zone.
fn zone_and_after(lead: i64, lag: i64) -> impl Strategy<Value = (Tz, DateTime<Utc>)> {
    let anywhere = 1_704_067_200i64..1_924_992_000i64;
    let near = (0..DST_ZONES.len(), 0..2usize, -lead..=lag)
        .prop_map(|(zone, change, delta)| (DST_ZONES[zone].0, DST_ZONES[zone].1[change] + delta));
    let utc = anywhere.clone().prop_map(|seconds| (Tz::UTC, seconds));
    let dst_anywhere =
        (0..DST_ZONES.len(), anywhere).prop_map(|(zone, seconds)| (DST_ZONES[zone].0, seconds));
    let nanos = prop_oneof![3 => Just(0u32), 1 => 0u32..1_000_000_000];
    (prop_oneof![4 => near, 1 => utc, 1 => dst_anywhere], nanos).prop_map(
        |((tz, seconds), nanos)| {
            (
                tz,
                DateTime::from_timestamp(seconds, nanos).expect("in range"),
            )
        },
    )
}

/// Checks the three properties on the window `(after, after + window]`.
fn check_window(
    spec: &Spec,
    tz: Tz,
    after: DateTime<Utc>,
    window: i64,
) -> Result<(), TestCaseError> {
    let schedule = match Schedule::cron(&spec.text, tz) {
        Ok(schedule) => schedule,
        Err(error) => {
            // Only an impossible date may be rejected, and it must say so on day-of-month.
            prop_assert_eq!(
                &error.field,
                "day-of-month",
                "{:?} rejected: {}",
                spec.text,
                error
            );
            prop_assert!(
                spec.days_and,
                "{:?} rejected though either day field may match",
                spec.text
            );
            return Ok(());
        }
    };
    let end = after + TimeDelta::seconds(window);
    let mut got = Vec::new();
    let mut cursor = after;
    while let Some(next) = schedule.next_after(cursor) {
        prop_assert!(
            next > cursor,
            "{:?} in {}: {} is not after {}",
            spec.text,
            tz,
            next,
            cursor
        );
        if next > end {
            break;
        }
        prop_assert!(
            spec.fires(tz, next),
            "{:?} in {}: {} does not fire by the rule (local {})",
            spec.text,
            tz,
            next,
            next.with_timezone(&tz)
        );
        got.push(next);
        cursor = next;
    }
    // No firing instant skipped: scan every candidate in the window.
    let step = spec.step();
    let first = (after.timestamp().div_euclid(step) + 1) * step;
    let mut expected = Vec::new();
    for seconds in (first..=end.timestamp()).step_by(step as usize) {
        let candidate = DateTime::from_timestamp(seconds, 0).expect("in range");
        if spec.fires(tz, candidate) {
            expected.push(candidate);
        }
    }
    if got != expected {
        let missing: Vec<String> = expected
            .iter()
            .filter(|t| !got.contains(t))
            .take(3)
            .map(|t| t.with_timezone(&tz).to_rfc3339())
            .collect();
        prop_assert!(
            false,
            "{:?} in {} after {}: skipped {:?}",
            spec.text,
            tz,
            after.with_timezone(&tz),
            missing
        );
    }
    Ok(())
}

fn config(cases: u32) -> ProptestConfig {
    // No regression files: a failure prints the minimal expression, zone and instant to add to
    // tests/schedule_table.rs instead.
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config(1000))]

    /// 5 fields: two days, minute by minute.
    #[test]
    fn five_fields_fire_exactly_by_the_rule(spec in spec(false), (tz, after) in zone_and_after(40 * 3600, 2 * 3600)) {
        check_window(&spec, tz, after, 2 * 86_400)?;
    }
}

proptest! {
    #![proptest_config(config(400))]

    /// 6 fields: ninety minutes, second by second, mostly around a daylight-saving change.
    #[test]
    fn six_fields_fire_exactly_by_the_rule(spec in spec(true), (tz, after) in zone_and_after(80 * 60, 10 * 60)) {
        check_window(&spec, tz, after, 90 * 60)?;
    }
}

proptest! {
    #![proptest_config(config(1500))]

    /// Far-apart instants (rare schedules, any distance): asking from anywhere strictly between
    /// two consecutive results, or from just before a result (the edge of a gap, the first
    /// second of a repeat), gives the later one; each result fires by the rule.
    #[test]
    fn next_is_the_same_from_anywhere_in_between(
        spec in spec(false),
        (tz, after) in zone_and_after(40 * 3600, 2 * 3600),
        fractions in prop::collection::vec(0.0f64..1.0, 6),
    ) {
        let Ok(schedule) = Schedule::cron(&spec.text, tz) else { return Ok(()) };
        let mut previous = after;
        for fraction in fractions {
            let next = schedule.next_after(previous);
            prop_assert!(next.is_some(), "{:?} in {}: nothing after {}", spec.text, tz, previous);
            let next = next.expect("checked");
            prop_assert!(next > previous);
            prop_assert!(spec.fires(tz, next), "{:?} in {}: {} does not fire", spec.text, tz, next.with_timezone(&tz));
            let span = (next - previous).num_milliseconds();
            let between = previous + TimeDelta::milliseconds(((span - 1) as f64 * fraction) as i64);
            prop_assert_eq!(schedule.next_after(between), Some(next), "{:?} in {} from {}", spec.text, tz, between);
            prop_assert_eq!(schedule.next_after(next - TimeDelta::milliseconds(1)), Some(next), "{:?} in {} from 1ms before", spec.text, tz);
            previous = next;
        }
    }
}

proptest! {
    #![proptest_config(config(2000))]

    /// Whatever the user writes, parsing returns a schedule or a field-naming error, never a
    /// panic; and a schedule that parses yields a later instant or none.
    #[test]
    fn arbitrary_text_never_panics(
        text in prop_oneof![
            any::<String>(),
            "[0-9*/,?LW#@a-zA-Z -]{0,40}",
            "(([0-9]{1,3}|\\*|[A-Za-z]{3})([-/][0-9A-Za-z]{0,3})?(,|/)?){1,3}( ([0-9]{1,3}|\\*|[A-Za-z]{3})([-/,][0-9A-Za-z]{0,3})?){4,6}",
        ],
        (tz, after) in zone_and_after(86_400, 86_400),
    ) {
        match Schedule::cron(&text, tz) {
            Ok(schedule) => {
                if let Some(next) = schedule.next_after(after) {
                    prop_assert!(next > after);
                }
            }
            Err(error) => {
                let known = ["cron", "second", "minute", "hour", "day-of-month", "month", "day-of-week"];
                prop_assert!(known.contains(&error.field.as_str()), "{:?}: unexpected field in {}", text, error);
                prop_assert!(!error.reason.is_empty());
            }
        }
    }
}

/// Any instant chrono can represent, to the nanosecond.
fn any_instant() -> impl Strategy<Value = DateTime<Utc>> {
    let (min, max) = (
        DateTime::<Utc>::MIN_UTC.timestamp(),
        DateTime::<Utc>::MAX_UTC.timestamp(),
    );
    prop_oneof![
        (min..=max, 0u32..1_000_000_000),
        // Near the ends of chrono's range, where unchecked arithmetic would overflow.
        (min..=min + 400 * 86_400, 0u32..1_000_000_000),
        (max - 400 * 86_400..=max, 0u32..1_000_000_000),
        // Near the last RFC 3339 instant.
        (
            253_402_300_799i64 - 400 * 86_400..=253_402_300_799 + 400 * 86_400,
            0u32..1_000_000_000
        ),
    ]
    .prop_map(|(seconds, nanos)| {
        DateTime::from_timestamp(seconds, nanos).unwrap_or(DateTime::<Utc>::MAX_UTC)
    })
}

proptest! {
    #![proptest_config(config(3000))]

    /// Every path from a duration the user wrote to a date is checked arithmetic: however large
    /// the duration (as text or already parsed) and however far the instants, parsing, interval
    /// schedules and jitter give a value or an error, never a panic.
    #[test]
    fn user_durations_never_panic_on_the_way_to_a_date(
        text in prop_oneof![
            "[0-9]{1,22}(d|h|m|s|ms)",
            "([0-9]{1,20}d)?([0-9]{1,20}h)?([0-9]{1,20}m)?([0-9]{1,20}s)?([0-9]{1,20}ms)?",
        ],
        raw in prop_oneof![
            any::<u64>().prop_map(Duration::from_nanos),
            any::<u64>().prop_map(Duration::from_millis),
            any::<u64>().prop_map(Duration::from_secs),
            Just(Duration::MAX),
        ],
        anchor in any_instant(),
        after in any_instant(),
    ) {
        let parsed = parse_duration(&text).ok();
        if let Some(parsed) = parsed {
            prop_assert!(parsed <= Duration::from_secs(366 * 86_400), "{text:?} parsed to {parsed:?}");
        }
        for every in parsed.into_iter().chain([raw]) {
            for anchor in [IntervalAnchor::Start(anchor), IntervalAnchor::Created(anchor)] {
                if let Ok(schedule) = Schedule::interval(every, anchor)
                    && let Some(next) = schedule.next_after(after)
                {
                    prop_assert!(next > after);
                }
            }
            let offset = jitter::offset("ns/task", after, every);
            prop_assert!(offset <= every);
            if let Some(start) = jitter::delayed("ns/task", after, every) {
                prop_assert!(start >= after);
            }
        }
    }
}

proptest! {
    #![proptest_config(config(600))]

    /// Counting without listing (catch-up after an outage): the count over days is the number of
    /// instants `next_after` walks, around daylight-saving changes too.
    #[test]
    fn instants_are_counted_as_they_are_walked(
        spec in prop_oneof![spec(false), spec(true)],
        (tz, after) in zone_and_after(30 * 3600, 2 * 3600),
        hours in 1i64..60,
    ) {
        let Ok(schedule) = Schedule::cron(&spec.text, tz) else { return Ok(()) };
        let until = after + TimeDelta::hours(hours);
        let mut walked = 0u64;
        let mut at = after;
        while let Some(next) = schedule.next_after(at).filter(|t| *t <= until) {
            (at, walked) = (next, walked + 1);
            prop_assume!(walked < 300_000);
        }
        prop_assert_eq!(schedule.count_after(after, until), walked, "{:?} in {} from {} to {}", spec.text, tz, after, until);
    }
}
