//! `chronflow next`: print the upcoming instants of a schedule, so users can check one before
//! applying it. The output is a contract parsed by scripts and tests (PRODUCT.md):
//! one RFC 3339 instant per line, in the `--tz` zone's offset, fractional seconds only when
//! needed; an invalid input prints nothing on stdout, one line on stderr naming the field, and
//! exits with status 2. Output that cannot be written (a full disk) is one line on stderr and
//! status 1; a reader closing the pipe early (`| head -1`) ends the command quietly with 0.

use std::io::Write;
use std::process::ExitCode;

use chrono::{DateTime, SecondsFormat, Utc};
use chrono_tz::Tz;

use crate::schedule::{self, IntervalAnchor, Schedule, ScheduleError};

const AFTER_HELP: &str = "\
Forms:
  chronflow next CRON [--tz ZONE] [--after T] [--start T] [--end T] [-n N]
  chronflow next --interval DURATION --start T [--after T] [--end T] [-n N]
  chronflow next --at T [--after T]
  chronflow next CRON --between START END     (what a backfill of START..END would run)

Prints up to N instants strictly after --after, one per line, in RFC 3339 with the offset of
--tz. Instants (T) are RFC 3339, e.g. 2026-03-08T03:00:00-04:00 or 2026-12-01T01:00:00Z.
An invalid input prints one line on stderr naming the field and exits with status 2.

Examples:
  chronflow next '*/5 * * * * *' --tz Asia/Shanghai -n 3
  chronflow next '30 2 * * *' --tz America/New_York --after 2026-03-07T12:00:00Z
  chronflow next --interval 1m30s --start 2026-01-01T00:00:00Z
  chronflow next --at 2026-12-01T09:00:00+08:00
  chronflow next '0 */15 * * * *' --between 2026-11-28T00:00:00Z 2026-11-28T06:00:00Z";

/// Exit status for invalid input, the same as clap's usage errors.
const EXIT_INVALID: u8 = 2;

/// Arguments of `chronflow next`: exactly one of CRON, `--interval`, `--at`.
#[derive(Debug, clap::Args)]
#[command(
    group(clap::ArgGroup::new("schedule").required(true).args(["cron", "interval", "at"])),
    after_help = AFTER_HELP
)]
pub struct NextArgs {
    /// Cron expression, quoted: 5 fields (minute hour day-of-month month day-of-week), 6 fields
    /// (seconds first), or a macro (@yearly @annually @monthly @weekly @daily @midnight @hourly).
    // An expression starting with `-` (`-5 * * * *`) is the expression, so its error is ours
    // (one line naming the field), not clap's "unexpected argument".
    #[arg(value_name = "CRON", allow_hyphen_values = true)]
    pub cron: Option<String>,

    /// Fixed-rate interval instead of cron (500ms, 10s, 1m30s, 2h, 1d); due at
    /// START + k * DURATION for k = 0, 1, 2, ... Requires --start.
    #[arg(long, value_name = "DURATION", requires = "start")]
    pub interval: Option<String>,

    /// One-shot instant instead of cron: prints it if it is after --after.
    #[arg(long, value_name = "T")]
    pub at: Option<String>,

    /// IANA time zone the cron expression is read in (daylight saving handled), and the zone
    /// whose offset every printed instant carries [default: UTC]
    #[arg(long, value_name = "ZONE")]
    pub tz: Option<String>,

    /// Print instants strictly after this one [default: now]
    #[arg(long, value_name = "T")]
    pub after: Option<String>,

    /// First instant the schedule may fire (inclusive); the anchor of --interval.
    #[arg(long, value_name = "T")]
    pub start: Option<String>,

    /// Last instant the schedule may fire (inclusive); fewer than N lines are printed after it.
    #[arg(long, value_name = "T")]
    pub end: Option<String>,

    /// How many instants to print at most.
    #[arg(short = 'n', long = "count", value_name = "N", default_value_t = 10)]
    pub count: usize,

    /// Print every instant from START to END, both inclusive: what a backfill of that range
    /// would run (ignores --after and -n); a range a backfill would refuse is an error.
    #[arg(long, num_args = 2, value_names = ["START", "END"], conflicts_with_all = ["after", "count"])]
    pub between: Option<Vec<String>>,
}

/// Exit status when standard output cannot be written (a full disk), as for other failures of
/// the environment.
const EXIT_OUTPUT: u8 = 1;

/// Runs `chronflow next`: 0 on success (even with fewer than N instants, or when the reader
/// closes the pipe early, as `| head -1` does), 2 on invalid input, 1 when standard output
/// cannot be written.
pub fn run(args: &NextArgs) -> ExitCode {
    let printed = plan(args).and_then(|(schedule, tz, after)| match &args.between {
        Some(range) => Ok(print_instants(between(&schedule, range)?, tz)),
        None => Ok(print_instants(upcoming(&schedule, after, args.count), tz)),
    });
    match printed {
        Ok(Ok(())) => ExitCode::SUCCESS,
        // The reader left (`| head -1`): it has what it wanted; not an error of ours.
        Ok(Err(error)) if error.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Ok(Err(error)) => {
            report(&format!("cannot write stdout: {error}"));
            ExitCode::from(EXIT_OUTPUT)
        }
        Err(error) => {
            // Exactly one line: scripts read it as "field: reason".
            report(&error.to_string());
            ExitCode::from(EXIT_INVALID)
        }
    }
}

/// One line on standard error. If even that fails there is no one left to tell (`eprintln!`
/// would panic instead).
fn report(message: &str) {
    let _ = writeln!(std::io::stderr(), "error: {message}");
}

/// Validates every argument and builds the schedule, the output zone and the `--after` instant.
fn plan(args: &NextArgs) -> Result<(Schedule, Tz, DateTime<Utc>), ScheduleError> {
    let tz = match &args.tz {
        Some(name) => schedule::parse_timezone(name).map_err(|error| on_flag("--tz", error))?,
        None => Tz::UTC,
    };
    let instant = |flag: &str, text: &Option<String>| {
        text.as_deref()
            .map(|text| schedule::parse_instant(flag, text))
            .transpose()
    };
    let after = instant("--after", &args.after)?.unwrap_or_else(Utc::now);
    let start = instant("--start", &args.start)?;
    let end = instant("--end", &args.end)?;
    if let (Some(start), Some(end)) = (start, end)
        && end < start
    {
        return Err(ScheduleError {
            field: "--end".into(),
            reason: "is before --start".into(),
        });
    }
    let schedule = if let Some(cron) = &args.cron {
        Schedule::cron(cron, tz)?
    } else if let Some(every) = &args.interval {
        let every = schedule::parse_duration(every).map_err(|reason| ScheduleError {
            field: "--interval".into(),
            reason,
        })?;
        // clap enforces `requires = "start"`; a missing start here is still reported, not a panic.
        let Some(start) = start else {
            return Err(ScheduleError {
                field: "--start".into(),
                reason: "is required with --interval".into(),
            });
        };
        Schedule::interval(every, IntervalAnchor::Start(start))
            .map_err(|error| on_flag("--interval", error))?
    } else if let Some(at) = &args.at {
        Schedule::at(schedule::parse_instant("--at", at)?)
    } else {
        return Err(ScheduleError {
            field: "schedule".into(),
            reason: "give a CRON expression, --interval or --at".into(),
        });
    };
    let schedule = schedule
        .with_bounds(start, end)
        .map_err(|error| on_flag("--end", error))?;
    Ok((schedule, tz, after))
}

/// Reports a schedule error under the command-line flag the user typed.
fn on_flag(flag: &str, error: ScheduleError) -> ScheduleError {
    ScheduleError {
        field: flag.to_string(),
        reason: error.reason,
    }
}

/// Up to `count` instants strictly after `after`, computed as they are printed.
fn upcoming(
    schedule: &Schedule,
    after: DateTime<Utc>,
    count: usize,
) -> impl Iterator<Item = DateTime<Utc>> + '_ {
    std::iter::successors(schedule.next_after(after), |t| schedule.next_after(*t)).take(count)
}

/// The instants of `--between START END`, bounded as a backfill is.
fn between(schedule: &Schedule, range: &[String]) -> Result<Vec<DateTime<Utc>>, ScheduleError> {
    let [start, end] = range else {
        return Err(ScheduleError {
            field: "--between".into(),
            reason: "takes START and END".into(),
        });
    };
    let start = schedule::parse_instant("--between", start)?;
    let end = schedule::parse_instant("--between", end)?;
    if end < start {
        return Err(ScheduleError {
            field: "--between".into(),
            reason: "END is before START".into(),
        });
    }
    schedule
        .between(start, end, crate::engine::MAX_BACKFILL)
        .map_err(|limit| ScheduleError {
            field: "--between".into(),
            reason: format!(
                "the range holds more than {limit} instants; a backfill of it would be refused"
            ),
        })
}

/// Writes the instants, one per line, and flushes: every write error is returned.
fn print_instants(
    instants: impl IntoIterator<Item = DateTime<Utc>>,
    tz: Tz,
) -> std::io::Result<()> {
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for instant in instants {
        let line = instant
            .with_timezone(&tz)
            .to_rfc3339_opts(SecondsFormat::AutoSi, false);
        writeln!(out, "{line}")?;
    }
    out.flush()
}
