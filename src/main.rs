//! The `chronflow` binary: parse the command line and hand over to the library.

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;

/// mimalloc rather than glibc's malloc: a run's many small, short-lived allocations spent about
/// a quarter of the firing path's CPU in malloc and free (docs/benchmarks.md). Built without
/// transparent huge pages (Cargo.toml): an operator's memory, not its TLB, is what users count.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = chronflow::cli::Cli::parse();
    match cli.run().await {
        Ok(code) => code,
        Err(error) => {
            // Not eprintln!: it panics when stderr is closed.
            let _ = writeln!(std::io::stderr(), "chronflow: {error}");
            ExitCode::from(error.exit_code())
        }
    }
}
