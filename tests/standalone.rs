//! `chronflow standalone` run as a process on directories of manifests, calling real HTTP
//! servers on loopback: it fires on time, picks up edits, additions and deletions, reports an
//! invalid file without stopping the others, and drains on SIGTERM and exits 0.

#[path = "support/mod.rs"]
mod support;

use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use support::eventually;
use support::receiver::{Behavior, Receiver};

/// A standalone process; killed if the test ends before it stops.
struct Standalone {
    child: Option<Child>,
    log: std::path::PathBuf,
    address: std::net::SocketAddr,
}

impl Standalone {
    fn start(manifests: &Path, dir: &Path) -> Standalone {
        Standalone::start_with(manifests, dir, &[], &[])
    }

    /// With `extra` arguments and `env` variables.
    fn start_with(
        manifests: &Path,
        dir: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Standalone {
        let address = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let log = dir.join("standalone.log");
        let child = Command::new(env!("CARGO_BIN_EXE_chronflow"))
            .args(["standalone", "-f"])
            .arg(manifests)
            .args(["--listen", &address.to_string()])
            .args(extra)
            .envs(env.iter().copied())
            .env_remove("RUST_LOG")
            .env("SCHEDULER__LOG__FORMAT", "json")
            .stdout(
                std::fs::File::options()
                    .create(true)
                    .append(true)
                    .open(&log)
                    .unwrap(),
            )
            .stderr(Stdio::inherit())
            .spawn()
            .expect("chronflow runs");
        Standalone {
            child: Some(child),
            log,
            address,
        }
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn stats(&self) -> Option<serde_json::Value> {
        let url = format!("http://{}/stats", self.address);
        let response = reqwest::get(url).await.ok()?;
        serde_json::from_str(&response.text().await.ok()?).ok()
    }

    fn kill(&mut self) {
        let mut child = self.child.take().unwrap();
        let _ = child.kill();
        let _ = child.wait();
    }

    /// SIGTERM, and the exit status.
    fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().unwrap();
        let pid = child.id().to_string();
        assert!(
            Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .unwrap()
                .success()
        );
        child.wait().unwrap()
    }
}

impl Drop for Standalone {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn task(name: &str, schedule: &str, url: &str, extra: &str) -> String {
    format!(
        "apiVersion: chronflow.io/v1alpha1\nkind: ChronTask\nmetadata:\n  name: {name}\nspec:\n  \
         schedule: {schedule}\n  timeout: 5s\n{extra}  action:\n    http:\n      url: {url}\n"
    )
}

fn calls(receiver: &Receiver, task: &str) -> usize {
    let prefix = format!("default/{task}@");
    receiver
        .hits()
        .iter()
        .filter(|h| h.idempotency_key.starts_with(&prefix))
        .count()
}

async fn phase_count(standalone: &Standalone, phase: &str) -> Option<u64> {
    let stats = standalone.stats().await?;
    Some(stats["tasks_by_phase"][phase].as_u64().unwrap_or(0))
}

#[tokio::test]
async fn fires_on_time_and_follows_edits_additions_deletions_and_bad_files() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let receiver = Receiver::start(Behavior::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let manifests = dir.path().join("tasks");
    std::fs::create_dir(&manifests).unwrap();
    let url = |path: &str| receiver.url(path);
    std::fs::write(
        manifests.join("a.yaml"),
        task("a", "{interval: 1s}", &url("/a"), ""),
    )
    .unwrap();
    let standalone = Standalone::start(&manifests, dir.path());

    eventually("three runs of a", || async {
        (calls(&receiver, "a") >= 3).then_some(())
    })
    .await;
    // On time: each call within a second of its instant (a generous bound; figures come from
    // benchmarks), and intervals anchored at the epoch: whole seconds.
    for hit in receiver.hits() {
        let late = hit.arrived - hit.scheduled;
        assert!(late < chrono::Duration::seconds(1), "{hit:?}");
        assert_eq!(hit.scheduled.timestamp_subsec_nanos(), 0, "{hit:?}");
    }

    // An edit: paused.
    std::fs::write(
        manifests.join("a.yaml"),
        task("a", "{interval: 1s}", &url("/a"), "  paused: true\n"),
    )
    .unwrap();
    eventually("a paused", || async {
        (phase_count(&standalone, "Paused").await? == 1).then_some(())
    })
    .await;

    // A second file with two documents, and a broken one beside it.
    let two = format!(
        "{}---\n{}",
        task("b", "{cron: \"* * * * * *\"}", &url("/b"), ""),
        task("c", "{interval: 2s}", &url("/c"), "")
    );
    std::fs::write(manifests.join("b.yaml"), two).unwrap();
    std::fs::write(
        manifests.join("bad.yaml"),
        task("bad", "{cron: \"61 * * * * *\"}", &url("/bad"), ""),
    )
    .unwrap();
    std::fs::write(manifests.join("notes.txt"), "not a manifest").unwrap();
    eventually("b and c running", || async {
        (calls(&receiver, "b") >= 2 && calls(&receiver, "c") >= 1).then_some(())
    })
    .await;
    let logs = standalone.logs();
    assert!(
        logs.contains("bad") && logs.contains("spec.schedule.cron") && logs.contains("61"),
        "the invalid task is reported with its field:\n{logs}"
    );
    assert_eq!(calls(&receiver, "bad"), 0);

    // Deleting a file removes its tasks.
    std::fs::remove_file(manifests.join("b.yaml")).unwrap();
    eventually("b and c gone", || async {
        let total = standalone.stats().await?["total_tasks"].as_u64()?;
        (total == 2).then_some(())
    })
    .await;
    let (b, c) = (calls(&receiver, "b"), calls(&receiver, "c"));
    // One more second of a's pause proves nothing runs; the stats above already saw them go.
    assert!(standalone.logs().contains("task removed"));
    drop(standalone);
    assert_eq!((calls(&receiver, "b"), calls(&receiver, "c")), (b, c));
}

// The receiver answers while the test thread waits for the process to exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_runs_in_flight_finish_and_exits_zero() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let receiver = Receiver::start(Behavior {
        status: 200,
        delay: Duration::from_secs(2),
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("slow.yaml");
    std::fs::write(
        &manifest,
        task("slow", "{interval: 1s}", &receiver.url("/slow"), ""),
    )
    .unwrap();
    let mut standalone = Standalone::start(&manifest, dir.path());
    eventually("a call in flight", || async {
        (receiver.count() >= 1).then_some(())
    })
    .await;
    let status = standalone.terminate();
    assert!(status.success(), "{status:?}\n{}", standalone.logs());
    let logs = standalone.logs();
    assert!(
        logs.contains("run succeeded"),
        "the run in flight finished:\n{logs}"
    );
    assert!(logs.contains("chronflow standalone stopped"), "{logs}");
}

#[tokio::test]
async fn the_shipped_examples_run_as_the_readme_says() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/examples");
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("examples.log");
    // The README's first command, on the address the examples call.
    let mut child = Command::new(env!("CARGO_BIN_EXE_chronflow"))
        .args(["standalone", "-f"])
        .arg(&examples)
        .args(["--listen", "127.0.0.1:8080"])
        .env_remove("RUST_LOG")
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let succeeded = eventually("a successful run of every example", || async {
        let text = reqwest::get("http://127.0.0.1:8080/metrics")
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        let ok = |task: &str| {
            text.lines().any(|line| {
                line.starts_with("chronflow_runs_total")
                    && line.contains(&format!("task=\"{task}\""))
                    && line.contains("outcome=\"succeeded\"")
            })
        };
        (ok("self-check") && ok("stats") && ok("metrics") && ok("uname")).then_some(text)
    })
    .await;
    let _ = child.kill();
    let _ = child.wait();
    let logs = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(!logs.contains("manifest not loaded"), "{logs}");
    assert!(!succeeded.contains("outcome=\"failed\""), "{succeeded}");
}

#[tokio::test]
async fn a_command_runs_with_its_run_id_in_its_environment() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("runs.txt");
    let manifest = dir.path().join("tick.yaml");
    let spec = format!(
        "apiVersion: chronflow.io/v1alpha1\nkind: ChronTask\nmetadata:\n  name: tick\nspec:\n  \
         schedule: {{interval: 1s}}\n  action:\n    exec:\n      command: [sh, -c, \
         'echo $CHRONFLOW_RUN_ID >> {}']\n",
        out.display()
    );
    std::fs::write(&manifest, spec).unwrap();
    let standalone = Standalone::start(&manifest, dir.path());
    let lines = eventually("two runs written", || async {
        let text = std::fs::read_to_string(&out).ok()?;
        (text.lines().count() >= 2).then_some(text)
    })
    .await;
    for line in lines.lines() {
        assert!(line.starts_with("default/tick@"), "{line}");
    }
    let unique: std::collections::BTreeSet<&str> = lines.lines().collect();
    assert_eq!(unique.len(), lines.lines().count(), "each run once");
    drop(standalone);
}

#[tokio::test]
async fn proxies_come_from_the_configuration_never_from_the_environment() {
    let target = Receiver::start(Behavior::default()).await;
    // A proxy records what it is asked to forward, like any receiver, and answers 204 itself.
    let proxy = Receiver::start(Behavior::default()).await;
    let proxy_url = proxy.url("");
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("tick.yaml");
    let url = target.url("/hook");
    std::fs::write(&manifest, task("tick", "{interval: 1s}", &url, "")).unwrap();

    let injected: Vec<(&str, &str)> = ["HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "ALL_PROXY"]
        .into_iter()
        .map(|name| (name, proxy_url.as_str()))
        .collect();
    let direct = Standalone::start_with(&manifest, dir.path(), &[], &injected);
    eventually("two runs reach the target directly", || async {
        (calls(&target, "tick") >= 2).then_some(())
    })
    .await;
    assert_eq!(proxy.count(), 0, "a proxy from the environment was used");
    drop(direct);

    let configured = [("SCHEDULER__HTTP__PROXY", proxy_url.as_str())];
    let through = Standalone::start_with(&manifest, dir.path(), &[], &configured);
    eventually("a run goes through http.proxy", || async {
        (calls(&proxy, "tick") >= 1).then_some(())
    })
    .await;
    drop(through);

    // http.no_proxy names the hosts reached directly.
    let (since, direct_so_far) = (chrono::Utc::now(), calls(&target, "tick"));
    let excepted = [
        ("SCHEDULER__HTTP__PROXY", proxy_url.as_str()),
        ("SCHEDULER__HTTP__NO_PROXY", "example.com,127.0.0.1"),
    ];
    let _excepted = Standalone::start_with(&manifest, dir.path(), &[], &excepted);
    eventually("two more runs reach the target directly", || async {
        (calls(&target, "tick") >= direct_so_far + 2).then_some(())
    })
    .await;
    let proxied = proxy
        .hits()
        .into_iter()
        .filter(|hit| hit.scheduled >= since);
    assert_eq!(proxied.count(), 0, "http.no_proxy was not honoured");
}

#[tokio::test]
async fn a_command_gets_a_clean_environment_with_the_task_s_variables() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("env.txt");
    let manifest = dir.path().join("env.yaml");
    let spec = format!(
        "apiVersion: chronflow.io/v1alpha1\nkind: ChronTask\nmetadata:\n  name: env\nspec:\n  \
         schedule: {{interval: 1s}}\n  action:\n    exec:\n      command: [sh, -c, 'env > {}']\n      \
         env: [{{name: GREETING, value: hello}}]\n",
        out.display()
    );
    std::fs::write(&manifest, spec).unwrap();
    let secrets = [
        ("CHRONFLOW_SECRET_SHOP_TOKEN", "s3cr3t"),
        ("SCHEDULER__REDIS__PASSWORD", "hunter2"),
        ("AWS_SECRET_ACCESS_KEY", "k3y"),
    ];
    let _standalone = Standalone::start_with(&manifest, dir.path(), &[], &secrets);
    let env = eventually("the command wrote its environment", || async {
        let text = std::fs::read_to_string(&out).ok()?;
        text.contains("CHRONFLOW_RUN_ID=").then_some(text)
    })
    .await;
    for (name, value) in secrets {
        assert!(!env.contains(value), "{name} reached the command:\n{env}");
    }
    assert!(env.contains("GREETING=hello"), "{env}");
    assert!(env.lines().any(|line| line.starts_with("PATH=")), "{env}");
}

/// `chronflow standalone status` on `history`: the task's RUNS column.
fn runs_in_history(history: &str, task: &str) -> u64 {
    let output = Command::new(env!("CARGO_BIN_EXE_chronflow"))
        .args(["standalone", "status", "--history", history])
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let table = String::from_utf8_lossy(&output.stdout).into_owned();
    let row = table
        .lines()
        .find(|line| line.starts_with(&format!("default/{task} ")))
        .unwrap_or_else(|| panic!("no row for {task}:\n{table}"));
    // NAME SCHEDULE (may hold spaces) PHASE NEXT RUN RUNS SUCCESS LAST
    let fields: Vec<&str> = row.split_whitespace().collect();
    fields[fields.len() - 3].parse().unwrap()
}

// The receiver answers while the test thread waits for processes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sqlite_history_survives_kill_9_with_its_counts() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let receiver = Receiver::start(Behavior::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("kept.yaml");
    std::fs::write(
        &manifest,
        task("kept", "{interval: 1s}", &receiver.url("/kept"), ""),
    )
    .unwrap();
    let history = format!("sqlite:{}", dir.path().join("history.db").display());
    let extra = ["--history", history.as_str()];

    let mut first = Standalone::start_with(&manifest, dir.path(), &extra, &[]);
    eventually("three runs", || async {
        (calls(&receiver, "kept") >= 3).then_some(())
    })
    .await;
    first.kill();
    let before = calls(&receiver, "kept") as u64;
    let recorded = runs_in_history(&history, "kept");
    // Every finished run was written before the kill; one may have been in flight.
    assert!(
        recorded + 1 >= before && recorded <= before,
        "{recorded} of {before}"
    );

    let mut second = Standalone::start_with(&manifest, dir.path(), &extra, &[]);
    eventually("three more runs", || async {
        (calls(&receiver, "kept") as u64 >= before + 3).then_some(())
    })
    .await;
    assert!(second.terminate().success(), "{}", second.logs());
    let after = calls(&receiver, "kept") as u64;
    let total = runs_in_history(&history, "kept");
    assert!(
        total + 1 >= after && total <= after,
        "{total} recorded, {after} received"
    );
    // The restart resumed after the last recorded run: no instant was sent twice.
    let mut keys: Vec<String> = receiver
        .hits()
        .into_iter()
        .map(|h| h.idempotency_key)
        .collect();
    let received = keys.len();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), received, "an instant ran twice");
}

/// A manifest is read again only when its modification time or size changed: rewritten with
/// the same size and its old modification time put back, it is not read (the task keeps
/// calling the old path); touched, it is.
#[tokio::test]
async fn a_manifest_is_read_again_only_when_its_time_or_size_changed() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let receiver = Receiver::start(Behavior::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let manifests = dir.path().join("tasks");
    std::fs::create_dir(&manifests).unwrap();
    let file = manifests.join("a.yaml");
    let schedule = "{interval: 1s}";
    std::fs::write(&file, task("a", schedule, &receiver.url("/old"), "")).unwrap();
    let _standalone = Standalone::start(&manifests, dir.path());
    let path_called = |path: &'static str| {
        let receiver = &receiver;
        async move { receiver.hits().iter().any(|h| h.path == path).then_some(()) }
    };
    eventually("a call to /old", || path_called("/old")).await;

    let modified = std::fs::metadata(&file).unwrap().modified().unwrap();
    std::fs::write(&file, task("a", schedule, &receiver.url("/new"), "")).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&file)
        .unwrap()
        .set_modified(modified)
        .unwrap();
    let before = receiver.count();
    eventually("three more calls", || async {
        (receiver.count() >= before + 3).then_some(())
    })
    .await;
    assert!(
        path_called("/new").await.is_none(),
        "an unchanged modification time and size were read again"
    );

    std::fs::File::options()
        .write(true)
        .open(&file)
        .unwrap()
        .set_modified(std::time::SystemTime::now())
        .unwrap();
    eventually("a call to /new once touched", || path_called("/new")).await;
}
