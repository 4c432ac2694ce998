//! Failover (issue #23, part 5): three `chronflow run` replicas (this binary's `chronflow`
//! sub-command, the same library as the real binary) elect a leader through a Lease on a real
//! kube-apiserver (`scripts/control-plane`) and share a real redis-server as their ledger; the
//! leader is killed (-9) several times, a replacement standby joining each time, while tasks due
//! every second call the loopback receiver. Measured: how long until a standby holds the Lease
//! and until the first run arrives after each kill, and the instants lost or run twice.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::measure::now_ns;

const NS: &str = "bench-failover";

/// What the failover run measured.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct FailoverResult {
    pub tasks: usize,
    pub kills: usize,
    pub lease_duration: String,
    pub renew_deadline: String,
    pub retry_period: String,
    /// Per kill: seconds until another replica held the Lease (polled every 100 ms).
    pub lease_taken_s: Vec<f64>,
    /// Per kill: seconds until the receiver got the first call after the kill.
    pub first_run_s: Vec<f64>,
    /// Instants from each task's first to its last received instant that never arrived.
    pub lost: u64,
    /// Calls beyond the first for one (task, instant).
    pub duplicated: u64,
    /// Instants received (distinct), over all tasks.
    pub received: u64,
    /// The largest lag (scheduled → received) of any call, seconds: the longest gap's catch-up.
    pub max_lag_s: f64,
}

pub(crate) struct Plane {
    pub(crate) dir: PathBuf,
    path: String,
    pub(crate) kubeconfig: PathBuf,
    redis_url: String,
}

impl Drop for Plane {
    fn drop(&mut self) {
        let _ = Command::new(repo().join("scripts/control-plane"))
            .arg("down")
            .arg(&self.dir)
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub(crate) fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

impl Plane {
    pub(crate) fn up() -> Result<Plane, String> {
        let dir =
            std::env::temp_dir().join(format!("chronflow-bench-failover-{}", std::process::id()));
        let status = Command::new(repo().join("scripts/control-plane"))
            .arg("up")
            .arg(&dir)
            .args(["--watch-pid", &std::process::id().to_string()])
            .status()
            .map_err(|e| format!("scripts/control-plane: {e}"))?;
        if !status.success() {
            return Err(
                "scripts/control-plane up failed (scripts/test-deps builds what it needs)".into(),
            );
        }
        let env = std::fs::read_to_string(dir.join("env")).map_err(|e| e.to_string())?;
        let bin_dir = env
            .lines()
            .find_map(|l| l.strip_prefix("export PATH=\"")?.strip_suffix(":$PATH\""))
            .ok_or("no PATH in the plane's env")?;
        let path = format!("{bin_dir}:{}", std::env::var("PATH").unwrap_or_default());
        let redis_url = std::fs::read_to_string(dir.join("redis-url"))
            .map_err(|e| e.to_string())?
            .trim()
            .to_string();
        Ok(Plane {
            kubeconfig: dir.join("kubeconfig"),
            dir,
            path,
            redis_url,
        })
    }

    /// A plane with the ChronTask CRD established and the namespace `ns`.
    pub(crate) fn with_crd(ns: &str) -> Result<Plane, String> {
        let plane = Plane::up()?;
        let crds = repo().join("crds");
        plane.kubectl(&["apply", "-f", &crds.to_string_lossy()], None)?;
        let crd = "crd/chrontasks.chronflow.io";
        let established = ["wait", "--for=condition=Established", crd, "--timeout=60s"];
        plane.kubectl(&established, None)?;
        plane.kubectl(&["create", "namespace", ns], None)?;
        Ok(plane)
    }

    pub(crate) fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> Result<String, String> {
        let mut child = Command::new("kubectl")
            .args(args)
            .env("PATH", &self.path)
            .env("KUBECONFIG", &self.kubeconfig)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("kubectl: {e}"))?;
        // Written from a thread: kubectl answers while it reads, and a full stdout pipe would
        // otherwise block both sides.
        let mut input = child.stdin.take().expect("piped");
        let text = stdin.unwrap_or_default().to_string();
        let writer = std::thread::spawn(move || {
            use std::io::Write;
            let _ = input.write_all(text.as_bytes());
        });
        let out = child
            .wait_with_output()
            .map_err(|e| format!("kubectl: {e}"))?;
        let _ = writer.join();
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            Err(format!(
                "kubectl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    fn holder(&self) -> Option<String> {
        self.kubectl(
            &[
                "get",
                "lease",
                "-n",
                NS,
                "chronflow-leader",
                "-o",
                "jsonpath={.spec.holderIdentity}",
            ],
            None,
        )
        .ok()
        .filter(|h| !h.is_empty())
        // `POD_NAME#nonce`: the replica's name is the pod's.
        .map(|h| h.split('#').next().unwrap_or_default().to_string())
    }
}

struct Replica {
    name: String,
    child: Child,
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_replica(plane: &Plane, name: &str, config: &Path) -> Result<Replica, String> {
    let log = plane.dir.join(format!("{name}.log"));
    let child = Command::new(std::env::current_exe().map_err(|e| e.to_string())?)
        .args(["chronflow", "run", "-f"])
        .arg(config)
        .env("KUBECONFIG", &plane.kubeconfig)
        .env("POD_NAME", name)
        .env_remove("RUST_LOG")
        .stdout(std::fs::File::create(&log).map_err(|e| e.to_string())?)
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("a replica: {e}"))?;
    Ok(Replica {
        name: name.to_string(),
        child,
    })
}

fn signal(child: &Child, signal: &str) {
    let _ = Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status();
}

pub(crate) fn wait_for<T>(
    what: &str,
    limit: Duration,
    mut check: impl FnMut() -> Option<T>,
) -> Result<T, String> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = check() {
            return Ok(v);
        }
        if Instant::now() > deadline {
            return Err(format!("no {what} within {} s", limit.as_secs()));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Every call the receiver got: (task, instant ns, arrival ns).
fn hits(receiver: &str) -> Result<Vec<(u32, i64, i64)>, String> {
    let url = format!("{receiver}/hits");
    let body = std::process::Command::new("curl")
        .args(["-sf", &url])
        .output()
        .map_err(|e| format!("curl: {e}"))?;
    Ok(String::from_utf8_lossy(&body.stdout)
        .lines()
        .filter_map(|l| {
            let mut f = l.split(' ').map(|v| v.parse::<i64>().ok());
            Some((f.next()?? as u32, f.next()??, f.next()??))
        })
        .collect())
}

/// The failover run: `tasks` tasks due every second, `kills` leaders killed.
pub fn run(
    tasks: usize,
    kills: usize,
    lease: (&str, &str, &str),
    receiver: &str,
) -> Result<FailoverResult, String> {
    let plane = Plane::with_crd(NS)?;
    let (lease_duration, renew_deadline, retry_period) = lease;
    let config = plane.dir.join("chronflow.yaml");
    std::fs::write(
        &config,
        format!(
            "backend_type: redis\nwatch_namespaces: [{NS}]\nredis:\n  url: {}\n\
             leader_election:\n  enabled: true\n  lease_namespace: {NS}\n  lease_duration: {lease_duration}\n  \
             renew_deadline: {renew_deadline}\n  retry_period: {retry_period}\n\
             metrics:\n  bind: 127.0.0.1:0\nlog:\n  format: json\n  log_task_success: false\n",
            plane.redis_url
        ),
    )
    .map_err(|e| e.to_string())?;
    let mut manifests = String::new();
    for i in 0..tasks {
        let _ = write!(
            manifests,
            "---\napiVersion: chronflow.io/v1alpha1\nkind: ChronTask\nmetadata: {{name: t-{i}, namespace: {NS}}}\n\
             spec:\n  schedule: {{cron: \"* * * * * *\"}}\n  catchUp: All\n  concurrencyPolicy: Allow\n  timeout: 2s\n  \
             action: {{http: {{url: \"{receiver}/t/{i}\", method: POST}}}}\n"
        );
    }
    plane.kubectl(&["apply", "-f", "-"], Some(&manifests))?;

    let mut replicas = Vec::new();
    for i in 0..3 {
        replicas.push(start_replica(&plane, &format!("r{i}"), &config)?);
    }
    let names = |replicas: &[Replica]| replicas.iter().map(|r| r.name.clone()).collect::<Vec<_>>();
    let living = names(&replicas);
    wait_for("leader", Duration::from_secs(60), || {
        plane.holder().filter(|h| living.contains(h))
    })?;
    // Runs flow before the first kill.
    std::thread::sleep(Duration::from_secs(5));

    let mut result = FailoverResult {
        tasks,
        kills,
        lease_duration: lease_duration.into(),
        renew_deadline: renew_deadline.into(),
        retry_period: retry_period.into(),
        ..Default::default()
    };
    let mut kill_times = Vec::new();
    for trial in 0..kills {
        let living = names(&replicas);
        let leader = wait_for("leader", Duration::from_secs(60), || {
            plane.holder().filter(|h| living.contains(h))
        })?;
        let index = replicas
            .iter()
            .position(|r| r.name == leader)
            .expect("a living leader");
        let dead = replicas.remove(index);
        signal(&dead.child, "-KILL");
        let killed = Instant::now();
        kill_times.push(now_ns());
        drop(dead);
        // A replacement joins as a standby, as a Deployment would start one.
        replicas.push(start_replica(&plane, &format!("r{}", trial + 3), &config)?);
        let living = names(&replicas);
        wait_for("new leader", Duration::from_secs(120), || {
            plane
                .holder()
                .filter(|h| living.contains(h) && *h != leader)
        })?;
        result.lease_taken_s.push(killed.elapsed().as_secs_f64());
        eprintln!(
            "failover {}: a standby led {:.1} s after the leader was killed",
            trial + 1,
            killed.elapsed().as_secs_f64()
        );
        // Runs flow again before the next kill.
        std::thread::sleep(Duration::from_secs(5));
    }
    std::thread::sleep(Duration::from_secs(2));
    for replica in &replicas {
        signal(&replica.child, "-TERM");
    }
    for mut replica in replicas {
        let _ = replica.child.wait();
    }

    let hits = hits(receiver)?;
    for &killed in &kill_times {
        if let Some(first) = hits.iter().map(|h| h.2).filter(|&at| at > killed).min() {
            result.first_run_s.push((first - killed) as f64 / 1e9);
        }
    }
    let mut per_task: BTreeMap<u32, BTreeMap<i64, u64>> = BTreeMap::new();
    for &(task, due, at) in &hits {
        *per_task.entry(task).or_default().entry(due).or_default() += 1;
        result.max_lag_s = result.max_lag_s.max((at - due) as f64 / 1e9);
    }
    for instants in per_task.values() {
        let (Some(first), Some(last)) = (instants.keys().next(), instants.keys().last()) else {
            continue;
        };
        let span = (last - first) / 1_000_000_000 + 1;
        result.received += instants.len() as u64;
        result.lost += span as u64 - instants.len() as u64;
        result.duplicated += instants.values().map(|&n| n - 1).sum::<u64>();
    }
    Ok(result)
}

/// Reads the receiver's address from its first line.
pub fn receiver_address(child: &mut Child) -> Result<String, String> {
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    line.trim()
        .strip_prefix("LISTENING ")
        .map(|a| format!("http://{a}"))
        .ok_or_else(|| format!("the receiver said {line:?}"))
}
