//! The run ledger in Redis: exactly once across replicas, fenced by the leader's epoch.
//!
//! Keys of one task share the hash tag `{<namespace>/<name>}`, so each script touches one slot
//! and the layout works on Redis Cluster too:
//!
//! | key | type | holds |
//! |-----|------|-------|
//! | `chronflow:{ns/name}:epoch` | string | the highest epoch that acted on the task |
//! | `chronflow:{ns/name}:runs` | hash | instant (Unix ms) → `STATE EPOCH HOLDER` |
//! | `chronflow:{ns/name}:order` | sorted set | instants by time, for take-over and pruning |
//! | `chronflow:{ns/name}:counts` | hash | `runs`, `succeeded`, `failed`, `missed`, `pruned_before` |
//!
//! Fencing is per task: a claim or a `started`/`missed` mark from an epoch below the task's
//! stored epoch is refused, and any accepted one raises it. A leader that takes over raises
//! every task's epoch through [`RedisLedger::open`] before it fires, so from then on a stale
//! leader cannot start anything. A run a stale leader had already started is not undone: its
//! `finished` mark is accepted (the run did happen), so it is counted once.

use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use deadpool_redis::{Config, Pool, PoolConfig, Runtime, Timeouts};
use redis::Script;

use super::{Counts, LedgerError, Mark, Record, RunState, Verdict};
use crate::run::{RunId, TaskKey};

/// Records older than this are pruned; a claim for an instant before the pruned horizon is
/// refused as already handled, so a long catch-up cannot replay a pruned run.
pub const RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

/// `KEYS`: epoch, runs, order, counts. `ARGV`: epoch, instant (ms), holder, prune horizon (ms).
/// Returns `{"claimed"}`, `{"held", RECORD}` or `{"fenced", EPOCH}`.
const CLAIM: &str = r#"
local epoch = tonumber(ARGV[1])
local stored = tonumber(redis.call('GET', KEYS[1]) or '0')
if epoch < stored then return {'fenced', tostring(stored)} end
if epoch > stored then redis.call('SET', KEYS[1], epoch) end
local before = tonumber(redis.call('HGET', KEYS[4], 'pruned_before') or '0')
if tonumber(ARGV[2]) < before then return {'held', 'pruned 0 -'} end
local record = redis.call('HGET', KEYS[2], ARGV[2])
if record then
  local state, owner = string.match(record, '^(%S+) (%S+)')
  -- A claim of a dead epoch that never started is adopted: its leader can no longer start it.
  if not (state == 'claimed' and tonumber(owner) < epoch) then return {'held', record} end
end
redis.call('HSET', KEYS[2], ARGV[2], 'claimed ' .. ARGV[1] .. ' ' .. ARGV[3])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[2])
local old = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', '(' .. ARGV[4], 'LIMIT', 0, 64)
if #old > 0 then
  redis.call('HDEL', KEYS[2], unpack(old))
  redis.call('ZREM', KEYS[3], unpack(old))
  if tonumber(old[#old]) >= before then redis.call('HSET', KEYS[4], 'pruned_before', old[#old] + 1) end
end
return {'claimed'}
"#;

/// `KEYS`: epoch, runs, order, counts. `ARGV`: epoch, instant (ms), holder, new state
/// (`started`, `succeeded`, `failed`, `missed`). Returns `{"marked"}`, `{"held", RECORD}` (the
/// record does not allow it: not this epoch's, or already final) or `{"fenced", EPOCH}`.
const MARK: &str = r#"
local epoch = tonumber(ARGV[1])
local to = ARGV[4]
local stored = tonumber(redis.call('GET', KEYS[1]) or '0')
local record = redis.call('HGET', KEYS[2], ARGV[2])
local state, owner = 'none', '0'
if record then state, owner = string.match(record, '^(%S+) (%S+)') end
local final = to == 'succeeded' or to == 'failed'
-- A run this epoch started is finished whatever happened since; anything else is fenced.
if not (final and owner == ARGV[1]) and epoch < stored then return {'fenced', tostring(stored)} end
if epoch > stored then redis.call('SET', KEYS[1], epoch) end
local allowed = (to == 'started' and state == 'claimed' and owner == ARGV[1])
  or (final and owner == ARGV[1] and (state == 'claimed' or state == 'started'))
  or (to == 'missed' and (state == 'none' or (state == 'claimed' and owner == ARGV[1])))
if not allowed then return {'held', record or 'none 0 -'} end
redis.call('HSET', KEYS[2], ARGV[2], to .. ' ' .. ARGV[1] .. ' ' .. ARGV[3])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[2])
if to ~= 'started' then
  if to ~= 'missed' then redis.call('HINCRBY', KEYS[4], 'runs', 1) end
  redis.call('HINCRBY', KEYS[4], to, 1)
end
return {'marked'}
"#;

/// `KEYS`: epoch, runs, order, counts. `ARGV`: epoch, since (ms), holder. Raises the task's
/// epoch (or returns `{"fenced", EPOCH}`), turns runs a dead epoch started into `failed`
/// (their outcome is unknown; they are never run again) and returns
/// `{"open", INSTANT, RECORD, …}` for every record from `since` on.
const OPEN: &str = r#"
local epoch = tonumber(ARGV[1])
local stored = tonumber(redis.call('GET', KEYS[1]) or '0')
if epoch < stored then return {'fenced', tostring(stored)} end
redis.call('SET', KEYS[1], epoch)
local out = {'open'}
for _, instant in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], ARGV[2], '+inf')) do
  local record = redis.call('HGET', KEYS[2], instant)
  if record then
    local state, owner = string.match(record, '^(%S+) (%S+)')
    if state == 'started' and tonumber(owner) < epoch then
      record = 'failed ' .. owner .. ' ' .. ARGV[3]
      redis.call('HSET', KEYS[2], instant, record)
      redis.call('HINCRBY', KEYS[4], 'runs', 1)
      redis.call('HINCRBY', KEYS[4], 'failed', 1)
    end
    table.insert(out, instant)
    table.insert(out, record)
  end
end
return out
"#;

/// Connection settings, from `redis.*`.
#[derive(Clone, Debug)]
pub struct RedisSettings {
    /// `redis://` or `rediss://` URL with any password.
    pub url: String,
    pub max_connections: usize,
    /// How long one ledger operation may take, connection checkout included.
    pub timeout: Duration,
}

/// The ledger, over one bounded connection pool.
pub struct RedisLedger {
    pool: Pool,
    timeout: Duration,
    claim: Script,
    mark: Script,
    open: Script,
}

impl RedisLedger {
    /// Builds the pool; connections are made on demand (the first operation tells whether
    /// Redis is reachable).
    pub fn new(settings: &RedisSettings) -> Result<Self, LedgerError> {
        let mut config = Config::from_url(settings.url.clone());
        let wait = Some(settings.timeout);
        config.pool = Some(PoolConfig {
            max_size: settings.max_connections,
            timeouts: Timeouts {
                wait,
                create: wait,
                recycle: wait,
            },
            ..PoolConfig::default()
        });
        let pool = config
            .create_pool(Some(Runtime::Tokio1))
            .map_err(|error| LedgerError(format!("redis: {error}")))?;
        Ok(Self {
            pool,
            timeout: settings.timeout,
            claim: Script::new(CLAIM),
            mark: Script::new(MARK),
            open: Script::new(OPEN),
        })
    }

    /// Pool size and connections in use, for metrics.
    pub fn pool_status(&self) -> (usize, usize) {
        let status = self.pool.status();
        (status.max_size, status.size - status.available)
    }

    async fn invoke(
        &self,
        script: &Script,
        task: &TaskKey,
        args: &[String],
    ) -> Result<Vec<String>, LedgerError> {
        let run = async {
            let mut connection = self
                .pool
                .get()
                .await
                .map_err(|e| LedgerError(format!("redis: {e}")))?;
            let mut invocation = script.prepare_invoke();
            for key in keys(task) {
                invocation.key(key);
            }
            for arg in args {
                invocation.arg(arg);
            }
            invocation
                .invoke_async::<Vec<String>>(&mut connection)
                .await
                .map_err(|e| LedgerError(format!("redis: {e}")))
        };
        tokio::time::timeout(self.timeout, run)
            .await
            .map_err(|_| LedgerError(format!("redis: no answer within {:?}", self.timeout)))?
    }

    /// Claims `run` for `epoch`; see [`Verdict`].
    pub async fn claim(
        &self,
        run: &RunId,
        epoch: u64,
        holder: &str,
    ) -> Result<Verdict, LedgerError> {
        let horizon = run.instant() - chrono::Duration::from_std(RETENTION).unwrap_or_default();
        let args = [
            epoch.to_string(),
            millis(run.instant()),
            holder.to_string(),
            millis(horizon),
        ];
        let reply = self.invoke(&self.claim, run.task(), &args).await?;
        outcome(&reply, Verdict::Accepted)
    }

    /// Records a step of `run` made in `epoch`.
    pub async fn mark(
        &self,
        run: &RunId,
        epoch: u64,
        holder: &str,
        mark: Mark,
    ) -> Result<Verdict, LedgerError> {
        let state = match mark {
            Mark::Started => "started",
            Mark::Finished { succeeded: true } => "succeeded",
            Mark::Finished { succeeded: false } => "failed",
            Mark::Missed => "missed",
        };
        let args = [
            epoch.to_string(),
            millis(run.instant()),
            holder.to_string(),
            state.to_string(),
        ];
        let reply = self.invoke(&self.mark, run.task(), &args).await?;
        outcome(&reply, Verdict::Accepted)
    }

    /// Take-over of one task by `epoch`: raises the task's epoch so older leaders are fenced,
    /// settles runs a dead epoch started (failed: outcome unknown) and returns every record
    /// from `since` on, oldest first.
    pub async fn open(
        &self,
        task: &TaskKey,
        since: DateTime<Utc>,
        epoch: u64,
        holder: &str,
    ) -> Result<Vec<(DateTime<Utc>, Record)>, LedgerError> {
        let args = [epoch.to_string(), millis(since), holder.to_string()];
        let reply = self.invoke(&self.open, task, &args).await?;
        match reply.first().map(String::as_str) {
            Some("open") => reply[1..]
                .chunks(2)
                .map(|pair| match pair {
                    [instant, record] => Ok((instant_of(instant)?, parse_record(record)?)),
                    _ => Err(LedgerError(format!("redis: odd reply {reply:?}"))),
                })
                .collect(),
            _ => match outcome(&reply, Verdict::Accepted)? {
                Verdict::Fenced { epoch } => Err(LedgerError(format!(
                    "fenced: the ledger has seen epoch {epoch}, newer than this leader's"
                ))),
                other => Err(LedgerError(format!("redis: unexpected reply {other:?}"))),
            },
        }
    }

    /// The task's counts, as the marks made them.
    pub async fn counts(&self, task: &TaskKey) -> Result<Counts, LedgerError> {
        let run = async {
            let mut connection = self
                .pool
                .get()
                .await
                .map_err(|e| LedgerError(format!("redis: {e}")))?;
            let fields: Vec<Option<u64>> = redis::cmd("HMGET")
                .arg(keys(task)[3].clone())
                .arg(&["runs", "succeeded", "failed", "missed"])
                .query_async(&mut *connection)
                .await
                .map_err(|e| LedgerError(format!("redis: {e}")))?;
            let field = |i: usize| fields.get(i).copied().flatten().unwrap_or(0);
            Ok(Counts {
                runs: field(0),
                succeeded: field(1),
                failed: field(2),
                missed: field(3),
            })
        };
        tokio::time::timeout(self.timeout, run)
            .await
            .map_err(|_| LedgerError(format!("redis: no answer within {:?}", self.timeout)))?
    }
}

/// The task's keys, in the order the scripts take them.
fn keys(task: &TaskKey) -> [String; 4] {
    let tag = format!("chronflow:{{{task}}}");
    [
        format!("{tag}:epoch"),
        format!("{tag}:runs"),
        format!("{tag}:order"),
        format!("{tag}:counts"),
    ]
}

fn millis(instant: DateTime<Utc>) -> String {
    instant.timestamp_millis().to_string()
}

fn instant_of(text: &str) -> Result<DateTime<Utc>, LedgerError> {
    text.parse::<i64>()
        .ok()
        .and_then(|ms| Utc.timestamp_millis_opt(ms).single())
        .ok_or_else(|| LedgerError(format!("redis: bad instant {text:?}")))
}

/// `{"claimed"|"marked"}`, `{"held", RECORD}` or `{"fenced", EPOCH}`.
fn outcome(reply: &[String], accepted: Verdict) -> Result<Verdict, LedgerError> {
    match reply {
        [word] if word == "claimed" || word == "marked" => Ok(accepted),
        [word, record] if word == "held" => Ok(Verdict::Held(parse_record(record)?)),
        [word, epoch] if word == "fenced" => Ok(Verdict::Fenced {
            epoch: epoch.parse().unwrap_or(u64::MAX),
        }),
        _ => Err(LedgerError(format!("redis: unexpected reply {reply:?}"))),
    }
}

/// `STATE EPOCH HOLDER`.
fn parse_record(text: &str) -> Result<Record, LedgerError> {
    let mut parts = text.splitn(3, ' ');
    let (Some(state), Some(epoch), Some(holder)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(LedgerError(format!("redis: bad record {text:?}")));
    };
    let state = match state {
        "claimed" => RunState::Claimed,
        "started" => RunState::Started,
        "succeeded" => RunState::Succeeded,
        "failed" => RunState::Failed,
        "missed" => RunState::Missed,
        "pruned" | "none" => RunState::Unknown,
        other => return Err(LedgerError(format!("redis: bad state {other:?}"))),
    };
    Ok(Record {
        state,
        epoch: epoch.parse().unwrap_or(0),
        holder: holder.to_string(),
    })
}
