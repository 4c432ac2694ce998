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
