//! Test environment shared by every test that needs a cluster: one real etcd + kube-apiserver
//! and one redis-server per test run (started by `scripts/control-plane`, the same script
//! `scripts/dev-cluster` uses), the ChronTask CRD installed, a namespace per test.
//!
//! The processes are stopped by the script's watchdog as soon as this test process exits,
//! whether the run passed, failed or was interrupted.

#![allow(dead_code)] // each test binary uses a different part of this module

pub mod delay_proxy;
pub mod receiver;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{ObjectMeta, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};

/// Where the repository is (scripts, CRD, samples).
pub fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A generous bound for anything the cluster does; `CHRONFLOW_TEST_TIMEOUT` (seconds) raises it
/// on slow machines. Tests wait on conditions up to this bound, never for a fixed time.
pub fn timeout() -> Duration {
    let secs = std::env::var("CHRONFLOW_TEST_TIMEOUT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    Duration::from_secs(secs)
}

/// One at a time: held by the test that loads the whole machine (the fault storm: its own
/// control plane, replicas killed and restarted) and by those that assert on start lag, so the
/// storm's load never turns into another test's missed deadline.
pub async fn machine_to_myself() -> tokio::sync::MutexGuard<'static, ()> {
    static MACHINE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    MACHINE.lock().await
}

/// The running control plane and Redis of this test run.
pub struct TestEnv {
    pub dir: PathBuf,
    pub kubeconfig: PathBuf,
    /// Directory of the cached kubectl, kube-apiserver and etcd.
    pub bin_dir: PathBuf,
    pub redis_url: String,
}

/// Starts the control plane on first use; later calls (from any test thread) share it.
pub fn test_env() -> &'static TestEnv {
    static ENV: OnceLock<Result<TestEnv, String>> = OnceLock::new();
    match ENV.get_or_init(start) {
        Ok(env) => env,
        Err(error) => panic!("test environment unavailable: {error}"),
    }
}

fn start() -> Result<TestEnv, String> {
    start_in("control-plane", true)
}

/// A control plane with the Job tier (kube-controller-manager, kube-scheduler, kwok's fake
/// node), started on first use and shared by the Job tests of this test binary.
pub fn job_env() -> &'static TestEnv {
    static ENV: OnceLock<OwnControlPlane> = OnceLock::new();
    &ENV.get_or_init(|| OwnControlPlane::start_with_jobs("jobs"))
        .0
}

/// The seed node of a 3-master Redis Cluster on loopback (`scripts/redis-cluster`), started once
/// per test binary and stopped with it.
pub fn redis_cluster_url() -> String {
    static URL: OnceLock<Result<String, String>> = OnceLock::new();
    let url = URL.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("redis-cluster-{}", std::process::id()));
        run(Command::new(repo_root().join("scripts/redis-cluster"))
            .arg("up")
            .arg(&dir)
            .arg("--watch-pid")
            .arg(std::process::id().to_string()))?;
        std::fs::read_to_string(dir.join("redis-url"))
            .map(|url| url.trim().to_string())
            .map_err(|e| format!("reading redis-url: {e}"))
    });
    match url {
        Ok(url) => url.clone(),
        Err(error) => panic!("Redis Cluster unavailable: {error}"),
    }
}

/// A control plane of one test's own, for faults that would disturb the shared one (an
/// apiserver restart); stopped when dropped.
pub struct OwnControlPlane(pub TestEnv);

impl OwnControlPlane {
    pub fn start(name: &str) -> OwnControlPlane {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        match start_in(&format!("{name}-{n}"), true) {
            Ok(env) => OwnControlPlane(env),
            Err(error) => panic!("control plane unavailable: {error}"),
        }
    }

    /// One with the Job tier: kube-controller-manager, kube-scheduler and kwok's fake node (a
    /// Job's Pod runs, then Succeeded, or Failed with the label `chronflowfail: "true"`).
    pub fn start_with_jobs(name: &str) -> OwnControlPlane {
        let plane = OwnControlPlane::start(name);
        let script = repo_root().join("scripts/control-plane");
        run(Command::new(script).arg("jobs").arg(&plane.0.dir)).expect("the Job tier starts");
        plane
    }

    /// One without the ChronTask CRD, as a cluster is before chronflow is installed.
    pub fn start_empty(name: &str) -> OwnControlPlane {
        match start_in(name, false) {
            Ok(env) => OwnControlPlane(env),
            Err(error) => panic!("control plane unavailable: {error}"),
        }
    }

    /// Stops kube-apiserver gracefully and starts it again on the same port (etcd keeps
    /// everything); returns once it is ready.
    pub fn restart_apiserver(&self) {
        let script = repo_root().join("scripts/control-plane");
        run(Command::new(script)
            .arg("restart-apiserver")
            .arg(&self.0.dir))
        .expect("kube-apiserver restarts");
    }
}

impl Drop for OwnControlPlane {
    fn drop(&mut self) {
        let script = repo_root().join("scripts/control-plane");
        let _ = Command::new(script).arg("down").arg(&self.0.dir).output();
    }
}

/// Starts a control plane in a directory of its own under the test run's, with the CRD if
/// `crd`.
fn start_in(name: &str, crd: bool) -> Result<TestEnv, String> {
    let bin_dir = match std::env::var_os("CHRONFLOW_TEST_BIN_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let out = run(Command::new(repo_root().join("scripts/test-deps")).arg("--bin-dir"))?;
            PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
        }
    };
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}", std::process::id()));
    run(Command::new(repo_root().join("scripts/control-plane"))
        .arg("up")
        .arg(&dir)
        .arg("--watch-pid")
        .arg(std::process::id().to_string()))?;
    let env = TestEnv {
        kubeconfig: dir.join("kubeconfig"),
        redis_url: std::fs::read_to_string(dir.join("redis-url"))
            .map_err(|e| format!("reading redis-url: {e}"))?
            .trim()
            .to_string(),
        bin_dir,
        dir,
    };
    if !crd {
        return Ok(env);
    }
    let crd = repo_root().join("crds/chronflow.io_chrontasks.yaml");
    run(env
        .kubectl_command()
        .args(["apply", "--server-side", "-f"])
        .arg(&crd))?;
    // Right after the apply, `kubectl wait` can fail on a CRD whose status has no conditions
    // yet ("accessor error: <nil>") instead of waiting: ask again until the bound.
    let deadline = std::time::Instant::now() + timeout();
    loop {
        let waited = run(env.kubectl_command().args([
            "wait",
            "--for=condition=Established",
            "crd/chrontasks.chronflow.io",
            &format!("--timeout={}s", timeout().as_secs()),
        ]));
        match waited {
            Ok(_) => return Ok(env),
            Err(error) if std::time::Instant::now() >= deadline => return Err(error),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

fn run(command: &mut Command) -> Result<Output, String> {
    let out = command.output().map_err(|e| format!("{command:?}: {e}"))?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(format!(
            "{command:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

impl TestEnv {
    /// The real kubectl, built for these tests, pointed at this control plane.
    pub fn kubectl_command(&self) -> Command {
        let mut command = Command::new(self.bin_dir.join("kubectl"));
        command.env("KUBECONFIG", &self.kubeconfig);
        command
    }

    /// Runs kubectl and returns its output, whatever its exit status.
    pub fn kubectl(&self, args: &[&str]) -> Output {
        self.kubectl_command()
            .args(args)
            .output()
            .expect("kubectl runs")
    }

    /// A client with admin rights. Each test makes its own: a client's connections belong to
    /// the runtime of the test that made it.
    pub async fn client(&self) -> Client {
        Client::try_from(self.config().await).expect("client builds")
    }

    /// The admin client configuration (tests point it elsewhere, e.g. through a proxy).
    pub async fn config(&self) -> Config {
        let kubeconfig = Kubeconfig::read_from(&self.kubeconfig).expect("kubeconfig is readable");
        Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .expect("kubeconfig is valid")
    }
}

/// A client that acts as `user` (impersonated by the admin), with only the rights granted to
/// that name.
pub async fn client_as(user: &str) -> Client {
    let mut config = test_env().config().await;
    config.auth_info.impersonate = Some(user.to_string());
    Client::try_from(config).expect("client builds")
}

/// Grants `user` in `ns` a Role named `name` with `rules`: (API group, resources, verbs).
pub async fn grant(admin: &Client, ns: &str, user: &str, name: &str, rules: &[Rule<'_>]) {
    use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
    let strings = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let meta = ObjectMeta {
        name: Some(name.into()),
        namespace: Some(ns.into()),
        ..Default::default()
    };
    let role = Role {
        metadata: meta.clone(),
        rules: Some(
            rules
                .iter()
                .map(|(group, resources, verbs)| PolicyRule {
                    api_groups: Some(vec![group.to_string()]),
                    resources: Some(strings(resources)),
                    verbs: strings(verbs),
                    ..Default::default()
                })
                .collect(),
        ),
    };
    let binding = RoleBinding {
        metadata: meta,
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "Role".into(),
            name: name.into(),
        },
        subjects: Some(vec![Subject {
            kind: "User".into(),
            name: user.into(),
            api_group: Some("rbac.authorization.k8s.io".into()),
            ..Default::default()
        }]),
    };
    let params = PostParams::default();
    Api::<Role>::namespaced(admin.clone(), ns)
        .create(&params, &role)
        .await
        .expect("the Role is created");
    Api::<RoleBinding>::namespaced(admin.clone(), ns)
        .create(&params, &binding)
        .await
        .expect("the RoleBinding is created");
}

/// One rule of a Role: API group, resources, verbs.
pub type Rule<'a> = (&'a str, &'a [&'a str], &'a [&'a str]);

/// A fresh namespace for one test, so tests never see each other's objects.
pub async fn namespace(client: &Client, prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let name = format!(
        "{prefix}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            ..Default::default()
        },
        ..Default::default()
    };
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .expect("namespace is created");
    name
}

/// Waits until `check` returns `Some`, polling every 100 ms up to [`timeout`].
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {:?} waiting for {what}",
            timeout()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
