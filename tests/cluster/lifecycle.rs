//! Lifecycle races against the real apiserver: many new tasks at once, one-shots at their
//! creation instant, pause or invalid periods spanning an operator restart, a namespaced
//! install, and a final status flush through an apiserver that is briefly unreachable.

use std::time::Duration;

use chronflow::ChronTask;
use chronflow::crd::Phase;
use futures::StreamExt;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;

use crate::observability::{free_address, get};
use crate::operator::{Operator, chrontask, patch_spec, status_where};
use crate::support::delay_proxy::DelayProxy;
use crate::support::receiver::{Behavior, Receiver};
use crate::support::{Rule, client_as, eventually, grant, namespace, test_env};

async fn start(ns: &str, client: Client, grace: Duration) -> Operator {
    Operator::start_with(ns, client, |config| config.shutdown.grace_period = grace).await
}

async fn set_paused(api: &Api<ChronTask>, name: &str, paused: bool) {
    patch_spec(api, name, json!({"paused": paused})).await;
}

#[tokio::test]
async fn every_new_task_shows_its_next_run_and_one_shots_due_at_creation_run_once() {
    let client = test_env().client().await;
    let ns = namespace(&client, "many-new").await;
    let api: Api<ChronTask> = Api::namespaced(client.clone(), &ns);
    let receiver = Receiver::start(Behavior::default()).await;
    let _operator = start(&ns, client.clone(), Duration::from_secs(5)).await;
    // Created while the operator runs: the engine's first fact about each must not be lost.
    let now = chrono::Utc::now();
    futures::stream::iter(0..50)
        .map(|n| {
            let api = api.clone();
            let url = receiver.url(&format!("/once-{n}"));
            async move {
                let yearly = json!({"schedule": {"cron": "0 0 0 1 1 *"},
                                    "action": {"http": {"url": "http://127.0.0.1:9/"}}});
                let once = json!({"schedule": {"at": now.to_rfc3339()},
                                  "action": {"http": {"url": url}}});
                let params = PostParams::default();
                api.create(&params, &chrontask(&format!("yearly-{n}"), yearly))
                    .await
                    .unwrap();
                api.create(&params, &chrontask(&format!("once-{n}"), once))
                    .await
                    .unwrap();
            }
        })
        .buffer_unordered(8)
        .collect::<Vec<()>>()
        .await;
    for n in 0..50 {
        status_where(&api, &format!("yearly-{n}"), "a next run time", |s| {
            s.phase == Some(Phase::Scheduled) && s.next_run_time.is_some()
        })
        .await;
        // Completed as soon as no instant is due: its one run may still wait for a worker.
        let once = status_where(&api, &format!("once-{n}"), "Completed with its run", |s| {
            s.phase == Some(Phase::Completed) && s.active.is_empty() && s.total_runs >= 1
        })
        .await;
        assert_eq!(once.successful_runs, 1, "once-{n}: {once:?}");
    }
    assert_eq!(receiver.count(), 50, "each one-shot ran exactly once");
}

#[tokio::test]
async fn a_pause_or_invalid_period_spanning_a_restart_is_never_replayed() {
    let client = test_env().client().await;
    let ns = namespace(&client, "no-replay").await;
    let api: Api<ChronTask> = Api::namespaced(client.clone(), &ns);
    let receiver = Receiver::start(Behavior::default()).await;
    let params = PostParams::default();
    let every_second =
        |url: String| json!({"schedule": {"interval": "1s"}, "action": {"http": {"url": url}}});
    api.create(
        &params,
        &chrontask("paused", every_second(receiver.url("/paused"))),
    )
    .await
    .unwrap();
    let mut broken = every_second(receiver.url("/fixed"));
    broken["schedule"] = json!({"cron": "61 * * * * *"});
    api.create(&params, &chrontask("fixed", broken))
        .await
        .unwrap();

    let operator = start(&ns, client.clone(), Duration::from_secs(5)).await;
    status_where(&api, "paused", "2 runs", |s| s.successful_runs >= 2).await;
    status_where(&api, "fixed", "Invalid", |s| {
        s.phase == Some(Phase::Invalid)
    })
    .await;
    set_paused(&api, "paused", true).await;
    status_where(&api, "paused", "Paused", |s| {
        s.phase == Some(Phase::Paused) && s.active.is_empty()
    })
    .await;
    operator.stop().await;
    let paused_at = chrono::Utc::now();

    // While chronflow is down, the pause and the invalid spec last a few seconds, then end.
    tokio::time::sleep(Duration::from_secs(4)).await;
    set_paused(&api, "paused", false).await;
    let fix = Patch::Merge(json!({"spec": {"schedule": {"cron": "* * * * * *"}}}));
    api.patch("fixed", &PatchParams::default(), &fix)
        .await
        .unwrap();
    let resumed_at = chrono::Utc::now();

    let _operator = start(&ns, client.clone(), Duration::from_secs(5)).await;
    for name in ["paused", "fixed"] {
        let status = status_where(&api, name, "a run after the restart", |s| {
            s.last_run
                .as_ref()
                .is_some_and(|r| r.scheduled_time > resumed_at)
        })
        .await;
        assert_eq!(status.missed_runs, 0, "{name}: {:?}", status.recent_runs);
    }
    let replayed: Vec<_> = receiver
        .hits()
        .into_iter()
        .filter(|h| h.scheduled > paused_at && h.scheduled < resumed_at)
        .collect();
    assert!(
        replayed.is_empty(),
        "instants from the paused or invalid period ran: {replayed:?}"
    );
}

#[tokio::test]
async fn a_namespaced_install_starts_without_cluster_wide_rights() {
    let admin = test_env().client().await;
    let ns = namespace(&admin, "namespaced").await;
    let user = format!("chronflow-{ns}");
    let rules: [Rule; 3] = [
        ("chronflow.io", &["chrontasks"], &["get", "list", "watch"]),
        ("chronflow.io", &["chrontasks/status"], &["patch"]),
        ("events.k8s.io", &["events"], &["create"]),
    ];
    grant(&admin, &ns, &user, "chronflow", &rules).await;
    let params = PostParams::default();
    let receiver = Receiver::start(Behavior::default()).await;
    let api: Api<ChronTask> = Api::namespaced(admin.clone(), &ns);
    let spec =
        json!({"schedule": {"interval": "1s"}, "action": {"http": {"url": receiver.url("/x")}}});
    api.create(&params, &chrontask("tick", spec)).await.unwrap();

    let operator = start(&ns, client_as(&user).await, Duration::from_secs(5)).await;
    status_where(
        &api,
        "tick",
        "runs counted by the namespaced operator",
        |s| s.successful_runs >= 2,
    )
    .await;
    operator.stop().await;
}

#[tokio::test]
async fn the_final_flush_retries_until_the_apiserver_answers() {
    let client = test_env().client().await;
    let ns = namespace(&client, "final-flush").await;
    let api: Api<ChronTask> = Api::namespaced(client.clone(), &ns);
    let receiver = Receiver::start(Behavior::default()).await;
    let spec =
        json!({"schedule": {"interval": "500ms"}, "action": {"http": {"url": receiver.url("/x")}}});
    api.create(&PostParams::default(), &chrontask("tick", spec))
        .await
        .unwrap();
    let (proxy, through) = DelayProxy::in_front_of_apiserver(Duration::ZERO).await;
    let operator = start(&ns, through, Duration::from_secs(30)).await;
    status_where(&api, "tick", "runs", |s| s.successful_runs >= 3).await;

    // The apiserver stops answering in time (writes time out after 10 s) just as chronflow
    // shuts down, and comes back a little later: the last outcomes still reach status.
    proxy.set_delay(Duration::from_secs(15));
    let stopping = tokio::spawn(operator.stop());
    tokio::time::sleep(Duration::from_secs(3)).await;
    proxy.set_delay(Duration::ZERO);
    stopping.await.unwrap();
    let status = api.get("tick").await.unwrap().status.unwrap_or_default();
    assert_eq!(
        status.total_runs as usize,
        receiver.count(),
        "status counts every run the receiver saw"
    );
}

#[tokio::test]
async fn without_rights_to_list_chrontasks_start_up_stops_with_a_clear_error() {
    let admin = test_env().client().await;
    let ns = namespace(&admin, "no-rights").await;
    let nobody = client_as(&format!("nobody-{ns}")).await;
    let mut settings = chronflow::config::OperatorConfig {
        watch_namespaces: vec![
            chronflow::config::Namespace::new(ns).expect("test namespaces are valid"),
        ],
        ..Default::default()
    };
    settings.metrics.bind = "127.0.0.1:0".parse().unwrap();
    let run =
        chronflow::operator::run(settings, nobody, tokio_util::sync::CancellationToken::new());
    let error = tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("start-up gives up at once")
        .unwrap_err();
    assert!(
        error.to_string().starts_with("cannot list ChronTasks"),
        "{error}"
    );
    assert_eq!(error.exit_code(), 1);
}

/// Stopped before it is up (the apiserver slow or unreachable at start, a rollout that moves on
/// at once), a replica exits at once: while it checks the CRD, and while its first list of
/// ChronTasks is on its way. kube's controller waits on shutdown for that first list, but no
/// longer reads the watch that brings it: such a replica never exited.
#[tokio::test]
async fn a_replica_stopped_before_its_first_list_exits_at_once() {
    let client = test_env().client().await;
    let ns = namespace(&client, "early-stop").await;
    // Every request takes at least 2 s (each chunk a client sends waits that long).
    let (_proxy, slow) = DelayProxy::in_front_of_apiserver(Duration::from_secs(2)).await;
    let stopped_within = |what: &'static str, address| {
        let slow = slow.clone();
        let ns = ns.clone();
        async move {
            let operator = Operator::start_with(&ns, slow, |c| c.metrics.bind = address).await;
            eventually(what, || async {
                get(address, "/readyz").await.filter(|(_, why)| why == what)
            })
            .await;
            tokio::time::timeout(Duration::from_secs(10), operator.stop())
                .await
                .unwrap_or_else(|_| panic!("still running 10 s after the stop, {what}"));
        }
    };
    stopped_within("waiting for the ChronTask CRD", free_address()).await;
    stopped_within(
        "waiting for the first sync of the ChronTask watch",
        free_address(),
    )
    .await;
}
