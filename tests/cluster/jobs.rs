//! The Job action on the Job tier (real kube-controller-manager, kube-scheduler, kwok's fake
//! node): a Job per run, named from the run and owned by its task, its end read from the Job's
//! conditions; Forbid, Replace, pruning, garbage collection and a restart mid-run.

use std::collections::BTreeSet;

use chronflow::ChronTask;
use chronflow::config::OperatorConfig;
use chronflow::crd::{ChronTaskStatus, Phase, RunOutcome};
use k8s_openapi::api::batch::v1::Job;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};

use crate::operator::{Operator, create, patch_spec, status_where};
use crate::support::{eventually, job_env, namespace};

struct JobSetup {
    tasks: Api<ChronTask>,
    jobs: Api<Job>,
    ns: String,
    client: Client,
}

async fn setup(prefix: &str) -> JobSetup {
    let client = job_env().client().await;
    let ns = namespace(&client, prefix).await;
    JobSetup {
        tasks: Api::namespaced(client.clone(), &ns),
        jobs: Api::namespaced(client.clone(), &ns),
        ns,
        client,
    }
}

impl JobSetup {
    async fn operator(&self) -> Operator {
        self.operator_with(|_| {}).await
    }

    /// An operator running Job actions, with other settings as `adjust` says.
    async fn operator_with(&self, adjust: impl FnOnce(&mut OperatorConfig)) -> Operator {
        Operator::start_with(&self.ns, self.client.clone(), |config| {
            config.jobs.enabled = true;
            adjust(config);
        })
        .await
    }

    /// The task's Jobs, by name.
    async fn jobs_of(&self, task: &str) -> Vec<Job> {
        let uid = self.tasks.get(task).await.unwrap().uid().unwrap();
        let selector = format!("chronflow.io/task-uid={uid}");
        let mut jobs = self
            .jobs
            .list(&ListParams::default().labels(&selector))
            .await
            .unwrap()
            .items;
        jobs.sort_by_key(|job| job.name_any());
        jobs
    }
}

/// A Job action whose Pod runs for `run_for` (kwok's stage reads the annotation; "" ends it at
/// once) and fails when `fail`.
pub fn job_action(run_for: &str, fail: bool) -> Value {
    let labels = if fail {
        json!({"chronflowfail": "true"})
    } else {
        json!({})
    };
    json!({"job": {"template": {"spec": {"template": {
        "metadata": {"labels": labels, "annotations": {"chronflow-test/run-for": run_for}},
        "spec": {"restartPolicy": "Never", "containers": [{"name": "work", "image": "busybox"}]}
    }}}}})
}

/// The type of the Job's finished condition, if it has one.
fn finished(job: &Job) -> Option<String> {
    job.status
        .as_ref()?
        .conditions
        .iter()
        .flatten()
        .find(|c| c.status == "True" && (c.type_ == "Complete" || c.type_ == "Failed"))
        .map(|c| c.type_.clone())
}

/// Waits until the task's one run is recorded, and checks it was once, as its Job's success.
pub async fn recorded_once(tasks: &Api<ChronTask>, task: &str, job: &str) {
    let status = status_where(tasks, task, "the run recorded", |st| {
        st.total_runs >= 1 && st.active.is_empty()
    })
    .await;
    let counts = (
        status.total_runs,
        status.successful_runs,
        status.failed_runs,
    );
    assert_eq!(counts, (1, 1, 0), "{task}: {status:?}");
    let message = status.last_run.unwrap().message.unwrap_or_default();
    assert_eq!(message, format!("Job {job} completed"), "{task}");
}

/// Pauses the task and waits until nothing of it is in flight; returns that status.
async fn pause_and_settle(s: &JobSetup, task: &str) -> ChronTaskStatus {
    patch_spec(&s.tasks, task, json!({"paused": true})).await;
    status_where(&s.tasks, task, "paused with no run in flight", |st| {
        st.phase == Some(Phase::Paused) && st.active.is_empty()
    })
    .await
}

#[tokio::test]
async fn jobs_are_refused_unless_enabled() {
    let s = crate::operator::setup("jobs-off").await;
    let _operator = Operator::start(&s.ns).await;
    let spec = json!({"schedule": {"interval": "2s"}, "action": job_action("", false)});
    create(&s.api, "nightly", spec).await;
    let status = status_where(&s.api, "nightly", "Invalid", |st| {
        st.phase == Some(Phase::Invalid)
    })
    .await;
    let message = status.message.unwrap_or_default();
    assert!(
        message.starts_with("spec.action.job: ") && message.contains("jobs.enabled"),
        "{message}"
    );
}

#[tokio::test]
async fn a_job_per_run_completes_and_is_counted_exactly() {
    let s = setup("jobs-count").await;
    let operator = s.operator().await;
    let spec = json!({"schedule": {"interval": "2s"}, "timeout": "1m",
                      "history": {"successfulRunsLimit": 50},
                      "action": job_action("", false)});
    create(&s.tasks, "every-2s", spec).await;
    status_where(&s.tasks, "every-2s", "three runs succeeded", |st| {
        st.successful_runs >= 3
    })
    .await;
    let status = pause_and_settle(&s, "every-2s").await;

    // One Job per run, each Complete, and status counts exactly those.
    let jobs = s.jobs_of("every-2s").await;
    assert_eq!(jobs.len() as u64, status.total_runs, "{status:?}");
    assert_eq!(status.successful_runs, status.total_runs);
    assert_eq!((status.failed_runs, status.missed_runs), (0, 0));
    let task = s.tasks.get("every-2s").await.unwrap();
    let names: BTreeSet<String> = jobs.iter().map(|j| j.name_any()).collect();
    assert_eq!(names.len(), jobs.len());
    for job in &jobs {
        let name = job.name_any();
        assert!(name.starts_with("every-2s-") && name.len() <= 63, "{name}");
        assert_eq!(finished(job).as_deref(), Some("Complete"), "{name}");
        let owner = &job.owner_references()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.uid.as_str()),
            ("ChronTask", task.uid().unwrap().as_str())
        );
        assert_eq!(job.labels()["chronflow.io/task"], "every-2s");
        assert!(
            job.labels()["chronflow.io/scheduled-time"]
                .parse::<i64>()
                .is_ok()
        );
        assert!(
            job.annotations()["chronflow.io/run-id"].starts_with(&format!("{}/every-2s@", s.ns))
        );
        let spec = job.spec.as_ref().unwrap();
        // The task's timeout and (no) retries, as the Job's own limits.
        assert_eq!(
            (spec.active_deadline_seconds, spec.backoff_limit),
            (Some(60), Some(0))
        );
    }
    let last = status.last_run.expect("the last run is recorded");
    assert_eq!(last.outcome, RunOutcome::Succeeded);
    let message = last.message.unwrap_or_default();
    assert!(
        message.starts_with("Job every-2s-") && message.ends_with(" completed"),
        "{message}"
    );
    operator.stop().await;
}

#[tokio::test]
async fn a_failing_job_is_counted_failed_with_its_reason() {
    let s = setup("jobs-fail").await;
    let _operator = s.operator().await;
    // The Pod fails; one retry becomes backoffLimit 1: two Pods, then BackoffLimitExceeded.
    let spec = json!({"schedule": {"interval": "1h", "startAt": soon()},
                      "retry": {"maxRetries": 1}, "action": job_action("", true)});
    create(&s.tasks, "fails", spec).await;
    // The Pod runs past the deadline (the task's timeout): DeadlineExceeded.
    let spec = json!({"schedule": {"interval": "1h", "startAt": soon()}, "timeout": "3s",
                      "action": job_action("1h", false)});
    create(&s.tasks, "too-slow", spec).await;

    for (task, reason, attempts) in [
        ("fails", "BackoffLimitExceeded", 2),
        ("too-slow", "DeadlineExceeded", 1),
    ] {
        let status = status_where(&s.tasks, task, "the run failed", |st| st.failed_runs == 1).await;
        let last = status.last_run.expect("the run is recorded");
        let message = last.message.unwrap_or_default();
        assert_eq!(last.outcome, RunOutcome::Failed);
        assert!(
            message.starts_with(&format!("Job {task}-"))
                && message.contains(&format!("failed: {reason}")),
            "{task}: {message}"
        );
        assert_eq!(last.attempts, attempts, "{task}: {message}");
        assert_eq!((status.total_runs, status.successful_runs), (1, 0));
    }
}

/// An instant a few seconds ahead, for a task due once soon.
fn soon() -> String {
    (chrono::Utc::now() + chrono::Duration::seconds(3)).to_rfc3339()
}

#[tokio::test]
async fn forbid_skips_while_a_job_runs_and_replace_deletes_the_running_job() {
    let s = setup("jobs-policy").await;
    let _operator = s.operator().await;
    let forbid = json!({"schedule": {"interval": "2s"}, "concurrencyPolicy": "Forbid",
                        "timeout": "1m", "action": job_action("7s", false)});
    create(&s.tasks, "forbid", forbid).await;
    let replace = json!({"schedule": {"interval": "4s"}, "concurrencyPolicy": "Replace",
                         "timeout": "1h", "action": job_action("1h", false)});
    create(&s.tasks, "replace", replace).await;

    // Forbid: while the first Job runs, its run is in status.active with the Job's name, and
    // the instants due meanwhile are missed, saying why.
    let running = status_where(
        &s.tasks,
        "forbid",
        "a Job in flight and an instant skipped",
        |st| st.missed_runs >= 1 && !st.active.is_empty(),
    )
    .await;
    let job_name = running.active[0]
        .job_name
        .clone()
        .expect("the run names its Job");
    assert!(s.jobs.get(&job_name).await.is_ok(), "{job_name} exists");
    let status = status_where(&s.tasks, "forbid", "the first Job completed", |st| {
        st.successful_runs >= 1
    })
    .await;
    let missed = status
        .recent_runs
        .iter()
        .find(|r| r.outcome == RunOutcome::Missed)
        .and_then(|r| r.message.clone())
        .unwrap_or_default();
    assert!(missed.contains("concurrencyPolicy Forbid"), "{missed}");
    let forbid_jobs = s.jobs_of("forbid").await;
    let active = forbid_jobs.iter().filter(|j| finished(j).is_none()).count();
    assert!(active <= 1, "Forbid never runs two Jobs at once: {active}");

    // Replace: the next instant deletes the running Job (its Pods go with it) and starts its own.
    let status = status_where(&s.tasks, "replace", "a run replaced", |st| {
        st.failed_runs >= 1
    })
    .await;
    let replaced = status.last_run.expect("the replaced run is recorded");
    let message = replaced.message.unwrap_or_default();
    assert!(message.contains("replaced by"), "{message}");
    let first_job = {
        let task = s.tasks.get("replace").await.unwrap();
        let id = chronflow::run::TaskId::new(
            chronflow::run::TaskKey::new(&s.ns, "replace"),
            task.uid().unwrap(),
        );
        let run =
            chronflow::run::RunId::parse(&id, &replaced.run_id, replaced.scheduled_time).unwrap();
        chronflow::executor::job::job_name(&id, &run)
    };
    eventually(&format!("Job {first_job} deleted"), || async {
        match s.jobs.get_opt(&first_job).await.unwrap() {
            None => Some(()),
            Some(job) => job.metadata.deletion_timestamp.map(|_| ()),
        }
    })
    .await;
    let live = status_where(&s.tasks, "replace", "the next run in flight", |st| {
        !st.active.is_empty()
    })
    .await;
    let next_job = live.active[0].job_name.clone().unwrap();
    assert_ne!(next_job, first_job);
}

#[tokio::test]
async fn finished_jobs_are_pruned_to_the_history_limits_and_go_with_their_task() {
    let s = setup("jobs-prune").await;
    let _operator = s.operator().await;
    let spec = json!({"schedule": {"interval": "2s"},
                      "history": {"successfulRunsLimit": 2, "failedRunsLimit": 1},
                      "action": job_action("", false)});
    create(&s.tasks, "pruned", spec).await;
    status_where(&s.tasks, "pruned", "five runs", |st| {
        st.successful_runs >= 5
    })
    .await;
    let status = pause_and_settle(&s, "pruned").await;
    let kept = eventually("finished Jobs pruned to 2", || async {
        let jobs = s.jobs_of("pruned").await;
        let live: Vec<_> = jobs
            .iter()
            .filter(|j| j.metadata.deletion_timestamp.is_none())
            .collect();
        (live.len() == 2).then_some(jobs)
    })
    .await;
    // The newest two are kept, and the counts still say every run.
    let newest = status.last_run.unwrap().run_id;
    assert!(
        kept.iter()
            .any(|j| j.annotations()["chronflow.io/run-id"] == newest),
        "the newest run's Job is kept"
    );
    let after = s.tasks.get("pruned").await.unwrap().status.unwrap();
    assert_eq!(after.successful_runs, status.successful_runs);
    assert!(after.total_runs >= 5);

    // Deleting the task deletes its Jobs (owner references, the garbage collector).
    s.tasks
        .delete("pruned", &DeleteParams::default())
        .await
        .unwrap();
    let uid = kept[0].labels()["chronflow.io/task-uid"].clone();
    eventually("the task's Jobs garbage-collected", || async {
        let selector = format!("chronflow.io/task-uid={uid}");
        let jobs = s
            .jobs
            .list(&ListParams::default().labels(&selector))
            .await
            .unwrap();
        jobs.items.is_empty().then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_restart_mid_run_records_the_run_once() {
    let s = setup("jobs-restart").await;
    // Due once in the next hour: the run below is the only one.
    // "unwritten": crashed before status said the run was in flight; its Job says so.
    for (task, stop) in [("graceful", true), ("crashed", false), ("unwritten", false)] {
        let operator = s.operator().await;
        let spec = json!({"schedule": {"interval": "1h", "startAt": soon()},
                          "timeout": "2m", "action": job_action("8s", false)});
        create(&s.tasks, task, spec).await;
        let running = status_where(&s.tasks, task, "the Job in flight", |st| {
            !st.active.is_empty()
        })
        .await;
        let job_name = running.active[0].job_name.clone().unwrap();
        if stop {
            operator.stop().await;
        } else {
            operator.crash();
        }
        let job = s.jobs.get(&job_name).await.unwrap();
        assert_eq!(
            finished(&job),
            None,
            "{task}: the Job runs on without the operator"
        );
        if task == "unwritten" {
            let forget = Patch::Merge(json!({"status": {"active": []}}));
            let params = PatchParams::default();
            s.tasks.patch_status(task, &params, &forget).await.unwrap();
        }

        let operator = s.operator().await;
        recorded_once(&s.tasks, task, &job_name).await;
        assert_eq!(s.jobs_of(task).await.len(), 1, "{task}: one Job");
        operator.stop().await;
    }
}

#[tokio::test]
async fn a_template_the_apiserver_refuses_makes_the_task_invalid_with_its_reason() {
    let s = setup("jobs-refused").await;
    let _operator = s.operator().await;
    let mut action = job_action("", false);
    action["job"]["template"]["spec"]["template"]["spec"]["restartPolicy"] = json!("Always");
    let spec = json!({"schedule": {"interval": "2s"}, "action": action});
    create(&s.tasks, "always", spec).await;
    let status = status_where(&s.tasks, "always", "Invalid", |st| {
        st.phase == Some(Phase::Invalid)
    })
    .await;
    let message = status.message.unwrap_or_default();
    assert!(
        message.starts_with("spec.action.job.template: the apiserver refuses the Job: ")
            && message.contains("restartPolicy"),
        "{message}"
    );
    assert!(s.jobs_of("always").await.is_empty());
}

#[tokio::test]
async fn job_runs_hold_no_worker_while_their_jobs_run() {
    let s = setup("jobs-workers").await;
    let _operator = s.operator_with(|config| config.max_workers = 2).await;
    let names = ["one", "two", "three"];
    for name in names {
        let spec = json!({"schedule": {"interval": "1h", "startAt": soon()}, "timeout": "1h",
                          "action": job_action("1h", false)});
        create(&s.tasks, name, spec).await;
    }
    // Three Jobs in flight at once on two workers: a worker only creates a Job.
    for name in names {
        let status = status_where(&s.tasks, name, "its Job in flight", |st| {
            !st.active.is_empty()
        })
        .await;
        assert_eq!(status.missed_runs, 0, "{name}: {status:?}");
    }
    for name in names {
        assert_eq!(s.jobs_of(name).await.len(), 1, "{name}");
    }
}
