//! `chronflow next`: print the upcoming instants of a schedule (a contract parsed by scripts).

use std::process::ExitCode;

/// Arguments of `chronflow next` (placeholder; filled in with the schedule module).
#[derive(Debug, clap::Args)]
pub struct NextArgs {}

pub fn run(_args: &NextArgs) -> ExitCode {
    ExitCode::SUCCESS
}
