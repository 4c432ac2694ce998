//! Humane durations as users write them in ChronTasks and the configuration: `500ms`, `10s`,
//! `1m30s`, `2h`, `1d`. One or more `<integer><unit>` parts, units largest first, each at most once.

use std::time::Duration;

/// Units in the order they must appear, with their length in milliseconds.
const UNITS: [(&str, u64); 5] = [
    ("d", 86_400_000),
    ("h", 3_600_000),
    ("m", 60_000),
    ("s", 1_000),
    ("ms", 1),
];

/// The longest duration [`parse_duration`] accepts: 366 days. Every duration chronflow reads
/// (an interval, a jitter, a timeout, a retry delay, a configuration period) is far below it, and
/// so is any sum with an instant of the RFC 3339 years, so no date arithmetic can overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(366 * 86_400);

/// Parses a humane duration. The error says what was expected, for messages such as
/// `interval: "5x" is not a duration (expected e.g. 500ms, 10s, 1m30s, 2h, 1d)`, or that it is
/// longer than [`MAX_DURATION`].
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let invalid =
        || format!("{text:?} is not a duration (expected e.g. 500ms, 10s, 1m30s, 2h, 1d)");
    let too_long = || {
        format!(
            "{text:?} is longer than the maximum {}",
            format_duration(MAX_DURATION)
        )
    };
    let mut rest = text.trim();
    if rest.is_empty() {
        return Err(invalid());
    }
    // Checked all the way, in u128: a long string of digits is "too long", not a panic.
    let mut total: u128 = 0;
    let mut too_many_digits = false;
    let mut next_unit = 0; // index into UNITS: parts must come largest first, once each
    while !rest.is_empty() {
        let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        if digits == 0 {
            return Err(invalid());
        }
        let value = rest[..digits].parse::<u64>().ok();
        rest = &rest[digits..];
        let letters = rest.len()
            - rest
                .trim_start_matches(|c: char| c.is_ascii_alphabetic())
                .len();
        let unit = &rest[..letters];
        rest = &rest[letters..];
        let position = UNITS[next_unit..]
            .iter()
            .position(|(name, _)| *name == unit)
            .ok_or_else(invalid)?;
        let millis = UNITS[next_unit + position].1;
        next_unit += position + 1;
        match value {
            Some(value) => total += u128::from(value) * u128::from(millis),
            None => too_many_digits = true,
        }
    }
    if too_many_digits || total > MAX_DURATION.as_millis() {
        return Err(too_long());
    }
    Ok(Duration::from_millis(total as u64))
}

/// Formats a duration the way [`parse_duration`] reads it, largest units first: `1m30s`, `500ms`, `0s`.
pub fn format_duration(duration: Duration) -> String {
    let mut millis = duration.as_millis() as u64;
    if millis == 0 {
        return "0s".to_string();
    }
    let mut out = String::new();
    for (name, length) in UNITS {
        if millis >= length {
            out.push_str(&format!("{}{name}", millis / length));
            millis %= length;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_unit_and_combinations() {
        let cases = [
            ("500ms", 500),
            ("10s", 10_000),
            ("1m30s", 90_000),
            ("2h", 7_200_000),
            ("1d", 86_400_000),
            ("1d2h3m4s5ms", 93_784_005),
            ("0s", 0),
        ];
        for (text, millis) in cases {
            assert_eq!(
                parse_duration(text),
                Ok(Duration::from_millis(millis)),
                "{text}"
            );
        }
    }

    #[test]
    fn rejects_malformed_text() {
        for text in ["", "5", "s", "5x", "1s1m", "1s1s", "-1s", "1.5s", "1 s"] {
            assert!(parse_duration(text).is_err(), "{text} should be rejected");
        }
    }

    #[test]
    fn rejects_durations_longer_than_the_maximum_instead_of_overflowing() {
        assert_eq!(MAX_DURATION, Duration::from_secs(366 * 86_400));
        for text in ["366d", "8784h", "365d23h59m59s999ms"] {
            assert!(parse_duration(text).is_ok(), "{text} is at most 366d");
        }
        for text in [
            "366d1ms",
            "367d",
            "8785h",
            "3000000d",
            "9999999999d",
            "99999999999999999999d",
            "18446744073709551615ms",
            "213503982334601d",
            "1d99999999999999999999h",
        ] {
            assert_eq!(
                parse_duration(text),
                Err(format!("{text:?} is longer than the maximum 366d")),
                "{text}"
            );
        }
    }

    #[test]
    fn format_round_trips() {
        for text in ["500ms", "10s", "1m30s", "2h", "1d", "1d2h3m4s5ms", "0s"] {
            assert_eq!(format_duration(parse_duration(text).unwrap()), text);
        }
    }
}
