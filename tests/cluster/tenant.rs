//! Tenant safety: what one ChronTask's author puts in a spec never leaks where others (or logs)
//! can read it.

use k8s_openapi::api::events::v1::Event;
use kube::Api;
use kube::api::ListParams;
use serde_json::json;

use crate::observability::free_address;
use crate::operator::{Operator, create, setup, status_where};
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
