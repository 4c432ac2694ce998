//! The command line: `chronflow run | standalone | next | trigger | crd | check-config`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::OperatorConfig;
use crate::{Error, Result};

pub mod next;
pub mod trigger;

/// chronflow runs scheduled work on Kubernetes with seconds precision, exactly once.
#[derive(Debug, Parser)]
#[command(name = "chronflow", version, about, long_about = None)]
pub struct Cli {
    /// The command to run.
    #[command(subcommand)]
    pub command: Command,
}

/// chronflow's commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the operator: watch ChronTasks (in-cluster, or through KUBECONFIG) and fire them
    /// until SIGINT/SIGTERM.
    Run {
        /// Configuration file (YAML); `SCHEDULER__…` environment variables override it.
        #[arg(short = 'f', long = "config", env = "CHRONFLOW_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Run ChronTask manifests from files in the foreground, without Kubernetes: the operator's
    /// semantics, edits picked up while running, Ctrl+C drains and exits.
    Standalone(crate::standalone::StandaloneArgs),
    /// Print the next instants a schedule fires, to check one before applying it.
    Next(next::NextArgs),
    /// Run a ChronTask once now, through the API: sets its `chronflow.io/run-now` annotation,
    /// which the operator runs exactly once.
    Trigger(trigger::TriggerArgs),
    /// Print the ChronTask CustomResourceDefinition as YAML (what `crds/` holds).
    Crd,
    /// Validate an operator configuration file and print the effective configuration,
    /// after `SCHEDULER__…` environment overrides and defaults.
    CheckConfig {
        /// Configuration file (YAML); without it, defaults and environment only.
        #[arg(short = 'f', long = "file", env = "CHRONFLOW_CONFIG")]
        file: Option<PathBuf>,
    },
}

impl Cli {
    /// Runs the chosen command and returns the process exit code.
    pub async fn run(self) -> Result<ExitCode> {
        match self.command {
            Command::Run { config } => {
                let config = OperatorConfig::load(config.as_deref())?;
                let _log = crate::telemetry::init(&config.log)?;
                // Before the kube client is built: it and the HTTP action share one TLS provider.
                let _ = rustls::crypto::ring::default_provider().install_default();
                let client = kube::Client::try_default()
                    .await
                    .map_err(|source| Error::ConnectCluster { source })?;
                crate::operator::run(config, client, on_signals()).await?;
                Ok(ExitCode::SUCCESS)
            }
            Command::Standalone(args) => {
                if let Some(crate::standalone::StandaloneCommand::Status { history }) =
                    &args.command
                {
                    return match crate::standalone::history::status(history) {
                        Ok(table) => {
                            print_stdout(&table)?;
                            Ok(ExitCode::SUCCESS)
                        }
                        Err(error) => {
                            eprintln!("error: {error}");
                            Ok(ExitCode::from(2))
                        }
                    };
                }
                let config = OperatorConfig::load(args.config.as_deref())?;
                let _log = crate::telemetry::init(&config.log)?;
                crate::standalone::run(&args, config, on_signals()).await?;
                Ok(ExitCode::SUCCESS)
            }
            Command::Next(args) => Ok(next::run(&args)),
            Command::Trigger(args) => {
                let request = trigger::run(&args).await?;
                print_stdout(&format!(
                    "chrontask/{} run requested ({}={request})\n",
                    args.name,
                    crate::crd::RUN_NOW_ANNOTATION
                ))?;
                Ok(ExitCode::SUCCESS)
            }
            Command::Crd => {
                print_stdout(&crate::crd::crd_yaml()?)?;
                Ok(ExitCode::SUCCESS)
            }
            Command::CheckConfig { file } => {
                let config = OperatorConfig::load(file.as_deref())?;
                let yaml = serde_yaml::to_string(&config).map_err(|source| Error::Serialize {
                    what: "configuration",
                    source,
                })?;
                print_stdout(&yaml)?;
                Ok(ExitCode::SUCCESS)
            }
        }
    }
}

/// Cancelled by the first SIGINT or SIGTERM (stop, drain, exit 0); a second one exits at once
/// with status 130: no drain, no last status write, no Lease release (a standby leads once the
/// lease expires).
fn on_signals() -> tokio_util::sync::CancellationToken {
    let shutdown = tokio_util::sync::CancellationToken::new();
    let on_signal = shutdown.clone();
    tokio::spawn(async move {
        crate::operator::shutdown_signal().await;
        on_signal.cancel();
        crate::operator::shutdown_signal().await;
        tracing::warn!("second signal: exiting at once");
        std::process::exit(130);
    });
    shutdown
}

/// Writes `text` to standard output and flushes, so a full disk is an error (exit 1). A reader
/// that closed the pipe early (`| head`) is not: it has what it wanted.
fn print_stdout(text: &str) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(source) => Err(Error::WriteOutput {
            path: "stdout".into(),
            source,
        }),
    }
}
