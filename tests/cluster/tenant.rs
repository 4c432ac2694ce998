//! Tenant safety: what one ChronTask's author puts in a spec never leaks where others (or logs)
//! can read it.

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::events::v1::Event;
use kube::Api;
use kube::api::{ListParams, PostParams};
use serde_json::json;

use crate::observability::free_address;
use crate::operator::{Operator, create, setup, status_where};
use crate::support::receiver::{Behavior, Receiver};
use crate::support::{eventually, test_env};

#[tokio::test]
async fn a_url_s_credentials_and_query_never_reach_status_or_events() {
    let s = setup("tenant-redact").await;
    let client = test_env().client().await;
    let _operator = Operator::start(&s.ns).await;
    // Nothing listens there: every run fails with the connection error, naming the URL.
    let port = free_address().port();
    let url = format!("http://alice:hunter2@127.0.0.1:{port}/hook?token=abc123");
    let spec = json!({"schedule": {"interval": "1s"}, "action": {"http": {"url": url}}});
    create(&s.api, "leaky", spec).await;
    let status = status_where(&s.api, "leaky", "a failed run", |st| st.failed_runs >= 1).await;
    let message = status
        .last_run
        .and_then(|run| run.message)
        .unwrap_or_default();
    let shown = format!("http://127.0.0.1:{port}/hook?<redacted>");
    assert!(message.contains(&shown), "{message}");

    let events: Api<Event> = Api::namespaced(client, &s.ns);
    let failed = eventually("a RunFailed Event", || async {
        let list = events.list(&ListParams::default()).await.ok()?;
        let found: Vec<Event> = list
            .items
            .into_iter()
            .filter(|e| e.reason.as_deref() == Some("RunFailed"))
            .collect();
        (!found.is_empty()).then_some(found)
    })
    .await;
    let task = s.api.get("leaky").await.unwrap();
    let everything = format!(
        "{}\n{}",
        serde_json::to_string(&task.status).unwrap(),
        serde_json::to_string(&failed).unwrap()
    );
    for secret in ["abc123", "hunter2", "alice"] {
        assert!(
            !everything.contains(secret),
            "{secret} leaked:\n{everything}"
        );
    }
}

#[tokio::test]
async fn a_redirect_to_another_port_never_receives_a_header_value() {
    let s = setup("tenant-redirect").await;
    let client = test_env().client().await;
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "token"}, "stringData": {"token": "s3cr3t-value"}}))
    .unwrap();
    Api::<Secret>::namespaced(client, &s.ns)
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    let elsewhere = Receiver::start(Behavior::default()).await;
    let redirecting = Receiver::redirecting(elsewhere.url("/stolen")).await;
    let _operator = Operator::start(&s.ns).await;
    let header = json!([{"name": "Authorization",
                         "valueFrom": {"secretKeyRef": {"name": "token", "key": "token"}}}]);
    for (name, follow) in [("default", None), ("same-origin", Some("SameOrigin"))] {
        let mut http = json!({"url": redirecting.url("/hook"), "headers": header});
        if let Some(follow) = follow {
            http["followRedirects"] = json!(follow);
        }
        let spec = json!({"schedule": {"interval": "1s"}, "action": {"http": http}});
        create(&s.api, name, spec).await;
    }
    for (name, why) in [
        ("default", "not followed: followRedirects is Never"),
        ("same-origin", "redirected to another origin"),
    ] {
        let status = status_where(&s.api, name, "a failed run", |st| st.failed_runs >= 2).await;
        let message = status.last_run.and_then(|r| r.message).unwrap_or_default();
        assert!(message.contains(why), "{name}: {message}");
        assert!(
            message.contains(&elsewhere.url("/stolen")),
            "{name}: {message}"
        );
    }
    assert!(redirecting.count() >= 4, "the task's own URL was called");
    assert!(
        redirecting.hits()[0].authorization.as_deref() == Some("s3cr3t-value"),
        "the header went to the task's own URL"
    );
    assert_eq!(elsewhere.count(), 0, "the other port was called");
}
