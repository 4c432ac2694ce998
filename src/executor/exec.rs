//! The command action, for standalone mode only (in a cluster, a command would run inside the
//! operator's Pod with its identity: the operator refuses it). One process per attempt, in a
//! process group of its own so that a timeout or a cancellation kills everything it started;
//! its output is kept up to a bound, the end of it going into the run's message.

use std::path::PathBuf;
use std::process::Stdio;

use tokio::io::{AsyncRead, AsyncReadExt};

use super::http::Attempt;

/// A validated command action.
#[derive(Clone, Debug, PartialEq)]
pub struct ExecAction {
    /// The program and its arguments (no shell).
    pub command: Vec<String>,
    /// Variables the command gets, besides [`INHERITED`] and the run's own.
    pub env: Vec<(String, String)>,
    /// The directory it runs in; chronflow's own when `None`.
    pub working_dir: Option<PathBuf>,
}

/// The only variables of chronflow's environment a command inherits (and `LC_*`), as cron
/// gives its jobs a minimal one: never `CHRONFLOW_SECRET_*` (every task's header values) nor
/// `SCHEDULER__*` (chronflow's configuration, a Redis password among it).
pub const INHERITED: [&str; 8] = [
    "PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "TZ", "TMPDIR",
];

/// How much of the output (stdout and stderr, each) is read; the rest is discarded as it comes.
const MAX_OUTPUT: usize = 64 * 1024;

/// How much of the output's end goes into the run's message.
const MESSAGE_OUTPUT: usize = 512;

/// Kills the process group when dropped: on a timeout or a cancellation (the attempt's future is
/// dropped), and after the command exits, for what it left running.
struct ProcessGroup(Option<u32>);

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        if let Some(Ok(pid)) = self.0.map(i32::try_from) {
            let group = nix::unistd::Pid::from_raw(pid);
            let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
        }
    }
}

/// Runs the command once. `Ok` says how it exited and how its output ended; `Err` why the
/// attempt failed (it could not start, or exited non-zero).
pub async fn attempt(action: &ExecAction, attempt: Attempt<'_>) -> Result<String, String> {
    let Some((program, args)) = action.command.split_first() else {
        return Err("the command is empty".into());
    };
    let mut command = tokio::process::Command::new(program);
    let inherited = std::env::vars_os().filter(|(name, _)| {
        let name = name.to_string_lossy();
        INHERITED.contains(&name.as_ref()) || name.starts_with("LC_")
    });
    command
        .args(args)
        .env_clear()
        .envs(inherited)
        .envs(action.env.iter().map(|(k, v)| (k, v)))
        .env("CHRONFLOW_RUN_ID", attempt.run_id.as_str())
        .env("CHRONFLOW_SCHEDULED_TIME", attempt.scheduled.to_rfc3339())
        .env("CHRONFLOW_ATTEMPT", attempt.number.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    if let Some(dir) = &action.working_dir {
        command.current_dir(dir);
    }
    let mut child = command
        .spawn()
        .map_err(|e| format!("cannot start {program}: {e}"))?;
    let _group = ProcessGroup(child.id());
    let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
    let (out, err, status) = tokio::join!(bounded(stdout), bounded(stderr), child.wait());
    let status = status.map_err(|e| format!("waiting for {program}: {e}"))?;
    let output = tail(&format!("{out}{err}"));
    let shown = if output.is_empty() {
        String::new()
    } else {
        format!(": {output}")
    };
    match status.code() {
        Some(0) => Ok(format!("exit 0{shown}")),
        Some(code) => Err(format!("exit status {code}{shown}")),
        None => Err(format!("killed by a signal{shown}")),
    }
}

/// Reads a stream to its end, keeping at most [`MAX_OUTPUT`] bytes.
async fn bounded(stream: Option<impl AsyncRead + Unpin>) -> String {
    let Some(mut stream) = stream else {
        return String::new();
    };
    let mut kept = Vec::new();
    let mut buffer = [0u8; 8192];
    while let Ok(read) = stream.read(&mut buffer).await {
        if read == 0 {
            break;
        }
        let room = MAX_OUTPUT.saturating_sub(kept.len());
        kept.extend_from_slice(&buffer[..read.min(room)]);
    }
    String::from_utf8_lossy(&kept).into_owned()
}

/// The end of the output, on one line, for the run's message.
fn tail(output: &str) -> String {
    let line = output.split_whitespace().collect::<Vec<_>>().join(" ");
    match line.char_indices().rev().nth(MESSAGE_OUTPUT) {
        Some((cut, _)) => format!("…{}", &line[cut..]),
        None => line,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::run::{RunId, TaskKey};
    use chrono::{DateTime, Utc};

    fn run(command: &[&str]) -> ExecAction {
        ExecAction {
            command: command.iter().map(|s| s.to_string()).collect(),
            env: vec![("GREETING".into(), "hello".into())],
            working_dir: None,
        }
    }

    async fn once(action: &ExecAction) -> Result<String, String> {
        let scheduled = DateTime::<Utc>::from_timestamp(1_767_225_600, 0).unwrap();
        let run_id = RunId::new(
            &crate::run::TaskId::new(TaskKey::new("default", "t"), "uid"),
            scheduled,
        );
        let one = Attempt {
            namespace: "default",
            run_id: &run_id,
            scheduled,
            number: 1,
            epoch: 1,
        };
        attempt(action, one).await
    }

    #[tokio::test]
    async fn the_exit_status_decides_and_the_output_ends_the_message() {
        let ok = once(&run(&["sh", "-c", "echo $GREETING $CHRONFLOW_RUN_ID"])).await;
        assert_eq!(
            ok,
            Ok("exit 0: hello default/t@2026-01-01T00:00:00Z".into())
        );
        let failed = once(&run(&["sh", "-c", "echo broken >&2; exit 3"])).await;
        assert_eq!(failed, Err("exit status 3: broken".into()));
        let missing = once(&run(&["/no/such/program"])).await.unwrap_err();
        assert!(
            missing.starts_with("cannot start /no/such/program"),
            "{missing}"
        );
    }

    #[tokio::test]
    async fn endless_output_is_bounded() {
        let action = run(&["sh", "-c", "yes chronflow | head -c 1000000"]);
        let message = once(&action).await.unwrap();
        assert!(message.len() < 1024, "{}", message.len());
    }

    #[tokio::test]
    async fn a_dropped_attempt_kills_the_whole_process_group() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("survived");
        // A child of the command, in the background, would write the marker after 1 s.
        let script = format!("(sleep 1; touch {}) & sleep 30", marker.display());
        let action = run(&["sh", "-c", &script]);
        let timed_out = tokio::time::timeout(std::time::Duration::from_millis(200), once(&action));
        assert!(timed_out.await.is_err());
        tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
        assert!(
            !marker.exists(),
            "a process of the group outlived the attempt"
        );
    }
}
