//! Run-now requests (`chronflow.io/run-now`): served when this replica leads and the task is
//! not being taken over, claimed in the ledger by the request's value, so a request runs once
//! whichever replica sees it and however often.

use std::sync::Arc;
use std::time::Duration;

use tracing::warn;

use super::{Engine, TAKE_OVER_RETRY, claimed, term_ends};
use crate::executor::{RunRequest, RunSpec};
use crate::ledger::Verdict;
use crate::run::{MissKind, Report, RunId, TaskId, TaskKey, Trigger};

/// A request waiting for this replica to lead.
pub(super) struct Request {
    /// The annotation's value.
    pub request: String,
    /// The task's run spec when the request came.
    pub spec: Arc<RunSpec>,
    /// The task's generation then.
    pub generation: i64,
    /// Paused, without `run-now-while-paused`: the request is not run.
    pub refused_while_paused: bool,
}

impl Engine {
    /// Runs the task's waiting run-now request, if this replica leads and the task is not being
    /// taken over: claimed in the ledger by its request, so it runs once whoever sees it.
    pub(super) fn serve_request(&mut self, key: &TaskKey) {
        let Some(uid) = self.tasks.get(key).map(|entry| entry.uid.clone()) else {
            return;
        };
        let Some(term) = self.leading(&uid) else {
            return;
        };
        let now = self.parts.clock.now();
        let Some(entry) = self.tasks.get_mut(key).filter(|e| !e.taking_over) else {
            return;
        };
        let Some(rare) = &mut entry.extras.rare else {
            return;
        };
        let Some(request) = rare.request.take() else {
            return;
        };
        rare.served = Some(request.request.clone());
        let task = TaskId::new(key.clone(), entry.uid.clone());
        let run_id = RunId::manual(&task, &request.request, now);
        let handled = Report::RequestHandled {
            task: task.clone(),
            request: request.request.clone(),
        };
        if request.refused_while_paused {
            self.parts.sink.record(Report::Missed {
                task,
                count: 1,
                run: run_id,
                trigger: Trigger::Manual,
                kind: MissKind::Withdrawn,
                reason: format!(
                    "the task is paused; run-now requests run while paused only with the \
                     annotation {}=true",
                    crate::run::RUN_NOW_WHILE_PAUSED_ANNOTATION
                ),
            });
            self.parts.sink.record(handled);
            return;
        }
        let run = RunRequest {
            task,
            generation: request.generation,
            run_id,
            scheduled: now,
            due: now,
            spec: request.spec,
            sequential: false,
            trigger: Trigger::Manual,
            term: term.clone(),
            adopted: false,
        };
        let (ledger, executor, sink) = (
            self.parts.ledger.clone(),
            self.parts.executor.clone(),
            self.parts.sink.clone(),
        );
        let (shutdown, mut leader) = (self.shutdown.clone(), self.parts.leader.clone());
        tokio::spawn(async move {
            // A request is not lost to a ledger that cannot answer: asked again while this term
            // lasts; past it, the next leader serves the request.
            let (mut wait, mut again) = (TAKE_OVER_RETRY, false);
            let verdict = loop {
                match ledger.claim(&run.run_id, &term).await {
                    Err(error) => {
                        warn!(run_id = %run.run_id, %error, ?wait, "cannot claim a run-now request yet");
                        again = true;
                    }
                    Ok(verdict) if again => break Ok(verdict.asked_again(&term)),
                    verdict => break verdict,
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    () = term_ends(&mut leader, &run.task.uid, &term) => return,
                    _ = tokio::time::sleep(wait) => wait = (wait * 2).min(Duration::from_secs(30)),
                }
            };
            // Run here, it is handled once it starts (a crash while it waits leaves it to the
            // next leader); claimed or run elsewhere, it is handled now.
            if let Ok(Verdict::Held(_)) = verdict {
                sink.record(handled);
            }
            if let Some(run) = claimed(sink.as_ref(), run, verdict) {
                executor.submit(run);
            }
        });
    }
}
