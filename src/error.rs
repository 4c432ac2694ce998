//! The crate's error type. Variants name the step that failed; `exit_code` tells the user's
//! mistakes (exit 2) from failures of the environment (exit 1).

use std::path::PathBuf;

/// Errors that reach the command line.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The operator configuration is invalid; the message names the key.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),

    /// No cluster could be reached (no in-cluster service account, no usable KUBECONFIG).
    #[error("cannot connect to Kubernetes: {source}")]
    ConnectCluster {
        /// Why.
        #[source]
        source: kube::Error,
    },

    /// The ChronTask CRD is not installed, or chronflow may not list ChronTasks.
    #[error(
        "cannot list ChronTasks (is the CRD installed? kubectl apply -f crds/chronflow.io_chrontasks.yaml): {source}"
    )]
    CrdUnavailable {
        /// The apiserver's answer.
        #[source]
        source: kube::Error,
    },

    /// `RUST_LOG` is not a tracing filter.
    #[error("RUST_LOG: {0}")]
    LogFilter(String),

    /// The log file cannot be opened.
    #[error("cannot open the log file: {0}")]
    Logging(#[source] std::io::Error),

    /// The operator could not start, or a component stopped while running.
    #[error("{0}")]
    Startup(String),

    /// `chronflow trigger` could not set the request on the ChronTask.
    #[error("cannot request a run of ChronTask {task}: {source}")]
    Trigger {
        /// `<namespace>/<name>` of the task.
        task: String,
        /// The apiserver's answer.
        #[source]
        source: kube::Error,
    },

    /// Writing output failed (a closed pipe, a full disk).
    #[error("cannot write {path}: {source}")]
    WriteOutput {
        /// What was being written.
        path: PathBuf,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },

    /// Serialising a document (the CRD, the effective configuration) failed.
    #[error("cannot serialise {what}: {source}")]
    Serialize {
        /// What was being serialised.
        what: &'static str,
        /// Why it failed.
        #[source]
        source: serde_yaml::Error,
    },
}

impl Error {
    /// Exit status for the command line: 2 for bad input, 1 for everything else.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Config(_) | Error::LogFilter(_) => 2,
            _ => 1,
        }
    }

    /// A short, stable label for metrics and Kubernetes Event reasons.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Config(_) => "config",
            Error::ConnectCluster { .. } => "connect_cluster",
            Error::CrdUnavailable { .. } => "crd_unavailable",
            Error::LogFilter(_) => "log_filter",
            Error::Logging(_) => "logging",
            Error::Startup(_) => "startup",
            Error::Trigger { .. } => "trigger",
            Error::WriteOutput { .. } => "write_output",
            Error::Serialize { .. } => "serialize",
        }
    }
}

/// Result with the crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
