//! The run ledger in Redis: exactly once across replicas, fenced by the leader's epoch.
//!
//! Keys of one task share the hash tag `{<namespace>/<name>/<uid>}` (the operator: a task
//! deleted and re-created under its name starts from nothing) or `{<namespace>/<name>}`
//! (standalone processes, whose tasks have no uid they share), so each script touches one slot
//! and the layout works on Redis Cluster too:
//!
//! | key | type | holds |
//! |-----|------|-------|
//! | `chronflow:{task}:epoch` | string | the highest epoch that acted on the task |
//! | `chronflow:{task}:runs` | hash | run → `STATE EPOCH HOLDER`; a run is its instant (Unix ms) or `m:<request>` (run now); `c:<run>`: `REST LOWER`, how many instants without a record of their own the miss recorded at `<run>` still counts, and the record below them; `w:<run>`: when a started run must be over (ms, Redis's clock) |
//! | `chronflow:{task}:order` | sorted set | runs by instant (a request: when it was seen), for take-over and pruning |
//! | `chronflow:{task}:counts` | hash | `runs`, `succeeded`, `failed`, `missed`, `manual`, `revision`, `pruned_before` |
//! | `chronflow:{task}:open` | sorted set | runs claimed or started, not yet final, and `-` (so the set stays, with its TTL, when its last run ends) |
//! | `chronflow:epoch` | string | the newest epoch handed to a leader ([`Ledger::next_epoch`]) |
//!
//! A task's keys live [`KEY_TTL`] after the last step that found less than a day of it gone (a
//! claim, a take-over, an adoption, a miss, or the end that made its counts), so the records of
//! a task nobody deleted through chronflow (deleted while no replica ran) go by themselves; a
//! deleted task's keys are fenced and go after the deletion grace ([`Ledger::forget`]).
//!
//! Claims, marks and term checks asked while others are on their way go together, one script
//! call for up to 256 of them (`batch`; on a cluster, per task): Redis spends its time in the
//! steps, not in a call and a reply each. Every step is atomic as before, and so is a batch.
//!
//! Fencing is per task: a claim or a `started`/`missed` mark from an epoch below the task's
//! stored epoch is refused, and any accepted one raises it. A leader that takes over raises
//! every task's epoch through [`Ledger::take_over`] before it fires, so from then on a stale
//! leader cannot start anything. A run a stale leader had already started is not undone: its
//! `finished` mark is accepted (the run did happen), so it is counted once.

mod batch;
mod connection;
mod scripts;

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use futures::future::{BoxFuture, FutureExt};
use redis::Script;

use self::batch::{Batcher, Call, Step};
use self::connection::Client;
use super::{Counts, Ledger, LedgerError, Mark, Marked, Record, RunState, TakeOver, Verdict};
use crate::config::{ConfigError, RedisConfig};
use crate::run::Term;
use crate::run::{RunId, TaskId};

/// Records older than this are pruned; a claim for an instant before the pruned horizon is
/// refused as already handled, so a long catch-up cannot replay a pruned run.
pub const RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

/// How long a task's keys live after the last write to them: twice [`RETENTION`], so a task
/// that runs at least weekly never loses them. One idle longer (paused, or a yearly schedule)
/// starts again from the counts its status shows (the take-over's seed).
pub const KEY_TTL: Duration = Duration::from_secs(14 * 24 * 3600);

/// The epoch a deleted task's keys are fenced with until they expire: above any term's.
const FORGOTTEN: u64 = 1 << 53;

/// The key of the epoch counter: one for every task, so one leader's epochs only go up.
const EPOCH_COUNTER: &str = "chronflow:epoch";

/// Connection settings, from `redis.*`.
#[derive(Clone, Debug)]
pub struct RedisSettings {
    /// `redis://` or `rediss://` URL with any password (with `cluster`, a seed node).
    pub url: String,
    /// A Redis Cluster: the client learns the other nodes from the seed and routes each
    /// script to the node that holds its task's slot.
    pub cluster: bool,
    /// PEM of the CA to trust for `rediss://` (else the web PKI roots).
    pub ca: Option<Vec<u8>>,
    /// Multiplexed connections to open (to each node of a cluster); operations take them in
    /// turn, many in flight on each.
    pub max_connections: usize,
    /// How long one ledger operation may take, connecting included.
    pub timeout: Duration,
    /// Replicas that must have each write (`WAIT`) before it counts as done; 0: none.
    pub wait_replicas: u32,
}

impl RedisSettings {
    /// The settings `redis.*` make; reads the password and CA files.
    pub fn from_config(config: &RedisConfig) -> Result<Self, ConfigError> {
        let ca = match &config.ca_file {
            Some(path) => Some(std::fs::read(path).map_err(|e| {
                let problem = format!("redis.ca_file: cannot read {}: {e}", path.display());
                ConfigError::from(problem)
            })?),
            None => None,
        };
        Ok(Self {
            url: config.connection_url()?,
            cluster: config.cluster,
            ca,
            max_connections: config.max_connections as usize,
            timeout: config.timeout,
            wait_replicas: config.wait_replicas,
        })
    }
}

/// The ledger, over a few multiplexed connections; claims, marks and term checks go in batches.
pub struct RedisLedger {
    client: Arc<Client>,
    by_uid: bool,
    claims: Batcher,
    marks: Batcher,
    /// Reads of a task's epoch ([`Ledger::holds`]).
    epochs: Batcher,
    take_over: Script,
    adopt: Script,
    forget: Script,
    next_epoch: Script,
}

impl RedisLedger {
    /// Prepares the connections; they are made on first use (the first operation tells
    /// whether Redis is reachable). Within a Tokio runtime.
    pub fn new(settings: &RedisSettings) -> Result<Self, LedgerError> {
        let client = Arc::new(Client::new(settings)?);
        Ok(Self {
            claims: Batcher::new(client.clone(), Call::Script(scripts::batch(scripts::CLAIM))),
            marks: Batcher::new(client.clone(), Call::Script(scripts::batch(scripts::MARK))),
            epochs: Batcher::new(client.clone(), Call::Get),
            take_over: scripts::batch(scripts::TAKE_OVER),
            adopt: scripts::batch(scripts::ADOPT),
            forget: scripts::batch(scripts::FORGET),
            next_epoch: Script::new(scripts::NEXT_EPOCH),
            client,
            by_uid: true,
        })
    }

    /// Keys tasks by name alone, for processes whose tasks carry no uid they share (standalone
    /// processes reading the same manifests): a task re-created under its name goes on from
    /// its record.
    pub fn keyed_by_name(mut self) -> Self {
        self.by_uid = false;
        self
    }

    /// The task's keys, in the order the scripts take them.
    fn keys(&self, task: &TaskId) -> Vec<String> {
        let tag = self.tag(task);
        ["epoch", "runs", "order", "counts", "open"]
            .iter()
            .map(|key| format!("{tag}:{key}"))
            .collect()
    }

    /// What the task's keys begin with: `chronflow:` and their hash tag.
    fn tag(&self, task: &TaskId) -> String {
        match self.by_uid {
            true => format!("chronflow:{{{}/{}}}", task.key, task.uid),
            false => format!("chronflow:{{{}}}", task.key),
        }
    }

    /// The server's `maxmemory-policy`, when it lets clients read it (managed services may
    /// refuse `CONFIG`).
    pub async fn eviction_policy(&self) -> Result<String, LedgerError> {
        let mut command = redis::cmd("CONFIG");
        command.arg("GET").arg("maxmemory-policy");
        let reply: std::collections::HashMap<String, String> = self.client.query(&command).await?;
        reply
            .get("maxmemory-policy")
            .cloned()
            .ok_or_else(|| redis_error(format!("unexpected CONFIG GET reply {reply:?}")))
    }

    /// The connections this ledger uses (`redis.max_connections`), for metrics.
    pub fn connection_count(&self) -> usize {
        self.client.connection_count()
    }

    /// Operations waiting for their answer, for metrics.
    pub fn in_flight(&self) -> usize {
        self.client.in_flight()
    }

    /// One step of `batcher`'s script on the task's keys, batched with others waiting.
    async fn batched(
        &self,
        batcher: &Batcher,
        task: &TaskId,
        args: Vec<String>,
    ) -> Result<Vec<String>, LedgerError> {
        let keys = self.keys(task);
        self.client.within(batcher.call(Step { keys, args })).await
    }

    /// `script` on the task's keys, alone.
    async fn invoke(
        &self,
        script: &Script,
        task: &TaskId,
        args: Vec<String>,
    ) -> Result<Vec<String>, LedgerError> {
        let step = Step {
            keys: self.keys(task),
            args,
        };
        let replies = self
            .client
            .within(batch::invoke(&self.client, script, std::iter::once(&step)))
            .await?;
        replies
            .into_iter()
            .next()
            .ok_or_else(|| redis_error("no reply to a script"))
    }

    async fn claim_with(
        &self,
        run: &RunId,
        term: &Term,
        mode: &str,
    ) -> Result<Verdict, LedgerError> {
        let retention = chrono::Duration::from_std(RETENTION).unwrap_or_default();
        let args = vec![
            term.epoch.to_string(),
            field(run),
            term.holder.to_string(),
            millis(run.instant() - retention),
            millis(run.instant()),
            mode.to_string(),
        ];
        let reply = self.batched(&self.claims, run.task_id(), args).await?;
        verdict(&reply)
    }
}

impl Ledger for RedisLedger {
    fn claim<'a>(
        &'a self,
        run: &'a RunId,
        term: &'a Term,
    ) -> BoxFuture<'a, Result<Verdict, LedgerError>> {
        self.claim_with(run, term, "next").boxed()
    }

    fn claim_past<'a>(
        &'a self,
        run: &'a RunId,
        term: &'a Term,
    ) -> BoxFuture<'a, Result<Verdict, LedgerError>> {
        self.claim_with(run, term, "past").boxed()
    }

    fn mark<'a>(
        &'a self,
        run: &'a RunId,
        term: &'a Term,
        mark: Mark,
    ) -> BoxFuture<'a, Result<Marked, LedgerError>> {
        async move {
            let (state, count, alone, window) = match mark {
                Mark::Started { window } => ("started", 1, "", window.as_millis()),
                Mark::StartedAlone { window } => ("started", 1, "alone", window.as_millis()),
                Mark::Finished { succeeded: true } => ("succeeded", 1, "", 0),
                Mark::Finished { succeeded: false } => ("failed", 1, "", 0),
                Mark::Missed { count } => ("missed", count, "", 0),
                Mark::Abandoned => ("abandoned", 1, "", 0),
            };
            let args = vec![
                term.epoch.to_string(),
                field(run),
                term.holder.to_string(),
                state.to_string(),
                count.to_string(),
                millis(run.instant()),
                alone.to_string(),
                window.to_string(),
            ];
            let reply = self.batched(&self.marks, run.task_id(), args).await?;
            // The counts follow the verdict (one or two fields), but not after a start.
            if reply.len() <= 2 {
                return Ok(Marked {
                    verdict: verdict(&reply)?,
                    counts: None,
                });
            }
            let (head, tail) = reply.split_at(reply.len() - 6);
            Ok(Marked {
                verdict: verdict(head)?,
                counts: Some(counts(tail)?),
            })
        }
        .boxed()
    }

    fn adopt<'a>(
        &'a self,
        run: &'a RunId,
        term: &'a Term,
    ) -> BoxFuture<'a, Result<Marked, LedgerError>> {
        async move {
            let args = vec![
                term.epoch.to_string(),
                field(run),
                term.holder.to_string(),
                millis(run.instant()),
            ];
            let reply = self.invoke(&self.adopt, run.task_id(), args).await?;
            Ok(Marked {
                verdict: verdict(&reply)?,
                counts: None,
            })
        }
        .boxed()
    }

    fn take_over<'a>(
        &'a self,
        task: &'a TaskId,
        term: &'a Term,
        settle: &'a [RunId],
        seed: Option<Counts>,
    ) -> BoxFuture<'a, Result<TakeOver, LedgerError>> {
        async move {
            let mut args = vec![term.epoch.to_string(), term.holder.to_string()];
            match seed {
                Some(seed) => args.extend(
                    [
                        seed.runs,
                        seed.succeeded,
                        seed.failed,
                        seed.missed,
                        seed.manual,
                    ]
                    .map(|n| n.to_string()),
                ),
                None => args.extend(["-"; 5].map(String::from)),
            }
            args.extend(settle.iter().map(field));
            let reply = self.invoke(&self.take_over, task, args).await?;
            match reply.first().map(String::as_str) {
                Some("taken") if reply.len() >= 10 => {
                    let unstarted: usize = reply[9].parse().map_err(redis_error)?;
                    let (unstarted, in_flight) = reply[10..]
                        .split_at_checked(unstarted)
                        .ok_or_else(|| redis_error(format!("odd take-over reply {reply:?}")))?;
                    Ok(TakeOver {
                        newest: match reply[1].as_str() {
                            "" => None,
                            newest => Some(instant_of(newest)?),
                        },
                        in_flight_for: match reply[2].as_str() {
                            "-" => None,
                            ms => Some(Duration::from_millis(ms.parse().map_err(redis_error)?)),
                        },
                        counts: Some(counts(&reply[3..9])?),
                        unstarted: unstarted
                            .iter()
                            .map(|run| run_of(task, run))
                            .collect::<Result<_, _>>()?,
                        in_flight: in_flight
                            .iter()
                            .map(|run| run_of(task, run))
                            .collect::<Result<_, _>>()?,
                    })
                }
                _ => match verdict(&reply)? {
                    Verdict::Fenced { epoch } => Err(LedgerError(format!(
                        "fenced: the ledger has seen epoch {epoch}, newer than this leader's {}",
                        term.epoch
                    ))),
                    other => Err(LedgerError(format!("redis: unexpected reply {other:?}"))),
                },
            }
        }
        .boxed()
    }

    fn next_epoch(&self, floor: u64) -> BoxFuture<'_, Result<u64, LedgerError>> {
        async move {
            let mut invocation = self.next_epoch.prepare_invoke();
            invocation.key(EPOCH_COUNTER).arg(floor);
            self.client.within(self.client.invoke(&invocation)).await
        }
        .boxed()
    }

    fn holds<'a>(
        &'a self,
        task: &'a TaskId,
        term: &'a Term,
    ) -> BoxFuture<'a, Result<bool, LedgerError>> {
        async move {
            let step = Step {
                keys: vec![format!("{}:epoch", self.tag(task))],
                args: Vec::new(),
            };
            let reply = self.client.within(self.epochs.call(step)).await?;
            let stored = match reply.first().map(String::as_str) {
                None | Some("") => None,
                Some(epoch) => Some(epoch.parse::<u64>().map_err(redis_error)?),
            };
            Ok(stored.is_none_or(|epoch| epoch <= term.epoch))
        }
        .boxed()
    }

    fn server_time(&self) -> BoxFuture<'_, Result<Option<DateTime<Utc>>, LedgerError>> {
        async move {
            let (seconds, micros): (i64, i64) = self.client.query(&redis::cmd("TIME")).await?;
            let time = Utc.timestamp_opt(seconds, (micros * 1000) as u32).single();
            time.map(Some)
                .ok_or_else(|| redis_error(format!("odd TIME reply {seconds} {micros}")))
        }
        .boxed()
    }

    fn forget<'a>(
        &'a self,
        task: &'a TaskId,
        grace: Duration,
    ) -> BoxFuture<'a, Result<(), LedgerError>> {
        async move {
            let args = vec![FORGOTTEN.to_string(), grace.as_secs().max(1).to_string()];
            self.invoke(&self.forget, task, args).await?;
            Ok(())
        }
        .boxed()
    }
}

fn redis_error(error: impl std::fmt::Display) -> LedgerError {
    LedgerError(format!("redis: {error}"))
}

/// A run's field in the task's `runs` hash: its instant in Unix ms, or `m:<request>`.
fn field(run: &RunId) -> String {
    match run.request() {
        Some(request) => format!("m:{request}"),
        None => millis(run.instant()),
    }
}

fn millis(instant: DateTime<Utc>) -> String {
    instant.timestamp_millis().to_string()
}

/// The run a field of the `runs` hash names.
fn run_of(task: &TaskId, field: &str) -> Result<RunId, LedgerError> {
    match field.strip_prefix("m:") {
        Some(request) => Ok(RunId::manual(task, request, Utc::now())),
        None => Ok(RunId::new(task, instant_of(field)?)),
    }
}

fn instant_of(text: &str) -> Result<DateTime<Utc>, LedgerError> {
    text.parse::<i64>()
        .ok()
        .and_then(|ms| Utc.timestamp_millis_opt(ms).single())
        .ok_or_else(|| redis_error(format!("bad instant {text:?}")))
}

/// `{"accepted"}`, `{"held", RECORD}` or `{"fenced", EPOCH}`.
fn verdict(reply: &[String]) -> Result<Verdict, LedgerError> {
    match reply {
        [word] if word == "accepted" => Ok(Verdict::Accepted),
        [word, record] if word == "held" => Ok(Verdict::Held(parse_record(record)?)),
        [word, record] if word == "busy" => Ok(Verdict::Busy(parse_record(record)?)),
        [word, epoch] if word == "fenced" => Ok(Verdict::Fenced {
            epoch: epoch.parse().unwrap_or(u64::MAX),
        }),
        _ => Err(redis_error(format!("unexpected reply {reply:?}"))),
    }
}

/// `runs, succeeded, failed, missed, manual, revision`.
fn counts(fields: &[String]) -> Result<Counts, LedgerError> {
    let number = |i: usize| {
        fields
            .get(i)
            .and_then(|field| field.parse::<u64>().ok())
            .ok_or_else(|| redis_error(format!("bad counts {fields:?}")))
    };
    Ok(Counts {
        runs: number(0)?,
        succeeded: number(1)?,
        failed: number(2)?,
        missed: number(3)?,
        manual: number(4)?,
        revision: number(5)?,
    })
}

/// `STATE EPOCH HOLDER`.
fn parse_record(text: &str) -> Result<Record, LedgerError> {
    let mut parts = text.splitn(3, ' ');
    let (Some(state), Some(epoch), Some(holder)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(redis_error(format!("bad record {text:?}")));
    };
    let state = match state {
        "claimed" => RunState::Claimed,
        "started" => RunState::Started,
        "succeeded" => RunState::Succeeded,
        "failed" => RunState::Failed,
        "missed" => RunState::Missed,
        "pruned" | "none" => RunState::Unknown,
        other => return Err(redis_error(format!("bad state {other:?}"))),
    };
    Ok(Record {
        state,
        epoch: epoch.parse().unwrap_or(0),
        holder: holder.to_string(),
    })
}
