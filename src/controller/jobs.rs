//! The Job action on the cluster: creates a run's Job (owned by its ChronTask, named from the
//! run), learns its end from a label-selected informer (never by polling), and prunes finished
//! Jobs to the task's history limits. `jobs.enabled` turns it on; see `docs/chrontask.md`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use futures::future::{BoxFuture, FutureExt};
use k8s_openapi::api::batch::v1::{Job, JobTemplateSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{DeleteParams, PostParams};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::ChronTask;
use crate::executor::JobAction;
use crate::executor::job::{JobEnd, JobRun, JobRunner, job_name};
use crate::run::{RunId, TaskId};

/// Every Job chronflow creates carries its task's uid here; the informer selects on it.
pub const TASK_UID_LABEL: &str = "chronflow.io/task-uid";
/// The task's name, when it fits in a label value (63 characters).
pub const TASK_LABEL: &str = "chronflow.io/task";
/// The run's instant, in Unix seconds (a label, so Jobs can be selected by it).
pub const SCHEDULED_LABEL: &str = "chronflow.io/scheduled-time";
/// The run id (an annotation: it does not fit a label value).
pub const RUN_ID_ANNOTATION: &str = "chronflow.io/run-id";
/// Annotation with the epoch of the leader that created the Job (`X-Chronflow-Epoch` of HTTP
/// runs): whatever the Pod does can fence on it.
pub const EPOCH_ANNOTATION: &str = crate::leader::EPOCH_ANNOTATION;

/// The operator's Job runner: one informer per watched namespace (or one for all).
pub struct KubeJobs {
    client: Client,
    stores: Vec<(Option<String>, Store<Job>)>,
    /// Runs waiting for their Job's next change, by namespace and name.
    waiters: Mutex<HashMap<(String, String), watch::Sender<()>>>,
}

/// Drives the informers of a [`KubeJobs`]; run it with [`JobInformers::run`].
pub struct JobInformers {
    jobs: Arc<KubeJobs>,
    writers: Vec<(Api<Job>, reflector::store::Writer<Job>)>,
}

impl KubeJobs {
    /// A runner watching Jobs in `namespaces` (`None`: all of them).
    pub fn new(client: Client, namespaces: &[Option<String>]) -> (Arc<KubeJobs>, JobInformers) {
        let mut stores = Vec::new();
        let mut writers = Vec::new();
        for namespace in namespaces {
            let (store, writer) = reflector::store();
            let api = match namespace {
                Some(ns) => Api::namespaced(client.clone(), ns),
                None => Api::all(client.clone()),
            };
            stores.push((namespace.clone(), store));
            writers.push((api, writer));
        }
        let jobs = Arc::new(KubeJobs {
            client,
            stores,
            waiters: Mutex::default(),
        });
        let informers = JobInformers {
            jobs: jobs.clone(),
            writers,
        };
        (jobs, informers)
    }

    /// The runs of `task` whose Jobs exist and have not ended: in flight whatever status says
    /// (a process that crashed right after creating one never wrote it down). Waits up to 10 s
    /// for the informer's first list.
    pub async fn in_flight(&self, task: &TaskId) -> Vec<RunId> {
        let Some(store) = self.store(&task.key.namespace) else {
            return Vec::new();
        };
        let ready = tokio::time::timeout(Duration::from_secs(10), store.wait_until_ready());
        if !matches!(ready.await, Ok(Ok(()))) {
            warn!(task = %task, "the Job informer has not listed Jobs yet; in-flight Jobs are taken from status only");
            return Vec::new();
        }
        store
            .state()
            .iter()
            .filter(|job| {
                job.metadata.namespace.as_deref() == Some(task.key.namespace.as_str())
                    && job.labels().get(TASK_UID_LABEL) == Some(&task.uid.to_string())
                    && job.metadata.deletion_timestamp.is_none()
                    && ended(job).is_none()
            })
            .filter_map(|job| {
                let id = job.annotations().get(RUN_ID_ANNOTATION)?;
                RunId::parse(task, id, chrono::Utc::now())
            })
            .collect()
    }

    fn store(&self, namespace: &str) -> Option<&Store<Job>> {
        self.stores
            .iter()
            .find(|(ns, _)| ns.as_deref().is_none_or(|ns| ns == namespace))
            .map(|(_, store)| store)
    }

    fn api(&self, namespace: &str) -> Api<Job> {
        Api::namespaced(self.client.clone(), namespace)
    }

    /// Wakes whoever waits for `job`; with `None`, everyone (the informer listed afresh).
    fn changed(&self, job: Option<&Job>) {
        let waiters = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        match job
            .and_then(|job| Some((job.metadata.namespace.clone()?, job.metadata.name.clone()?)))
        {
            Some(key) => {
                if let Some(waiter) = waiters.get(&key) {
                    waiter.send_replace(());
                }
            }
            None => waiters.values().for_each(|waiter| {
                waiter.send_replace(());
            }),
        }
    }

    async fn create_job(&self, run: JobRun<'_>) -> Result<(), String> {
        match self
            .api(&run.task.key.namespace)
            .create(&PostParams::default(), &job_of(&run))
            .await
        {
            Ok(_) => {
                debug!(job = run.name, "Job created");
                Ok(())
            }
            // Created before a restart or a failover: waited for, never created twice.
            Err(kube::Error::Api(status)) if status.code == 409 => {
                debug!(job = run.name, "the run's Job exists already");
                Ok(())
            }
            Err(error) => Err(format!("cannot create Job {}: {error}", run.name)),
        }
    }

    async fn wait_job(&self, run: JobRun<'_>) -> JobEnd {
        let namespace = run.task.key.namespace.as_str();
        let failed = |message: String| JobEnd {
            result: Err(message),
            attempts: 1,
        };
        let Some(store) = self.store(namespace) else {
            return failed(format!("namespace {namespace} is not watched for Jobs"));
        };
        let key = (namespace.to_string(), run.name.to_string());
        // Subscribed before the store is read: a change after the read wakes this wait.
        let mut changes = {
            let mut waiters = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
            let waiter = waiters
                .entry(key.clone())
                .or_insert_with(|| watch::channel(()).0);
            waiter.subscribe()
        };
        let _unsubscribe = Unsubscribe {
            jobs: self,
            key: &key,
        };
        // Until the first list, a Job missing from the store may exist.
        if store.wait_until_ready().await.is_err() {
            return failed("the Job informer stopped".into());
        }
        let reference = ObjectRef::new(run.name).within(namespace);
        let mut seen = false;
        loop {
            match store.get(&reference) {
                Some(job) => {
                    let owner = job.labels().get(TASK_UID_LABEL);
                    if owner.map(String::as_str) != Some(&*run.task.uid) {
                        return failed(format!(
                            "Job {} exists and belongs to another task (label {TASK_UID_LABEL}: \
                             {owner:?}); delete it or rename the task",
                            run.name
                        ));
                    }
                    seen = true;
                    if let Some(end) = ended(&job) {
                        self.prune(run).await;
                        return end;
                    }
                }
                None if run.adopted => {
                    return failed(format!(
                        "Job {} is gone: it ended or was deleted while no chronflow watched, so \
                         the run's outcome is unknown",
                        run.name
                    ));
                }
                None if seen => {
                    return failed(format!("Job {} was deleted before it finished", run.name));
                }
                // Created; the informer has not seen it yet.
                None => {}
            }
            if changes.changed().await.is_err() {
                return failed("the Job informer stopped".into());
            }
        }
    }

    /// Deletes the task's finished Jobs beyond its history limits, oldest first; the counts in
    /// status are not affected.
    async fn prune(&self, run: JobRun<'_>) {
        let namespace = &run.task.key.namespace;
        let Some(store) = self.store(namespace) else {
            return;
        };
        let mut succeeded = Vec::new();
        let mut failed = Vec::new();
        for job in store.state() {
            let ours = job.metadata.namespace.as_deref() == Some(namespace)
                && job.labels().get(TASK_UID_LABEL) == Some(&run.task.uid.to_string());
            match ended(&job).filter(|_| ours) {
                Some(JobEnd { result: Ok(_), .. }) => succeeded.push(job),
                Some(_) => failed.push(job),
                None => {}
            }
        }
        let api = self.api(namespace);
        for (mut jobs, keep) in [
            (succeeded, run.action.keep_succeeded),
            (failed, run.action.keep_failed),
        ] {
            // Newest first: by the run's instant, then by name.
            jobs.sort_by_cached_key(|job| {
                let at = job
                    .labels()
                    .get(SCHEDULED_LABEL)
                    .and_then(|t| t.parse::<i64>().ok());
                std::cmp::Reverse((at, job.metadata.name.clone()))
            });
            for job in jobs.iter().skip(keep as usize) {
                let name = job.metadata.name.clone().unwrap_or_default();
                debug!(job = %name, "pruning a finished Job (history limit)");
                delete(&api, &name).await;
            }
        }
    }
}

/// Removes a run's waiter once no run waits for that Job any more.
struct Unsubscribe<'a> {
    jobs: &'a KubeJobs,
    key: &'a (String, String),
}

impl Drop for Unsubscribe<'_> {
    fn drop(&mut self) {
        let mut waiters = self.jobs.waiters.lock().unwrap_or_else(|p| p.into_inner());
        if waiters
            .get(self.key)
            .is_some_and(|waiter| waiter.receiver_count() <= 1)
        {
            waiters.remove(self.key);
        }
    }
}

impl JobRunner for KubeJobs {
    fn create<'a>(&'a self, run: JobRun<'a>) -> BoxFuture<'a, Result<(), String>> {
        self.create_job(run).boxed()
    }

    fn wait<'a>(&'a self, run: JobRun<'a>) -> BoxFuture<'a, JobEnd> {
        self.wait_job(run).boxed()
    }

    fn stop<'a>(&'a self, namespace: &'a str, name: &'a str) -> BoxFuture<'a, ()> {
        async move { delete(&self.api(namespace), name).await }.boxed()
    }
}

impl JobInformers {
    /// Keeps the stores current and wakes the runs whose Job changed, until `stop`.
    pub async fn run(self, stop: CancellationToken) {
        let JobInformers { jobs, writers } = self;
        let selector = watcher::Config::default().labels(TASK_UID_LABEL);
        let streams = writers.into_iter().map(|(api, writer)| {
            let jobs = watcher(api, selector.clone())
                .default_backoff()
                .modify(|job| job.managed_fields_mut().clear());
            reflector::reflector(writer, jobs).boxed()
        });
        let mut events = futures::stream::select_all(streams);
        loop {
            let event = tokio::select! {
                _ = stop.cancelled() => return,
                event = events.next() => event,
            };
            match event {
                Some(Ok(watcher::Event::Apply(job) | watcher::Event::Delete(job))) => {
                    jobs.changed(Some(&job))
                }
                Some(Ok(watcher::Event::InitDone)) => jobs.changed(None),
                Some(Ok(_)) => {}
                Some(Err(error)) => warn!(%error, "watching Jobs failed; retrying"),
                None => return,
            }
        }
    }
}

/// Asks the apiserver, in a dry run, whether it would create the task's Jobs: a template it
/// refuses (a Pod without a container, `restartPolicy: Always`, ...) makes the task Invalid with
/// the apiserver's reason instead of failing every run. `None` when it accepts, or cannot say
/// (no answer, no right to ask): the runs then fail with the reason.
pub async fn refused_template(
    client: &Client,
    task: &TaskId,
    action: &JobAction,
) -> Option<String> {
    let scheduled = chrono::Utc::now();
    let run_id = RunId::new(task, scheduled);
    let name = job_name(task, &run_id);
    let run = JobRun {
        task,
        run_id: &run_id,
        epoch: 0,
        scheduled,
        name: &name,
        action,
        adopted: false,
    };
    let dry_run = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    let api: Api<Job> = Api::namespaced(client.clone(), &task.key.namespace);
    match api.create(&dry_run, &job_of(&run)).await {
        Err(kube::Error::Api(status)) if matches!(status.code, 400 | 422) => Some(format!(
            "spec.action.job.template: the apiserver refuses the Job: {}",
            status.message
        )),
        Err(error) => {
            debug!(task = %task, %error, "cannot check the Job template (dry run)");
            None
        }
        Ok(_) => None,
    }
}

/// The run's Job: the template, named from the run, labeled with its task and instant, owned
/// by the ChronTask (deleting the task deletes its Jobs).
fn job_of(run: &JobRun<'_>) -> Job {
    let template: JobTemplateSpec =
        serde_json::from_value((*run.action.template).clone()).unwrap_or_default();
    let mut meta = template.metadata.unwrap_or_default();
    let task = &run.task.key;
    let labels = meta.labels.get_or_insert_with(Default::default);
    labels.insert("app.kubernetes.io/managed-by".into(), "chronflow".into());
    labels.insert(TASK_UID_LABEL.into(), run.task.uid.to_string());
    if task.name.len() <= 63 {
        labels.insert(TASK_LABEL.into(), task.name.clone());
    }
    labels.insert(
        SCHEDULED_LABEL.into(),
        run.scheduled.timestamp().to_string(),
    );
    let annotations = meta.annotations.get_or_insert_with(Default::default);
    annotations.insert(RUN_ID_ANNOTATION.into(), run.run_id.to_string());
    annotations.insert(EPOCH_ANNOTATION.into(), run.epoch.to_string());
    annotations.insert(
        SCHEDULED_LABEL.into(),
        run.scheduled
            .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
    );
    Job {
        metadata: ObjectMeta {
            name: Some(run.name.to_string()),
            namespace: Some(task.namespace.clone()),
            owner_references: Some(vec![OwnerReference {
                api_version: ChronTask::api_version(&()).into_owned(),
                kind: ChronTask::kind(&()).into_owned(),
                name: task.name.clone(),
                uid: run.task.uid.to_string(),
                controller: Some(true),
                block_owner_deletion: None,
            }]),
            ..meta
        },
        spec: template.spec,
        status: None,
    }
}

/// How a Job ended, once its `Complete` or `Failed` condition is true.
fn ended(job: &Job) -> Option<JobEnd> {
    let status = job.status.as_ref()?;
    let name = job.metadata.name.as_deref().unwrap_or_default();
    let attempts = (status.succeeded.unwrap_or(0) + status.failed.unwrap_or(0)).max(1) as u32;
    let condition = status
        .conditions
        .iter()
        .flatten()
        .find(|c| c.status == "True" && (c.type_ == "Complete" || c.type_ == "Failed"))?;
    let result = if condition.type_ == "Complete" {
        Ok(format!("Job {name} completed"))
    } else {
        let reason = condition.reason.as_deref().unwrap_or("Failed");
        let message = condition.message.as_deref().unwrap_or_default();
        Err(format!("Job {name} failed: {reason}: {message}")
            .trim_end_matches(": ")
            .to_string())
    };
    Some(JobEnd { result, attempts })
}

/// Deletes a Job and its Pods (background propagation); one already gone is fine.
async fn delete(api: &Api<Job>, name: &str) {
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => {}
        Err(kube::Error::Api(status)) if status.code == 404 => {}
        Err(error) => warn!(job = name, %error, "cannot delete the Job"),
    }
}
