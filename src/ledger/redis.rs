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
//! | `chronflow:{task}:counts` | hash | `runs`, `succeeded`, `failed`, `missed`, `manual`, `pruned_before` |
//! | `chronflow:{task}:open` | sorted set | runs claimed or started, not yet final |
//! | `chronflow:epoch` | string | the newest epoch handed to a leader ([`Ledger::next_epoch`]) |
//!
//! Every claim, take-over, adoption and miss gives the task's keys [`KEY_TTL`] to live again (a
//! start or an end follows its claim: 10 of a run's 15 `EXPIRE`s saved), so the records of a task nobody
//! deleted through chronflow (deleted while no replica ran) go by themselves; a deleted task's
//! keys are fenced and go after the deletion grace ([`Ledger::forget`]).
//!
//! Fencing is per task: a claim or a `started`/`missed` mark from an epoch below the task's
//! stored epoch is refused, and any accepted one raises it. A leader that takes over raises
//! every task's epoch through [`Ledger::take_over`] before it fires, so from then on a stale
//! leader cannot start anything. A run a stale leader had already started is not undone: its
//! `finished` mark is accepted (the run did happen), so it is counted once.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{IntoConnectionInfo, ProtocolVersion, RedisFuture, Script, Value};

use futures::future::{BoxFuture, FutureExt};

use super::{Counts, Ledger, LedgerError, Mark, Marked, Record, RunState, TakeOver, Verdict};
use crate::config::{ConfigError, RedisConfig};
use crate::metrics::InProgress;
use crate::run::Term;
use crate::run::{RunId, TaskId};

/// Records older than this are pruned; a claim for an instant before the pruned horizon is
/// refused as already handled, so a long catch-up cannot replay a pruned run.
pub const RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

/// How long a task's keys live after the last write to them: twice [`RETENTION`], so a task
/// that runs at least weekly never loses them. One idle longer (paused, or a yearly schedule)
/// starts again from the counts its status shows (the take-over's seed).
pub const KEY_TTL: Duration = Duration::from_secs(14 * 24 * 3600);

/// The longest a write waits for its replicas (`redis.wait_replicas`).
const MAX_REPLICA_WAIT: Duration = Duration::from_millis(400);

/// The epoch a deleted task's keys are fenced with until they expire: above any term's.
const FORGOTTEN: u64 = 1 << 53;

/// The key of the epoch counter: one for every task, so one leader's epochs only go up.
const EPOCH_COUNTER: &str = "chronflow:epoch";

/// Stands in the scripts that write a task's keys where each key is given [`KEY_TTL`] again.
const KEEP_KEYS: &str = "@KEEP@";

/// A script of the task's keys, each key kept [`KEY_TTL`] from its end.
fn task_script(source: &str) -> Script {
    // Not for a deleted task's keys: they go after the deletion grace.
    let keep = format!(
        "if tonumber(redis.call('GET', KEYS[1]) or '0') < {FORGOTTEN} then \
         for i = 1, 5 do redis.call('EXPIRE', KEYS[i], {}) end end",
        KEY_TTL.as_secs()
    );
    Script::new(&source.replace(KEEP_KEYS, &keep))
}

/// `KEYS`: the counter. `ARGV`: the floor. The next epoch: above every one handed out, at least
/// the floor.
const NEXT_EPOCH: &str = r#"
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
local epoch = math.max(current + 1, tonumber(ARGV[1]))
redis.call('SET', KEYS[1], string.format('%d', epoch))
return epoch
"#;

/// `KEYS`: epoch, runs, order, counts, open. `ARGV`: the fencing epoch, the grace (s). A deleted
/// task: every later claim or start is fenced, and its keys go after the grace.
const FORGET: &str = r#"
redis.call('SET', KEYS[1], ARGV[1])
for i = 1, 5 do redis.call('EXPIRE', KEYS[i], tonumber(ARGV[2])) end
return 1
"#;

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
if ARGV[6] == 'past' then
  -- An instant counted missed is no longer: its run will be counted. Missed itself, or one of
  -- the others a coalesced miss counted (`c:` of the next record up: how many are left).
  -- (Redis hands Lua a missing field as false, not nil.)
  local counted = record ~= false and record ~= nil
  if not counted then
    -- The coalesced miss whose span (lower, at) holds this instant, if any: the first `c:`
    -- above it (records a backfill made inside the span have none).
    for _, above in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '(' .. ARGV[5], '+inf', 'LIMIT', 0, 32)) do
      local span = tonumber(above) and redis.call('HGET', KEYS[2], 'c:' .. above)
      if span then
        local rest, lower = string.match(span, '^(%d+) (%d+)$')
        if tonumber(lower) < tonumber(ARGV[5]) and tonumber(rest) > 0 then
          redis.call('HSET', KEYS[2], 'c:' .. above, (tonumber(rest) - 1) .. ' ' .. lower)
          counted = true
        end
        break
      end
    end
  end
  if counted and tonumber(redis.call('HGET', KEYS[4], 'missed') or '0') > 0 then
    redis.call('HINCRBY', KEYS[4], 'missed', -1)
    redis.call('HINCRBY', KEYS[4], 'revision', 1)
  end
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
  for _, kind in ipairs({'c:', 'w:'}) do
    local fields = {}
    for i = 1, #runs do fields[i] = kind .. runs[i] end
    redis.call('HDEL', KEYS[2], unpack(fields))
  end
  redis.call('ZREM', KEYS[3], unpack(runs))
  redis.call('ZREM', KEYS[5], unpack(runs))
  redis.call('HSET', KEYS[4], 'pruned_before', string.format('%d', horizon))
end
@KEEP@
return {'accepted'}
"#;

/// `KEYS`: epoch, runs, order, counts, open. `ARGV`: epoch, run (its field), holder, new state
/// (`started`, `succeeded`, `failed`, `missed`), how many instants (`missed` only: a catch-up
/// skips many at once, recorded at the newest), the run's instant (ms), `alone` (a start
/// refused as `busy` while another process's run of the task is in flight) or nothing, and
/// (`started` only) how long the run may last (ms): it is over by then on Redis's clock. Returns
/// `{VERDICT, …, runs, succeeded, failed, missed, manual, revision}` with VERDICT `accepted`,
/// `held RECORD`, `busy RECORD` or `fenced EPOCH`.
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
  local c = redis.call('HMGET', KEYS[4], 'runs', 'succeeded', 'failed', 'missed', 'manual', 'revision')
  for i = 1, 6 do table.insert(verdict, c[i] or '0') end
  return verdict
end
-- A run this epoch started is finished whatever happened since; anything else is fenced.
if not (final and mine) and epoch < stored then return counts({'fenced', tostring(stored)}) end
if epoch > stored then redis.call('SET', KEYS[1], epoch) end
local allowed = (to == 'started' and state == 'claimed' and mine)
  or (final and mine and (state == 'claimed' or state == 'started'))
  or (to == 'missed' and (state == 'none' or (state == 'claimed' and mine)))
if not allowed then return counts({'held', record or 'none 0 -'}) end
if to == 'started' and ARGV[7] == 'alone' then
  -- Forbid across processes: another one's run of the task is in flight.
  for _, other in ipairs(redis.call('ZRANGE', KEYS[5], 0, -1)) do
    local theirs = other ~= ARGV[2] and redis.call('HGET', KEYS[2], other)
    if theirs and string.sub(theirs, 1, 8) == 'started ' then
      local _, o, h = string.match(theirs, '^(%S+) (%S+) (.*)$')
      if not (o == ARGV[1] and h == ARGV[3]) then return counts({'busy', theirs}) end
    end
  end
end
redis.call('HSET', KEYS[2], ARGV[2], to .. ' ' .. ARGV[1] .. ' ' .. ARGV[3])
redis.call('ZADD', KEYS[3], ARGV[6], ARGV[2])
if to == 'started' then
  local now = redis.call('TIME')
  local over = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) + tonumber(ARGV[8])
  redis.call('HSET', KEYS[2], 'w:' .. ARGV[2], string.format('%d', over))
else
  redis.call('ZREM', KEYS[5], ARGV[2])
  redis.call('HDEL', KEYS[2], 'w:' .. ARGV[2])
  redis.call('HINCRBY', KEYS[4], 'revision', 1)
  if to == 'missed' then
    redis.call('HINCRBY', KEYS[4], 'missed', tonumber(ARGV[5]))
    -- The others a coalesced miss counts have no record: a backfill finds them by this one,
    -- between the record below (`lower`) and this one.
    if tonumber(ARGV[5]) > 1 then
      local lower = 0
      for _, below in ipairs(redis.call('ZREVRANGEBYSCORE', KEYS[3], '(' .. ARGV[6], '-inf', 'LIMIT', 0, 8)) do
        if tonumber(below) then lower = tonumber(below) break end
      end
      redis.call('HSET', KEYS[2], 'c:' .. ARGV[2], (tonumber(ARGV[5]) - 1) .. ' ' .. string.format('%d', lower))
    end
  else
    redis.call('HINCRBY', KEYS[4], 'runs', 1)
    redis.call('HINCRBY', KEYS[4], to, 1)
    if string.sub(ARGV[2], 1, 2) == 'm:' then redis.call('HINCRBY', KEYS[4], 'manual', 1) end
  end
end
-- A start or an end follows the claim that gave the keys their time; a miss may come alone.
if to == 'missed' then
@KEEP@
end
return counts({'accepted'})
"#;

/// `KEYS`: epoch, runs, order, counts, open. `ARGV`: epoch, holder, the seed counts `runs
/// succeeded failed missed manual` (set when the task has no counts yet; `-` each for none),
/// then the runs to settle. Take-over of the task by a new leader: raises its epoch (or returns
/// `{"fenced", EPOCH}`); an earlier leader is an older epoch or, without leader election (every
/// process in epoch 0), another process. Runs an earlier leader started are kept open and
/// reported in flight, but those listed to settle are counted failed (their outcome is unknown;
/// they are never run again); its claims of scheduled instants that never started become this
/// leader's (a run-now claim is adopted when its request is seen again). Returns `{"taken",
/// NEWEST, HOLD, runs, succeeded, failed, missed, manual, revision, N, UNSTARTED×N,
/// IN_FLIGHT…}`: the newest scheduled instant on record (`""` if none), how much longer the runs
/// in flight may last (ms, by the `w:` their starts recorded; `-` if one has none), the claims
/// taken over (run them), and the runs in flight.
const TAKE_OVER: &str = r#"
local epoch = tonumber(ARGV[1])
local stored = tonumber(redis.call('GET', KEYS[1]) or '0')
if epoch < stored then return {'fenced', tostring(stored)} end
redis.call('SET', KEYS[1], epoch)
if ARGV[3] ~= '-' and redis.call('EXISTS', KEYS[4]) == 0 then
  redis.call('HSET', KEYS[4], 'runs', ARGV[3], 'succeeded', ARGV[4], 'failed', ARGV[5],
    'missed', ARGV[6], 'manual', ARGV[7], 'revision', 1)
end
local settle = {}
for i = 8, #ARGV do settle[ARGV[i]] = true end
local unstarted, in_flight = {}, {}
local now = redis.call('TIME')
now = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local hold = 0
for _, run in ipairs(redis.call('ZRANGE', KEYS[5], 0, -1)) do
  local record = redis.call('HGET', KEYS[2], run)
  local state, owner, holder = 'none', '0', ''
  if record then state, owner, holder = string.match(record, '^(%S+) (%S+) (.*)$') end
  local scheduled = tonumber(run) ~= nil
  -- An earlier leader: an older epoch, or (without leader election, epoch 0) another process.
  if tonumber(owner) < epoch or (tonumber(owner) == epoch and holder ~= ARGV[2]) then
    if state == 'started' and not settle[run] then
      table.insert(in_flight, run)
      local over = tonumber(redis.call('HGET', KEYS[2], 'w:' .. run))
      if over and hold then hold = math.max(hold, over - now) else hold = nil end
    elseif state == 'started' then
      redis.call('HSET', KEYS[2], run, 'failed ' .. owner .. ' ' .. ARGV[2])
      redis.call('HDEL', KEYS[2], 'w:' .. run)
      redis.call('HINCRBY', KEYS[4], 'runs', 1)
      redis.call('HINCRBY', KEYS[4], 'failed', 1)
      redis.call('HINCRBY', KEYS[4], 'revision', 1)
      if not scheduled then redis.call('HINCRBY', KEYS[4], 'manual', 1) end
      redis.call('ZREM', KEYS[5], run)
    elseif state == 'claimed' then
      -- Taken over in place: the earlier leader can no longer start it, this one will (a
      -- run-now request too: the earlier leader may have recorded it handled).
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
local out = {'taken', newest, hold and string.format('%d', hold) or '-'}
local c = redis.call('HMGET', KEYS[4], 'runs', 'succeeded', 'failed', 'missed', 'manual', 'revision')
for i = 1, 6 do table.insert(out, c[i] or '0') end
table.insert(out, tostring(#unstarted))
for _, run in ipairs(unstarted) do table.insert(out, run) end
for _, run in ipairs(in_flight) do table.insert(out, run) end
@KEEP@
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
@KEEP@
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

/// Connections to Redis, each multiplexed: every operation in flight on it at once, pipelined
/// on one socket (no checkout per operation, no health check before each), and made again after
/// a failure. Operations take them in turn.
enum Connections {
    Single(Vec<ConnectionManager>),
    /// A cluster connection reaches every node (one socket per node) and routes each script to
    /// the node that holds its task's slot; connected on first use.
    Cluster(
        Box<ClusterClient>,
        Vec<tokio::sync::OnceCell<ClusterConnection>>,
    ),
}

/// One of the [`Connections`], for one operation.
#[derive(Clone)]
enum Connection {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> RedisFuture<'a, Value> {
        match self {
            Connection::Single(connection) => connection.req_packed_command(cmd),
            Connection::Cluster(connection) => connection.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Connection::Single(connection) => {
                connection.req_packed_commands(pipeline, offset, count)
            }
            Connection::Cluster(connection) => {
                connection.req_packed_commands(pipeline, offset, count)
            }
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Single(connection) => connection.get_db(),
            Connection::Cluster(connection) => connection.get_db(),
        }
    }
}

/// The ledger, over a few multiplexed connections.
pub struct RedisLedger {
    connections: Connections,
    /// The connection the next operation takes.
    turn: AtomicUsize,
    /// Operations waiting for their answer.
    in_flight: AtomicUsize,
    timeout: Duration,
    wait_replicas: u32,
    by_uid: bool,
    claim: Script,
    mark: Script,
    take_over: Script,
    adopt: Script,
    next_epoch: Script,
    forget: Script,
}

impl RedisLedger {
    /// Prepares the connections; they are made on first use (the first operation tells
    /// whether Redis is reachable). Within a Tokio runtime.
    pub fn new(settings: &RedisSettings) -> Result<Self, LedgerError> {
        if settings.cluster && settings.wait_replicas > 0 {
            return Err(redis_error(
                "redis.wait_replicas is not supported with redis.cluster",
            ));
        }
        let count = settings.max_connections.max(1);
        let connections = if settings.cluster {
            if settings.ca.is_some() {
                return Err(redis_error(
                    "a CA file (redis.ca_file) is not supported with cluster",
                ));
            }
            let client = ClusterClient::builder(vec![settings.url.as_str()])
                .connection_timeout(settings.timeout)
                .response_timeout(settings.timeout)
                .build()
                .map_err(redis_error)?;
            let slots = (0..count).map(|_| tokio::sync::OnceCell::new()).collect();
            Connections::Cluster(Box::new(client), slots)
        } else {
            // RESP3: a connection that drops (Redis restarted, failed over) tells its manager,
            // which makes it again before the next operation needs it.
            let info = settings
                .url
                .as_str()
                .into_connection_info()
                .map_err(redis_error)?;
            let resp3 = info
                .redis_settings()
                .clone()
                .set_protocol(ProtocolVersion::RESP3);
            let info = info.set_redis_settings(resp3);
            let client = match &settings.ca {
                Some(ca) => {
                    let certificates = redis::TlsCertificates {
                        client_tls: None,
                        root_cert: Some(ca.clone()),
                    };
                    redis::Client::build_with_tls(info, certificates)
                }
                None => redis::Client::open(info),
            }
            .map_err(redis_error)?;
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(settings.timeout))
                .set_response_timeout(Some(settings.timeout))
                .set_number_of_retries(1)
                .set_max_delay(Duration::from_millis(500));
            let managers = (0..count)
                .map(|_| ConnectionManager::new_lazy_with_config(client.clone(), config.clone()))
                .collect::<Result<_, _>>()
                .map_err(redis_error)?;
            Connections::Single(managers)
        };
        Ok(Self {
            connections,
            turn: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            timeout: settings.timeout,
            wait_replicas: settings.wait_replicas,
            by_uid: true,
            claim: task_script(CLAIM),
            mark: task_script(MARK),
            take_over: task_script(TAKE_OVER),
            adopt: task_script(ADOPT),
            next_epoch: Script::new(NEXT_EPOCH),
            forget: Script::new(FORGET),
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
        let tag = match self.by_uid {
            true => format!("chronflow:{{{}/{}}}", task.key, task.uid),
            false => format!("chronflow:{{{}}}", task.key),
        };
        ["epoch", "runs", "order", "counts", "open"]
            .iter()
            .map(|key| format!("{tag}:{key}"))
            .collect()
    }

    /// The server's `maxmemory-policy`, when it lets clients read it (managed services may
    /// refuse `CONFIG`).
    pub async fn eviction_policy(&self) -> Result<String, LedgerError> {
        let mut command = redis::cmd("CONFIG");
        command.arg("GET").arg("maxmemory-policy");
        let reply: std::collections::HashMap<String, String> = self.query(&command).await?;
        reply
            .get("maxmemory-policy")
            .cloned()
            .ok_or_else(|| redis_error(format!("unexpected CONFIG GET reply {reply:?}")))
    }

    /// The connections this ledger uses (`redis.max_connections`), for metrics.
    pub fn connection_count(&self) -> usize {
        match &self.connections {
            Connections::Single(managers) => managers.len(),
            Connections::Cluster(_, slots) => slots.len(),
        }
    }

    /// Operations waiting for their answer, for metrics.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// The connection whose turn it is (a cluster's is connected on first use). An operation
    /// refused by it (Redis was down when it was last made; nothing was sent) is sent once more:
    /// the refusal made the connection again.
    async fn connection(&self) -> Result<Connection, LedgerError> {
        let turn = self.turn.fetch_add(1, Ordering::Relaxed);
        match &self.connections {
            Connections::Single(managers) => {
                Ok(Connection::Single(managers[turn % managers.len()].clone()))
            }
            Connections::Cluster(client, slots) => {
                let slot = &slots[turn % slots.len()];
                let connection = slot
                    .get_or_try_init(|| client.get_async_connection())
                    .await
                    .map_err(redis_error)?;
                Ok(Connection::Cluster(connection.clone()))
            }
        }
    }

    /// Runs `script` on the task's keys, within the timeout.
    async fn invoke(
        &self,
        script: &Script,
        task: &TaskId,
        args: &[String],
    ) -> Result<Vec<String>, LedgerError> {
        self.invoke_on(script, &self.keys(task), args).await
    }

    /// Runs `script` on `keys`, within the timeout (with `redis.wait_replicas`, until the
    /// replicas have the write).
    async fn invoke_on<T: redis::FromRedisValue>(
        &self,
        script: &Script,
        keys: &[String],
        args: &[String],
    ) -> Result<T, LedgerError> {
        let mut invocation = script.prepare_invoke();
        for key in keys {
            invocation.key(key);
        }
        for arg in args {
            invocation.arg(arg);
        }
        let run = async {
            let mut connection = self.connection().await?;
            let reply = match invocation.invoke_async(&mut connection).await {
                Err(error) if error.is_connection_refusal() => {
                    invocation.invoke_async(&mut connection).await
                }
                reply => reply,
            }
            .map_err(redis_error)?;
            self.replicated(&mut connection).await?;
            Ok(reply)
        };
        self.within(run).await
    }

    /// With `redis.wait_replicas`, waits (on the connection that wrote) until that many
    /// replicas have the write: a replica promoted after a failover then knows it.
    async fn replicated(&self, connection: &mut Connection) -> Result<(), LedgerError> {
        if self.wait_replicas == 0 {
            return Ok(());
        }
        // Within the client's own response timeout (half a second) and the operation's.
        let wait = (self.timeout / 2).min(MAX_REPLICA_WAIT);
        let mut command = redis::cmd("WAIT");
        command
            .arg(self.wait_replicas)
            .arg(wait.as_millis().max(1) as u64);
        let acknowledged: u32 = command.query_async(connection).await.map_err(redis_error)?;
        if acknowledged < self.wait_replicas {
            return Err(redis_error(format!(
                "{acknowledged} of {} replicas had the write within {wait:?} (redis.wait_replicas)",
                self.wait_replicas
            )));
        }
        Ok(())
    }

    /// Sends one command, within the timeout.
    async fn query<T: redis::FromRedisValue>(
        &self,
        command: &redis::Cmd,
    ) -> Result<T, LedgerError> {
        let run = async {
            let mut connection = self.connection().await?;
            match command.query_async(&mut connection).await {
                Err(error) if error.is_connection_refusal() => {
                    command.query_async(&mut connection).await
                }
                reply => reply,
            }
            .map_err(redis_error)
        };
        self.within(run).await
    }

    async fn within<T>(
        &self,
        run: impl Future<Output = Result<T, LedgerError>>,
    ) -> Result<T, LedgerError> {
        let _in_flight = InProgress::count(&self.in_flight);
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
            term.holder.to_string(),
            millis(run.instant() - retention),
            millis(run.instant()),
            mode.to_string(),
        ];
        let reply = self.invoke(&self.claim, run.task_id(), &args).await?;
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
            };
            let args = [
                term.epoch.to_string(),
                field(run),
                term.holder.to_string(),
                state.to_string(),
                count.to_string(),
                millis(run.instant()),
                alone.to_string(),
                window.to_string(),
            ];
            let reply = self.invoke(&self.mark, run.task_id(), &args).await?;
            let (head, tail) = reply.split_at(reply.len().saturating_sub(6));
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
                term.holder.to_string(),
                millis(run.instant()),
            ];
            let reply = self.invoke(&self.adopt, run.task_id(), &args).await?;
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
            let reply = self.invoke(&self.take_over, task, &args).await?;
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
            let keys = [EPOCH_COUNTER.to_string()];
            self.invoke_on(&self.next_epoch, &keys, &[floor.to_string()])
                .await
        }
        .boxed()
    }

    fn holds<'a>(
        &'a self,
        task: &'a TaskId,
        term: &'a Term,
    ) -> BoxFuture<'a, Result<bool, LedgerError>> {
        async move {
            let mut command = redis::cmd("GET");
            command.arg(&self.keys(task)[0]);
            let stored: Option<u64> = self.query(&command).await?;
            Ok(stored.is_none_or(|epoch| epoch <= term.epoch))
        }
        .boxed()
    }

    fn server_time(&self) -> BoxFuture<'_, Result<Option<DateTime<Utc>>, LedgerError>> {
        async move {
            let (seconds, micros): (i64, i64) = self.query(&redis::cmd("TIME")).await?;
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
            let args = [FORGOTTEN.to_string(), grace.as_secs().max(1).to_string()];
            let _: i64 = self
                .invoke_on(&self.forget, &self.keys(task), &args)
                .await?;
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
