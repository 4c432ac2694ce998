//! Every configuration key has an effect: for the keys no other test exercises, the operator
//! runs with the key changed and the test observes the difference. `docs/configuration.md`
//! names, for every key, the test that shows its effect (checked by `tests/config.rs`).

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use chronflow::ChronTask;
use chronflow::config::RedisConfig;
use chronflow::leader::Term;
use chronflow::ledger::{Ledger, RedisLedger, RedisSettings, Verdict};
use chronflow::run::{RunId, TaskId, TaskKey};
use chrono::{TimeZone, Utc};
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use serde_json::json;

use crate::observability::{free_address, get, sample};
use crate::operator::{Operator, chrontask, create, setup, status_where};
use crate::support::receiver::{Behavior, Receiver};
use crate::support::{eventually, test_env};

fn every_second(url: &str) -> serde_json::Value {
    json!({
        "schedule": {"cron": "* * * * * *"},
        "concurrencyPolicy": "Allow",
        "timeout": "5s",
        "action": {"http": {"url": url, "method": "POST"}},
    })
}

/// Status writes (MODIFIED events of ChronTasks in `ns`) seen during `window`.
async fn status_writes(api: &Api<ChronTask>, window: Duration) -> usize {
    let mut events = api
        .watch(&WatchParams::default(), "0")
        .await
        .expect("watch starts")
        .boxed();
    let mut writes = 0;
    let _ = tokio::time::timeout(window, async {
        while let Some(event) = events.next().await {
            if let Ok(WatchEvent::Modified(_)) = event {
                writes += 1;
            }
        }
    })
    .await;
    writes
}

#[tokio::test]
async fn max_workers_bounds_the_runs_in_flight() {
    let s = setup("key-workers").await;
    let receiver = Receiver::start(Behavior {
        status: 200,
        delay: Duration::from_millis(2500),
    })
    .await;
    let client = test_env().client().await;
    // One namespace: every worker is its share.
    let _operator = Operator::start_with(&s.ns, client, |c| {
        c.max_workers = 3;
        c.limits.max_workers_per_namespace = Some(3);
    })
    .await;
    for name in ["a", "b", "c", "d", "e", "f"] {
        create(&s.api, name, every_second(&receiver.url("/w"))).await;
    }
    eventually("three runs in flight", || async {
        (receiver.max_in_flight() >= 3).then_some(())
    })
    .await;
    // Several rounds of the full pool later, still never more than max_workers.
    eventually("nine calls", || async {
        (receiver.count() >= 9).then_some(())
    })
    .await;
    assert_eq!(receiver.max_in_flight(), 3, "never more than max_workers");
}

#[tokio::test]
async fn queue_size_bounds_the_runs_waiting_and_the_rest_are_missed() {
    let s = setup("key-queue").await;
    let receiver = Receiver::start(Behavior {
        status: 200,
        delay: Duration::from_secs(3),
    })
    .await;
    let client = test_env().client().await;
    let _operator = Operator::start_with(&s.ns, client, |c| {
        c.max_workers = 2;
        c.limits.max_workers_per_namespace = Some(2);
        c.queue_size = 1;
    })
    .await;
    for name in ["a", "b", "c"] {
        create(&s.api, name, every_second(&receiver.url("/q"))).await;
    }
    let status = status_where(&s.api, "c", "runs missed on a full queue", |st| {
        st.recent_runs.iter().any(|r| {
            r.message
                .as_deref()
                .is_some_and(|m| m.contains("queue is full"))
        })
    })
    .await;
    assert!(status.missed_runs > 0);
}

#[tokio::test]
async fn timezone_is_the_zone_of_cron_schedules_without_one() {
    let s = setup("key-zone").await;
    let client = test_env().client().await;
    let zone = chrono_tz::Pacific::Kiritimati; // UTC+14: its midnight is 10:00 UTC the day before
    let _operator = Operator::start_with(&s.ns, client, |c| c.timezone = zone).await;
    let spec = json!({
        "schedule": {"cron": "0 0 0 * * *"},
        "action": {"http": {"url": "http://127.0.0.1:9/", "method": "POST"}},
    });
    create(&s.api, "midnight", spec).await;
    let status = status_where(&s.api, "midnight", "the next run", |st| {
        st.next_run_time.is_some()
    })
    .await;
    let next = status.next_run_time.unwrap();
    let local = next.with_timezone(&zone);
    assert_eq!(local.format("%H:%M:%S").to_string(), "00:00:00", "{next}");
    assert!(next > Utc::now() && next - Utc::now() <= chrono::Duration::days(1));
}

#[tokio::test]
async fn status_flush_interval_spaces_each_task_s_writes() {
    let s = setup("key-flush").await;
    let receiver = Receiver::start(Behavior::default()).await;
    let client = test_env().client().await;
    let _operator = Operator::start_with(&s.ns, client, |c| {
        c.status.flush_interval = Duration::from_secs(3);
    })
    .await;
    create(&s.api, "steady", every_second(&receiver.url("/f"))).await;
    status_where(&s.api, "steady", "a first run", |st| st.total_runs > 0).await;
    // A run every second, but at most one write every 3 s.
    let writes = status_writes(&s.api, Duration::from_secs(9)).await;
    assert!(
        (1..=4).contains(&writes),
        "{writes} status writes in 9 s with flush_interval 3s"
    );
}

#[tokio::test]
async fn status_max_writes_per_second_is_a_budget_over_all_tasks() {
    let s = setup("key-budget").await;
    let receiver = Receiver::start(Behavior::default()).await;
    let client = test_env().client().await;
    let _operator = Operator::start_with(&s.ns, client, |c| {
        c.status.max_writes_per_second = 1;
    })
    .await;
    for name in ["a", "b", "c", "d", "e", "f"] {
        create(&s.api, name, every_second(&receiver.url("/b"))).await;
    }
    eventually("runs", || async { (receiver.count() >= 12).then_some(()) }).await;
    // Six tasks changing every second: 36 writes in 6 s unbudgeted; the budget allows 6.
    let writes = status_writes(&s.api, Duration::from_secs(6)).await;
    assert!(
        writes <= 8,
        "{writes} status writes in 6 s with max_writes_per_second 1"
    );
}

#[tokio::test]
async fn metrics_per_task_false_leaves_the_task_labels_empty() {
    let s = setup("key-per-task").await;
    let receiver = Receiver::start(Behavior::default()).await;
    let address = free_address();
    let client = test_env().client().await;
    let _operator = Operator::start_with(&s.ns, client, |c| {
        c.metrics.bind = address;
        c.metrics.per_task = false;
    })
    .await;
    create(&s.api, "anonymous", every_second(&receiver.url("/m"))).await;
    let text = eventually("a run in /metrics", || async {
        let (_, text) = get(address, "/metrics").await?;
        let labels = [("namespace", ""), ("task", ""), ("outcome", "succeeded")];
        sample(&text, "chronflow_runs_total", &labels).map(|_| text)
    })
    .await;
    assert!(
        !text.contains(&format!("namespace=\"{}\"", s.ns)),
        "no series names the task's namespace:\n{text}"
    );
}

#[tokio::test]
async fn leader_election_with_the_memory_backend_holds_the_configured_lease() {
    let s = setup("key-lease").await;
    let receiver = Receiver::start(Behavior::default()).await;
    let client = test_env().client().await;
    let ns = s.ns.clone();
    let _operator = Operator::start_with(&s.ns, client.clone(), |c| {
        c.leader_election.enabled = true;
        c.leader_election.sharding = false;
        c.leader_election.lease_name = "my-chronflow".into();
        c.leader_election.lease_namespace = Some(chronflow::config::Namespace::new(ns).unwrap());
        c.leader_election.lease_duration = Duration::from_secs(4);
        c.leader_election.renew_deadline = Duration::from_secs(3);
        c.leader_election.retry_period = Duration::from_millis(500);
    })
    .await;
    let leases: Api<Lease> = Api::namespaced(client, &s.ns);
    let lease = eventually("the Lease", || async {
        leases.get_opt("my-chronflow").await.ok().flatten()
    })
    .await;
    let spec = lease.spec.unwrap();
    assert_eq!(spec.lease_duration_seconds, Some(4));
    assert!(spec.holder_identity.is_some_and(|h| !h.is_empty()));
    // The leader fires.
    create(&s.api, "led", every_second(&receiver.url("/l"))).await;
    eventually("a run", || async { (receiver.count() > 0).then_some(()) }).await;
}

/// A redis-server with a password, on a free port; stopped when dropped.
struct PasswordRedis(Child);

impl Drop for PasswordRedis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn redis_host_port_db_password_and_password_file_make_the_connection() {
    let port = free_address().port();
    let password = "p@ss:w/rd 1";
    let child = Command::new("redis-server")
        .args([
            "--bind",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--save",
            "",
        ])
        .args(["--requirepass", password])
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-server runs");
    let _redis = PasswordRedis(child);
    let config = |password: &str| RedisConfig {
        host: "127.0.0.1".into(),
        port,
        db: 5,
        password: Some(chronflow::config::Secret::new(password)),
        ..RedisConfig::default()
    };
    let run = RunId::new(
        &TaskId::new(TaskKey::new("keys", "t"), "uid"),
        Utc.timestamp_opt(0, 0).unwrap(),
    );
    let term = Term::single("test");
    let ledger = RedisLedger::new(&RedisSettings::from_config(&config(password)).unwrap()).unwrap();
    let claimed = eventually("redis-server to answer", || async {
        ledger.claim(&run, &term).await.ok()
    })
    .await;
    assert_eq!(claimed, Verdict::Accepted);
    // The keys went to database 5.
    let url = format!("redis://:{}@127.0.0.1:{port}/5", "p%40ss%3Aw%2Frd%201");
    let mut probe = redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("chronflow:*")
        .query_async(&mut probe)
        .await
        .unwrap();
    assert!(!keys.is_empty(), "no ledger keys in database 5");
    // The same password from a file (a mounted Secret, with its trailing newline).
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("password");
    std::fs::write(&file, format!("{password}\n")).unwrap();
    let from_file = RedisConfig {
        password: None,
        password_file: Some(file),
        ..config("ignored")
    };
    let ledger = RedisLedger::new(&RedisSettings::from_config(&from_file).unwrap()).unwrap();
    let other = RunId::new(
        &TaskId::new(TaskKey::new("keys", "t"), "uid"),
        Utc.timestamp_opt(1, 0).unwrap(),
    );
    assert_eq!(
        ledger.claim(&other, &term).await.unwrap(),
        Verdict::Accepted
    );
    // A wrong password is an error, not a hang.
    let wrong = RedisLedger::new(&RedisSettings::from_config(&config("nope")).unwrap()).unwrap();
    let error = wrong.claim(&run, &term).await.unwrap_err();
    assert!(error.0.starts_with("redis: "), "{error}");
}

/// `openssl` in `dir`: a CA (`ca.crt`), and a certificate for 127.0.0.1 it signs
/// (`server.crt`, `server.key`).
fn certificates(dir: &std::path::Path) {
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=chronflow test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
    ]);
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    ]);
    std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        "san.ext",
        "-out",
        "server.crt",
    ]);
}

#[tokio::test]
async fn redis_ca_file_trusts_a_private_ca_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    certificates(dir.path());
    let path = |name: &str| dir.path().join(name).display().to_string();
    let port = free_address().port();
    let child = Command::new("redis-server")
        .args(["--bind", "127.0.0.1", "--port", "0", "--save", ""])
        .args(["--tls-port", &port.to_string(), "--tls-auth-clients", "no"])
        .args([
            "--tls-cert-file",
            &path("server.crt"),
            "--tls-key-file",
            &path("server.key"),
        ])
        .args(["--tls-ca-cert-file", &path("ca.crt")])
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-server runs");
    let _redis = PasswordRedis(child);
    let url = format!("rediss://127.0.0.1:{port}/0");
    let settings = |ca: Option<String>| {
        let mut env = vec![("SCHEDULER__REDIS__URL".to_string(), url.clone())];
        env.extend(ca.map(|ca| ("SCHEDULER__REDIS__CA_FILE".to_string(), ca)));
        let config = chronflow::config::OperatorConfig::load_from(None, env).unwrap();
        RedisSettings::from_config(&config.redis).unwrap()
    };
    let run = RunId::new(
        &TaskId::new(TaskKey::new("tls", "t"), "uid"),
        Utc.timestamp_opt(0, 0).unwrap(),
    );
    let term = Term::single("test");
    let trusting = RedisLedger::new(&settings(Some(path("ca.crt")))).unwrap();
    let claimed = eventually("redis-server to answer over TLS", || async {
        trusting.claim(&run, &term).await.ok()
    })
    .await;
    assert_eq!(claimed, Verdict::Accepted);
    // Without the CA, the server's certificate is not trusted.
    let doubting = RedisLedger::new(&settings(None)).unwrap();
    let error = doubting.claim(&run, &term).await.unwrap_err();
    assert!(error.0.starts_with("redis: "), "{error}");
}

/// Only the tasks `metrics.per_task_selector` selects get their own series, as their labels say
/// now; a deleted task's series go.
#[tokio::test]
async fn metrics_per_task_selector_names_only_the_selected_tasks_and_deletion_drops_them() {
    let s = setup("key-selector").await;
    let receiver = Receiver::start(Behavior::default()).await;
    let address = free_address();
    let client = test_env().client().await;
    let _operator = Operator::start_with(&s.ns, client, |c| {
        c.metrics.bind = address;
        c.metrics.per_task_selector =
            Some(chronflow::config::TaskSelector::new("team in (payments)").unwrap());
    })
    .await;
    let labelled = |name: &str, team: &str| {
        let mut task = chrontask(name, every_second(&receiver.url("/m")));
        task.metadata.labels = Some([("team".to_string(), team.to_string())].into());
        task
    };
    for (name, team) in [("billing", "payments"), ("catalog", "shop")] {
        s.api
            .create(&PostParams::default(), &labelled(name, team))
            .await
            .unwrap();
    }
    let succeeded = |task: &'static str| {
        let ns = s.ns.clone();
        move |text: &str| {
            let labels = [
                ("namespace", ns.as_str()),
                ("task", task),
                ("outcome", "succeeded"),
            ];
            sample(text, "chronflow_runs_total", &labels)
        }
    };
    let (billing, catalog) = (succeeded("billing"), succeeded("catalog"));
    let text = eventually("runs of both tasks in /metrics", || async {
        let (_, text) = get(address, "/metrics").await?;
        let anonymous = [("namespace", ""), ("task", ""), ("outcome", "succeeded")];
        (billing(&text).is_some() && sample(&text, "chronflow_runs_total", &anonymous).is_some())
            .then_some(text)
    })
    .await;
    assert_eq!(
        catalog(&text),
        None,
        "an unselected task has no series:\n{text}"
    );

    // Labelled into the selection: from now on it has its own series.
    let patch = json!({"metadata": {"labels": {"team": "payments"}}});
    s.api
        .patch("catalog", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    eventually("the relabelled task's series", || async {
        let (_, text) = get(address, "/metrics").await?;
        catalog(&text)
    })
    .await;

    s.api
        .delete("billing", &DeleteParams::default())
        .await
        .unwrap();
    let text = eventually("the deleted task's series gone", || async {
        let (_, text) = get(address, "/metrics").await?;
        billing(&text).is_none().then_some(text)
    })
    .await;
    assert!(
        !text.contains("task=\"billing\""),
        "no series of the deleted task:\n{text}"
    );
}

/// With `metrics.auth: kubernetes`, `/metrics` answers only a bearer token the apiserver
/// authenticates, of a user allowed `get` on `/metrics`; the probes' paths stay open.
#[tokio::test]
async fn metrics_auth_kubernetes_serves_metrics_only_to_users_allowed_to_get_them() {
    use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
    use k8s_openapi::api::core::v1::ServiceAccount;
    use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};

    let s = setup("key-metrics-auth").await;
    let address = free_address();
    let client = test_env().client().await;
    let _operator = Operator::start_with(&s.ns, client.clone(), |c| {
        c.metrics.bind = address;
        c.metrics.auth = chronflow::config::MetricsAuth::Kubernetes;
    })
    .await;
    let fetch = |path: &'static str, token: Option<String>| async move {
        let mut request = reqwest::Client::new().get(format!("http://{address}{path}"));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.ok()?;
        Some((response.status().as_u16(), response.text().await.ok()?))
    };
    eventually("ready", || async {
        (fetch("/readyz", None).await?.0 == 200).then_some(())
    })
    .await;
    let fetch = |path: &'static str, token: Option<String>| async move {
        fetch(path, token).await.expect("the endpoint answers")
    };
    assert_eq!(fetch("/healthz", None).await.0, 200);
    assert_eq!(fetch("/stats", None).await.0, 200);
    assert_eq!(fetch("/metrics", None).await.0, 401);
    assert_eq!(fetch("/metrics", Some("not-a-token".into())).await.0, 401);

    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), &s.ns);
    let account: ServiceAccount =
        serde_json::from_value(json!({"metadata": {"name": "scraper"}})).unwrap();
    accounts
        .create(&PostParams::default(), &account)
        .await
        .unwrap();
    let request = TokenRequest {
        spec: TokenRequestSpec::default(),
        ..Default::default()
    };
    let token = accounts
        .create_token_request("scraper", &PostParams::default(), &request)
        .await
        .unwrap()
        .status
        .unwrap()
        .token;
    let (status, body) = fetch("/metrics", Some(token.clone())).await;
    assert_eq!(status, 403, "{body}");
    let user = format!("system:serviceaccount:{}:scraper", s.ns);
    assert!(body.contains(&user), "{body}");

    let name = format!("{}-metrics-reader", s.ns);
    let role: ClusterRole = serde_json::from_value(json!({"metadata": {"name": name},
        "rules": [{"nonResourceURLs": ["/metrics"], "verbs": ["get"]}]}))
    .unwrap();
    Api::<ClusterRole>::all(client.clone())
        .create(&PostParams::default(), &role)
        .await
        .unwrap();
    let binding: ClusterRoleBinding = serde_json::from_value(json!({"metadata": {"name": name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": "scraper", "namespace": s.ns}]}))
    .unwrap();
    Api::<ClusterRoleBinding>::all(client)
        .create(&PostParams::default(), &binding)
        .await
        .unwrap();
    let text = eventually("/metrics for the granted scraper", || async {
        let (status, text) = fetch("/metrics", Some(token.clone())).await;
        (status == 200).then_some(text)
    })
    .await;
    assert!(
        text.contains("# TYPE chronflow_start_lag_seconds histogram"),
        "{text}"
    );
}
