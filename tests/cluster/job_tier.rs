//! The Job tier of the test control plane (for the Job action): real kube-controller-manager
//! and kube-scheduler with kwok as the kubelet take a Job to Complete, or to Failed when its Pod
//! asks for it (`chronflowfail: "true"`).

use k8s_openapi::api::batch::v1::Job;
use kube::Api;
use kube::api::PostParams;
use serde_json::json;

use crate::support::{eventually, job_env};

fn job(name: &str, fail: bool) -> Job {
    let labels = if fail {
        json!({"chronflowfail": "true"})
    } else {
        json!({})
    };
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"backoffLimit": 0, "template": {
            "metadata": {"labels": labels},
            "spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "busybox"}]}}}
    }))
    .unwrap()
}

/// The type of the Job's first finished condition (`Complete` or `Failed`).
async fn outcome(jobs: &Api<Job>, name: &str) -> String {
    eventually(&format!("job {name} finished"), || async {
        let job = jobs.get(name).await.ok()?;
        job.status?
            .conditions?
            .into_iter()
            .find(|c| c.status == "True" && (c.type_ == "Complete" || c.type_ == "Failed"))
            .map(|c| c.type_)
    })
    .await
}

#[tokio::test]
async fn jobs_complete_or_fail_on_the_fake_node() {
    let jobs: Api<Job> = Api::namespaced(job_env().client().await, "default");
    for (name, fail) in [("succeeds", false), ("fails", true)] {
        jobs.create(&PostParams::default(), &job(name, fail))
            .await
            .unwrap();
    }
    assert_eq!(outcome(&jobs, "succeeds").await, "Complete");
    assert_eq!(outcome(&jobs, "fails").await, "Failed");
}
