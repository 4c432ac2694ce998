//! One run on a worker: its start and end in the ledger and in reports, its attempts with
//! timeout and retries, or its Job; a `RunGuard` ends its stay in the pool even on a panic.

use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use chrono::{DateTime, Utc};
use tokio::sync::OwnedSemaphorePermit;
use tracing::{debug, error, info, warn};

use super::cancel::{Cancel, CancelReason};
use super::ending::{Ending, Endings};
use super::queue::Shared;
use super::{
    Action, JobAction, JobRunner, RunInfo, RunRequest, ValueSource, exec, http, job, missed,
};
use crate::clock::Clock;
use crate::ledger::{Ledger, Mark, Marked, Verdict};
use crate::metrics::InProgress;
use crate::policy::ConcurrencyPolicy;
use crate::run::{FinishedRun, MissKind, Outcome, Report, ReportSink};
use crate::telemetry::LogQuota;

pub(super) struct WorkerContext {
    pub(super) http: http::HttpClient,
    pub(super) values: Arc<dyn ValueSource>,
    pub(super) jobs: Arc<dyn JobRunner>,
    pub(super) job_waits: Arc<AtomicUsize>,
    pub(super) ledger: Arc<dyn Ledger>,
    pub(super) log_success: bool,
    pub(super) sink: Arc<dyn ReportSink>,
    pub(super) clock: Clock,
    pub(super) endings: Endings,
}

/// Ends a run's stay in the pool however its worker ends, even by a panic: the task's runs in
/// flight must not keep a finished run (a `Forbid` task would miss every later run), and a run
/// whose worker panicked is reported as failed.
pub(super) struct RunGuard {
    pub(super) shared: Arc<Shared>,
    pub(super) run: RunRequest,
    /// The handle the run was handed out with: it names the run's place in the pool.
    pub(super) cancel: Cancel,
    pub(super) started: DateTime<Utc>,
    pub(super) reported: bool,
}

impl Drop for RunGuard {
    fn drop(&mut self) {
        if !self.reported {
            error!(run_id = %self.run.run_id, "the run's worker panicked");
            let finished = self.shared.clock.now();
            self.shared.sink.record(finished_report(
                &self.run,
                self.started,
                finished,
                0,
                Err("internal error: the run's worker panicked (a chronflow bug)".into()),
            ));
        }
        self.shared
            .finished(&self.run.task, &self.run.run_id, &self.cancel);
    }
}

fn finished_report(
    run: &RunRequest,
    started: DateTime<Utc>,
    finished: DateTime<Utc>,
    attempts: u32,
    result: Result<String, String>,
) -> Report {
    let (outcome, message) = match result {
        Ok(message) => (Outcome::Succeeded, message),
        Err(message) => (Outcome::Failed, message),
    };
    Report::Finished {
        task: run.task.clone(),
        run: FinishedRun {
            run_id: run.run_id.clone(),
            trigger: run.trigger,
            scheduled: run.scheduled,
            started,
            finished,
            outcome,
            attempts,
            message: Some(message),
        },
    }
}

/// Runs all attempts of one run and reports its start and finish, recording both in the
/// ledger: its start first, which the ledger refuses once a newer leader took the task over
/// (fencing), then its end, which carries the task's counts (handed over: the worker goes on).
pub(super) async fn execute(
    context: &WorkerContext,
    guard: &mut RunGuard,
    cancel: &Cancel,
    worker: OwnedSemaphorePermit,
) {
    let run = &guard.run;
    let starting = if run.adopted {
        context.ledger.adopt(&run.run_id, &run.term).await
    } else {
        // Forbid holds across processes too: the ledger refuses a start while another
        // process's run of the task is in flight.
        let window = run.spec.longest();
        let mark = match run.spec.concurrency {
            ConcurrencyPolicy::Forbid => Mark::StartedAlone { window },
            _ => Mark::Started { window },
        };
        context.ledger.mark(&run.run_id, &run.term, mark).await
    };
    let refusal = match starting {
        Ok(marked) if marked.verdict == Verdict::Accepted => None,
        Ok(Marked {
            verdict: Verdict::Busy(theirs),
            ..
        }) => {
            let reason = format!(
                "concurrencyPolicy Forbid: a run of this task is in flight in another process \
                 ({})",
                theirs.holder
            );
            let skipped = missed(run, MissKind::Concurrency, reason.clone());
            context.sink.record(skipped);
            Some(reason)
        }
        Ok(marked) => Some(format!(
            "the ledger refused its start ({:?})",
            marked.verdict
        )),
        Err(error) => {
            let reason = format!("cannot record the run's start: {error}");
            context
                .sink
                .record(missed(run, MissKind::Claim, reason.clone()));
            Some(reason)
        }
    };
    if let Some(reason) = refusal {
        static NOT_STARTED: LogQuota = LogQuota::new("run not started");
        if NOT_STARTED.allow() {
            warn!(%reason, "run not started");
        }
        guard.reported = true;
        return;
    }
    let job = match &run.spec.action {
        Action::Job(action) => Some((job::job_name(&run.task, &run.run_id), action)),
        _ => None,
    };
    context.sink.record(Report::Started {
        task: run.task.clone(),
        run_id: run.run_id.clone(),
        trigger: run.trigger,
        scheduled: run.scheduled,
        due: run.due,
        started: guard.started,
        job: job.as_ref().map(|(name, _)| name.clone()),
    });
    let (attempts, result) = match job {
        Some((name, action)) => {
            match Box::pin(run_job(context, run, &name, action, cancel, worker)).await {
                Some(end) => end,
                None => {
                    // Shut down with the Job running: it runs on, and whoever leads next finds it
                    // by name and records its end (the run stays started in the ledger and in
                    // status.active).
                    info!(job = %name, "shutting down; the run's Job runs on and is adopted by the next leader");
                    guard.reported = true;
                    return;
                }
            }
        }
        None => attempt_all(context, run, cancel).await,
    };
    let result = match cancel.reason.get() {
        Some(reason) => Err(reason.to_string()),
        None => result,
    };
    match &result {
        // Not `message`: that is the event's own field, and JSON logs would carry it twice.
        Ok(result) if context.log_success => info!(attempts, %result, "run succeeded"),
        Ok(_) => {}
        Err(error) => {
            static FAILED: LogQuota = LogQuota::new("run failed");
            if FAILED.allow() {
                warn!(attempts, %error, "run failed");
            }
        }
    }
    let finished = context.clock.now();
    let succeeded = result.is_ok();
    context.sink.record(finished_report(
        run,
        guard.started,
        finished,
        attempts,
        result,
    ));
    guard.reported = true;
    // Recorded off the worker (`ending`); the executor outlives its workers until it is.
    let _ = context.endings.send(Ending {
        task: run.task.clone(),
        run_id: run.run_id.clone(),
        term: run.term.clone(),
        succeeded,
    });
}

/// Every attempt of a run, with the task's timeout on each and its retry policy between them.
async fn attempt_all(
    context: &WorkerContext,
    run: &RunRequest,
    cancel: &Cancel,
) -> (u32, Result<String, String>) {
    let spec = &run.spec;
    let mut attempts = 0;
    let result = loop {
        attempts += 1;
        // The first attempt follows the start the ledger accepted for this term a moment ago:
        // asking again would cost a round trip per run and close no gap the start leaves open.
        if attempts > 1
            && let Err(refused) = still_holds(context, run).await
        {
            break Err(format!("attempt {attempts} not made: {refused}"));
        }
        let attempt = attempt_once(context, run, attempts);
        let result = tokio::select! {
            _ = cancel.token.cancelled() => break Err(String::new()),
            result = tokio::time::timeout(spec.timeout, attempt) => result
                .unwrap_or_else(|_| Err(format!("timed out after {}", crate::schedule::format_duration(spec.timeout)))),
        };
        match result {
            Ok(message) => break Ok(message),
            Err(message) if attempts >= spec.retry.max_attempts() => break Err(message),
            Err(message) => {
                let delay = spec.retry.delay(attempts);
                debug!(attempt = attempts, error = %message, ?delay, "attempt failed; retrying");
                tokio::select! {
                    _ = cancel.token.cancelled() => break Err(message),
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    };
    (attempts, result)
}

/// Whether the run's term still holds its task in the ledger: a leader frozen after the run's
/// start and woken after another took the task over must not act any more (that one settles
/// the run). A ledger that cannot say is taken as a no: acting could run the instant twice.
async fn still_holds(context: &WorkerContext, run: &RunRequest) -> Result<(), String> {
    match context.ledger.holds(&run.task, &run.term).await {
        Ok(true) => Ok(()),
        Ok(false) => {
            warn!("fenced: a newer leader took the task over after this run started");
            Err("a newer leader took the task over (fenced)".to_string())
        }
        Err(error) => Err(format!(
            "cannot check the leader's term in the ledger: {error}"
        )),
    }
}

/// A Job run: its Job is created (or found) and watched until it ends; Kubernetes retries and
/// times it out (`backoffLimit`, `activeDeadlineSeconds`). The worker is held only to create
/// the Job: waiting for it costs a watch, not a worker. Cancelled by Replace or an invalid
/// spec, the Job is deleted; by a shutdown, it runs on and `None` is returned.
async fn run_job(
    context: &WorkerContext,
    run: &RunRequest,
    name: &str,
    action: &JobAction,
    cancel: &Cancel,
    worker: OwnedSemaphorePermit,
) -> Option<(u32, Result<String, String>)> {
    let job = job::JobRun {
        task: &run.task,
        run_id: &run.run_id,
        epoch: run.term.epoch,
        scheduled: run.scheduled,
        name,
        action,
        adopted: run.adopted,
    };
    // The spec's timeout is the Job's deadline and a grace (`JobAction::deadline`).
    let run_job = async {
        if !run.adopted {
            still_holds(context, run)
                .await
                .map_err(|refused| format!("Job {name} not created: {refused}"))?;
            context.jobs.create(job).await?;
        }
        drop(worker);
        // Counted as a Job run that waits without a worker, for as long as it lives.
        let _counted = InProgress::count(&context.job_waits);
        Ok(context.jobs.wait(job).await)
    };
    let waited = tokio::select! {
        _ = cancel.token.cancelled() => None,
        end = tokio::time::timeout(run.spec.timeout, run_job) => Some(end),
    };
    match waited {
        Some(Ok(Ok(end))) => Some((end.attempts, end.result)),
        Some(Ok(Err(cannot_create))) => Some((1, Err(cannot_create))),
        Some(Err(_)) => Some((
            1,
            Err(format!(
                "Job {name} did not end within its activeDeadlineSeconds ({}) and {} more: is \
                 the cluster's Job controller running?",
                crate::schedule::format_duration(action.deadline),
                crate::schedule::format_duration(job::JOB_DEADLINE_GRACE)
            )),
        )),
        None => match cancel.reason.get() {
            Some(CancelReason::Shutdown) => None,
            _ => {
                context.jobs.stop(&run.task.key.namespace, name).await;
                Some((1, Err(String::new())))
            }
        },
    }
}

async fn attempt_once(
    context: &WorkerContext,
    run: &RunRequest,
    number: u32,
) -> Result<String, String> {
    let attempt = http::Attempt {
        namespace: &run.task.key.namespace,
        run_id: &run.run_id,
        scheduled: run.scheduled,
        number,
        epoch: run.term.epoch,
    };
    // Boxed where they are large (an HTTP attempt's future is kilobytes): inline, every
    // attempt's future would be as large, whatever its action, and copied whole at each start.
    match &run.spec.action {
        Action::Http(action) => {
            Box::pin(http::attempt(
                &context.http,
                &context.values,
                action,
                attempt,
            ))
            .await
        }
        Action::Exec(action) => Box::pin(exec::attempt(action, attempt)).await,
        Action::Job(_) => Err("internal error: a Job run has no attempts of its own".into()),
        Action::Call(call) => {
            let info = RunInfo {
                run_id: run.run_id.to_string(),
                scheduled: run.scheduled,
                attempt: number,
            };
            (call.0)(info).await
        }
    }
}

#[cfg(test)]
mod tests {
    use chrono::{TimeZone, Utc};

    use super::RunGuard;
    use crate::executor::fixtures::{executor, request};
    use crate::run::{Outcome, Report, RunId, TaskId, TaskKey};

    #[tokio::test]
    async fn a_worker_that_panics_reports_a_failure_and_frees_its_task() {
        let (executor, mut reports) = executor();
        let at = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
        let task = TaskId::new(TaskKey::new("ns", "t"), "uid");
        let run = request(at, at, None);
        executor.submit(run);
        let mut dropped = Vec::new();
        let (run, cancel) = executor.shared.next_run(&mut dropped).unwrap();
        let guard = RunGuard {
            shared: executor.shared.clone(),
            run: run.clone(),
            cancel,
            started: at,
            reported: false,
        };
        let worker = tokio::spawn(async move {
            let _guard = guard;
            panic!("a bug in an action");
        });
        assert!(worker.await.unwrap_err().is_panic());
        match reports.recv().await {
            Some(Report::Finished { run, .. }) => {
                assert_eq!(run.outcome, Outcome::Failed);
                assert!(run.message.unwrap().contains("panicked"));
            }
            other => panic!("expected a failed run, got {other:?}"),
        }
        assert!(executor.shared.lock().tasks.is_empty(), "the task is free");
        let mut next = run;
        next.run_id = RunId::new(&task, at + chrono::Duration::seconds(1));
        executor.submit(next);
        assert!(
            executor.shared.next_run(&mut dropped).is_some(),
            "a Forbid task's next run can start"
        );
    }
}
