"""Lua scripts of the Redis store: each runs atomically on the server, so a clip, its indexes and the byte counter
never disagree and a read sees one consistent state in one round trip.

Key layout (see RedisStore): a clip's hash is its stream's clip prefix plus its member, the seq zero-padded to 20
digits so that Redis' tie order between equal times is the seq order. Clip keys are derived inside the scripts,
which standalone Redis allows (Redis Cluster would not).
"""

# Shared by PUT and ENFORCE. Arguments: the stream's info hash, media and wall sorted sets, and clip key prefix.
_EVICT = """
local function evict(info, media, wall, prefix, member)
  local clip = prefix .. member
  local nbytes = tonumber(redis.call('HGET', clip, 'nbytes') or '0')
  redis.call('UNLINK', clip)
  redis.call('ZREM', media, member)
  redis.call('ZREM', wall, member)
  redis.call('HINCRBY', info, 'evicted', 1)
  return redis.call('HINCRBY', info, 'bytes', -nbytes)
end

local function evict_to_cap(info, media, wall, prefix, evicted)
  local cap = redis.call('HGET', info, 'max_bytes')
  if not cap then return end
  cap = tonumber(cap)
  local bytes = tonumber(redis.call('HGET', info, 'bytes') or '0')
  while bytes > cap do
    local oldest = redis.call('ZRANGE', wall, 0, 0)[1]
    if not oldest then return end
    bytes = evict(info, media, wall, prefix, oldest)
    evicted[#evicted + 1] = oldest
  end
end
"""

# The stream's longest clip on each clock (info fields media_span, wall_span), which bounds how long before a
# range a clip overlapping it can start (memory.store.scan_from). Spans only grow: an evicted long clip leaves
# scans a little wider, never wrong. A stream written before spans were kept gets them from its clips, once.
_SPANS = """
local function spans(info, zset, prefix)
  local kept = redis.call('HMGET', info, 'media_span', 'wall_span')
  if kept[1] and kept[2] then return tonumber(kept[1]), tonumber(kept[2]) end
  local media, wall = 0, 0
  for _, member in ipairs(redis.call('ZRANGE', zset, 0, -1)) do
    local c = cjson.decode(redis.call('HGET', prefix .. member, 'meta'))
    media = math.max(media, c.media_end - c.media_start)
    wall = math.max(wall, c.wall_end - c.wall_start)
  end
  redis.call('HSET', info, 'media_span', string.format('%.17g', media), 'wall_span', string.format('%.17g', wall))
  return media, wall
end
"""

# KEYS: streams, info, media, wall, clip. ARGV: stream_id, member, media_start, wall_start, wall_end, meta,
# fmt, ntok, dim, shape, tokens, vector, nbytes, clip prefix, media length, wall length.
# Returns {0} if the clip exists, {-1, shape} on a shape mismatch, else {1, evicted members}.
PUT = (
    _EVICT
    + _SPANS
    + """
if redis.call('EXISTS', KEYS[5]) == 1 then return {0} end
local shape = redis.call('HGET', KEYS[2], 'shape')
if shape and shape ~= ARGV[10] then return {-1, shape} end
redis.call('SADD', KEYS[1], ARGV[1])
local media_span, wall_span = spans(KEYS[2], KEYS[3], ARGV[14])
redis.call('HSET', KEYS[2], 'media_span', string.format('%.17g', math.max(media_span, tonumber(ARGV[15]))),
           'wall_span', string.format('%.17g', math.max(wall_span, tonumber(ARGV[16]))))
redis.call('HSET', KEYS[5], 'meta', ARGV[6], 'fmt', ARGV[7], 'ntok', ARGV[8], 'dim', ARGV[9],
           'tokens', ARGV[11], 'vector', ARGV[12], 'nbytes', ARGV[13], 'wall_end', ARGV[5])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[2])
redis.call('ZADD', KEYS[4], ARGV[4], ARGV[2])
redis.call('HSET', KEYS[2], 'shape', ARGV[10])
redis.call('HINCRBY', KEYS[2], 'bytes', ARGV[13])
local evicted = {}
evict_to_cap(KEYS[2], KEYS[3], KEYS[4], ARGV[14], evicted)
return {1, evicted}
"""
)

# KEYS: streams, info, media, wall. ARGV: stream_id, now, clip prefix. Returns the evicted members.
# %.17g keeps the cutoff exact; Lua's default number formatting would round it to 14 digits.
ENFORCE = (
    _EVICT
    + """
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 0 then return {} end
local evicted = {}
local max_age = redis.call('HGET', KEYS[2], 'max_age_s')
if max_age then
  local cutoff = tonumber(ARGV[2]) - tonumber(max_age)
  for _, member in ipairs(redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', string.format('(%.17g', cutoff))) do
    if tonumber(redis.call('HGET', ARGV[3] .. member, 'wall_end')) < cutoff then
      evict(KEYS[2], KEYS[3], KEYS[4], ARGV[3], member)
      evicted[#evicted + 1] = member
    end
  end
end
evict_to_cap(KEYS[2], KEYS[3], KEYS[4], ARGV[3], evicted)
return evicted
"""
)

# KEYS: streams, info, the clock's sorted set. ARGV: stream_id, start ('' for none), max score, clip prefix, clock
# ('media' or 'wall'), scan margin. Returns the metas of clips starting from scan_from(start, that clock's span)
# to max, nil if the stream is unknown; the caller keeps those that end after start.
CLIPS = (
    _SPANS
    + """
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 0 then return nil end
local min = '-inf'
if ARGV[2] ~= '' then
  local media_span, wall_span = spans(KEYS[2], KEYS[3], ARGV[4])
  local span = ARGV[5] == 'media' and media_span or wall_span
  min = string.format('%.17g', tonumber(ARGV[2]) - span - tonumber(ARGV[6]))
end
local metas = {}
for i, member in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], min, ARGV[3])) do
  metas[i] = redis.call('HGET', ARGV[4] .. member, 'meta')
end
return metas
"""
)

# KEYS: streams, info, wall. ARGV: stream_id, clip prefix.
# Returns {info as field/value list, clip count, oldest meta, newest meta}, nil if unknown.
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

# KEYS: streams, info, media, wall, configs. ARGV: stream_id, clip prefix. Returns 0 if unknown, else 1.
DELETE = """
if redis.call('SREM', KEYS[1], ARGV[1]) == 0 then return 0 end
for _, member in ipairs(redis.call('ZRANGE', KEYS[4], 0, -1)) do
  redis.call('UNLINK', ARGV[2] .. member)
end
redis.call('UNLINK', KEYS[2], KEYS[3], KEYS[4])
redis.call('HDEL', KEYS[5], ARGV[1])
return 1
"""
