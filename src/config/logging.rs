//! The `log` section and the check of its `level` filter.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::values::text;

/// Logging settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// Output format.
    pub format: LogFormat,
    /// A `tracing` EnvFilter directive such as `info` or `chronflow=debug,kube=warn`.
    #[serde(deserialize_with = "text")]
    pub level: String,
    /// Whether each successful run is logged (failures always are).
    pub log_task_success: bool,
    /// Also write logs to this file; `None` means standard output only.
    pub file: Option<PathBuf>,
    /// When the log file is rotated.
    pub rotation: LogRotation,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One JSON object per line.
    Json,
    /// Multi-line, human-friendly.
    Pretty,
    /// One line per event.
    Compact,
    /// No logs.
    Off,
}

/// Log file rotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogRotation {
    /// One file forever.
    Never,
    /// A new file every hour.
    Hourly,
    /// A new file every day.
    Daily,
}

/// Checks a log filter: `tracing_subscriber::EnvFilter` must parse it, and a directive without
/// `=` must be a level (`verbose` would otherwise silently mean "everything from the target
/// named verbose", that is nothing at all). The error completes `log.level: `.
pub(super) fn check_log_level(level: &str) -> Result<(), String> {
    const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
    let expected = "expected a log filter such as info, debug or chronflow=debug,kube=warn";
    if level.trim().is_empty() {
        return Err(format!("{expected}, got {level:?}"));
    }
    for directive in level.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let is_level = LEVELS
            .iter()
            .any(|known| directive.eq_ignore_ascii_case(known));
        if !directive.contains('=') && !directive.contains('[') && !is_level {
            return Err(format!(
                "{directive:?} is not a level (expected trace, debug, info, warn, error or off; \
                 to filter a target give it a level: {directive}=debug)"
            ));
        }
    }
    tracing_subscriber::EnvFilter::try_new(level)
        .map(|_| ())
        .map_err(|error| format!("{expected}, got {level:?} ({error})"))
}
