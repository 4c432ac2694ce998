//! The run ledger in Redis: exactly once across replicas, fenced by the leader's epoch.
//!
//! Keys of one task share the hash tag `{<namespace>/<name>}`, so each script touches one slot
//! and the layout works on Redis Cluster too:
//!
//! | key | type | holds |
//! |-----|------|-------|
//! | `chronflow:{ns/name}:epoch` | string | the highest epoch that acted on the task |
//! | `chronflow:{ns/name}:runs` | hash | run → `STATE EPOCH HOLDER`; a run is its instant (Unix ms) or `m:<request>` (run now) |
//! | `chronflow:{ns/name}:order` | sorted set | runs by instant (a request: when it was seen), for take-over and pruning |
//! | `chronflow:{ns/name}:counts` | hash | `runs`, `succeeded`, `failed`, `missed`, `manual`, `pruned_before` |
//! | `chronflow:{ns/name}:open` | sorted set | runs claimed or started, not yet final |
//!
//! Fencing is per task: a claim or a `started`/`missed` mark from an epoch below the task's
//! stored epoch is refused, and any accepted one raises it. A leader that takes over raises
//! every task's epoch through [`Ledger::take_over`] before it fires, so from then on a stale
//! leader cannot start anything. A run a stale leader had already started is not undone: its
//! `finished` mark is accepted (the run did happen), so it is counted once.

use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use deadpool_redis::{Config, PoolConfig, Runtime, Timeouts};
use redis::Script;

use futures::future::{BoxFuture, FutureExt};

use super::{Counts, Ledger, LedgerError, Mark, Marked, Record, RunState, TakeOver, Verdict};
use crate::config::{ConfigError, RedisConfig};
use crate::run::Term;
use crate::run::{RunId, TaskKey};

/// Records older than this are pruned; a claim for an instant before the pruned horizon is
/// refused as already handled, so a long catch-up cannot replay a pruned run.
pub const RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

/// `KEYS`: epoch, runs, order, counts, open. `ARGV`: epoch, run (its field), holder, prune
/// horizon (ms), the run's instant (ms), `next` or `past` (a backfill). Returns `{"accepted"}`,
/// `{"held", RECORD}` or `{"fenced", EPOCH}`.
const CLAIM: &str = r#"
local epoch = tonumber(ARGV[1])
local stored = tonumber(redis.call('GET', KEYS[1]) or '0')
if epoch < stored then return {'fenced', tostring(stored)} end
if epoch > stored then redis.call('SET', KEYS[1], epoch) end
local before = tonumber(redis.call('HGET', KEYS[4], 'pruned_before') or '0')
if tonumber(ARGV[5]) < before then return {'held', 'pruned 0 -'} end
local record = redis.call('HGET', KEYS[2], ARGV[2])
if record then
  local state, owner = string.match(record, '^(%S+) (%S+)')
  -- A claim of a dead epoch that never started is adopted: its leader can no longer start it.
  local adopt = state == 'claimed' and tonumber(owner) < epoch
  -- A backfill runs an instant that was missed when it was due.
  local backfill = state == 'missed' and ARGV[6] == 'past'
  if not (adopt or backfill) then return {'held', record} end
end
redis.call('HSET', KEYS[2], ARGV[2], 'claimed ' .. ARGV[1] .. ' ' .. ARGV[3])
redis.call('ZADD', KEYS[3], ARGV[5], ARGV[2])
redis.call('ZADD', KEYS[5], ARGV[5], ARGV[2])
local old = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', '(' .. ARGV[4], 'WITHSCORES', 'LIMIT', 0, 64)
if #old > 0 then
  local runs, horizon = {}, before
  for i = 1, #old, 2 do
    table.insert(runs, old[i])
    horizon = math.max(horizon, tonumber(old[i + 1]) + 1)
  end
  redis.call('HDEL', KEYS[2], unpack(runs))
  redis.call('ZREM', KEYS[3], unpack(runs))
  redis.call('ZREM', KEYS[5], unpack(runs))
  redis.call('HSET', KEYS[4], 'pruned_before', string.format('%d', horizon))
end
return {'accepted'}
"#;

/// `KEYS`: epoch, runs, order, counts, open. `ARGV`: epoch, run (its field), holder, new state
/// (`started`, `succeeded`, `failed`, `missed`), how many instants (`missed` only: a catch-up
/// skips many at once, recorded at the newest), the run's instant (ms). Returns `{VERDICT, …,
/// runs, succeeded, failed, missed, manual}` with VERDICT `accepted`, `held RECORD` or `fenced
/// EPOCH`.
const MARK: &str = r#"
local epoch = tonumber(ARGV[1])
local to = ARGV[4]
local stored = tonumber(redis.call('GET', KEYS[1]) or '0')
local record = redis.call('HGET', KEYS[2], ARGV[2])
local state, owner, holder = 'none', '0', ''
if record then state, owner, holder = string.match(record, '^(%S+) (%S+) (.*)$') end
-- The run is this leader's: its epoch and its name (without leader election every process has
-- epoch 0, and a restarted one may have taken the claim over).
local mine = owner == ARGV[1] and holder == ARGV[3]
local final = to == 'succeeded' or to == 'failed'
local function counts(verdict)
  local c = redis.call('HMGET', KEYS[4], 'runs', 'succeeded', 'failed', 'missed', 'manual')
  for i = 1, 5 do table.insert(verdict, c[i] or '0') end
  return verdict
end
-- A run this epoch started is finished whatever happened since; anything else is fenced.
if not (final and mine) and epoch < stored then return counts({'fenced', tostring(stored)}) end
if epoch > stored then redis.call('SET', KEYS[1], epoch) end
local allowed = (to == 'started' and state == 'claimed' and mine)
  or (final and mine and (state == 'claimed' or state == 'started'))
  or (to == 'missed' and (state == 'none' or (state == 'claimed' and mine)))
if not allowed then return counts({'held', record or 'none 0 -'}) end
redis.call('HSET', KEYS[2], ARGV[2], to .. ' ' .. ARGV[1] .. ' ' .. ARGV[3])
redis.call('ZADD', KEYS[3], ARGV[6], ARGV[2])
if to ~= 'started' then
  redis.call('ZREM', KEYS[5], ARGV[2])
  if to == 'missed' then
    redis.call('HINCRBY', KEYS[4], 'missed', tonumber(ARGV[5]))
  else
    redis.call('HINCRBY', KEYS[4], 'runs', 1)
    redis.call('HINCRBY', KEYS[4], to, 1)
    if string.sub(ARGV[2], 1, 2) == 'm:' then redis.call('HINCRBY', KEYS[4], 'manual', 1) end
  end
end
return counts({'accepted'})
"#;

/// `KEYS`: epoch, runs, order, counts, open. `ARGV`: epoch, holder, `settle` or `keep`.
/// Take-over of the task by a new leader: raises its epoch (or returns `{"fenced", EPOCH}`);
/// an earlier leader is an older epoch or, without leader election (every process in epoch 0),
/// another process. Runs an earlier leader started are kept open (reported in flight) or, with
/// `settle`, counted failed (their outcome is unknown; they are never run again); its claims
/// of scheduled instants that never started become this leader's (a run-now claim is adopted
/// when its request is seen again). Returns `{"taken", NEWEST, runs, succeeded, failed, missed,
/// manual, N, UNSTARTED×N, IN_FLIGHT…}`: the newest scheduled instant on record (`""` if none),
/// the claims taken over (run them), and the runs in flight.
const TAKE_OVER: &str = r#"
local epoch = tonumber(ARGV[1])
local stored = tonumber(redis.call('GET', KEYS[1]) or '0')
if epoch < stored then return {'fenced', tostring(stored)} end
redis.call('SET', KEYS[1], epoch)
local unstarted, in_flight = {}, {}
for _, run in ipairs(redis.call('ZRANGE', KEYS[5], 0, -1)) do
  local record = redis.call('HGET', KEYS[2], run)
  local state, owner, holder = 'none', '0', ''
  if record then state, owner, holder = string.match(record, '^(%S+) (%S+) (.*)$') end
  local scheduled = tonumber(run) ~= nil
  -- An earlier leader: an older epoch, or (without leader election, epoch 0) another process.
  if tonumber(owner) < epoch or (tonumber(owner) == epoch and holder ~= ARGV[2]) then
    if state == 'started' and ARGV[3] == 'keep' then
      table.insert(in_flight, run)
    elseif state == 'started' then
      redis.call('HSET', KEYS[2], run, 'failed ' .. owner .. ' ' .. ARGV[2])
      redis.call('HINCRBY', KEYS[4], 'runs', 1)
      redis.call('HINCRBY', KEYS[4], 'failed', 1)
      if not scheduled then redis.call('HINCRBY', KEYS[4], 'manual', 1) end
      redis.call('ZREM', KEYS[5], run)
    elseif state == 'claimed' and scheduled then
      -- Taken over in place: the earlier leader can no longer start it, this one will.
      redis.call('HSET', KEYS[2], run, 'claimed ' .. ARGV[1] .. ' ' .. ARGV[2])
      table.insert(unstarted, run)
    elseif state ~= 'claimed' then
      redis.call('ZREM', KEYS[5], run)
    end
  end
end
local newest = ''
for _, run in ipairs(redis.call('ZREVRANGE', KEYS[3], 0, 63)) do
  if tonumber(run) then newest = run break end
end
local out = {'taken', newest}
local c = redis.call('HMGET', KEYS[4], 'runs', 'succeeded', 'failed', 'missed', 'manual')
for i = 1, 5 do table.insert(out, c[i] or '0') end
table.insert(out, tostring(#unstarted))
for _, run in ipairs(unstarted) do table.insert(out, run) end
for _, run in ipairs(in_flight) do table.insert(out, run) end
return out
"#;

/// `KEYS`: epoch, runs, order, counts, open. `ARGV`: epoch, run (its field), holder, the run's
/// instant (ms). A run whose work lives on outside its leader (a Job) is taken over as started
/// by this leader, which then records its end: accepted unless it is over, or already this
/// leader's. Returns `{"accepted"}`, `{"held", RECORD}` or `{"fenced", EPOCH}`.
const ADOPT: &str = r#"
local epoch = tonumber(ARGV[1])
local stored = tonumber(redis.call('GET', KEYS[1]) or '0')
if epoch < stored then return {'fenced', tostring(stored)} end
if epoch > stored then redis.call('SET', KEYS[1], epoch) end
local record = redis.call('HGET', KEYS[2], ARGV[2])
local state, owner, holder = 'none', '0', ''
if record then state, owner, holder = string.match(record, '^(%S+) (%S+) (.*)$') end
local mine = owner == ARGV[1] and holder == ARGV[3]
local open = state == 'none' or state == 'claimed' or state == 'started'
if mine or not open then return {'held', record or 'none 0 -'} end
redis.call('HSET', KEYS[2], ARGV[2], 'started ' .. ARGV[1] .. ' ' .. ARGV[3])
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[2])
redis.call('ZADD', KEYS[5], ARGV[4], ARGV[2])
return {'accepted'}
"#;

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
    /// Size of the connection pool.
    pub max_connections: usize,
    /// How long one ledger operation may take, connection checkout included.
    pub timeout: Duration,
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
        })
    }
}

/// One bounded pool of connections: to one server, or to a cluster (each pooled connection
/// reaches every node).
enum Pool {
    Single(deadpool_redis::Pool),
    Cluster(deadpool_redis::cluster::Pool),
}

/// The ledger, over one bounded connection pool.
pub struct RedisLedger {
    pool: Pool,
    timeout: Duration,
    claim: Script,
    mark: Script,
    take_over: Script,
    adopt: Script,
}

impl RedisLedger {
    /// Builds the pool; connections are made on demand (the first operation tells whether
    /// Redis is reachable).
    pub fn new(settings: &RedisSettings) -> Result<Self, LedgerError> {
        let wait = Some(settings.timeout);
        let limits = PoolConfig {
            max_size: settings.max_connections,
            timeouts: Timeouts {
                wait,
                create: wait,
                recycle: wait,
            },
            ..PoolConfig::default()
        };
        let runtime = Some(Runtime::Tokio1);
        let pool = if let Some(ca) = &settings.ca {
            if settings.cluster {
                return Err(redis_error(
                    "a CA file (redis.ca_file) is not supported with cluster",
                ));
            }
            let certificates = redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(ca.clone()),
            };
            let client = redis::Client::build_with_tls(settings.url.as_str(), certificates)
                .map_err(redis_error)?;
            let manager = deadpool_redis::Manager::new(client.get_connection_info().clone())
                .map_err(redis_error)?;
            let builder = deadpool_redis::Pool::builder(manager).runtime(Runtime::Tokio1);
            Pool::Single(builder.config(limits).build().map_err(redis_error)?)
        } else if settings.cluster {
            let mut config = deadpool_redis::cluster::Config::from_urls(vec![settings.url.clone()]);
            config.pool = Some(limits);
            Pool::Cluster(config.create_pool(runtime).map_err(redis_error)?)
        } else {
            let mut config = Config::from_url(settings.url.clone());
            config.pool = Some(limits);
            Pool::Single(config.create_pool(runtime).map_err(redis_error)?)
        };
        Ok(Self {
            pool,
            timeout: settings.timeout,
            claim: Script::new(CLAIM),
            mark: Script::new(MARK),
            take_over: Script::new(TAKE_OVER),
            adopt: Script::new(ADOPT),
        })
    }

    /// Pool size and connections in use, for metrics.
    pub fn pool_status(&self) -> (usize, usize) {
        let status = match &self.pool {
            Pool::Single(pool) => pool.status(),
            Pool::Cluster(pool) => pool.status(),
        };
        (status.max_size, status.size - status.available)
    }

    /// Runs `script` on the task's keys, within the timeout (connection checkout included).
    async fn invoke(
        &self,
        script: &Script,
        task: &TaskKey,
        args: &[String],
    ) -> Result<Vec<String>, LedgerError> {
        let mut invocation = script.prepare_invoke();
        for key in keys(task) {
            invocation.key(key);
        }
        for arg in args {
            invocation.arg(arg);
        }
        let run = async {
            match &self.pool {
                Pool::Single(pool) => {
                    let mut connection = pool.get().await.map_err(redis_error)?;
                    invocation.invoke_async(&mut connection).await
                }
                Pool::Cluster(pool) => {
                    let mut connection = pool.get().await.map_err(redis_error)?;
                    invocation.invoke_async(&mut connection).await
                }
            }
            .map_err(redis_error)
        };
        tokio::time::timeout(self.timeout, run)
            .await
            .map_err(|_| LedgerError(format!("redis: no answer within {:?}", self.timeout)))?
    }
}

impl RedisLedger {
    async fn claim_with(
        &self,
        run: &RunId,
        term: &Term,
        mode: &str,
    ) -> Result<Verdict, LedgerError> {
        let retention = chrono::Duration::from_std(RETENTION).unwrap_or_default();
        let args = [
            term.epoch.to_string(),
            field(run),
            term.holder.clone(),
            millis(run.instant() - retention),
            millis(run.instant()),
            mode.to_string(),
        ];
        let reply = self.invoke(&self.claim, run.task(), &args).await?;
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
            let (state, count) = match mark {
                Mark::Started => ("started", 1),
                Mark::Finished { succeeded: true } => ("succeeded", 1),
                Mark::Finished { succeeded: false } => ("failed", 1),
                Mark::Missed { count } => ("missed", count),
            };
            let args = [
                term.epoch.to_string(),
                field(run),
                term.holder.clone(),
                state.to_string(),
                count.to_string(),
                millis(run.instant()),
            ];
            let reply = self.invoke(&self.mark, run.task(), &args).await?;
            let (head, tail) = reply.split_at(reply.len().saturating_sub(5));
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
            let args = [
                term.epoch.to_string(),
                field(run),
                term.holder.clone(),
                millis(run.instant()),
            ];
            let reply = self.invoke(&self.adopt, run.task(), &args).await?;
            Ok(Marked {
                verdict: verdict(&reply)?,
                counts: None,
            })
        }
        .boxed()
    }

    fn take_over<'a>(
        &'a self,
        task: &'a TaskKey,
        term: &'a Term,
        settle: bool,
    ) -> BoxFuture<'a, Result<TakeOver, LedgerError>> {
        async move {
            let mode = if settle { "settle" } else { "keep" };
            let args = [term.epoch.to_string(), term.holder.clone(), mode.into()];
            let reply = self.invoke(&self.take_over, task, &args).await?;
            match reply.first().map(String::as_str) {
                Some("taken") if reply.len() >= 8 => {
                    let unstarted: usize = reply[7].parse().map_err(redis_error)?;
                    let instants = |list: &[String]| {
                        list.iter()
                            .map(|instant| instant_of(instant))
                            .collect::<Result<Vec<_>, _>>()
                    };
                    let (unstarted, in_flight) = reply[8..]
                        .split_at_checked(unstarted)
                        .ok_or_else(|| redis_error(format!("odd take-over reply {reply:?}")))?;
                    Ok(TakeOver {
                        newest: match reply[1].as_str() {
                            "" => None,
                            newest => Some(instant_of(newest)?),
                        },
                        counts: Some(counts(&reply[2..7])?),
                        unstarted: instants(unstarted)?,
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
}

fn redis_error(error: impl std::fmt::Display) -> LedgerError {
    LedgerError(format!("redis: {error}"))
}

/// The task's keys, in the order the scripts take them.
fn keys(task: &TaskKey) -> [String; 5] {
    let tag = format!("chronflow:{{{task}}}");
    ["epoch", "runs", "order", "counts", "open"].map(|key| format!("{tag}:{key}"))
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
fn run_of(task: &TaskKey, field: &str) -> Result<RunId, LedgerError> {
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
        [word, epoch] if word == "fenced" => Ok(Verdict::Fenced {
            epoch: epoch.parse().unwrap_or(u64::MAX),
        }),
        _ => Err(redis_error(format!("unexpected reply {reply:?}"))),
    }
}

/// `runs, succeeded, failed, missed, manual`.
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
