//! Cron expressions: parsing (5 or 6 fields, names, ranges, lists, steps, Sunday as 0 or 7,
//! macros) with errors that name the field, and the search for the next matching *local wall
//! time*. Time zones and daylight saving are deliberately not handled here: `super::zone` maps
//! local wall times to instants.
//!
//! Semantics follow Vixie cron (what `cronsim` and Kubernetes `CronJob` users expect), with two
//! documented readings where Vixie is silent or terse: `N/step` means `N-max/step` (as in
//! `cronsim` and the `robfig/cron` library behind `CronJob`), a day-of-week range may end on
//! Sunday written as `SUN` or `0` (`FRI-SUN` = `5-7`), and a step longer than the range
//! matches only its start (`*/15` in month = `1`), as all of those do.

use std::fmt;

use chrono::{Datelike, NaiveDate, NaiveDateTime, Timelike};

use super::ScheduleError;

/// How far ahead [`CronExpr::next_local`] looks. The Gregorian calendar repeats every 400 years
/// (dates *and* weekdays), so a date pattern with no match in 400 years never matches.
const SEARCH_YEARS: i32 = 400;

/// One field of a cron expression: its name in error messages, its range, and its names.
struct Field {
    name: &'static str,
    min: u32,
    max: u32,
    names: Names,
    /// `?` (Quartz and `CronJob` spelling of "any") is accepted in the two day fields only.
    any_question_mark: bool,
}

#[derive(Clone, Copy, PartialEq)]
enum Names {
    None,
    Months,
    Days,
}

const SECOND: Field = Field {
    name: "second",
    min: 0,
    max: 59,
    names: Names::None,
    any_question_mark: false,
};
const MINUTE: Field = Field {
    name: "minute",
    min: 0,
    max: 59,
    names: Names::None,
    any_question_mark: false,
};
const HOUR: Field = Field {
    name: "hour",
    min: 0,
    max: 23,
    names: Names::None,
    any_question_mark: false,
};
const DAY_OF_MONTH: Field = Field {
    name: "day-of-month",
    min: 1,
    max: 31,
    names: Names::None,
    any_question_mark: true,
};
const MONTH: Field = Field {
    name: "month",
    min: 1,
    max: 12,
    names: Names::Months,
    any_question_mark: false,
};
// 7 is accepted as a second spelling of Sunday and folded onto 0 after expansion.
const DAY_OF_WEEK: Field = Field {
    name: "day-of-week",
    min: 0,
    max: 7,
    names: Names::Days,
    any_question_mark: true,
};

const MONTH_NAMES: [&str; 12] = [
    "JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC",
];
const DAY_NAMES: [&str; 7] = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"];

/// The macros of crontab(5) and what they stand for. `@midnight` is Vixie's synonym of `@daily`.
const MACROS: [(&str, &str); 7] = [
    ("@yearly", "0 0 1 1 *"),
    ("@annually", "0 0 1 1 *"),
    ("@monthly", "0 0 1 * *"),
    ("@weekly", "0 0 * * 0"),
    ("@daily", "0 0 * * *"),
    ("@midnight", "0 0 * * *"),
    ("@hourly", "0 * * * *"),
];

/// How the two day fields combine (Vixie): if either starts with `*` (or `?`) a day must match
/// both; when both are restricted, a day matching either one is enough.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DayRule {
    Both,
    Either,
}

/// A parsed cron expression: the set of local wall times it matches.
#[derive(Clone, PartialEq, Eq)]
pub struct CronExpr {
    /// The expression as written (whitespace collapsed), for `describe()`.
    text: String,
    seconds: u64,
    minutes: u64,
    hours: u64,
    /// Bit `d` for day `d` (1-31).
    days: u64,
    /// Bit `m` for month `m` (1-12).
    months: u64,
    /// Bit `w` for weekday `w`, Sunday = 0.
    weekdays: u64,
    day_rule: DayRule,
    wall_clock: bool,
}

impl fmt::Debug for CronExpr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The bit sets are unreadable; the text says everything.
        f.debug_tuple("CronExpr").field(&self.text).finish()
    }
}

impl CronExpr {
    /// Parses a 5-field (`m h dom mon dow`), 6-field (`s m h dom mon dow`) or macro expression.
    pub fn parse(expr: &str) -> Result<CronExpr, ScheduleError> {
        let words: Vec<&str> = expr.split_whitespace().collect();
        let text = words.join(" ");
        let expanded: Vec<&str> = match words.as_slice() {
            [word] if word.starts_with('@') => expand_macro(word)?.split(' ').collect(),
            [first, ..] if first.starts_with('@') => {
                return Err(err("cron", format!("macro {first} takes no fields")));
            }
            _ => words.clone(),
        };
        let fields: [&str; 6] = match expanded.as_slice() {
            [m, h, dom, mon, dow] => ["0", m, h, dom, mon, dow],
            [s, m, h, dom, mon, dow] => [s, m, h, dom, mon, dow],
            other => {
                return Err(err(
                    "cron",
                    format!("expected 5 or 6 fields, got {}", other.len()),
                ));
            }
        };
        let [second, minute, hour, dom, month, dow] = fields;
        let weekdays = parse_field(&DAY_OF_WEEK, dow)?;
        let unrestricted = |field: &str| field.starts_with('*') || field.starts_with('?');
        let parsed = CronExpr {
            seconds: parse_field(&SECOND, second)?,
            minutes: parse_field(&MINUTE, minute)?,
            hours: parse_field(&HOUR, hour)?,
            days: parse_field(&DAY_OF_MONTH, dom)?,
            months: parse_field(&MONTH, month)?,
            // Sunday is both 0 and 7: fold bit 7 onto bit 0.
            weekdays: (weekdays & 0x7f) | (weekdays >> 7 & 1),
            day_rule: if unrestricted(dom) || unrestricted(dow) {
                DayRule::Both
            } else {
                DayRule::Either
            },
            // The classification of PRODUCT.md "Time semantics": explicit minute *and* hour.
            wall_clock: !minute.starts_with('*') && !hour.starts_with('*'),
            text,
        };
        parsed.check_can_fire(dom, month)?;
        Ok(parsed)
    }

    /// True for a *wall-clock* schedule (minute and hour both explicit, e.g. `30 2 * * *`,
    /// `@daily`): at daylight-saving changes it fires once per wall time. Otherwise the schedule
    /// is *periodic* (`*/15 * * * *`, `@hourly`) and keeps its real-time rhythm.
    pub fn is_wall_clock(&self) -> bool {
        self.wall_clock
    }

    /// A lower bound of the distance between two consecutive matching local wall times: the
    /// smallest distance between two values of the seconds field, counted around the minute
    /// (`*/7` gives 4s: from :56 to :00); with one second, the same for minutes (× 60s); with
    /// one minute too, for hours around the day (× 1h); otherwise one day. It reads the
    /// expression only, so it is a bound, not the exact gap (`@yearly` gives one day).
    pub fn min_gap(&self) -> std::time::Duration {
        let seconds = if let Some(gap) = smallest_circular_gap(self.seconds, 60) {
            gap
        } else if let Some(gap) = smallest_circular_gap(self.minutes, 60) {
            gap * 60
        } else if let Some(gap) = smallest_circular_gap(self.hours, 24) {
            gap * 3600
        } else {
            86_400
        };
        std::time::Duration::from_secs(u64::from(seconds))
    }

    /// How many matching times of day a matching day has at or before `time` (a whole second
    /// of the day, `None`: before midnight), counted from the bit sets without listing them.
    pub fn times_until(&self, time: Option<(u32, u32, u32)>) -> u64 {
        let Some((h, m, s)) = time else {
            return 0;
        };
        let below = |set: u64, value: u32| u64::from((set & ((1u64 << value) - 1)).count_ones());
        let (minutes, seconds) = (
            u64::from(self.minutes.count_ones()),
            u64::from(self.seconds.count_ones()),
        );
        let mut count = below(self.hours, h) * minutes * seconds;
        if has(self.hours, h) {
            count += below(self.minutes, m) * seconds;
            if has(self.minutes, m) {
                count += below(self.seconds, s + 1);
            }
        }
        count
    }

    /// Whether the expression fires on `date` (month, and day of month / day of week by the
    /// POSIX rule).
    pub fn fires_on(&self, date: NaiveDate) -> bool {
        has(self.months, date.month()) && self.day_matches(date)
    }

    /// The expression as written, with runs of whitespace collapsed to one space.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Whether a local wall time matches every field (sub-second part ignored).
    pub fn matches_local(&self, local: NaiveDateTime) -> bool {
        has(self.months, local.month())
            && self.day_matches(local.date())
            && has(self.hours, local.hour())
            && has(self.minutes, local.minute())
            && has(self.seconds, local.second())
    }

    /// The first matching local wall time at or after `from` (its sub-second part is dropped, so
    /// pass a whole second). `None` if nothing matches within [`SEARCH_YEARS`].
    pub fn next_local(&self, from: NaiveDateTime) -> Option<NaiveDateTime> {
        let limit = from.year().checked_add(SEARCH_YEARS)?;
        let mut date = from.date();
        let mut time = (from.hour(), from.minute(), from.second());
        while date.year() <= limit {
            if !has(self.months, date.month()) {
                // Skip the whole month at once: this keeps rare patterns (29 Feb) cheap.
                let (year, month) = if date.month() == 12 {
                    (date.year() + 1, 1)
                } else {
                    (date.year(), date.month() + 1)
                };
                date = NaiveDate::from_ymd_opt(year, month, 1)?;
                time = (0, 0, 0);
                continue;
            }
            if self.day_matches(date)
                && let Some((h, m, s)) = self.first_time_from(time)
            {
                return date.and_hms_opt(h, m, s);
            }
            date = date.succ_opt()?;
            time = (0, 0, 0);
        }
        None
    }

    fn day_matches(&self, date: NaiveDate) -> bool {
        let dom = has(self.days, date.day());
        let dow = has(self.weekdays, date.weekday().num_days_from_sunday());
        match self.day_rule {
            DayRule::Both => dom && dow,
            DayRule::Either => dom || dow,
        }
    }

    /// The first matching time of day at or after `(h, m, s)`, if any is left in the day.
    fn first_time_from(&self, (h, m, s): (u32, u32, u32)) -> Option<(u32, u32, u32)> {
        let mut hour = next_bit(self.hours, h)?;
        // Only the starting hour and minute carry a lower bound; later ones start from 0.
        let (mut minute_from, mut second_from) = if hour == h { (m, s) } else { (0, 0) };
        loop {
            while let Some(minute) = next_bit(self.minutes, minute_from) {
                let from = if minute == minute_from {
                    second_from
                } else {
                    0
                };
                if let Some(second) = next_bit(self.seconds, from) {
                    return Some((hour, minute, second));
                }
                minute_from = minute + 1;
                second_from = 0;
            }
            hour = next_bit(self.hours, hour + 1)?;
            minute_from = 0;
            second_from = 0;
        }
    }

    /// Rejects a schedule whose date fields can never match (`0 0 30 2 *`). Hours, minutes and
    /// seconds always hold at least one value, and over the 400-year cycle every valid date falls
    /// on every weekday, so only day-of-month against month can make a schedule impossible, and
    /// only when the two day fields are combined with AND.
    fn check_can_fire(&self, dom_text: &str, month_text: &str) -> Result<(), ScheduleError> {
        if self.day_rule == DayRule::Either {
            return Ok(()); // the weekday field alone matches some day of every month
        }
        // Longest length of each month in any year (February: 29).
        const LONGEST: [u32; 13] = [0, 31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];
        let possible = (1..=12).any(|month| {
            has(self.months, month) && (1..=LONGEST[month as usize]).any(|day| has(self.days, day))
        });
        if possible {
            Ok(())
        } else {
            Err(err(
                DAY_OF_MONTH.name,
                format!(
                    "{dom_text} never occurs in month {month_text}, so the schedule would never fire"
                ),
            ))
        }
    }
}

/// The smallest distance between two members of `set` (values `0..period`), counting the wrap
/// from the largest back to the smallest one period later; `None` with fewer than two members.
fn smallest_circular_gap(set: u64, period: u32) -> Option<u32> {
    let values: Vec<u32> = (0..period).filter(|value| has(set, *value)).collect();
    let (&first, &last) = (values.first()?, values.last()?);
    if first == last {
        return None;
    }
    let wrap = period - last + first;
    values
        .windows(2)
        .map(|pair| pair[1] - pair[0])
        .chain([wrap])
        .min()
}

fn has(set: u64, value: u32) -> bool {
    value < 64 && set >> value & 1 == 1
}

/// The smallest member of `set` that is `>= from`.
fn next_bit(set: u64, from: u32) -> Option<u32> {
    if from >= 64 {
        return None;
    }
    let rest = set >> from;
    (rest != 0).then(|| from + rest.trailing_zeros())
}

fn err(field: &str, reason: impl Into<String>) -> ScheduleError {
    ScheduleError {
        field: field.to_string(),
        reason: reason.into(),
    }
}

fn expand_macro(word: &str) -> Result<&'static str, ScheduleError> {
    MACROS
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(word))
        .map(|(_, expansion)| *expansion)
        .ok_or_else(|| err("cron", format!("unknown macro {word}")))
}

/// Expands one field into a bit set: a comma-separated list of `*`, `N`, `A-B`, each optionally
/// followed by `/STEP`.
fn parse_field(field: &Field, text: &str) -> Result<u64, ScheduleError> {
    let mut set = 0u64;
    for item in text.split(',') {
        if item.is_empty() {
            return Err(err(field.name, format!("empty item in list {text:?}")));
        }
        set |= parse_item(field, item)?;
    }
    Ok(set)
}

fn parse_item(field: &Field, item: &str) -> Result<u64, ScheduleError> {
    let (range, step) = match item.split_once('/') {
        None => (item, None),
        Some((range, step)) => (range, Some(parse_step(field, step)?)),
    };
    let (first, last) = if range == "*" || (range == "?" && field.any_question_mark) {
        (field.min, field.max)
    } else if let Some((start, end)) = range.split_once('-') {
        let first = parse_value(field, start, item)?;
        let mut last = parse_value(field, end, item)?;
        if field.names == Names::Days && last == 0 && first > 0 {
            last = 7; // `FRI-SUN`: a range may end on Sunday, spelled 0 or SUN
        }
        if first > last {
            return Err(err(
                field.name,
                format!("range {range} is backwards (start {first} is after end {last})"),
            ));
        }
        (first, last)
    } else {
        let value = parse_value(field, range, item)?;
        // `N/step` runs from N to the end of the field, as in cronsim and robfig/cron.
        (value, if step.is_some() { field.max } else { value })
    };
    let step = step.unwrap_or(1);
    Ok((first..=last)
        .step_by(step as usize)
        .fold(0u64, |set, value| set | 1 << value))
}

/// A step: any positive integer. A step longer than the field's range is accepted and matches
/// only the start of the range (`*/15` in month is January), as in Vixie cron, robfig/cron
/// (what `CronJob` uses), croniter and cronsim, so such schedules migrate unchanged.
fn parse_step(field: &Field, text: &str) -> Result<u32, ScheduleError> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(err(field.name, format!("step {text:?} is not a number")));
    }
    match text.parse::<u32>() {
        Ok(0) => Err(err(field.name, "step 0 must be at least 1")),
        Ok(step) => Ok(step),
        Err(_) => Err(err(field.name, format!("step {text} is too large"))),
    }
}

/// One value of a field: a number or, for month and day-of-week, a three-letter name. `item` is
/// the list item it came from, for the message.
fn parse_value(field: &Field, text: &str, item: &str) -> Result<u32, ScheduleError> {
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        return match text.parse::<u32>() {
            Ok(value) if (field.min..=field.max).contains(&value) => Ok(value),
            _ => Err(err(
                field.name,
                format!("{text} is out of range {}-{}", field.min, field.max),
            )),
        };
    }
    let names: &[&str] = match field.names {
        Names::Months => &MONTH_NAMES,
        Names::Days => &DAY_NAMES,
        Names::None => &[],
    };
    if let Some(index) = names
        .iter()
        .position(|name| name.eq_ignore_ascii_case(text))
    {
        let index = index as u32;
        return Ok(if field.names == Names::Months {
            index + 1
        } else {
            index
        });
    }
    if text.is_empty() {
        return Err(err(field.name, format!("missing a value in {item:?}")));
    }
    if is_quartz_extension(text) {
        return Err(err(
            field.name,
            format!("{text:?} uses L, W or #, which are not supported"),
        ));
    }
    let starts_alphabetic = text.starts_with(|c: char| c.is_ascii_alphabetic());
    let reason = match field.names {
        Names::Months if starts_alphabetic => format!("{text:?} is not a month name"),
        Names::Days if starts_alphabetic => format!("{text:?} is not a day name"),
        _ => format!("{text:?} is not a number"),
    };
    Err(err(field.name, reason))
}

/// `L`, `LW`, `15W`, `5L`, `MON#2`: Quartz extensions some users expect; named in the message so
/// they know it is the extension, not a typo, that is refused.
fn is_quartz_extension(text: &str) -> bool {
    let digits_then = |suffix: char| {
        text.len() > 1
            && text.ends_with(suffix)
            && text[..text.len() - 1].bytes().all(|b| b.is_ascii_digit())
    };
    text.contains('#') || text == "L" || text == "LW" || digits_then('L') || digits_then('W')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bits(values: &[u32]) -> u64 {
        values.iter().fold(0, |set, v| set | 1 << v)
    }

    #[test]
    fn expands_lists_ranges_steps_and_names() {
        let parsed = CronExpr::parse("5/20 1-10/3,30 */6 1,15 JAN-mar SAT-SUN").expect("valid");
        assert_eq!(parsed.seconds, bits(&[5, 25, 45]));
        assert_eq!(parsed.minutes, bits(&[1, 4, 7, 10, 30]));
        assert_eq!(parsed.hours, bits(&[0, 6, 12, 18]));
        assert_eq!(parsed.days, bits(&[1, 15]));
        assert_eq!(parsed.months, bits(&[1, 2, 3]));
        assert_eq!(parsed.weekdays, bits(&[0, 6]));
        assert_eq!(parsed.day_rule, DayRule::Either);
        assert!(!parsed.is_wall_clock(), "the hour field starts with *");
    }

    #[test]
    fn steps_longer_than_the_range_match_its_start() {
        let parsed = CronExpr::parse("*/90 */100 9-17/24 */40 */15 */20").expect("valid");
        assert_eq!(parsed.seconds, bits(&[0]));
        assert_eq!(parsed.minutes, bits(&[0]));
        assert_eq!(parsed.hours, bits(&[9]));
        assert_eq!(parsed.days, bits(&[1]));
        assert_eq!(parsed.months, bits(&[1]));
        assert_eq!(parsed.weekdays, bits(&[0]));
        let parsed = CronExpr::parse("5/4294967295 * * * *").expect("the largest u32 step");
        assert_eq!(parsed.minutes, bits(&[5]));
        assert_eq!(
            CronExpr::parse("*/0 * * * *")
                .expect_err("zero")
                .to_string(),
            "minute: step 0 must be at least 1"
        );
        assert_eq!(
            CronExpr::parse("*/4294967296 * * * *")
                .expect_err("beyond u32")
                .to_string(),
            "minute: step 4294967296 is too large"
        );
    }

    #[test]
    fn sunday_is_zero_and_seven() {
        let zero = CronExpr::parse("0 0 * * 0").expect("valid");
        let seven = CronExpr::parse("0 0 * * 7").expect("valid");
        assert_eq!(zero.weekdays, seven.weekdays);
        assert_eq!(
            CronExpr::parse("0 0 * * 0-7").expect("valid").weekdays,
            0x7f
        );
    }

    #[test]
    fn classifies_wall_clock_and_day_rule() {
        assert!(CronExpr::parse("@daily").expect("valid").is_wall_clock());
        assert!(!CronExpr::parse("@hourly").expect("valid").is_wall_clock());
        assert!(
            !CronExpr::parse("0 */2 * * *")
                .expect("valid")
                .is_wall_clock()
        );
        assert!(
            CronExpr::parse("* 30 2 * * *")
                .expect("valid")
                .is_wall_clock()
        );
        assert_eq!(
            CronExpr::parse("0 0 */10 * MON").expect("valid").day_rule,
            DayRule::Both
        );
        assert_eq!(
            CronExpr::parse("0 0 ? * MON").expect("valid").day_rule,
            DayRule::Both
        );
        assert_eq!(
            CronExpr::parse("0 0 1-7 * MON").expect("valid").day_rule,
            DayRule::Either
        );
    }

    #[test]
    fn next_local_crosses_days_months_and_years() {
        let at = |text: &str| {
            NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S").expect("test time")
        };
        let parsed = CronExpr::parse("0 0 29 2 *").expect("valid");
        assert_eq!(
            parsed.next_local(at("2026-01-01 00:00:00")),
            Some(at("2028-02-29 00:00:00"))
        );
        let parsed = CronExpr::parse("*/20 59 23 31 12 *").expect("valid");
        assert_eq!(
            parsed.next_local(at("2026-12-31 23:59:41")),
            Some(at("2027-12-31 23:59:00"))
        );
        assert_eq!(
            parsed.next_local(at("2026-12-31 23:59:40")),
            Some(at("2026-12-31 23:59:40"))
        );
    }

    #[test]
    fn impossible_dates_are_rejected() {
        let error = CronExpr::parse("0 0 30 2 *").expect_err("never fires");
        assert_eq!(error.field, "day-of-month");
        assert!(
            CronExpr::parse("0 0 30 2 MON").is_ok(),
            "either day field may match"
        );
        assert!(CronExpr::parse("0 0 29 2 *").is_ok(), "leap days exist");
    }
}
