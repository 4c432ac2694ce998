//! The Lua scripts of the Redis ledger. Each one that reads or writes a task's keys takes them as
//! `KEYS` epoch, runs, order, counts, open, and runs in a batch: one call carries the steps of
//! many tasks (`batch`), each step as if it were the whole script.

use redis::Script;

use super::{FORGOTTEN, KEY_TTL};

/// Stands in the scripts that write a task's keys where they are given [`KEY_TTL`] again.
const KEEP_KEYS: &str = "@KEEP@";

/// A task's keys are given [`KEY_TTL`] again once what is left of it falls below this: once a
/// day, not at every step (five `EXPIRE`s a claim, each written to replicas and the append-only
/// file). The probe is the counts: the one key a task's first claims do not make, so a new
/// task's keys are kept at each claim until its first end or miss made them all.
const KEEP_REFRESH: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// A task script (its `KEYS` the task's five, [`KEEP_KEYS`] where they are kept), made to take
/// the steps of many tasks in one call: `ARGV` begins with how many keys and how many arguments
/// each step has, then every step's arguments in turn; `KEYS` holds every step's keys in turn.
/// Returns each step's reply, in order. A batch is one script call: atomic, one round trip, one
/// entry into Lua.
pub(super) fn batch(source: &str) -> Script {
    let keep_below = (KEY_TTL - KEEP_REFRESH).as_millis();
    // Not for a deleted task's keys: they go after the deletion grace.
    let keep = format!(
        "if redis.call('PTTL', KEYS[4]) < {keep_below} \
         and tonumber(redis.call('GET', KEYS[1]) or '0') < {FORGOTTEN} then \
         for i = 1, 5 do redis.call('EXPIRE', KEYS[i], {}) end end",
        KEY_TTL.as_secs()
    );
    let step = source.replace(KEEP_KEYS, &keep);
    Script::new(&format!(
        "local function step(KEYS, ARGV)\n{step}\nend\n{BATCH}"
    ))
}

/// Runs `step` for each step of a batch.
const BATCH: &str = r#"
local width, arity = tonumber(ARGV[1]), tonumber(ARGV[2])
local replies = {}
for i = 0, #KEYS / width - 1 do
  local keys = {unpack(KEYS, i * width + 1, (i + 1) * width)}
  replies[i + 1] = step(keys, {unpack(ARGV, 3 + i * arity, 2 + (i + 1) * arity)})
end
return replies
"#;

/// `KEYS`: the counter. `ARGV`: the floor. The next epoch: above every one handed out, at least
/// the floor.
pub(super) const NEXT_EPOCH: &str = r#"
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
local epoch = math.max(current + 1, tonumber(ARGV[1]))
redis.call('SET', KEYS[1], string.format('%d', epoch))
return epoch
"#;

/// `KEYS`: epoch, runs, order, counts, open. `ARGV`: the fencing epoch, the grace (s). A deleted
/// task: every later claim or start is fenced, and its keys go after the grace.
pub(super) const FORGET: &str = r#"
redis.call('SET', KEYS[1], ARGV[1])
for i = 1, 5 do redis.call('EXPIRE', KEYS[i], tonumber(ARGV[2])) end
return {'forgotten'}
"#;

/// `KEYS`: epoch, runs, order, counts, open. `ARGV`: epoch, run (its field), holder, prune
/// horizon (ms), the run's instant (ms), `next` or `past` (a backfill). Returns `{"accepted"}`,
/// `{"held", RECORD}` or `{"fenced", EPOCH}`.
pub(super) const CLAIM: &str = r#"
local epoch = tonumber(ARGV[1])
local stored = tonumber(redis.call('GET', KEYS[1]) or '0')
if epoch < stored then return {'fenced', tostring(stored)} end
if epoch > stored then redis.call('SET', KEYS[1], ARGV[1], 'KEEPTTL') end
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
redis.call('ZADD', KEYS[5], '-inf', '-', ARGV[5], ARGV[2])
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
/// (`started`, `succeeded`, `failed`, `missed`, or `abandoned`: missed, over its own start too), how many instants (`missed` only: a catch-up
/// skips many at once, recorded at the newest), the run's instant (ms), `alone` (a start
/// refused as `busy` while another process's run of the task is in flight) or nothing, and
/// (`started` only) how long the run may last (ms): it is over by then on Redis's clock. Returns
/// `{VERDICT, …, runs, succeeded, failed, missed, manual, revision}` with VERDICT `accepted`,
/// `held RECORD`, `busy RECORD` or `fenced EPOCH`.
pub(super) const MARK: &str = r#"
local epoch = tonumber(ARGV[1])
local to = ARGV[4]
-- A start whose answer never came: recorded missed, over the start too should it have landed.
local abandoned = to == 'abandoned'
if abandoned then to = 'missed' end
local record = redis.call('HGET', KEYS[2], ARGV[2])
local state, owner, holder = 'none', '0', ''
if record then state, owner, holder = string.match(record, '^(%S+) (%S+) (.*)$') end
-- The run is this leader's: its epoch and its name (without leader election every process has
-- epoch 0, and a restarted one may have taken the claim over).
local mine = owner == ARGV[1] and holder == ARGV[3]
local final = to == 'succeeded' or to == 'failed'
local names = {'runs', 'succeeded', 'failed', 'missed', 'manual', 'revision'}
local function counts(verdict)
  -- Nobody reads the counts after a start.
  if to == 'started' then return verdict end
  local c = redis.call('HMGET', KEYS[4], unpack(names))
  for i = 1, 6 do table.insert(verdict, c[i] or '0') end
  return verdict
end
-- A run this epoch started is finished whatever happened since; anything else is fenced.
if not (final and mine) then
  local stored = tonumber(redis.call('GET', KEYS[1]) or '0')
  if epoch < stored then return counts({'fenced', tostring(stored)}) end
  if epoch > stored then redis.call('SET', KEYS[1], ARGV[1], 'KEEPTTL') end
end
local allowed = (to == 'started' and state == 'claimed' and mine)
  or (final and mine and (state == 'claimed' or state == 'started'))
  or (to == 'missed' and (state == 'none' or (state == 'claimed' and mine)))
  or (abandoned and state == 'started' and mine)
if not allowed then return counts({'held', record or 'none 0 -'}) end
if to == 'started' and ARGV[7] == 'alone' then
  -- Forbid across processes: another one's run of the task is in flight.
  for _, other in ipairs(redis.call('ZRANGE', KEYS[5], 0, -1)) do
    local theirs = other ~= ARGV[2] and other ~= '-' and redis.call('HGET', KEYS[2], other)
    if theirs and string.sub(theirs, 1, 8) == 'started ' then
      local _, o, h = string.match(theirs, '^(%S+) (%S+) (.*)$')
      if not (o == ARGV[1] and h == ARGV[3]) then return counts({'busy', theirs}) end
    end
  end
end
local now_record = to .. ' ' .. ARGV[1] .. ' ' .. ARGV[3]
if to == 'started' then
  local now = redis.call('TIME')
  local over = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) + tonumber(ARGV[8])
  redis.call('HSET', KEYS[2], ARGV[2], now_record, 'w:' .. ARGV[2], string.format('%d', over))
  return {'accepted'}
end
redis.call('HSET', KEYS[2], ARGV[2], now_record)
redis.call('ZREM', KEYS[5], ARGV[2])
redis.call('HDEL', KEYS[2], 'w:' .. ARGV[2])
-- The counts read and written once (a script runs alone: nothing changes them in between).
local c = redis.call('HMGET', KEYS[4], unpack(names))
local n = {}
for i = 1, 6 do n[i] = tonumber(c[i] or '0') end
n[6] = n[6] + 1
if to == 'missed' then
  -- A start or an end is of a claimed run, already in order; a miss may have no claim.
  redis.call('ZADD', KEYS[3], ARGV[6], ARGV[2])
  n[4] = n[4] + tonumber(ARGV[5])
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
  n[1] = n[1] + 1
  if to == 'succeeded' then n[2] = n[2] + 1 else n[3] = n[3] + 1 end
  if string.sub(ARGV[2], 1, 2) == 'm:' then n[5] = n[5] + 1 end
end
local reply, fields = {'accepted'}, {}
for i = 1, 6 do
  reply[i + 1] = string.format('%d', n[i])
  fields[2 * i - 1], fields[2 * i] = names[i], reply[i + 1]
end
redis.call('HSET', KEYS[4], unpack(fields))
-- A start or an end follows the claim that gave the keys their time, but for the counts when
-- this end made them; a miss may come alone.
if to == 'missed' or not c[6] then
@KEEP@
end
return reply
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
pub(super) const TAKE_OVER: &str = r#"
local epoch = tonumber(ARGV[1])
local stored = tonumber(redis.call('GET', KEYS[1]) or '0')
if epoch < stored then return {'fenced', tostring(stored)} end
redis.call('SET', KEYS[1], ARGV[1], 'KEEPTTL')
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
  -- (`-` keeps the set from going when its last run ends, and with it its TTL.)
  if run ~= '-' and (tonumber(owner) < epoch or (tonumber(owner) == epoch and holder ~= ARGV[2])) then
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
pub(super) const ADOPT: &str = r#"
local epoch = tonumber(ARGV[1])
local stored = tonumber(redis.call('GET', KEYS[1]) or '0')
if epoch < stored then return {'fenced', tostring(stored)} end
if epoch > stored then redis.call('SET', KEYS[1], ARGV[1], 'KEEPTTL') end
local record = redis.call('HGET', KEYS[2], ARGV[2])
local state, owner, holder = 'none', '0', ''
if record then state, owner, holder = string.match(record, '^(%S+) (%S+) (.*)$') end
local mine = owner == ARGV[1] and holder == ARGV[3]
local open = state == 'none' or state == 'claimed' or state == 'started'
if mine or not open then return {'held', record or 'none 0 -'} end
redis.call('HSET', KEYS[2], ARGV[2], 'started ' .. ARGV[1] .. ' ' .. ARGV[3])
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[2])
redis.call('ZADD', KEYS[5], '-inf', '-', ARGV[4], ARGV[2])
@KEEP@
return {'accepted'}
"#;
