//! Operations of one kind sent together. Each claim or mark is one step of a task script
//! ([`super::scripts::batch`]), each term check one read of a task's epoch. One asked while
//! nothing of its kind is on its way goes at once, from the caller's task; those asked
//! meanwhile wait in a queue, and the next call takes all of them: under load one script call,
//! one round trip and one entry into Lua carry hundreds of claims or marks. A task's steps keep
//! their order (they are asked one after the other anyway).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use redis::Script;
use tokio::sync::{Mutex, mpsc, oneshot};

use super::connection::Client;
use super::redis_error;
use crate::ledger::LedgerError;
use crate::metrics::InProgress;

/// The most steps one call carries: a few milliseconds of Redis's time, so other clients (and
/// this ledger's other operations) are not held up longer.
const MAX_STEPS: usize = 256;

/// Batches of one kind in flight at once: while they are on their way, the next steps gather.
const BATCHES_IN_FLIGHT: usize = 2;

/// What a batch of steps is sent as.
pub(super) enum Call {
    /// A task script made by [`super::scripts::batch`]: one call for every step.
    Script(Script),
    /// Each step's one key read: `MGET` (its value, `""` for none).
    Get,
}

/// One step: its keys and its arguments.
pub(super) struct Step {
    pub keys: Vec<String>,
    pub args: Vec<String>,
}

/// The reply to one step.
pub(super) type StepReply = Result<Vec<String>, LedgerError>;

struct Queued {
    step: Step,
    reply: oneshot::Sender<StepReply>,
}

/// Sends steps of one kind, in batches when they come faster than Redis answers.
pub(super) struct Batcher {
    queue: mpsc::UnboundedSender<Queued>,
    kind: Arc<Kind>,
}

/// What a batcher's senders and callers share.
struct Kind {
    client: Arc<Client>,
    call: Call,
    /// Calls on their way.
    busy: AtomicUsize,
}

impl Batcher {
    /// Starts the batcher's senders (they end with it). Within a Tokio runtime.
    pub(super) fn new(client: Arc<Client>, call: Call) -> Self {
        let (queue, steps) = mpsc::unbounded_channel();
        let steps = Arc::new(Mutex::new(steps));
        let kind = Arc::new(Kind {
            client,
            call,
            busy: AtomicUsize::new(0),
        });
        for _ in 0..BATCHES_IN_FLIGHT {
            tokio::spawn(send(kind.clone(), steps.clone()));
        }
        Self { queue, kind }
    }

    /// Runs `step`: at once when nothing of its kind is on its way, else with the others
    /// waiting.
    pub(super) async fn call(&self, step: Step) -> StepReply {
        if self.kind.busy.load(Ordering::Relaxed) == 0 {
            let _busy = InProgress::count(&self.kind.busy);
            let replies = self.kind.invoke(std::slice::from_ref(&step)).await?;
            return replies
                .into_iter()
                .next()
                .ok_or_else(|| redis_error("no reply to a step"));
        }
        let (reply, answer) = oneshot::channel();
        self.queue
            .send(Queued { step, reply })
            .map_err(|_| redis_error("the ledger is shut down"))?;
        answer
            .await
            .map_err(|_| redis_error("the ledger is shut down"))?
    }
}

/// Takes whatever waits (at most [`MAX_STEPS`]) and sends it as one call per shape of step (on
/// a cluster: one per task, as a script reaches one slot; those calls go at once), until the
/// batcher is dropped.
async fn send(kind: Arc<Kind>, steps: Arc<Mutex<mpsc::UnboundedReceiver<Queued>>>) {
    let mut batch = Vec::with_capacity(MAX_STEPS);
    let cluster = kind.client.is_cluster();
    loop {
        if steps.lock().await.recv_many(&mut batch, MAX_STEPS).await == 0 {
            return;
        }
        let _busy = InProgress::count(&kind.busy);
        // Given up on (timed out): not sent, so it cannot land after its operation's retry.
        batch.retain(|queued| !queued.reply.is_closed());
        if cluster {
            // Stable: a task's steps keep their order.
            batch.sort_by(|a, b| a.step.keys[0].cmp(&b.step.keys[0]));
        }
        let same_call = |a: &Queued, b: &Queued| {
            a.step.keys.len() == b.step.keys.len()
                && a.step.args.len() == b.step.args.len()
                && (!cluster || a.step.keys[0] == b.step.keys[0])
        };
        let mut calls = Vec::new();
        let mut queued = batch.drain(..).peekable();
        while let Some(first) = queued.next() {
            let mut call = vec![first];
            while let Some(next) = queued.next_if(|next| same_call(&call[0], next)) {
                call.push(next);
            }
            calls.push(call);
        }
        futures::future::join_all(calls.into_iter().map(|call| async {
            let steps: Vec<&Step> = call.iter().map(|queued| &queued.step).collect();
            let replies = kind.invoke(steps.iter().copied()).await;
            answer(call, replies);
        }))
        .await;
    }
}

impl Kind {
    /// Sends `steps` (all of one shape) as one call: each step's reply, in order.
    async fn invoke<'a>(
        &self,
        steps: impl IntoIterator<Item = &'a Step> + Clone,
    ) -> Result<Vec<Vec<String>>, LedgerError> {
        match &self.call {
            Call::Script(script) => invoke(&self.client, script, steps).await,
            Call::Get => {
                let mut command = redis::cmd("MGET");
                for step in steps {
                    command.arg(&step.keys);
                }
                let values: Vec<Option<String>> = self.client.command(&command).await?;
                Ok(values
                    .into_iter()
                    .map(|value| vec![value.unwrap_or_default()])
                    .collect())
            }
        }
    }
}

/// Calls `script` with `steps` (all of one shape): each step's reply, in order.
pub(super) async fn invoke<'a>(
    client: &Client,
    script: &Script,
    steps: impl IntoIterator<Item = &'a Step> + Clone,
) -> Result<Vec<Vec<String>>, LedgerError> {
    let mut invocation = script.prepare_invoke();
    let mut shape = None;
    for step in steps.clone() {
        shape.get_or_insert((step.keys.len(), step.args.len()));
        for key in &step.keys {
            invocation.key(key);
        }
    }
    let Some((width, arity)) = shape else {
        return Ok(Vec::new());
    };
    invocation.arg(width).arg(arity);
    for step in steps {
        for arg in &step.args {
            invocation.arg(arg);
        }
    }
    client.invoke(&invocation).await
}

/// Hands each queued step its reply (the call's error to each when the call failed).
fn answer(call: Vec<Queued>, replies: Result<Vec<Vec<String>>, LedgerError>) {
    let replies = replies.and_then(|replies| match replies.len() == call.len() {
        true => Ok(replies),
        false => Err(redis_error(format!(
            "{} replies to a batch of {}",
            replies.len(),
            call.len()
        ))),
    });
    match replies {
        Ok(replies) => {
            for (queued, reply) in call.into_iter().zip(replies) {
                let _ = queued.reply.send(Ok(reply));
            }
        }
        Err(error) => {
            for queued in call {
                let _ = queued.reply.send(Err(error.clone()));
            }
        }
    }
}
