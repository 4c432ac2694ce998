//! Logging: one tracing subscriber, its format (`json | pretty | compact | off`), level filter
//! and optional rotated file chosen by the `log` section of the configuration.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::writer::BoxMakeWriter;

use crate::Error;
use crate::config::{LogConfig, LogFormat, LogRotation};

/// Keeps the background log-file writer alive; hold it until the process exits.
#[must_use = "dropping the guard stops writing the log file"]
pub struct LogGuard(#[allow(dead_code)] Option<tracing_appender::non_blocking::WorkerGuard>);

/// Installs the global subscriber. `RUST_LOG`, when set, replaces `log.level` (the usual way to
/// turn up one module for a while). The configuration was validated at load; what can still
/// fail is a `RUST_LOG` that is not a filter, or a log file that cannot be created.
pub fn init(log: &LogConfig) -> Result<LogGuard, Error> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(directives) if !directives.trim().is_empty() => EnvFilter::try_new(&directives)
            .map_err(|e| Error::LogFilter(format!("{directives:?} is not a log filter: {e}")))?,
        _ => EnvFilter::try_new(&log.level).unwrap_or_else(|_| EnvFilter::new("info")),
    };
    if log.format == LogFormat::Off {
        return Ok(LogGuard(None));
    }
    let (writer, guard, ansi) = match &log.file {
        None => (
            BoxMakeWriter::new(std::io::stdout),
            None,
            std::io::stdout().is_terminal(),
        ),
        Some(path) => {
            let directory = path
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(std::path::Path::new("."));
            std::fs::create_dir_all(directory).map_err(Error::Logging)?;
            let file_name = path.file_name().unwrap_or(path.as_os_str());
            let rotation = match log.rotation {
                LogRotation::Never => tracing_appender::rolling::Rotation::NEVER,
                LogRotation::Hourly => tracing_appender::rolling::Rotation::HOURLY,
                LogRotation::Daily => tracing_appender::rolling::Rotation::DAILY,
            };
            let appender = tracing_appender::rolling::RollingFileAppender::builder()
                .rotation(rotation)
                .filename_prefix(file_name.to_string_lossy())
                .build(directory)
                .map_err(|e| Error::Logging(std::io::Error::other(e)))?;
            let (writer, guard) = tracing_appender::non_blocking(appender);
            (BoxMakeWriter::new(writer), Some(guard), false)
        }
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(ansi);
    // A second init (tests embedding the operator) keeps the first subscriber.
    let _ = match log.format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Pretty => builder.pretty().try_init(),
        LogFormat::Compact | LogFormat::Off => builder.compact().try_init(),
    };
    Ok(LogGuard(guard))
}

/// At most [`LogQuota::PER_MINUTE`] lines a minute of one kind of message (a run that failed or
/// was missed, a status write that failed): ten thousand tasks failing each second must not
/// write ten thousand lines a second. Beyond the quota lines are counted, and the first line of
/// the next minute says how many were left out; the metrics still count every one.
#[derive(Debug)]
pub struct LogQuota {
    what: &'static str,
    window: std::sync::Mutex<Option<(std::time::Instant, u32, u64)>>,
}

impl LogQuota {
    /// Lines of one kind logged in a minute.
    pub const PER_MINUTE: u32 = 100;

    /// A quota for lines that say `what`.
    pub const fn new(what: &'static str) -> Self {
        Self {
            what,
            window: std::sync::Mutex::new(None),
        }
    }

    /// Whether a line may be logged now.
    pub fn allow(&self) -> bool {
        self.allow_at(std::time::Instant::now())
    }

    fn allow_at(&self, now: std::time::Instant) -> bool {
        let mut window = self.window.lock().unwrap_or_else(|p| p.into_inner());
        let (started, logged, left_out) = window.get_or_insert((now, 0, 0));
        if now.duration_since(*started) >= std::time::Duration::from_secs(60) {
            if *left_out > 0 {
                tracing::warn!(
                    left_out = *left_out,
                    "{}: {} more in the last minute were not logged (the metrics, and for runs \
                     each task's status and Events, count every one)",
                    self.what,
                    *left_out
                );
            }
            (*started, *logged, *left_out) = (now, 0, 0);
        }
        if *logged < Self::PER_MINUTE {
            *logged += 1;
            true
        } else {
            *left_out += 1;
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn a_quota_lets_so_many_lines_a_minute_through_and_counts_the_rest() {
        let quota = LogQuota::new("run failed");
        let start = Instant::now();
        let allowed = (0..250).filter(|_| quota.allow_at(start)).count();
        assert_eq!(allowed, LogQuota::PER_MINUTE as usize);
        let left_out = || quota.window.lock().unwrap().unwrap().2;
        assert_eq!(left_out(), 150);
        assert!(!quota.allow_at(start + Duration::from_secs(59)));
        assert!(
            quota.allow_at(start + Duration::from_secs(60)),
            "a new minute"
        );
        assert_eq!(left_out(), 0);
    }
}
