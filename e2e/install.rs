//! The install a cluster user does, end to end, on a real control plane with no chronflow in it:
//! `helm lint`, `helm install chronflow charts/chronflow`, then the operator's release binary
//! (built as the Dockerfile builds it) run as the chart's ServiceAccount with the configuration
//! the chart rendered — no kubelet runs Pods here — proving the chart's RBAC suffices, and
//! `kubectl auth can-i` proving it is no more; then kubectl as a user types it, `helm upgrade`
//! rolling the configuration, and `helm uninstall` leaving the CRD and the ChronTasks.

#[path = "../tests/support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Instant;

use support::receiver::{Behavior, Receiver};
use support::{OwnControlPlane, TestEnv, eventually, repo_root};

const NS: &str = "chronflow-system";
const SA: &str = "system:serviceaccount:chronflow-system:chronflow";

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Runs a command to success and returns its stdout.
fn ok(command: &mut Command) -> String {
    let output = command.output().expect("the command runs");
    assert!(output.status.success(), "{command:?}: {}", text(&output));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn helm(env: &TestEnv) -> Command {
    let mut command = Command::new(env.bin_dir.join("helm"));
    command
        .env("KUBECONFIG", &env.kubeconfig)
        .env("HELM_CACHE_HOME", env.dir.join("helm/cache"))
        .env("HELM_CONFIG_HOME", env.dir.join("helm/config"))
        .env("HELM_DATA_HOME", env.dir.join("helm/data"));
    command
}

fn kubectl(env: &TestEnv, args: &[&str]) -> String {
    ok(env.kubectl_command().args(args))
}

/// The optimized binary: the one `scripts/test` built before `cargo test` (`cargo bench --no-run`)
/// (`CHRONFLOW_RELEASE_BIN`, the release profile's settings, the benchmark's build), else one
/// built here in a target directory of its own (the one running this test is locked by the
/// `cargo test` that runs it).
fn release_binary() -> PathBuf {
    if let Some(built) = std::env::var_os("CHRONFLOW_RELEASE_BIN").map(PathBuf::from) {
        assert!(
            built.is_file(),
            "CHRONFLOW_RELEASE_BIN: no file at {built:?}"
        );
        return built;
    }
    let target = Path::new(env!("CARGO_TARGET_TMPDIR")).join("e2e-release");
    ok(Command::new(env!("CARGO"))
        .args(["build", "--release", "--locked", "--bin", "chronflow"])
        .env("CARGO_TARGET_DIR", &target)
        .current_dir(repo_root()));
    target.join("release/chronflow")
}

/// The admin kubeconfig, acting as the chart's ServiceAccount.
fn as_service_account(env: &TestEnv) -> PathBuf {
    let mut config: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(&env.kubeconfig).unwrap()).unwrap();
    for user in config["users"].as_sequence_mut().unwrap() {
        user["user"]["as"] = SA.into();
    }
    let path = env.dir.join("kubeconfig-chronflow-sa");
    std::fs::write(&path, serde_yaml::to_string(&config).unwrap()).unwrap();
    path
}

fn can_i(env: &TestEnv, args: &[&str]) -> bool {
    let output = env
        .kubectl_command()
        .args(["auth", "can-i", "--as", SA])
        .args(args)
        .output()
        .unwrap();
    String::from_utf8_lossy(&output.stdout).trim() == "yes"
}

struct Operator(Child);

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn task_manifest(url: &str) -> String {
    format!(
        "apiVersion: chronflow.io/v1alpha1\nkind: ChronTask\nmetadata:\n  name: every-second\n  \
         namespace: shop\nspec:\n  schedule:\n    cron: \"* * * * * *\"\n  timeout: 2s\n  \
         action:\n    http:\n      url: {url}\n      method: GET\n"
    )
}

#[tokio::test]
async fn helm_install_then_kubectl_as_a_user_would() {
    let started = Instant::now();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let plane = OwnControlPlane::start_empty("e2e");
    let env = &plane.0;
    let chart = repo_root().join("charts/chronflow");
    let binary = release_binary();

    let lint = ok(helm(env).arg("lint").arg(&chart));
    assert!(
        !lint.contains("[WARNING]") && !lint.contains("[ERROR]"),
        "{lint}"
    );
    renders_each_option(env);
    // The chart refuses HA without Redis, saying why.
    let ha = helm(env)
        .args(["template", "chronflow"])
        .arg(&chart)
        .args(["--set", "replicaCount=2"])
        .output()
        .unwrap();
    assert!(!ha.status.success());
    assert!(text(&ha).contains("HA needs Redis"), "{}", text(&ha));

    ok(helm(env)
        .args(["install", "chronflow"])
        .arg(&chart)
        .args(["-n", NS, "--create-namespace"])
        .args(["--set", "apiPriority.enabled=true"]));
    kubectl(env, &["get", "crd", "chrontasks.chronflow.io"]);

    // What the ServiceAccount may do, and may not.
    for allowed in [
        &["list", "chrontasks.chronflow.io", "--all-namespaces"][..],
        &["watch", "chrontasks.chronflow.io", "--all-namespaces"],
        &[
            "patch",
            "chrontasks.chronflow.io",
            "--subresource=status",
            "-n",
            "shop",
        ],
        &["create", "events.events.k8s.io", "-n", "shop"],
        &["get", "secrets", "-n", "shop"],
        &["get", "configmaps", "-n", "shop"],
        &["update", "leases.coordination.k8s.io", "-n", NS],
        // Each replica's member Lease: listed with the others', deleted at a stop.
        &["list", "leases.coordination.k8s.io", "-n", NS],
        &["watch", "leases.coordination.k8s.io", "-n", NS],
        &["delete", "leases.coordination.k8s.io", "-n", NS],
        // config.metrics.auth: kubernetes, the chart's default.
        &["create", "tokenreviews.authentication.k8s.io"],
        &["create", "subjectaccessreviews.authorization.k8s.io"],
    ] {
        assert!(can_i(env, allowed), "the operator needs {allowed:?}");
    }
    for denied in [
        &["list", "secrets", "--all-namespaces"][..],
        &["watch", "secrets", "-n", "shop"],
        &["list", "configmaps", "-n", "shop"],
        &["update", "chrontasks.chronflow.io", "-n", "shop"],
        &["patch", "chrontasks.chronflow.io", "-n", "shop"],
        &["delete", "chrontasks.chronflow.io", "-n", "shop"],
        &["create", "pods", "-n", "shop"],
        &["create", "jobs.batch", "-n", "shop"],
        &["update", "leases.coordination.k8s.io", "-n", "shop"],
        &["create", "clusterrolebindings"],
    ] {
        assert!(!can_i(env, denied), "the operator must not {denied:?}");
    }

    // The operator, as the Pod would run it: the chart's ConfigMap, the ServiceAccount's rights.
    let rendered = kubectl(
        env,
        &[
            "get",
            "configmap",
            "chronflow",
            "-n",
            NS,
            "-o",
            "jsonpath={.data.chronflow\\.yaml}",
        ],
    );
    let config = env.dir.join("chronflow.yaml");
    std::fs::write(&config, rendered).unwrap();
    let metrics = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let log = env.dir.join("operator.log");
    let operator = Operator(
        Command::new(&binary)
            .args(["run", "-f"])
            .arg(&config)
            .env("KUBECONFIG", as_service_account(env))
            .env("POD_NAME", "chronflow-e2e")
            .env("POD_NAMESPACE", NS)
            .env("SCHEDULER__METRICS__BIND", metrics.to_string())
            .env_remove("RUST_LOG")
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let logs = || std::fs::read_to_string(&log).unwrap_or_default();
    let client = reqwest::Client::new();
    eventually("the operator ready", || async {
        let url = format!("http://{metrics}/readyz");
        let response = client.get(url).send().await.ok()?;
        response.status().is_success().then_some(())
    })
    .await;
    // The chart's /metrics answers only a token the apiserver accepts.
    let anonymous = client.get(format!("http://{metrics}/metrics")).send();
    assert_eq!(anonymous.await.unwrap().status().as_u16(), 401);

    // The card's flows, with the real kubectl.
    let receiver = Receiver::start(Behavior::default()).await;
    kubectl(env, &["create", "namespace", "shop"]);
    let manifest = env.dir.join("every-second.yaml");
    std::fs::write(&manifest, task_manifest(&receiver.url("/every-second"))).unwrap();
    kubectl(env, &["apply", "-f", manifest.to_str().unwrap()]);
    let row = eventually("runs and a success rate in kubectl get", || async {
        let out = kubectl(env, &["get", "chrontasks", "-n", "shop", "--no-headers"]);
        // NAME SCHEDULE (with spaces) PAUSED PHASE LAST-RUN NEXT-RUN RUNS SUCCESS AGE
        let mut fields = out.split_whitespace().rev().skip(1);
        let success = fields.next()?;
        let runs: u64 = fields.next()?.parse().ok()?;
        (runs >= 2 && success == "100.0%").then_some(out)
    })
    .await;
    assert!(row.starts_with("every-second"), "{row}");
    // apiPriority.enabled: the apiserver classified the status writes by the chart's FlowSchema.
    let classified = kubectl(env, &["get", "--raw", "/metrics"])
        .lines()
        .filter(|l| l.starts_with("apiserver_flowcontrol_dispatched_requests_total{"))
        .filter(|l| l.contains("flow_schema=\"chronflow-status\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>();
    assert!(
        classified >= 1.0,
        "no request matched the chart's FlowSchema"
    );
    kubectl(
        env,
        &[
            "patch",
            "chrontask",
            "every-second",
            "-n",
            "shop",
            "--type",
            "merge",
            "-p",
            r#"{"spec":{"paused":true}}"#,
        ],
    );
    eventually("Paused in kubectl get", || async {
        let phase = kubectl(
            env,
            &[
                "get",
                "chrontask",
                "every-second",
                "-n",
                "shop",
                "-o",
                "jsonpath={.status.phase}",
            ],
        );
        (phase == "Paused").then_some(())
    })
    .await;
    assert!(receiver.count() >= 2);
    assert!(
        !logs().to_lowercase().contains("forbidden"),
        "the ServiceAccount lacked a right:\n{}",
        logs()
    );

    // A changed value rolls the Deployment (its Pod template's checksum).
    let checksum = || {
        kubectl(
            env,
            &[
                "get",
                "deployment",
                "chronflow",
                "-n",
                NS,
                "-o",
                "jsonpath={.spec.template.metadata.annotations.checksum/config}",
            ],
        )
    };
    let before = checksum();
    ok(helm(env).args(["upgrade", "chronflow"]).arg(&chart).args([
        "-n",
        NS,
        "--set",
        "config.max_workers=20",
    ]));
    assert_ne!(
        checksum(),
        before,
        "the configuration change rolls the Pods"
    );

    drop(operator);
    ok(helm(env).args(["uninstall", "chronflow", "-n", NS]));
    kubectl(env, &["get", "crd", "chrontasks.chronflow.io"]);
    kubectl(env, &["get", "chrontask", "every-second", "-n", "shop"]);
    for gone in [
        &["serviceaccount", "chronflow", "-n", NS][..],
        &["configmap", "chronflow", "-n", NS],
        &["deployment", "chronflow", "-n", NS],
        &["clusterrole", "chronflow"],
        &["clusterrolebinding", "chronflow"],
        &["role", "chronflow-leader", "-n", NS],
    ] {
        let output = env
            .kubectl_command()
            .arg("get")
            .args(gone)
            .output()
            .unwrap();
        assert!(!output.status.success(), "{gone:?} left behind");
    }
    eprintln!(
        "e2e: install, RBAC, kubectl flows, upgrade and uninstall in {:?}",
        started.elapsed()
    );
}

/// `helm template` with `values`: the rendered manifests, one YAML document each.
fn render(env: &TestEnv, values: &[&str]) -> Vec<serde_yaml::Value> {
    let mut command = helm(env);
    command
        .args(["template", "chronflow"])
        .arg(repo_root().join("charts/chronflow"))
        .args(["-n", NS]);
    for value in values {
        command.args(["--set", value]);
    }
    let out = ok(&mut command);
    out.split("\n---")
        .filter_map(|doc| serde_yaml::from_str::<serde_yaml::Value>(doc).ok())
        .filter(|doc| doc.get("kind").is_some())
        .collect()
}

fn kinds(docs: &[serde_yaml::Value]) -> Vec<String> {
    docs.iter()
        .map(|doc| {
            let namespace = doc["metadata"]["namespace"].as_str().unwrap_or("");
            format!("{}/{namespace}", doc["kind"].as_str().unwrap())
        })
        .collect()
}

/// What each option adds to the rendered chart.
fn renders_each_option(env: &TestEnv) {
    // No password reaches the ConfigMap that `config:` becomes.
    for (value, says) in [
        (
            "config.redis.password=pw",
            "config.redis.password would be stored in a ConfigMap",
        ),
        (
            "config.redis.url=redis://:pw@r:6379/0",
            "config.redis.url holds a password",
        ),
        (
            "config.http.proxy=http://u:pw@proxy:3128",
            "config.http.proxy holds a password",
        ),
    ] {
        let out = helm(env)
            .args(["template", "chronflow"])
            .arg(repo_root().join("charts/chronflow"))
            .args(["--set", value])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{value} rendered");
        assert!(text(&out).contains(says), "{value}: {}", text(&out));
    }

    let defaults = kinds(&render(env, &[]));
    for expected in [
        "ClusterRole/",
        "ClusterRoleBinding/",
        "Role/chronflow-system",
        "Deployment/chronflow-system",
    ] {
        assert!(defaults.contains(&expected.to_string()), "{defaults:?}");
    }
    assert!(
        !defaults
            .iter()
            .any(|k| k.starts_with("PodDisruptionBudget") || k.starts_with("FlowSchema"))
    );
    let prioritized = kinds(&render(env, &["apiPriority.enabled=true"]));
    for expected in ["FlowSchema/", "PriorityLevelConfiguration/"] {
        assert!(
            prioritized.contains(&expected.to_string()),
            "{prioritized:?}"
        );
    }

    // Watching namespaces: a Role per namespace, no cluster-wide rights (with /metrics open;
    // metrics.auth: kubernetes needs to create TokenReviews and SubjectAccessReviews, which
    // only exist cluster-wide).
    let scoped = kinds(&render(
        env,
        &[
            "config.watch_namespaces={shop,ops}",
            "config.metrics.auth=none",
        ],
    ));
    for expected in [
        "Role/shop",
        "RoleBinding/shop",
        "Role/ops",
        "RoleBinding/ops",
    ] {
        assert!(scoped.contains(&expected.to_string()), "{scoped:?}");
    }
    assert!(
        !scoped.iter().any(|k| k.starts_with("ClusterRole")),
        "{scoped:?}"
    );

    // Rights on Jobs only with the Job action enabled.
    let job_rules = |docs: &[serde_yaml::Value]| {
        docs.iter()
            .filter(|d| d["kind"] == "ClusterRole")
            .flat_map(|d| d["rules"].as_sequence().cloned().unwrap_or_default())
            .filter(|rule| rule["resources"][0] == "jobs")
            .count()
    };
    assert_eq!(job_rules(&render(env, &[])), 0);
    let jobs = render(env, &["config.jobs.enabled=true"]);
    assert_eq!(job_rules(&jobs), 1);
    let config = jobs.iter().find(|d| d["kind"] == "ConfigMap").unwrap();
    let file = config["data"]["chronflow.yaml"].as_str().unwrap();
    let file: serde_yaml::Value = serde_yaml::from_str(file).unwrap();
    assert_eq!(file["jobs"]["enabled"], true, "{file:?}");
    // ... and the admission policy that keeps the Job action no stronger than its author: the
    // same as crds/chronflow-job-policy.yaml for kubectl users.
    let policy_spec = |docs: &[serde_yaml::Value], kind: &str| {
        docs.iter()
            .find(|d| d["kind"] == kind)
            .map(|d| d["spec"].clone())
    };
    let shipped = std::fs::read_to_string(repo_root().join("crds/chronflow-job-policy.yaml"))
        .expect("crds/chronflow-job-policy.yaml");
    let shipped: Vec<serde_yaml::Value> = shipped
        .split("\n---")
        .filter_map(|doc| serde_yaml::from_str(doc).ok())
        .collect();
    for kind in [
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
    ] {
        let rendered = policy_spec(&jobs, kind);
        assert!(rendered.is_some(), "{kind} with config.jobs.enabled");
        assert_eq!(
            rendered,
            policy_spec(&shipped, kind),
            "crds/chronflow-job-policy.yaml differs"
        );
        assert_eq!(
            policy_spec(&render(env, &[]), kind),
            None,
            "{kind} without Jobs"
        );
    }
    let narrowed = render(
        env,
        &[
            "config.jobs.enabled=true",
            "config.jobs.allowed_service_accounts={default,batch}",
        ],
    );
    let allowed = &policy_spec(&narrowed, "ValidatingAdmissionPolicy").unwrap()["variables"][2];
    assert_eq!(allowed["expression"], r#"["default","batch"]"#);

    // HA: a PodDisruptionBudget, the Redis URL from a Secret.
    let ha = render(
        env,
        &[
            "replicaCount=2",
            "config.backend_type=redis",
            "redis.url=redis://:pw@redis:6379/0",
        ],
    );
    assert!(kinds(&ha).contains(&"PodDisruptionBudget/chronflow-system".to_string()));
    let deployment = ha.iter().find(|d| d["kind"] == "Deployment").unwrap();
    let env_vars = &deployment["spec"]["template"]["spec"]["containers"][0]["env"];
    let redis = env_vars
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "SCHEDULER__REDIS__URL")
        .expect("the Redis URL reaches the operator");
    assert_eq!(
        redis["valueFrom"]["secretKeyRef"]["name"],
        "chronflow-redis"
    );

    let extras = kinds(&render(
        env,
        &[
            "serviceMonitor.enabled=true",
            "dashboards.enabled=true",
            "networkPolicy.enabled=true",
        ],
    ));
    for expected in [
        "ServiceMonitor/chronflow-system",
        "NetworkPolicy/chronflow-system",
    ] {
        assert!(extras.contains(&expected.to_string()), "{extras:?}");
    }
    assert!(!defaults.iter().any(|k| k.starts_with("NetworkPolicy")));
    assert!(
        extras.iter().filter(|k| k.starts_with("ConfigMap")).count() == 2,
        "{extras:?}"
    );
}
