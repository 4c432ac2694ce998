//! Known-correct schedule instants, derived independently of the code under test:
//! - `tests/data/schedule_table.tsv`: generated from the Python library `cronsim` by
//!   `tests/data/gen_schedule_table.py` (5- and 6-field cron, names, ranges, lists, steps, macros,
//!   leap days, 31st of month, and daylight-saving gaps and repeats in eight zones);
//! - the hand-derived tables below, where cronsim does not state the contract: 6-field wall-clock
//!   schedules at daylight-saving changes, instants asked for from inside a repeated hour,
//!   intervals, one-shots, bounds, and the exact error messages of invalid input.
//!
//! Each table is checked as a whole and every failing case is listed by name.

use std::time::Duration;

use chronflow::schedule::{IntervalAnchor, Schedule, parse_instant, parse_timezone};
use chrono::{DateTime, SecondsFormat, Utc};
use chrono_tz::Tz;

fn instant(text: &str) -> DateTime<Utc> {
    parse_instant("test", text).unwrap_or_else(|error| panic!("bad instant in table: {error}"))
}

fn zone(name: &str) -> Tz {
    parse_timezone(name).unwrap_or_else(|error| panic!("bad zone in table: {error}"))
}

/// The first `count` instants after `after`, in `tz`, as `chronflow next` prints them.
fn upcoming(schedule: &Schedule, tz: Tz, after: DateTime<Utc>, count: usize) -> Vec<String> {
    let mut out = Vec::new();
    let mut cursor = after;
    while out.len() < count {
        let Some(next) = schedule.next_after(cursor) else {
            break;
        };
        out.push(
            next.with_timezone(&tz)
                .to_rfc3339_opts(SecondsFormat::AutoSi, false),
        );
        cursor = next;
    }
    out
}

/// Panics with every failure, one per line, if there are any.
fn report(table: &str, cases: usize, failures: Vec<String>) {
    assert!(
        failures.is_empty(),
        "{} of {cases} {table} cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// A cron case: `expected` are the first instants after `after`, in `tz`.
struct CronCase {
    name: &'static str,
    expr: &'static str,
    tz: &'static str,
    after: &'static str,
    expected: &'static [&'static str],
}

fn check_cron(name: &str, expr: &str, tz: &str, after: &str, expected: &[&str]) -> Option<String> {
    let tz = zone(tz);
    let schedule = match Schedule::cron(expr, tz) {
        Ok(schedule) => schedule,
        Err(error) => return Some(format!("{name}: {expr:?} rejected: {error}")),
    };
    // One more than expected: a table row that stops early (cronsim's 50-year limit) is a prefix.
    let got = upcoming(&schedule, tz, instant(after), expected.len());
    (got != expected).then(|| {
        format!(
            "{name}: {expr:?} in {tz} after {after}\n  expected {expected:?}\n  got      {got:?}"
        )
    })
}

#[test]
fn cronsim_table() {
    let data = include_str!("data/schedule_table.tsv");
    let mut cases = 0;
    let mut failures = Vec::new();
    for line in data.lines().filter(|line| !line.starts_with('#')).skip(1) {
        let columns: Vec<&str> = line.split('\t').collect();
        let [name, expr, tz, after, expected] = columns.as_slice() else {
            panic!("malformed table line: {line:?}");
        };
        let expected: Vec<&str> = expected.split(' ').collect();
        cases += 1;
        failures.extend(check_cron(name, expr, tz, after, &expected));
    }
    assert!(cases >= 150, "the generated table has only {cases} cases");
    report("generated cron", cases, failures);
}

/// Hand-derived, each with its reasoning. Transitions used:
/// - America/New_York: 2026-03-08 02:00 EST -> 03:00 EDT (07:00Z); 2026-11-01 02:00 EDT -> 01:00 EST (06:00Z).
/// - Europe/Berlin: 2026-03-29 02:00 -> 03:00 (01:00Z); 2026-10-25 03:00 -> 02:00 (01:00Z).
/// - Australia/Lord_Howe (30-minute DST): 2026-10-04 02:00 +10:30 -> 02:30 +11:00;
///   2026-04-05 02:00 +11:00 -> 01:30 +10:30.
/// - Australia/Sydney: 2026-10-04 02:00 +10 -> 03:00 +11; 2026-04-05 03:00 +11 -> 02:00 +10.
/// - America/Sao_Paulo: 2018-11-04 00:00 -03 -> 01:00 -02 (midnight does not exist).
const HAND: &[CronCase] = &[
    // --- 6 fields, wall-clock (minute and hour explicit), spring forward: all wall times in the
    // gap collapse onto the first instant after it, once.
    CronCase {
        name: "6f-ny-gap-once",
        expr: "0 30 2 * * *",
        tz: "America/New_York",
        after: "2026-03-08T00:00:00-05:00",
        expected: &[
            "2026-03-08T03:00:00-04:00",
            "2026-03-09T02:30:00-04:00",
            "2026-03-10T02:30:00-04:00",
        ],
    },
    CronCase {
        name: "6f-ny-gap-seconds-collapse",
        expr: "*/20 30 2 * * *",
        tz: "America/New_York",
        after: "2026-03-08T00:00:00-05:00",
        expected: &[
            "2026-03-08T03:00:00-04:00",
            "2026-03-09T02:30:00-04:00",
            "2026-03-09T02:30:20-04:00",
            "2026-03-09T02:30:40-04:00",
        ],
    },
    // 02:00 and 02:30 collapse onto 03:00, which the schedule also names: still one run.
    CronCase {
        name: "6f-ny-gap-and-existing-time",
        expr: "0 0,30 2-3 * * *",
        tz: "America/New_York",
        after: "2026-03-08T00:00:00-05:00",
        expected: &[
            "2026-03-08T03:00:00-04:00",
            "2026-03-08T03:30:00-04:00",
            "2026-03-09T02:00:00-04:00",
            "2026-03-09T02:30:00-04:00",
        ],
    },
    CronCase {
        name: "6f-berlin-gap",
        expr: "0 30 2 * * *",
        tz: "Europe/Berlin",
        after: "2026-03-29T00:00:00+01:00",
        expected: &["2026-03-29T03:00:00+02:00", "2026-03-30T02:30:00+02:00"],
    },
    CronCase {
        name: "6f-lord-howe-gap-half-hour",
        expr: "0 15 2 * * *",
        tz: "Australia/Lord_Howe",
        after: "2026-10-04T00:00:00+10:30",
        expected: &["2026-10-04T02:30:00+11:00", "2026-10-05T02:15:00+11:00"],
    },
    // 02:15 is missing (-> 02:30), 02:45 exists and fires at its own time.
    CronCase {
        name: "6f-lord-howe-gap-partial",
        expr: "0 15,45 2 * * *",
        tz: "Australia/Lord_Howe",
        after: "2026-10-04T00:00:00+10:30",
        expected: &[
            "2026-10-04T02:30:00+11:00",
            "2026-10-04T02:45:00+11:00",
            "2026-10-05T02:15:00+11:00",
            "2026-10-05T02:45:00+11:00",
        ],
    },
    CronCase {
        name: "6f-sydney-gap",
        expr: "0 0 2 * * *",
        tz: "Australia/Sydney",
        after: "2026-10-04T00:00:00+10:00",
        expected: &["2026-10-04T03:00:00+11:00", "2026-10-05T02:00:00+11:00"],
    },
    CronCase {
        name: "6f-sao-paulo-midnight-gap",
        expr: "0 0 0 * * *",
        tz: "America/Sao_Paulo",
        after: "2018-11-03T12:00:00-03:00",
        expected: &["2018-11-04T01:00:00-02:00", "2018-11-05T00:00:00-02:00"],
    },
    // --- 6 fields, wall-clock, fall back: first occurrence only.
    CronCase {
        name: "6f-ny-fold-once",
        expr: "0 30 1 * * *",
        tz: "America/New_York",
        after: "2026-11-01T00:00:00-04:00",
        expected: &["2026-11-01T01:30:00-04:00", "2026-11-02T01:30:00-05:00"],
    },
    CronCase {
        name: "6f-ny-fold-seconds-first-half",
        expr: "*/20 30 1 * * *",
        tz: "America/New_York",
        after: "2026-11-01T00:00:00-04:00",
        expected: &[
            "2026-11-01T01:30:00-04:00",
            "2026-11-01T01:30:20-04:00",
            "2026-11-01T01:30:40-04:00",
            "2026-11-02T01:30:00-05:00",
        ],
    },
    CronCase {
        name: "6f-ny-fold-asked-in-repeat",
        expr: "0 30 1 * * *",
        tz: "America/New_York",
        after: "2026-11-01T01:10:00-05:00",
        expected: &["2026-11-02T01:30:00-05:00"],
    },
    CronCase {
        name: "6f-berlin-fold",
        expr: "15 30 2 * * *",
        tz: "Europe/Berlin",
        after: "2026-10-25T00:00:00+02:00",
        expected: &["2026-10-25T02:30:15+02:00", "2026-10-26T02:30:15+01:00"],
    },
    CronCase {
        name: "6f-lord-howe-fold",
        expr: "0 45 1 * * *",
        tz: "Australia/Lord_Howe",
        after: "2026-04-05T00:00:00+11:00",
        expected: &["2026-04-05T01:45:00+11:00", "2026-04-06T01:45:00+10:30"],
    },
    // 2026-04-05 is a Sunday; the next Sunday is after the change.
    CronCase {
        name: "6f-sydney-fold-sunday",
        expr: "30 30 2 * * SUN",
        tz: "Australia/Sydney",
        after: "2026-04-05T00:00:00+11:00",
        expected: &["2026-04-05T02:30:30+11:00", "2026-04-12T02:30:30+10:00"],
    },
    // --- 6 fields, periodic (minute or hour starts with *): real-time rhythm.
    CronCase {
        name: "6f-ny-periodic-gap-skipped",
        expr: "30 * 2 * * *",
        tz: "America/New_York",
        after: "2026-03-08T00:00:00-05:00",
        expected: &["2026-03-09T02:00:30-04:00", "2026-03-09T02:01:30-04:00"],
    },
    CronCase {
        name: "6f-lord-howe-periodic-fold-both",
        expr: "0 */15 1 * * *",
        tz: "Australia/Lord_Howe",
        after: "2026-04-05T01:20:00+11:00",
        expected: &[
            "2026-04-05T01:30:00+11:00",
            "2026-04-05T01:45:00+11:00",
            "2026-04-05T01:30:00+10:30",
            "2026-04-05T01:45:00+10:30",
            "2026-04-06T01:00:00+10:30",
        ],
    },
    CronCase {
        name: "6f-ny-periodic-fold-every-20-min",
        expr: "0 */20 * * * *",
        tz: "America/New_York",
        after: "2026-11-01T01:30:00-04:00",
        expected: &[
            "2026-11-01T01:40:00-04:00",
            "2026-11-01T01:00:00-05:00",
            "2026-11-01T01:20:00-05:00",
        ],
    },
    // --- asked from inside the repeated hour (cronsim answers with an instant already past):
    // the first occurrence has gone, a wall-clock schedule does not fire the repeat.
    CronCase {
        name: "ny-fold-in-repeat-daily",
        expr: "30 1 * * *",
        tz: "America/New_York",
        after: "2026-11-01T01:10:00-05:00",
        expected: &["2026-11-02T01:30:00-05:00"],
    },
    CronCase {
        name: "ny-fold-in-repeat-hour-range",
        expr: "30 1-2 * * *",
        tz: "America/New_York",
        after: "2026-11-01T01:10:00-05:00",
        expected: &[
            "2026-11-01T02:30:00-05:00",
            "2026-11-02T01:30:00-05:00",
            "2026-11-02T02:30:00-05:00",
        ],
    },
    CronCase {
        name: "ny-fold-in-repeat-hour-list",
        expr: "15 1,3 * * *",
        tz: "America/New_York",
        after: "2026-11-01T01:10:00-05:00",
        expected: &["2026-11-01T03:15:00-05:00", "2026-11-02T01:15:00-05:00"],
    },
    CronCase {
        name: "berlin-fold-in-repeat",
        expr: "30 2 * * *",
        tz: "Europe/Berlin",
        after: "2026-10-25T02:10:00+01:00",
        expected: &["2026-10-26T02:30:00+01:00"],
    },
    CronCase {
        name: "lord-howe-fold-in-repeat",
        expr: "45 1-2 * * *",
        tz: "Australia/Lord_Howe",
        after: "2026-04-05T01:40:00+10:30",
        expected: &["2026-04-05T02:45:00+10:30", "2026-04-06T01:45:00+10:30"],
    },
    CronCase {
        name: "ny-fold-after-first-occurrence",
        expr: "30 1 * * *",
        tz: "America/New_York",
        after: "2026-11-01T01:30:00-04:00",
        expected: &["2026-11-02T01:30:00-05:00"],
    },
    // Every minute of 01:xx, written as a wall-clock schedule: the first pass only.
    CronCase {
        name: "ny-fold-wall-clock-every-minute",
        expr: "0-59 1 * * *",
        tz: "America/New_York",
        after: "2026-11-01T01:58:00-04:00",
        expected: &["2026-11-01T01:59:00-04:00", "2026-11-02T01:00:00-05:00"],
    },
    // Periodic from the first pass: the repeat comes next, in real-time order.
    CronCase {
        name: "ny-fold-periodic-from-first-pass",
        expr: "*/30 * * * *",
        tz: "America/New_York",
        after: "2026-11-01T01:40:00-04:00",
        expected: &[
            "2026-11-01T01:00:00-05:00",
            "2026-11-01T01:30:00-05:00",
            "2026-11-01T02:00:00-05:00",
        ],
    },
    CronCase {
        name: "ny-fold-periodic-in-repeat",
        expr: "*/30 * * * *",
        tz: "America/New_York",
        after: "2026-11-01T01:10:00-05:00",
        expected: &["2026-11-01T01:30:00-05:00", "2026-11-01T02:00:00-05:00"],
    },
    CronCase {
        name: "ny-fold-every-minute-edge",
        expr: "* * * * *",
        tz: "America/New_York",
        after: "2026-11-01T01:59:00-04:00",
        expected: &["2026-11-01T01:00:00-05:00", "2026-11-01T01:01:00-05:00"],
    },
    // --- periodic schedules at folds that are not a whole hour (cronsim misses the repeats).
    // Lord Howe falls back 30 minutes at 02:00 +11:00: 01:30-02:00 happens twice.
    CronCase {
        name: "lord-howe-fold-periodic-45",
        expr: "45 * * * *",
        tz: "Australia/Lord_Howe",
        after: "2026-04-05T00:00:00+11:00",
        expected: &[
            "2026-04-05T00:45:00+11:00",
            "2026-04-05T01:45:00+11:00",
            "2026-04-05T01:45:00+10:30",
            "2026-04-05T02:45:00+10:30",
        ],
    },
    // 02:00 +11:00 is the moment clocks go back, so it never shows; 02:00 +10:30 happens once.
    CronCase {
        name: "lord-howe-fold-periodic-every-2h",
        expr: "0 */2 * * *",
        tz: "Australia/Lord_Howe",
        after: "2026-04-05T00:00:00+11:00",
        expected: &["2026-04-05T02:00:00+10:30", "2026-04-05T04:00:00+10:30"],
    },
    // Chatham falls back at 03:45 +13:45 to 02:45 +12:45: 02:45 happens twice.
    CronCase {
        name: "chatham-fold-periodic-quarter",
        expr: "*/15 2 * * *",
        tz: "Pacific/Chatham",
        after: "2026-04-05T01:45:00+13:45",
        expected: &[
            "2026-04-05T02:00:00+13:45",
            "2026-04-05T02:15:00+13:45",
            "2026-04-05T02:30:00+13:45",
            "2026-04-05T02:45:00+13:45",
            "2026-04-05T02:45:00+12:45",
            "2026-04-06T02:00:00+12:45",
        ],
    },
    // --- the instant just before and at the end of a gap.
    CronCase {
        name: "ny-gap-asked-just-before-end",
        expr: "30 2 * * *",
        tz: "America/New_York",
        after: "2026-03-08T01:59:59.5-05:00",
        expected: &["2026-03-08T03:00:00-04:00", "2026-03-09T02:30:00-04:00"],
    },
    CronCase {
        name: "ny-gap-asked-at-end",
        expr: "30 2 * * *",
        tz: "America/New_York",
        after: "2026-03-08T03:00:00-04:00",
        expected: &["2026-03-09T02:30:00-04:00"],
    },
    // --- syntax cronsim does not share.
    CronCase {
        name: "dow-range-ending-sun",
        expr: "0 0 * * SAT-SUN",
        tz: "UTC",
        after: "2026-01-01T00:00:00Z",
        expected: &[
            "2026-01-03T00:00:00+00:00",
            "2026-01-04T00:00:00+00:00",
            "2026-01-10T00:00:00+00:00",
        ],
    },
    CronCase {
        name: "dow-range-fri-sun",
        expr: "0 0 * * FRI-SUN",
        tz: "UTC",
        after: "2026-01-01T00:00:00Z",
        expected: &[
            "2026-01-02T00:00:00+00:00",
            "2026-01-03T00:00:00+00:00",
            "2026-01-04T00:00:00+00:00",
            "2026-01-09T00:00:00+00:00",
        ],
    },
    // `?` is "any", like `*`: the other day field alone decides.
    CronCase {
        name: "question-mark-dom",
        expr: "0 0 ? * MON",
        tz: "UTC",
        after: "2026-01-01T00:00:00Z",
        expected: &["2026-01-05T00:00:00+00:00", "2026-01-12T00:00:00+00:00"],
    },
    CronCase {
        name: "question-mark-dow",
        expr: "0 0 1 * ?",
        tz: "UTC",
        after: "2026-01-01T00:00:00Z",
        expected: &["2026-02-01T00:00:00+00:00", "2026-03-01T00:00:00+00:00"],
    },
    CronCase {
        name: "uppercase-macro",
        expr: "@DAILY",
        tz: "UTC",
        after: "2026-01-01T00:00:00Z",
        expected: &["2026-01-02T00:00:00+00:00"],
    },
    CronCase {
        name: "tabs-and-spaces",
        expr: " 0\t9  * * * ",
        tz: "UTC",
        after: "2026-01-01T00:00:00Z",
        expected: &["2026-01-01T09:00:00+00:00", "2026-01-02T09:00:00+00:00"],
    },
    // --- Pacific/Apia skipped 2011-12-30 entirely (-10 -> +14): noon of the missing day moves to
    // the first instant after it, midnight of the 31st.
    // --- steps longer than the field's range, as Vixie cron, robfig/cron (CronJob), croniter
    // and cronsim read them: only the start of the range matches.
    CronCase {
        name: "step-longer-than-months-is-january",
        expr: "0 0 1 */15 *",
        tz: "UTC",
        after: "2025-12-31T00:00:00Z",
        expected: &[
            "2026-01-01T00:00:00+00:00",
            "2027-01-01T00:00:00+00:00",
            "2028-01-01T00:00:00+00:00",
        ],
    },
    CronCase {
        // 2026-01-01 is a Thursday; */20 over 0-7 is 0 alone: Sunday.
        name: "step-longer-than-weekdays-is-sunday",
        expr: "0 0 * * */20",
        tz: "UTC",
        after: "2026-01-01T00:00:00Z",
        expected: &[
            "2026-01-04T00:00:00+00:00",
            "2026-01-11T00:00:00+00:00",
            "2026-01-18T00:00:00+00:00",
        ],
    },
    CronCase {
        name: "step-longer-than-minutes-is-minute-0",
        expr: "*/100 * * * *",
        tz: "UTC",
        after: "2026-01-01T00:00:00Z",
        expected: &["2026-01-01T01:00:00+00:00", "2026-01-01T02:00:00+00:00"],
    },
    CronCase {
        name: "value-with-long-step-is-the-value",
        expr: "5/100 * * * *",
        tz: "UTC",
        after: "2026-01-01T00:00:00Z",
        expected: &["2026-01-01T00:05:00+00:00", "2026-01-01T01:05:00+00:00"],
    },
    CronCase {
        name: "range-with-long-step-is-its-start",
        expr: "0 9-17/24 * * *",
        tz: "UTC",
        after: "2026-01-01T00:00:00Z",
        expected: &["2026-01-01T09:00:00+00:00", "2026-01-02T09:00:00+00:00"],
    },
    CronCase {
        name: "6f-step-longer-than-seconds",
        expr: "*/90 * * * * *",
        tz: "UTC",
        after: "2026-01-01T00:00:00Z",
        expected: &["2026-01-01T00:01:00+00:00", "2026-01-01T00:02:00+00:00"],
    },
    CronCase {
        name: "apia-skipped-day-6f",
        expr: "0 0 12 * * *",
        tz: "Pacific/Apia",
        after: "2011-12-29T13:00:00-10:00",
        expected: &["2011-12-31T00:00:00+14:00", "2011-12-31T12:00:00+14:00"],
    },
    CronCase {
        name: "apia-skipped-day-periodic",
        expr: "0 */12 * * *",
        tz: "Pacific/Apia",
        after: "2011-12-29T13:00:00-10:00",
        expected: &["2011-12-31T00:00:00+14:00", "2011-12-31T12:00:00+14:00"],
    },
];

#[test]
fn hand_derived_cron() {
    let failures = HAND
        .iter()
        .filter_map(|case| check_cron(case.name, case.expr, case.tz, case.after, case.expected))
        .collect();
    report("hand-derived cron", HAND.len(), failures);
}

/// Invalid expressions and the exact message (`field: reason`).
const INVALID: &[(&str, &str)] = &[
    ("61 * * * *", "minute: 61 is out of range 0-59"),
    ("* 24 * * *", "hour: 24 is out of range 0-23"),
    ("* * 0 * *", "day-of-month: 0 is out of range 1-31"),
    ("* * 32 * *", "day-of-month: 32 is out of range 1-31"),
    ("* * * 13 *", "month: 13 is out of range 1-12"),
    ("* * * * 8", "day-of-week: 8 is out of range 0-7"),
    ("60 * * * * *", "second: 60 is out of range 0-59"),
    (
        "99999999999 * * * *",
        "minute: 99999999999 is out of range 0-59",
    ),
    (
        "* * * * FUNDAY",
        "day-of-week: \"FUNDAY\" is not a day name",
    ),
    ("* * * FOO *", "month: \"FOO\" is not a month name"),
    ("0 JAN * * *", "hour: \"JAN\" is not a number"),
    ("a * * * *", "minute: \"a\" is not a number"),
    ("? * * * *", "minute: \"?\" is not a number"),
    ("* * *", "cron: expected 5 or 6 fields, got 3"),
    ("* * * * * * *", "cron: expected 5 or 6 fields, got 7"),
    ("", "cron: expected 5 or 6 fields, got 0"),
    ("@often", "cron: unknown macro @often"),
    ("@reboot", "cron: unknown macro @reboot"),
    ("@daily *", "cron: macro @daily takes no fields"),
    ("1,,2 * * * *", "minute: empty item in list \"1,,2\""),
    ("0 0 1, * *", "day-of-month: empty item in list \"1,\""),
    ("*/0 * * * *", "minute: step 0 must be at least 1"),
    ("0 0 * 1-6/0 *", "month: step 0 must be at least 1"),
    ("*/x * * * *", "minute: step \"x\" is not a number"),
    ("*/-1 * * * *", "minute: step \"-1\" is not a number"),
    (
        "*/99999999999 * * * *",
        "minute: step 99999999999 is too large",
    ),
    ("1/2/3 * * * *", "minute: step \"2/3\" is not a number"),
    (
        "0 22-2 * * *",
        "hour: range 22-2 is backwards (start 22 is after end 2)",
    ),
    (
        "0 0 * * SAT-MON",
        "day-of-week: range SAT-MON is backwards (start 6 is after end 1)",
    ),
    ("0 0 * * 1-", "day-of-week: missing a value in \"1-\""),
    ("-1 * * * *", "minute: missing a value in \"-1\""),
    (
        "0 0 L * *",
        "day-of-month: \"L\" uses L, W or #, which are not supported",
    ),
    (
        "0 0 15W * *",
        "day-of-month: \"15W\" uses L, W or #, which are not supported",
    ),
    (
        "0 0 * * MON#2",
        "day-of-week: \"MON#2\" uses L, W or #, which are not supported",
    ),
    (
        "0 0 30 2 *",
        "day-of-month: 30 never occurs in month 2, so the schedule would never fire",
    ),
    (
        "0 0 31 4,6,9,11 *",
        "day-of-month: 31 never occurs in month 4,6,9,11, so the schedule would never fire",
    ),
    (
        "0 0 0 30-31 FEB *",
        "day-of-month: 30-31 never occurs in month FEB, so the schedule would never fire",
    ),
];

#[test]
fn invalid_expressions_name_the_field() {
    let failures = INVALID
        .iter()
        .filter_map(|(expr, expected)| match Schedule::cron(expr, Tz::UTC) {
            Ok(_) => Some(format!("{expr:?}: accepted, expected {expected:?}")),
            Err(error) if error.to_string() != *expected => Some(format!(
                "{expr:?}: got {:?}, expected {expected:?}",
                error.to_string()
            )),
            Err(_) => None,
        })
        .collect();
    assert!(INVALID.len() >= 20);
    report("invalid-expression", INVALID.len(), failures);
}

/// Errors outside the cron expression: zone, instants, interval, bounds.
#[test]
fn invalid_spec_values_name_the_field() {
    let start = instant("2026-02-01T00:00:00Z");
    let anchor = IntervalAnchor::Created(start);
    let cases: [(&str, String, &str); 8] = [
        (
            "unknown zone",
            error_text(parse_timezone("Mars/Base")),
            "timezone: \"Mars/Base\" is not an IANA time zone",
        ),
        (
            "not rfc3339",
            error_text(parse_instant("startAt", "tomorrow")),
            "startAt: \"tomorrow\" is not an RFC 3339 instant (e.g. 2026-12-01T09:00:00+08:00)",
        ),
        (
            "zero interval",
            error_text(Schedule::interval(Duration::ZERO, anchor)),
            "interval: must be greater than 0",
        ),
        (
            "short interval",
            error_text(Schedule::interval(Duration::from_millis(50), anchor)),
            "interval: 50ms is shorter than the minimum 100ms",
        ),
        (
            "end before start",
            error_text(
                Schedule::at(start).with_bounds(Some(start), Some(instant("2026-01-01T00:00:00Z"))),
            ),
            "endAt: 2026-01-01T00:00:00Z is before startAt 2026-02-01T00:00:00Z",
        ),
        (
            "shortest interval accepted",
            error_text(Schedule::interval(Duration::from_millis(100), anchor).map(|_| ())),
            "ok",
        ),
        (
            "long interval",
            error_text(Schedule::interval(
                Duration::from_secs(366 * 86_400 + 1),
                anchor,
            )),
            "interval: 366d1s is longer than the maximum 366d",
        ),
        (
            "longest interval accepted",
            error_text(Schedule::interval(Duration::from_secs(366 * 86_400), anchor).map(|_| ())),
            "ok",
        ),
    ];
    let failures = cases
        .iter()
        .filter(|(_, got, expected)| got != expected)
        .map(|(name, got, expected)| format!("{name}: got {got:?}, expected {expected:?}"))
        .collect();
    report("spec-error", cases.len(), failures);
}

fn error_text<T>(result: Result<T, chronflow::schedule::ScheduleError>) -> String {
    match result {
        Ok(_) => "ok".to_string(),
        Err(error) => error.to_string(),
    }
}

/// Intervals, one-shots and bounds: (name, schedule, zone to print in, after, expected — all of
/// them: after the last one, nothing is due).
fn bounded_cases() -> Vec<(
    &'static str,
    Schedule,
    &'static str,
    &'static str,
    Vec<&'static str>,
)> {
    let every = |millis: u64, anchor: IntervalAnchor| {
        Schedule::interval(Duration::from_millis(millis), anchor).expect("valid interval")
    };
    let start = |text: &str| IntervalAnchor::Start(instant(text));
    let created = |text: &str| IntervalAnchor::Created(instant(text));
    let bounded = |schedule: Schedule, from: Option<&str>, to: Option<&str>| {
        schedule
            .with_bounds(from.map(instant), to.map(instant))
            .expect("valid bounds")
    };
    let hourly = Schedule::cron("0 * * * *", Tz::UTC).expect("valid");
    vec![
        // startAt anchor: k = 0 is due, at startAt itself.
        (
            "interval-start-includes-k0",
            bounded(
                every(30_000, start("2026-01-01T00:00:00Z")),
                Some("2026-01-01T00:00:00Z"),
                Some("2026-01-01T00:01:00Z"),
            ),
            "UTC",
            "2025-12-31T23:00:00Z",
            vec![
                "2026-01-01T00:00:00+00:00",
                "2026-01-01T00:00:30+00:00",
                "2026-01-01T00:01:00+00:00",
            ],
        ),
        (
            "interval-start-strictly-after",
            bounded(
                every(30_000, start("2026-01-01T00:00:00Z")),
                None,
                Some("2026-01-01T00:01:00Z"),
            ),
            "UTC",
            "2026-01-01T00:00:00Z",
            vec!["2026-01-01T00:00:30+00:00", "2026-01-01T00:01:00+00:00"],
        ),
        // creation anchor: k >= 1, creation itself is not due.
        (
            "interval-created-skips-k0",
            bounded(
                every(30_000, created("2026-01-01T00:00:00Z")),
                None,
                Some("2026-01-01T00:01:00Z"),
            ),
            "UTC",
            "2025-12-31T00:00:00Z",
            vec!["2026-01-01T00:00:30+00:00", "2026-01-01T00:01:00+00:00"],
        ),
        (
            "interval-500ms",
            bounded(
                every(500, start("2026-01-01T00:00:00Z")),
                None,
                Some("2026-01-01T00:00:01.500Z"),
            ),
            "UTC",
            "2026-01-01T00:00:00.2Z",
            vec![
                "2026-01-01T00:00:00.500+00:00",
                "2026-01-01T00:00:01+00:00",
                "2026-01-01T00:00:01.500+00:00",
            ],
        ),
        // 3590 s after the anchor: k = 40 is the first grid point after, 10 + 40 * 90 s.
        (
            "interval-grid-no-drift",
            bounded(
                every(90_000, start("2026-01-01T00:00:10Z")),
                None,
                Some("2026-01-01T01:01:40Z"),
            ),
            "UTC",
            "2026-01-01T01:00:00Z",
            vec!["2026-01-01T01:00:10+00:00", "2026-01-01T01:01:40+00:00"],
        ),
        // Intervals are elapsed time: across fall back the wall clock repeats 01:30.
        (
            "interval-ignores-fall-back",
            bounded(
                every(3_600_000, start("2026-11-01T00:30:00-04:00")),
                None,
                Some("2026-11-01T02:30:00-05:00"),
            ),
            "America/New_York",
            "2026-11-01T00:30:00-04:00",
            vec![
                "2026-11-01T01:30:00-04:00",
                "2026-11-01T01:30:00-05:00",
                "2026-11-01T02:30:00-05:00",
            ],
        ),
        // One day of elapsed time across spring forward lands at 13:00 local.
        (
            "interval-1d-across-spring",
            bounded(
                every(86_400_000, start("2026-03-07T12:00:00-05:00")),
                None,
                Some("2026-03-08T13:00:00-04:00"),
            ),
            "America/New_York",
            "2026-03-07T12:00:00-05:00",
            vec!["2026-03-08T13:00:00-04:00"],
        ),
        (
            "interval-sub-second-anchor",
            bounded(
                every(1_000, start("2026-01-01T00:00:00.250Z")),
                None,
                Some("2026-01-01T00:00:02.250Z"),
            ),
            "UTC",
            "2026-01-01T00:00:00.250Z",
            vec![
                "2026-01-01T00:00:01.250+00:00",
                "2026-01-01T00:00:02.250+00:00",
            ],
        ),
        // One-shot.
        (
            "at-once",
            Schedule::at(instant("2026-12-01T09:00:00+08:00")),
            "UTC",
            "2026-01-01T00:00:00Z",
            vec!["2026-12-01T01:00:00+00:00"],
        ),
        (
            "at-printed-in-zone",
            Schedule::at(instant("2026-12-01T01:00:00Z")),
            "Asia/Shanghai",
            "2026-01-01T00:00:00Z",
            vec!["2026-12-01T09:00:00+08:00"],
        ),
        (
            "at-passed",
            Schedule::at(instant("2026-12-01T01:00:00Z")),
            "UTC",
            "2026-12-01T01:00:00Z",
            vec![],
        ),
        (
            "at-before-start",
            bounded(
                Schedule::at(instant("2026-12-01T01:00:00Z")),
                Some("2026-12-02T00:00:00Z"),
                None,
            ),
            "UTC",
            "2026-01-01T00:00:00Z",
            vec![],
        ),
        (
            "at-on-end-inclusive",
            bounded(
                Schedule::at(instant("2026-12-01T01:00:00Z")),
                None,
                Some("2026-12-01T01:00:00Z"),
            ),
            "UTC",
            "2026-01-01T00:00:00Z",
            vec!["2026-12-01T01:00:00+00:00"],
        ),
        // Cron bounds, both inclusive.
        (
            "cron-bounds-inclusive",
            bounded(
                hourly.clone(),
                Some("2026-01-01T05:00:00Z"),
                Some("2026-01-01T07:00:00Z"),
            ),
            "UTC",
            "2026-01-01T00:00:00Z",
            vec![
                "2026-01-01T05:00:00+00:00",
                "2026-01-01T06:00:00+00:00",
                "2026-01-01T07:00:00+00:00",
            ],
        ),
        (
            "cron-start-between-runs",
            bounded(
                hourly.clone(),
                Some("2026-01-01T05:30:00Z"),
                Some("2026-01-01T06:00:00Z"),
            ),
            "UTC",
            "2026-01-01T00:00:00Z",
            vec!["2026-01-01T06:00:00+00:00"],
        ),
        (
            "cron-start-equals-end",
            bounded(
                hourly.clone(),
                Some("2026-01-01T05:00:00Z"),
                Some("2026-01-01T05:00:00Z"),
            ),
            "UTC",
            "2026-01-01T00:00:00Z",
            vec!["2026-01-01T05:00:00+00:00"],
        ),
        (
            "cron-end-before-any-run",
            bounded(hourly.clone(), None, Some("2026-01-01T00:59:59Z")),
            "UTC",
            "2026-01-01T00:00:00Z",
            vec![],
        ),
        (
            "cron-after-past-start",
            bounded(
                hourly.clone(),
                Some("2026-01-01T05:00:00Z"),
                Some("2026-01-01T10:00:00Z"),
            ),
            "UTC",
            "2026-01-01T08:30:00Z",
            vec!["2026-01-01T09:00:00+00:00", "2026-01-01T10:00:00+00:00"],
        ),
        (
            "cron-sub-second-start",
            bounded(
                Schedule::cron("* * * * * *", Tz::UTC).expect("valid"),
                Some("2026-01-01T00:00:00.5Z"),
                Some("2026-01-01T00:00:02Z"),
            ),
            "UTC",
            "2025-01-01T00:00:00Z",
            vec!["2026-01-01T00:00:01+00:00", "2026-01-01T00:00:02+00:00"],
        ),
    ]
}

#[test]
fn intervals_one_shots_and_bounds() {
    let cases = bounded_cases();
    let failures = cases
        .iter()
        .filter_map(|(name, schedule, tz, after, expected)| {
            // Ask for one more than expected: the schedule must be exhausted after the last.
            let got = upcoming(schedule, zone(tz), instant(after), expected.len() + 1);
            (got != *expected).then(|| {
                format!("{name}: after {after}\n  expected {expected:?}\n  got      {got:?}")
            })
        })
        .collect();
    report("interval/at/bounds", cases.len(), failures);
}
