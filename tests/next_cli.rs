//! `chronflow next` run as a process: its output is a contract parsed by scripts and by tests
//! outside this repository (PRODUCT.md), so every form is checked byte for byte.

use std::process::{Command, Output};

fn next(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_chronflow"))
        .arg("next")
        .args(args)
        .output()
        .expect("the chronflow binary runs")
}

fn stdout(output: &Output) -> String {
    String::from_utf8(output.stdout.clone()).expect("stdout is UTF-8")
}

fn stderr(output: &Output) -> String {
    String::from_utf8(output.stderr.clone()).expect("stderr is UTF-8")
}

/// Success: exit 0, nothing on stderr, exactly `lines` on stdout.
fn assert_prints(args: &[&str], lines: &[&str]) {
    let output = next(args);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{args:?}: stderr {:?}",
        stderr(&output)
    );
    assert_eq!(stderr(&output), "", "{args:?}");
    let expected: String = lines.iter().map(|line| format!("{line}\n")).collect();
    assert_eq!(stdout(&output), expected, "{args:?}");
}

/// Invalid input: exit 2, empty stdout, one stderr line that contains `field` and `reason`.
fn assert_rejects(args: &[&str], field: &str, reason: &str) {
    let output = next(args);
    let message = stderr(&output);
    assert_eq!(
        output.status.code(),
        Some(2),
        "{args:?}: stderr {message:?}"
    );
    assert_eq!(stdout(&output), "", "{args:?}");
    assert_eq!(message.lines().count(), 1, "{args:?}: {message:?}");
    assert!(
        message.contains(field) && message.contains(reason),
        "{args:?}: {message:?} should name {field:?} and say {reason:?}"
    );
}

#[test]
fn cron_form_with_every_option() {
    // 6 fields in a zone without daylight saving; -n and --count are the same option.
    let lines = [
        "2026-01-01T08:00:05+08:00",
        "2026-01-01T08:00:10+08:00",
        "2026-01-01T08:00:15+08:00",
    ];
    for count in ["-n", "--count"] {
        let args = [
            "*/5 * * * * *",
            "--tz",
            "Asia/Shanghai",
            "--after",
            "2026-01-01T00:00:00Z",
            count,
            "3",
        ];
        assert_prints(&args, &lines);
    }
    // --start and --end are inclusive; fewer than N instants is still success.
    assert_prints(
        &[
            "0 * * * *",
            "--after",
            "2026-01-01T00:00:00Z",
            "--start",
            "2026-01-01T05:00:00Z",
            "--end",
            "2026-01-01T07:00:00Z",
            "-n",
            "5",
        ],
        &[
            "2026-01-01T05:00:00+00:00",
            "2026-01-01T06:00:00+00:00",
            "2026-01-01T07:00:00+00:00",
        ],
    );
}

#[test]
fn defaults_are_utc_ten_instants_after_now() {
    let output = next(&["@hourly"]);
    assert_eq!(output.status.code(), Some(0));
    let text = stdout(&output);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 10, "{text}");
    let now = chrono::Utc::now();
    let mut previous = now - chrono::TimeDelta::seconds(5);
    for line in lines {
        assert!(
            line.ends_with(":00:00+00:00"),
            "UTC with +00:00 and whole hours: {line}"
        );
        let instant = chrono::DateTime::parse_from_rfc3339(line).expect("RFC 3339");
        assert!(instant > previous, "{line} is not later");
        previous = instant.with_timezone(&chrono::Utc);
    }
}

#[test]
fn daylight_saving_examples() {
    // Spring forward in New York: 02:30 does not exist, the wall-clock schedule runs at 03:00.
    assert_prints(
        &[
            "30 2 * * *",
            "--tz",
            "America/New_York",
            "--after",
            "2026-03-07T12:00:00Z",
            "-n",
            "3",
        ],
        &[
            "2026-03-08T03:00:00-04:00",
            "2026-03-09T02:30:00-04:00",
            "2026-03-10T02:30:00-04:00",
        ],
    );
    // Fall back: a periodic schedule runs in both passes of 01:xx, in real-time order.
    assert_prints(
        &[
            "*/30 * * * *",
            "--tz",
            "America/New_York",
            "--after",
            "2026-11-01T00:50:00-04:00",
            "-n",
            "4",
        ],
        &[
            "2026-11-01T01:00:00-04:00",
            "2026-11-01T01:30:00-04:00",
            "2026-11-01T01:00:00-05:00",
            "2026-11-01T01:30:00-05:00",
        ],
    );
}

#[test]
fn interval_form() {
    // Fractional seconds appear only when needed.
    assert_prints(
        &[
            "--interval",
            "500ms",
            "--start",
            "2026-01-01T00:00:00Z",
            "--after",
            "2026-01-01T00:00:00Z",
            "-n",
            "3",
        ],
        &[
            "2026-01-01T00:00:00.500+00:00",
            "2026-01-01T00:00:01+00:00",
            "2026-01-01T00:00:01.500+00:00",
        ],
    );
    // k = 0 is due at --start itself; --end is inclusive; printed in --tz.
    assert_prints(
        &[
            "--interval",
            "1m30s",
            "--start",
            "2026-01-01T00:00:00Z",
            "--after",
            "2025-12-31T00:00:00Z",
            "--end",
            "2026-01-01T00:03:00Z",
            "--tz",
            "Europe/Berlin",
        ],
        &[
            "2026-01-01T01:00:00+01:00",
            "2026-01-01T01:01:30+01:00",
            "2026-01-01T01:03:00+01:00",
        ],
    );
}

#[test]
fn at_form() {
    assert_prints(
        &[
            "--at",
            "2026-12-01T09:00:00+08:00",
            "--after",
            "2026-01-01T00:00:00Z",
        ],
        &["2026-12-01T01:00:00+00:00"],
    );
    assert_prints(
        &[
            "--at",
            "2026-12-01T01:00:00Z",
            "--after",
            "2026-01-01T00:00:00Z",
            "--tz",
            "Asia/Shanghai",
        ],
        &["2026-12-01T09:00:00+08:00"],
    );
    // Passed: nothing due, still success.
    assert_prints(
        &[
            "--at",
            "2026-12-01T01:00:00Z",
            "--after",
            "2026-12-01T01:00:00Z",
        ],
        &[],
    );
}

#[test]
fn invalid_input_exits_2_with_one_line_naming_the_field() {
    assert_rejects(&["61 * * * *"], "minute", "61 is out of range 0-59");
    assert_rejects(
        &["* * * * FUNDAY"],
        "day-of-week",
        "\"FUNDAY\" is not a day name",
    );
    assert_rejects(&["* * *"], "cron", "expected 5 or 6 fields, got 3");
    assert_rejects(&["@often"], "cron", "unknown macro @often");
    assert_rejects(&["0 0 30 2 *"], "day-of-month", "never");
    assert_rejects(
        &["* * * * *", "--tz", "Mars/Base"],
        "--tz",
        "\"Mars/Base\" is not an IANA time zone",
    );
    assert_rejects(
        &["* * * * *", "--after", "yesterday"],
        "--after",
        "RFC 3339",
    );
    assert_rejects(
        &["* * * * *", "--start", "2026-13-01T00:00:00Z"],
        "--start",
        "RFC 3339",
    );
    assert_rejects(
        &[
            "* * * * *",
            "--start",
            "2026-02-01T00:00:00Z",
            "--end",
            "2026-01-01T00:00:00Z",
        ],
        "--end",
        "before --start",
    );
    assert_rejects(
        &["--interval", "5x", "--start", "2026-01-01T00:00:00Z"],
        "--interval",
        "is not a duration",
    );
    assert_rejects(
        &["--interval", "50ms", "--start", "2026-01-01T00:00:00Z"],
        "--interval",
        "shorter than the minimum 100ms",
    );
    assert_rejects(&["--at", "noon"], "--at", "RFC 3339");
}

#[test]
fn huge_intervals_are_rejected_not_a_panic() {
    let start = "2026-01-01T00:00:00Z";
    assert_rejects(
        &["--interval", "367d", "--start", start],
        "--interval",
        "is longer than the maximum 366d",
    );
    for huge in [
        "3000000d",
        "9999999999d",
        "99999999999999999999d",
        "18446744073709551615ms",
    ] {
        assert_rejects(
            &["--interval", huge, "--start", start],
            "--interval",
            "is longer than the maximum 366d",
        );
    }
    assert_prints(
        &[
            "--interval",
            "366d",
            "--start",
            start,
            "--after",
            start,
            "-n",
            "1",
        ],
        &["2027-01-02T00:00:00+00:00"],
    );
}

#[test]
fn usage_errors_exit_2() {
    for args in [
        &[][..],
        &["--interval", "10s"][..],
        &["* * * * *", "--at", "2026-01-01T00:00:00Z"][..],
        &["* * * * *", "-n", "-1"][..],
    ] {
        let output = next(args);
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        assert_eq!(stdout(&output), "", "{args:?}");
    }
}

#[test]
fn a_failed_write_to_stdout_exits_1_with_one_line() {
    let full = std::fs::File::create("/dev/full").expect("/dev/full exists on Linux");
    let output = Command::new(env!("CARGO_BIN_EXE_chronflow"))
        .args(["next", "@hourly", "-n", "3"])
        .stdout(full)
        .output()
        .expect("the chronflow binary runs");
    let message = stderr(&output);
    assert_eq!(output.status.code(), Some(1), "stderr {message:?}");
    assert_eq!(
        message,
        "error: cannot write stdout: No space left on device (os error 28)\n"
    );
}

#[test]
fn a_reader_that_stops_early_is_not_an_error() {
    use std::io::BufRead;
    // Far more output than a pipe buffers, so the write after the reader leaves is refused.
    let mut child = Command::new(env!("CARGO_BIN_EXE_chronflow"))
        .args(["next", "* * * * * *", "-n", "1000000"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("the chronflow binary runs");
    let mut first = String::new();
    std::io::BufReader::new(child.stdout.take().expect("piped"))
        .read_line(&mut first)
        .expect("one line");
    assert!(first.ends_with("+00:00\n"), "{first:?}");
    // The reader is dropped here: the pipe is closed, as `| head -1` does.
    let output = child.wait_with_output().expect("it ends");
    assert_eq!(output.status.code(), Some(0), "{:?}", stderr(&output));
    assert_eq!(stderr(&output), "");
}

#[test]
fn a_cron_expression_starting_with_a_hyphen_is_read_as_the_expression() {
    assert_rejects(&["-5 * * * *"], "minute", "missing a value in \"-5\"");
    assert_rejects(
        &["-n", "3", "-5 * * * *"],
        "minute",
        "missing a value in \"-5\"",
    );
    assert_rejects(&["--", "-5 * * * *"], "minute", "missing a value in \"-5\"");
    assert_rejects(
        &["-1-5 * * * *", "--tz", "UTC"],
        "minute",
        "missing a value in \"-1-5\"",
    );
    // Options still work around the expression.
    assert_prints(
        &["-n", "1", "0 0 * * *", "--after", "2026-01-01T00:00:00Z"],
        &["2026-01-02T00:00:00+00:00"],
    );
}

#[test]
fn between_prints_what_a_backfill_of_the_range_would_run() {
    // Both ends inclusive, in the --tz offset.
    let lines = [
        "2026-11-28T03:00:00+01:00",
        "2026-11-28T03:15:00+01:00",
        "2026-11-28T03:30:00+01:00",
    ];
    let range = ["--between", "2026-11-28T02:00:00Z", "2026-11-28T02:30:00Z"];
    let mut args = vec!["0 */15 * * * *", "--tz", "Europe/Berlin"];
    args.extend(range);
    assert_prints(&args, &lines);
    // More than a backfill takes (10000): refused, as the operator would refuse it.
    assert_rejects(
        &[
            "* * * * * *",
            "--between",
            "2026-11-28T00:00:00Z",
            "2026-11-28T06:00:00Z",
        ],
        "--between",
        "more than 10000 instants",
    );
    assert_rejects(
        &[
            "* * * * * *",
            "--between",
            "2026-11-28T01:00:00Z",
            "2026-11-28T00:00:00Z",
        ],
        "--between",
        "END is before START",
    );
}
