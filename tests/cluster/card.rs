//! The product card's flow, as a user types it: the real `chronflow run` binary, the real
//! kubectl, a sample applied with `kubectl apply -f`, paused and resumed with `kubectl patch`.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::support::receiver::{Behavior, Receiver};
use crate::support::{eventually, namespace, repo_root, test_env};

/// The operator binary, killed if the test fails before stopping it.
struct OperatorProcess(Child);

impl Drop for OperatorProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
    }
}

fn columns(table: &str, name: &str) -> Vec<String> {
    let header = table.lines().next().unwrap_or_default();
    let row = table
        .lines()
        .find(|l| l.starts_with(name))
        .unwrap_or_default();
    // Columns start where the header's titles start.
    let starts: Vec<usize> = header
        .match_indices(|c: char| c != ' ')
        .map(|(i, _)| i)
        .filter(|&i| {
            i == 0
                || header.as_bytes()[i - 1] == b' ' && (i < 2 || header.as_bytes()[i - 2] == b' ')
        })
        .collect();
    starts
        .iter()
        .enumerate()
        .map(|(n, &start)| {
            let end = starts
                .get(n + 1)
                .copied()
                .unwrap_or(row.len())
                .min(row.len());
            row.get(start.min(row.len())..end)
                .unwrap_or_default()
                .trim()
                .to_string()
        })
        .collect()
}

#[tokio::test]
async fn apply_get_pause_resume_with_kubectl() {
    let env = test_env();
    let client = env.client().await;
    let ns = namespace(&client, "card").await;
    let receiver = Receiver::start(Behavior::default()).await;

    let sample =
        std::fs::read_to_string(repo_root().join("e2e/samples/loopback-every-second.yaml"))
            .unwrap();
    let manifest = sample.replace("http://127.0.0.1:8081/", &receiver.url("/hook"));
    let file = std::env::temp_dir().join(format!("chronflow-card-{ns}.yaml"));
    std::fs::write(&file, manifest).unwrap();

    let operator = OperatorProcess(
        Command::new(env!("CARGO_BIN_EXE_chronflow"))
            .arg("run")
            .env("KUBECONFIG", &env.kubeconfig)
            .env("SCHEDULER__WATCH_NAMESPACES", &ns)
            .env("SCHEDULER__STATUS__FLUSH_INTERVAL", "300ms")
            .env("SCHEDULER__LOG__FORMAT", "json")
            .env("SCHEDULER__METRICS__BIND", "127.0.0.1:0")
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let kubectl = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["-n", ns.as_str()]);
        let output = env.kubectl(&all);
        assert!(
            output.status.success(),
            "kubectl {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    };
    let set_paused = |paused: bool| {
        let patch = format!(r#"{{"spec":{{"paused":{paused}}}}}"#);
        kubectl(&[
            "patch",
            "chrontask",
            "every-second",
            "--type",
            "merge",
            "-p",
            &patch,
        ]);
    };
    kubectl(&["apply", "-f", file.to_str().unwrap()]);

    // `kubectl get chrontasks` shows runs and the success rate within seconds.
    let row = eventually("kubectl get to show 3 runs", || async {
        let row = columns(&kubectl(&["get", "chrontasks"]), "every-second");
        (row.get(6).and_then(|r| r.parse::<u64>().ok()).unwrap_or(0) >= 3).then_some(row)
    })
    .await;
    assert_eq!(row[1], "* * * * * * (UTC)");
    assert_eq!(row[2], "false");
    assert_eq!(row[7], "100.0%");

    set_paused(true);
    eventually("phase Paused", || async {
        let row = columns(&kubectl(&["get", "chrontasks"]), "every-second");
        (row.get(3).map(String::as_str) == Some("Paused")).then_some(())
    })
    .await;
    // Runs start only after the engine has the task; Paused is written after it was paused,
    // so from here on not a single call may arrive. Absence is observed over a window.
    let quiet = receiver.count();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(receiver.count(), quiet, "no calls while paused");

    set_paused(false);
    eventually("calls to resume", || async {
        (receiver.count() >= quiet + 2).then_some(())
    })
    .await;

    // SIGTERM: stop firing, drain, exit 0.
    let pid = operator.0.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let operator = std::sync::Mutex::new(operator);
    let exit = eventually("the operator to exit", || async {
        operator.lock().unwrap().0.try_wait().unwrap()
    })
    .await;
    assert!(exit.success(), "exit status {exit}");
    let _ = std::fs::remove_file(file);
}
