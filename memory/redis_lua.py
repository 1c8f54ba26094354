"""Lua scripts of the Redis store: each runs atomically on the server, so a clip, its indexes and the byte counter
never disagree and a read sees one consistent state in one round trip.

No script loops over a stream: each does O(log n) work per clip it touches and touches a bounded number (a pick's
positions, a chunk of an eviction or a delete, which the client repeats), so none holds Redis for more than a
millisecond or so at any memory size. A stream written before streams kept their longest clip is measured once
by the client, in chunks (RedisStore._measure_spans), when a script says its spans are missing.

Key layout (see RedisStore): a clip's hash is its stream's clip prefix plus its member, the seq zero-padded to 20
digits so that Redis' tie order between equal times is the seq order. Clip keys are derived inside the scripts;
Redis Cluster allows that only because every key a script touches carries its stream's hash tag, so all sit in the
slot of the keys passed (RedisClusterStore). While that slot is being migrated a script can fail (TRYAGAIN).
"""

# Shared by PUT and ENFORCE. Arguments: the stream's info hash, media, wall and seq sorted sets, and clip key prefix.
_EVICT = """
local function evict(info, media, wall, seqs, prefix, member)
  local clip = prefix .. member
  local nbytes = tonumber(redis.call('HGET', clip, 'nbytes') or '0')
  redis.call('UNLINK', clip)
  redis.call('ZREM', media, member)
  redis.call('ZREM', wall, member)
  redis.call('ZREM', seqs, member)
  redis.call('HINCRBY', info, 'evicted', 1)
  return redis.call('HINCRBY', info, 'bytes', -nbytes)
end

-- Evicts the oldest (by wall start) while over max_bytes, at most `limit`; true if still over after that.
local function evict_to_cap(info, media, wall, seqs, prefix, evicted, limit)
  local cap = redis.call('HGET', info, 'max_bytes')
  if not cap then return false end
  cap = tonumber(cap)
  local bytes = tonumber(redis.call('HGET', info, 'bytes') or '0')
  local n = 0
  while bytes > cap do
    if n >= limit then return true end
    local oldest = redis.call('ZRANGE', wall, 0, 0)[1]
    if not oldest then return false end
    bytes = evict(info, media, wall, seqs, prefix, oldest)
    evicted[#evicted + 1] = oldest
    n = n + 1
  end
  return false
end
"""

# The stream's longest clip on each clock (info fields media_span, wall_span), which bounds how long before a
# range a clip overlapping it can start (memory.store.scan_from). Spans only grow: an evicted long clip leaves
# scans a little wider, never wrong. nil when a stream that holds clips has none: written before spans were kept
# (the scripts then return SPANS_MISSING and the client measures them).
_SPANS = """
local function spans(info, zset)
  local kept = redis.call('HMGET', info, 'media_span', 'wall_span')
  if kept[1] and kept[2] then return tonumber(kept[1]), tonumber(kept[2]) end
  if redis.call('ZCARD', zset) == 0 then return 0, 0 end
  return nil
end
"""
SPANS_MISSING = -2

# KEYS: streams, info, media, wall, clip, seqs. ARGV: stream_id, member, media_start, wall_start, wall_end, meta,
# fmt, ntok, dim, shape, tokens, vector, nbytes, clip prefix, media length, wall length, seq, generation,
# eviction limit, thumbnail ('' for none; else kept in the clip's hash, so it goes with the clip). Returns {0} if
# the clip exists, {-1, shape} on a shape mismatch, {-2} if the stream's spans are missing (nothing written), else
# {1, evicted members}.
PUT = (
    _EVICT
    + _SPANS
    + """
if redis.call('EXISTS', KEYS[5]) == 1 then return {0} end
local shape = redis.call('HGET', KEYS[2], 'shape')
if shape and shape ~= ARGV[10] then return {-1, shape} end
local media_span, wall_span = spans(KEYS[2], KEYS[3])
if not media_span then return {-2} end
redis.call('SADD', KEYS[1], ARGV[1])
redis.call('HSETNX', KEYS[2], 'gen', ARGV[18])
redis.call('HSET', KEYS[2], 'media_span', string.format('%.17g', math.max(media_span, tonumber(ARGV[15]))),
           'wall_span', string.format('%.17g', math.max(wall_span, tonumber(ARGV[16]))))
redis.call('HSET', KEYS[5], 'meta', ARGV[6], 'fmt', ARGV[7], 'ntok', ARGV[8], 'dim', ARGV[9],
           'tokens', ARGV[11], 'vector', ARGV[12], 'nbytes', ARGV[13], 'wall_end', ARGV[5])
if ARGV[20] ~= '' then redis.call('HSET', KEYS[5], 'thumb', ARGV[20]) end
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[2])
redis.call('ZADD', KEYS[4], ARGV[4], ARGV[2])
redis.call('ZADD', KEYS[6], ARGV[17], ARGV[2])
redis.call('HSET', KEYS[2], 'shape', ARGV[10])
redis.call('HINCRBY', KEYS[2], 'bytes', ARGV[13])
local evicted = {}
evict_to_cap(KEYS[2], KEYS[3], KEYS[4], KEYS[6], ARGV[14], evicted, tonumber(ARGV[19]))
return {1, evicted}
"""
)

# KEYS: streams, info, media, wall, seqs. ARGV: stream_id, clip prefix, tag, key shape ('HkvxTxhd'), tokens per clip
# (T), key width (Hkv * hd), generation ('' for any), eviction limit, then (member, keys blob) pairs. Keeps the
# keys in the clips' own hashes (fields ktag, kshape, keys: they go with the clip), counted in its nbytes and the
# stream's bytes. Returns {-2} if the stream is unknown, {-1, shape} if the keys do not fit its tokens, {0, {}} if
# it is of another generation, else {clips that took keys, evicted members}.
PUT_KEYS = (
    _EVICT
    + """
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 0 then return {-2} end
if ARGV[7] ~= '' and redis.call('HGET', KEYS[2], 'gen') ~= ARGV[7] then return {0, {}} end
local shape = redis.call('HGET', KEYS[2], 'shape')
if shape then
  local t, d = string.match(shape, '^(%d+)x(%d+)$')
  if tonumber(t) ~= tonumber(ARGV[5]) or tonumber(ARGV[6]) > tonumber(d) then return {-1, shape} end
end
local stored = 0
for i = 9, #ARGV, 2 do
  local clip = ARGV[2] .. ARGV[i]
  if redis.call('EXISTS', clip) == 1 then
    local delta = string.len(ARGV[i + 1]) - redis.call('HSTRLEN', clip, 'keys')
    redis.call('HSET', clip, 'ktag', ARGV[3], 'kshape', ARGV[4], 'keys', ARGV[i + 1])
    redis.call('HINCRBY', clip, 'nbytes', delta)
    redis.call('HINCRBY', KEYS[2], 'bytes', delta)
    stored = stored + 1
  end
end
local evicted = {}
evict_to_cap(KEYS[2], KEYS[3], KEYS[4], KEYS[5], ARGV[2], evicted, tonumber(ARGV[8]))
return {stored, evicted}
"""
)

# KEYS: streams, info, media, wall, seqs. ARGV: stream_id, now, clip prefix, limit, offset (clips past the age
# cutoff by start but not by end, skipped by earlier calls). One chunk of retention: evicts at most `limit` clips
# by age, then (if the age pass is done) at most `limit` more by bytes. Returns {evicted members, clips skipped,
# 1 if there may be more to evict else 0}; the client calls again while more.
# %.17g keeps the cutoff exact; Lua's default number formatting would round it to 14 digits.
ENFORCE = (
    _EVICT
    + """
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 0 then return {{}, 0, 0} end
local limit = tonumber(ARGV[4])
local evicted, skipped, more = {}, 0, 0
local max_age = redis.call('HGET', KEYS[2], 'max_age_s')
if max_age then
  local cutoff = tonumber(ARGV[2]) - tonumber(max_age)
  local old = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', string.format('(%.17g', cutoff), 'LIMIT', ARGV[5], limit)
  for _, member in ipairs(old) do
    if tonumber(redis.call('HGET', ARGV[3] .. member, 'wall_end')) < cutoff then
      evict(KEYS[2], KEYS[3], KEYS[4], KEYS[5], ARGV[3], member)
      evicted[#evicted + 1] = member
    else
      skipped = skipped + 1
    end
  end
  if #old == limit then more = 1 end
end
if more == 0 and evict_to_cap(KEYS[2], KEYS[3], KEYS[4], KEYS[5], ARGV[3], evicted, limit) then more = 1 end
return {evicted, skipped, more}
"""
)

# KEYS: streams, info, the clock's sorted set. ARGV: stream_id, start ('' for none), end ('' for none), clip prefix,
# clock ('media' or 'wall'), scan margin. Where a range's clips sit in the sorted set, without reading them:
# {hi, j, head} where ranks [j, hi) start after `start` and before `end` (so overlap it), and head holds the metas
# of the few clips starting at or before `start` (from scan_from(start, longest clip)) that end after it.
# nil if the stream is unknown, {-2} if its spans are missing. O(log n + head).
LOCATE = (
    _SPANS
    + """
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 0 then return nil end
local hi
if ARGV[3] == '' then hi = redis.call('ZCARD', KEYS[3])
else hi = redis.call('ZCOUNT', KEYS[3], '-inf', '(' .. ARGV[3]) end
if ARGV[2] == '' then return {hi, 0, {}} end
local start = tonumber(ARGV[2])
local media_span, wall_span = spans(KEYS[2], KEYS[3])
if not media_span then return {-2} end
local span = ARGV[5] == 'media' and media_span or wall_span
local first = redis.call('ZCOUNT', KEYS[3], '-inf', string.format('(%.17g', start - span - tonumber(ARGV[6])))
local j = math.min(redis.call('ZCOUNT', KEYS[3], '-inf', ARGV[2]), hi)
local head = {}
if j > first then
  for _, member in ipairs(redis.call('ZRANGE', KEYS[3], first, j - 1)) do
    local meta = redis.call('HGET', ARGV[4] .. member, 'meta')
    local c = cjson.decode(meta)
    local e = ARGV[5] == 'media' and c.media_end or c.wall_end
    if e > start then head[#head + 1] = meta end
  end
end
return {hi, j, head}
"""
)

# KEYS: the clock's sorted set. ARGV: clip prefix, then runs of ranks as (first, last) pairs. Per run, the metas
# of the clips at those ranks (fewer where the run goes past the end). O(log n) per run plus O(1) per clip; the
# client sends a bounded number of clips per call.
FETCH = """
local runs = {}
for i = 2, #ARGV, 2 do
  local metas = {}
  for j, member in ipairs(redis.call('ZRANGE', KEYS[1], ARGV[i], ARGV[i + 1])) do
    metas[j] = redis.call('HGET', ARGV[1] .. member, 'meta')
  end
  runs[#runs + 1] = metas
end
return runs
"""

# KEYS: wall, seqs. ARGV: first rank, count. Adds a chunk of a stream written before the seq index to it.
BACKFILL_SEQS = """
local members = redis.call('ZRANGE', KEYS[1], ARGV[1], tonumber(ARGV[1]) + tonumber(ARGV[2]) - 1)
for _, member in ipairs(members) do redis.call('ZADD', KEYS[2], tonumber(member), member) end
return #members
"""

# KEYS: streams, info, wall. ARGV: stream_id, clip prefix.
# Returns {info as field/value list, clip count, oldest meta, newest meta}, nil if unknown. O(log n).
STATS = """
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 0 then return nil end
local first = redis.call('ZRANGE', KEYS[3], 0, 0)[1]
local last = redis.call('ZRANGE', KEYS[3], -1, -1)[1]
return {
  redis.call('HGETALL', KEYS[2]),
  redis.call('ZCARD', KEYS[3]),
  first and redis.call('HGET', ARGV[2] .. first, 'meta') or false,
  last and redis.call('HGET', ARGV[2] .. last, 'meta') or false,
}
"""

# KEYS: streams, media, wall, seqs. ARGV: stream_id, clip prefix, limit. Deletes up to `limit` of the stream's clips
# (not its counters: the stream is going). Returns the clips left, -1 if the stream is unknown.
DELETE_CHUNK = """
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 0 then return -1 end
for _, member in ipairs(redis.call('ZRANGE', KEYS[3], 0, tonumber(ARGV[3]) - 1)) do
  redis.call('UNLINK', ARGV[2] .. member)
  redis.call('ZREM', KEYS[2], member)
  redis.call('ZREM', KEYS[3], member)
  redis.call('ZREM', KEYS[4], member)
end
return redis.call('ZCARD', KEYS[3])
"""

# KEYS: streams, info, media, wall, seqs, configs. ARGV: stream_id. After DELETE_CHUNK has emptied the stream.
# Returns 0 if unknown, -1 if a clip was written since (the client deletes chunks again), else 1.
DELETE = """
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 0 then return 0 end
if redis.call('ZCARD', KEYS[4]) > 0 then return -1 end
redis.call('SREM', KEYS[1], ARGV[1])
redis.call('UNLINK', KEYS[2], KEYS[3], KEYS[4], KEYS[5])
redis.call('HDEL', KEYS[6], ARGV[1])
return 1
"""

# ---- alerts (issue 14) ----
# Every alert key carries the hash tag {alerts} (RedisStore._alert_keys), so all of them sit in one slot and each
# script below is atomic on one node of a cluster too; keys a script derives (an alert's id set, its states) are
# in that slot as well.

# KEYS: configs, the alert's state hash. ARGV: name, sealed config. A new alert starts with no state (one left by a
# runner's write racing the delete of an earlier alert of the name would otherwise be taken for its own).
PUT_ALERT = """
if redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) == 1 then redis.call('DEL', KEYS[2]) end
"""

# KEYS: configs, the alert's state hash. ARGV: name. Returns 1 if the alert was held, else 0.
DELETE_ALERT = """
redis.call('DEL', KEYS[2])
return redis.call('HDEL', KEYS[1], ARGV[1])
"""

# KEYS: next id, keys (event key -> id), records (id -> JSON), ids (sorted set), the alert's ids, a state hash.
# ARGV: event key, record JSON, max events, '1' to write a state else '', the state's stream id, the state JSON,
# the prefix of per-alert id sets, eviction limit. Returns {id, 1} for a new record, {its id, 0} for a key held.
# The newest `max events` are kept: at most `limit` of the oldest go per call, so a lowered cap is met over the
# next appends without one call walking the whole log.
APPEND_EVENT = """
local held = redis.call('HGET', KEYS[2], ARGV[1])
if held then return {tonumber(held), 0} end
local id = redis.call('INCR', KEYS[1])
redis.call('HSET', KEYS[2], ARGV[1], id)
redis.call('HSET', KEYS[3], id, ARGV[2])
redis.call('ZADD', KEYS[4], id, id)
redis.call('ZADD', KEYS[5], id, id)
if ARGV[4] ~= '' then redis.call('HSET', KEYS[6], ARGV[5], ARGV[6]) end
local over = redis.call('ZCARD', KEYS[4]) - tonumber(ARGV[3])
local n = 0
while over > 0 and n < tonumber(ARGV[8]) do
  local oldest = redis.call('ZPOPMIN', KEYS[4])[1]
  local record = redis.call('HGET', KEYS[3], oldest)
  redis.call('HDEL', KEYS[3], oldest)
  if record then
    local r = cjson.decode(record)
    redis.call('HDEL', KEYS[2], r.key)
    redis.call('ZREM', ARGV[7] .. r.alert, oldest)
  end
  over, n = over - 1, n + 1
end
return {id, 1}
"""

# KEYS: an id sorted set (all, or one alert's), records. ARGV: after, limit. {id, JSON, id, JSON, ...} ascending.
READ_EVENTS = """
local out = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. ARGV[1], '+inf', 'LIMIT', 0, ARGV[2])) do
  local record = redis.call('HGET', KEYS[2], id)
  if record then
    out[#out + 1] = id
    out[#out + 1] = record
  end
end
return out
"""
