//! The manifests of standalone mode: read from a file or a directory, again and again, and
//! turned into what the controller makes of ChronTasks in a cluster (validated tasks for the
//! engine, observations for the status index). A file is read and parsed again only when its
//! modification time or size changed. A manifest that cannot be read or is invalid is reported
//! once, naming its file (and document and field), and never stops the others.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use chrono_tz::Tz;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use serde::Deserialize;
use tracing::{error, info, warn};

use crate::ChronTask;
use crate::config::OperatorConfig;
use crate::controller::validate::{Invalid, validate};
use crate::controller::{TenantLimits, resume_from};
use crate::crd::ChronTaskStatus;
use crate::engine::EngineHandle;
use crate::metrics::Metrics;
use crate::run::{TaskId, TaskKey};
use crate::status::{Observed, StatusIndex};

/// A task's namespace when its manifest names none.
pub const DEFAULT_NAMESPACE: &str = "default";

/// A manifest without `metadata.creationTimestamp` is taken as created at the Unix epoch, so an
/// `interval` without `startAt` is anchored there: `interval: 30s` runs at :00 and :30 of every
/// minute, the same instants across restarts.
fn anchor() -> Time {
    Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH)
}

/// What standalone mode knows of a task it runs.
struct Known {
    uid: String,
    generation: i64,
    file: PathBuf,
    /// The spec and annotations last applied: a change is a new generation.
    fingerprint: String,
    /// Why it is invalid, if it is: applied again when that changes (a header's secret file
    /// appeared).
    invalid: Option<String>,
}

/// The manifests under one path, and the tasks made of them.
pub struct Manifests {
    path: PathBuf,
    timezone: Tz,
    limits: TenantLimits,
    index: StatusIndex,
    engine: EngineHandle,
    values: std::sync::Arc<super::LocalValues>,
    metrics: std::sync::Arc<Metrics>,
    known: HashMap<TaskKey, Known>,
    /// What the history held at start, taken by each task when first seen.
    stored: HashMap<TaskKey, ChronTaskStatus>,
    next_uid: u64,
    /// The problems reported last time: reported again only when they change.
    reported: Vec<String>,
    /// Each file as last read, by path.
    read: HashMap<PathBuf, File>,
}

/// A manifest file as last read: when it was modified and how long it was, and what it held.
struct File {
    stamp: (Option<SystemTime>, u64),
    documents: Vec<Document>,
    problems: Vec<String>,
}

/// One ChronTask document of a file.
struct Document {
    /// `FILE (document N)`.
    place: String,
    key: TaskKey,
    task: Result<ChronTask, String>,
}

impl Manifests {
    /// The manifests under `path`, fed to `engine`, observed by `index` and `metrics`.
    pub fn new(
        path: PathBuf,
        config: &OperatorConfig,
        index: StatusIndex,
        engine: EngineHandle,
        values: std::sync::Arc<super::LocalValues>,
        metrics: std::sync::Arc<Metrics>,
        stored: HashMap<TaskKey, ChronTaskStatus>,
    ) -> Self {
        Self {
            path,
            timezone: config.timezone,
            limits: TenantLimits {
                min_period: config.limits.min_period,
                max_tasks_per_namespace: 0,
                allow_insecure_skip_verify: config.http.allow_insecure_skip_verify,
                allow_exec: true,
                max_timeout: config.limits.max_timeout,
                jobs: None,
            },
            index,
            engine,
            values,
            metrics,
            known: HashMap::new(),
            stored,
            next_uid: 0,
            reported: Vec::new(),
            read: HashMap::new(),
        }
    }

    /// Reads every manifest that changed and applies what changed: new tasks, edited ones (a
    /// new generation), removed ones. Tasks of a file that cannot be read or parsed keep running.
    pub async fn reload(&mut self) {
        let mut problems = Vec::new();
        let Some(files) = self.files(&mut problems) else {
            self.report(problems);
            return;
        };
        let mut seen: HashMap<TaskKey, (PathBuf, Result<ChronTask, String>)> = HashMap::new();
        let mut changed = Vec::new();
        let mut unreadable = Vec::new();
        for path in &files {
            match self.read_if_changed(path) {
                Ok(true) => changed.push(path.clone()),
                Ok(false) => {}
                Err(e) => {
                    problems.push(format!("{}: cannot read: {e}", path.display()));
                    unreadable.push(path.clone());
                    continue;
                }
            }
            let file = &self.read[path];
            problems.extend(file.problems.iter().cloned());
            for document in &file.documents {
                if let Some((other, _)) = seen.get(&document.key) {
                    problems.push(format!(
                        "{}: ChronTask {} is already defined in {}",
                        document.place,
                        document.key,
                        other.display()
                    ));
                    continue;
                }
                let entry = (path.clone(), document.task.clone());
                seen.insert(document.key.clone(), entry);
            }
        }
        self.read.retain(|path, _| files.contains(path));
        self.report(problems);
        for (key, (file, task)) in seen.iter() {
            // Unchanged, valid, from the same file: nothing to apply.
            let settled = self
                .known
                .get(key)
                .is_some_and(|k| k.invalid.is_none() && k.file == *file);
            if !settled || changed.contains(file) {
                self.apply(key, file, task.clone()).await;
            }
        }
        let gone: Vec<TaskKey> = self
            .known
            .iter()
            .filter(|(key, known)| !seen.contains_key(key) && !unreadable.contains(&known.file))
            .map(|(key, _)| key.clone())
            .collect();
        for key in gone {
            if let Some(known) = self.known.remove(&key) {
                info!(task = %key, file = %known.file.display(), "task removed");
                let id = TaskId::new(key, known.uid);
                self.engine.remove(id.clone()).await;
                self.index.forget(&id);
                self.metrics.forget(&id.key);
            }
        }
    }

    /// The manifest files: the path itself, or the `*.yaml` and `*.yml` files of the directory
    /// in name order; `None` when the path cannot be listed.
    fn files(&self, problems: &mut Vec<String>) -> Option<Vec<PathBuf>> {
        if self.path.is_file() {
            return Some(vec![self.path.clone()]);
        }
        let entries = match std::fs::read_dir(&self.path) {
            Ok(entries) => entries,
            Err(e) => {
                problems.push(format!("{}: cannot read: {e}", self.path.display()));
                return None;
            }
        };
        let mut files: Vec<PathBuf> = entries
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|path| {
                path.is_file()
                    && matches!(
                        path.extension().and_then(|e| e.to_str()),
                        Some("yaml" | "yml")
                    )
            })
            .collect();
        files.sort();
        Some(files)
    }

    /// Reads and parses `path` unless its modification time and size are those of the last
    /// read; `Ok(true)` when it did.
    fn read_if_changed(&mut self, path: &Path) -> std::io::Result<bool> {
        let metadata = std::fs::metadata(path)?;
        let stamp = (metadata.modified().ok(), metadata.len());
        if self.read.get(path).is_some_and(|file| file.stamp == stamp) {
            return Ok(false);
        }
        let text = std::fs::read_to_string(path)?;
        let mut file = File {
            stamp,
            documents: Vec::new(),
            problems: Vec::new(),
        };
        documents(path, &text, &mut file);
        self.read.insert(path.to_path_buf(), file);
        Ok(true)
    }

    fn report(&mut self, problems: Vec<String>) {
        if problems != self.reported {
            for problem in &problems {
                error!(%problem, "manifest not loaded");
            }
            self.reported = problems;
        }
    }

    /// Applies one task's manifest if it changed (or is invalid for a reason that may have
    /// changed: a header's secret file appeared).
    async fn apply(&mut self, key: &TaskKey, file: &Path, task: Result<ChronTask, String>) {
        let fingerprint = match &task {
            Ok(task) => {
                self.metrics.labels(key, kube::ResourceExt::labels(task));
                serde_json::to_string(&(&task.spec, &task.metadata.annotations)).unwrap_or_default()
            }
            Err(error) => error.clone(),
        };
        if let Some(known) = self.known.get(key)
            && known.fingerprint == fingerprint
            && known.invalid.is_none()
        {
            return;
        }
        // The first time: what the history says of it (counters, where it stopped).
        let mut seed = None;
        if !self.known.contains_key(key) {
            seed = self.stored.remove(key);
            self.next_uid += 1;
            let known = Known {
                uid: format!("standalone-{}", self.next_uid),
                generation: 0,
                file: file.to_path_buf(),
                fingerprint: String::new(),
                invalid: None,
            };
            self.known.insert(key.clone(), known);
        }
        let (id, generation, previous) = {
            let known = self.known.get_mut(key).expect("inserted above");
            if known.fingerprint != fingerprint {
                known.generation += 1;
                known.fingerprint = fingerprint;
            }
            known.file = file.to_path_buf();
            let id = TaskId::new(key.clone(), known.uid.clone());
            (id, known.generation, known.invalid.clone())
        };
        self.observe(&id, generation, &task, seed.clone());
        let outcome = match task {
            Ok(mut task) => {
                let meta = &mut task.metadata;
                meta.uid = Some(id.uid.to_string());
                meta.generation = Some(generation);
                meta.namespace = Some(key.namespace.clone());
                meta.creation_timestamp.get_or_insert_with(anchor);
                // Catch-up starts where the history's last run left off.
                task.status = seed.clone();
                self.valid(&task).await
            }
            Err(error) => Err(Invalid(format!("cannot decode the ChronTask: {error}"))),
        };
        let invalid = outcome.as_ref().err().map(|Invalid(reason)| reason.clone());
        if let Some(known) = self.known.get_mut(key) {
            known.invalid = invalid.clone();
        }
        match outcome {
            Ok(mut valid) => {
                if let Some(status) = self.index.lock().status(key) {
                    resume_from(&mut valid, &status);
                }
                // Without history of earlier runs, a task starts from now.
                if seed.is_none() {
                    valid.engine.catch_up_from = None;
                }
                info!(task = %key, file = %file.display(), schedule = %valid.schedule_text, "task scheduled");
                self.engine.upsert(valid.engine).await;
            }
            // Reported once per reason.
            Err(Invalid(reason)) if previous.as_ref() != Some(&reason) => {
                warn!(task = %key, file = %file.display(), %reason, "invalid task");
                self.engine.invalidate(id, reason).await;
            }
            Err(_) => {}
        }
    }

    /// Tells the status index about the task, as the controller does with what it watches.
    fn observe(
        &self,
        id: &TaskId,
        generation: i64,
        task: &Result<ChronTask, String>,
        seed: Option<ChronTaskStatus>,
    ) {
        let history = task
            .as_ref()
            .ok()
            .and_then(|t| t.spec.history)
            .unwrap_or_default();
        self.index.observe(Observed {
            task: id.clone(),
            generation: Some(generation),
            status: seed,
            history,
        });
    }

    /// Validation as the operator does it, and every value the task names can be read.
    async fn valid(
        &self,
        task: &ChronTask,
    ) -> Result<crate::controller::validate::ValidTask, Invalid> {
        let valid = validate(task, self.timezone).and_then(|v| self.limits.allow(v))?;
        let namespace = task.metadata.namespace.as_deref().unwrap_or_default();
        for reference in &valid.references {
            use crate::executor::http::ValueSource;
            self.values
                .get(namespace, reference)
                .await
                .map_err(Invalid)?;
        }
        Ok(valid)
    }
}

/// Parses the documents of the file at `path` into `file`, each keyed by namespace and name;
/// what cannot be parsed goes to its problems (a document that names its task but is not a valid ChronTask makes
/// that task Invalid, as the operator does with an object it cannot decode).
fn documents(path: &Path, text: &str, file: &mut File) {
    let problems = &mut file.problems;
    for (n, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let place = format!("{} (document {})", path.display(), n + 1);
        let value = match serde_yaml::Value::deserialize(document) {
            Ok(serde_yaml::Value::Null) => continue,
            Ok(value) => value,
            Err(e) => {
                // YAML syntax: the rest of the file cannot be read either.
                problems.push(format!("{place}: {e}"));
                return;
            }
        };
        let kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or("");
        let api_version = value
            .get("apiVersion")
            .and_then(|v| v.as_str())
            .unwrap_or("");
        if kind != "ChronTask" || !api_version.starts_with("chronflow.io/") {
            problems.push(format!(
                "{place}: not a ChronTask (kind {kind:?}, apiVersion {api_version:?})"
            ));
            continue;
        }
        let metadata = value.get("metadata");
        let text_of = |field: &str| {
            metadata
                .and_then(|m| m.get(field))
                .and_then(|v| v.as_str())
                .map(str::to_string)
        };
        let Some(name) = text_of("name") else {
            problems.push(format!("{place}: metadata.name is missing"));
            continue;
        };
        let namespace = text_of("namespace").unwrap_or_else(|| DEFAULT_NAMESPACE.into());
        let key = TaskKey::new(namespace, name);
        // Reported as the task's Invalid reason, with its file.
        let task = serde_path_to_error::deserialize::<_, ChronTask>(value)
            .map_err(|e| format!("{}: {}", e.path(), e.inner()));
        file.documents.push(Document { place, key, task });
    }
}
