"""The memory in Redis, shared by every process of a deployment.

Writes and multi-key reads are Lua scripts (memory.redis_lua), so each is atomic and one round trip; token
fetches are one pipeline. No call does work in proportion to a stream's size: a pick locates its range by rank in
the clock's sorted set (ZCOUNT) and reads the picked ranks' metadata (one script, O(log n) each), and whatever
must walk a stream (deletes, retention, a full vector load) goes in bounded chunks, each its own call, so Redis
answers other clients in between. The client never retries and uses short socket timeouts (`socket_timeout_s`,
VCFLASH_REDIS_TIMEOUT_S): a dead Redis must surface as MemoryUnavailable within a second rather than stall a
question, and the connection pool reconnects by itself on the next call once Redis is back. `rediss://` URLs
connect over TLS (redis-py; `?ssl_ca_certs=/path/ca.pem` for a private CA). Stream configs are sealed
(memory.secrets) with a key every service of the deployment must share. On a Redis Cluster the same store runs with
hash-tagged keys (RedisClusterStore); `open_redis` picks the class from the URL. Alerts, their states and their
event log live under one hash tag, {alerts}, in both classes: each alert write is one script on one slot.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

import numpy as np
import redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.connection import parse_url
from redis.retry import Retry

import memory.codec as codec
import memory.redis_lua as redis_lua
from memory.records import ClipMeta, ClipRecord, Clock, Retention, StreamStats, TokenFormat
from memory.secrets import ConfigCipher
from memory.store import (
    MAX_EVENTS,
    SCAN_MARGIN_S,
    MemoryStore,
    MemoryUnavailable,
    Picked,
    Positions,
    UnknownStream,
    check_alert_name,
    check_positions,
    event_row,
)

log = logging.getLogger(__name__)


CHUNK = 256  # clips per bounded call: a pick's ranks, an eviction or a delete step (about a millisecond of Redis)
SCAN_CHUNK = 4096  # members per ZRANGE when listing a stream's seqs or vectors
PUT_EVICT_LIMIT = 64  # evictions one write may make; a lowered max_bytes is met over the next writes or sweeps
KEYS_CHUNK = 32  # clips' keys per PUT_KEYS call: 1 MB for the 2B (32 KB a clip), so no call holds Redis long


class _StreamKeys(NamedTuple):
    info: str  # hash: shape, bytes, evicted, max_age_s, max_bytes, media_span, wall_span, gen
    media: str  # sorted set: member -> media_start
    wall: str  # sorted set: member -> wall_start
    seqs: str  # sorted set: member -> seq (for an index to fetch only the clips after its last)
    clip_prefix: str  # + member: hash of meta, fmt, ntok, dim, tokens, vector, nbytes, wall_end, thumb (if any),
    # and ktag, kshape, keys (the reasoner's keys, if any)
    streams: str  # set: the ids of the registered streams (a cluster: this stream's own, holding only its id)
    configs: str  # hash: stream_id -> sealed config (a cluster: this stream's own)


class _AlertKeys(NamedTuple):
    """Every alert key carries the hash tag {alerts}: one slot, so each alert write is one atomic script on a
    cluster too (alerts and their events are few next to clips: one slot holds them)."""

    configs: str  # hash: name -> sealed config
    state_prefix: str  # + name: hash of stream_id -> state JSON
    next_id: str  # string: the last event id given (INCR: ids only grow, across restarts of any client)
    keys: str  # hash: event key -> id
    records: str  # hash: id -> record JSON (without its id)
    ids: str  # sorted set: every id held (score = member = id)
    by_alert_prefix: str  # + alert name: sorted set of that alert's ids


EVICT_EVENTS = 64  # event records one append may evict (a lowered max_events is met over the next appends)
EVENT_PAGE = 1000  # records one read returns at most


def _member(seq: int) -> str:
    """Zero-padded so that members with equal times sort by seq."""
    return f"{seq:020d}"


def _bound(t: float | None) -> str:
    """A range bound as the scripts take it: '' for none, else a finite number (Lua's tonumber reads no 'inf')."""
    return "" if t is None else repr(min(max(float(t), -sys.float_info.max), sys.float_info.max))


def _address(url: str) -> str:
    """Where a URL points, for messages: the URL itself may hold a password."""
    kw = parse_url(url)
    where = kw.get("path") or f"{kw.get('host')}:{kw.get('port', 6379)}"
    return f"{where}/{kw.get('db', 0)}"


def _runs(ranks: Sequence[int]) -> list[tuple[int, int]]:
    """Ascending ranks as (first, last) runs of consecutive ones."""
    runs: list[tuple[int, int]] = []
    for r in ranks:
        if runs and r == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], r)
        else:
            runs.append((r, r))
    return runs


def _chunks(items: Sequence[int], size: int) -> Iterator[Sequence[int]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


class RedisStore(MemoryStore):
    client_class: Any = redis.Redis
    kind = "redis"  # for messages
    unavailable: tuple[type[Exception], ...] = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)

    def __init__(
        self,
        url: str,
        prefix: str = "vcflash",
        token_format: TokenFormat = "fp16",
        socket_timeout_s: float = 0.5,
        connect_timeout_s: float = 0.5,
        cipher: ConfigCipher | None = None,
        max_thumbnail_bytes: int = codec.MAX_THUMBNAIL_BYTES,
        max_events: int = MAX_EVENTS,
    ) -> None:
        """`cipher` seals stream and alert configs; without one they cannot be written or read (a ValueError says so).
        A clip whose thumbnail is larger than `max_thumbnail_bytes` is refused (ValueError). The newest `max_events`
        event records are kept."""
        self.prefix = prefix
        self.max_events = max_events
        self.token_format = codec.check_format(token_format)
        self.max_thumbnail_bytes = max_thumbnail_bytes
        self.cipher = cipher or ConfigCipher()
        self._where = f"{self.kind} at {_address(url)}"
        with self._reachable():  # a cluster client reads the slot map here; a plain one connects on first use
            self._redis = self.client_class.from_url(
                url,
                socket_timeout=socket_timeout_s,
                socket_connect_timeout=connect_timeout_s,
                socket_read_size=1 << 20,  # tokens come in 200 KB values: 32 KB reads (the default) double a fetch
                retry=Retry(NoBackoff(), 0),
            )
        self._streams_key = f"{prefix}:streams"
        self._configs_key = f"{prefix}:configs"
        self._put = self._redis.register_script(redis_lua.PUT)
        self._put_keys = self._redis.register_script(redis_lua.PUT_KEYS)
        self._enforce = self._redis.register_script(redis_lua.ENFORCE)
        self._locate = self._redis.register_script(redis_lua.LOCATE)
        self._fetch = self._redis.register_script(redis_lua.FETCH)
        self._backfill_seqs = self._redis.register_script(redis_lua.BACKFILL_SEQS)
        self._stats = self._redis.register_script(redis_lua.STATS)
        self._delete_chunk = self._redis.register_script(redis_lua.DELETE_CHUNK)
        self._delete = self._redis.register_script(redis_lua.DELETE)
        self._put_alert = self._redis.register_script(redis_lua.PUT_ALERT)
        self._delete_alert = self._redis.register_script(redis_lua.DELETE_ALERT)
        self._append_event = self._redis.register_script(redis_lua.APPEND_EVENT)
        self._read_events = self._redis.register_script(redis_lua.READ_EVENTS)
        a = f"{prefix}:{{alerts}}"
        self._alert_keys = _AlertKeys(
            f"{a}:configs", f"{a}:state:", f"{a}:next_id", f"{a}:keys", f"{a}:records", f"{a}:ids", f"{a}:ids:"
        )
        log.info("redis memory at %s, prefix %r (%s tokens)", self._where, prefix, self.token_format)

    @contextmanager
    def _reachable(self) -> Iterator[None]:
        try:
            yield
        except self.unavailable as e:
            raise MemoryUnavailable(f"{self._where} unreachable: {e}") from e

    def _keys(self, stream_id: str) -> _StreamKeys:
        s = f"{self.prefix}:s:{stream_id}"
        return _StreamKeys(
            f"{s}:info", f"{s}:media", f"{s}:wall", f"{s}:seq", f"{s}:c:", self._streams_key, self._configs_key
        )

    def _listed(self, stream_id: str) -> None:
        """Called after a write registered `stream_id` (its `streams` key): nothing to do where that key is global."""

    def _unlisted(self, stream_id: str) -> None:
        """Called after `stream_id` was deleted: nothing to do where its `streams` key is global."""

    def put(self, record: ClipRecord) -> bool:
        enc = codec.encode(record, self.token_format, self.max_thumbnail_bytes)
        m = enc.meta
        k = self._keys(m.stream_id)
        member = _member(m.seq)
        with self._reachable():
            reply = self._put_script(k, m, member, enc)
            if reply[0] == redis_lua.SPANS_MISSING:
                self._measure_spans(k)
                reply = self._put_script(k, m, member, enc)
            if reply[0] != -1:
                self._listed(m.stream_id)
        if reply[0] == -1:
            raise ValueError(f"stream {m.stream_id!r} holds {reply[1].decode()} tokens, clip {m.seq} has {enc.shape}")
        if reply[0] == 1 and reply[1]:
            log.debug("stream %r over its max_bytes: evicted seqs %s on put", m.stream_id, [int(x) for x in reply[1]])
        return reply[0] == 1

    def _put_script(self, k: _StreamKeys, m: ClipMeta, member: str, enc: codec.EncodedClip) -> Any:
        return self._put(
            keys=[k.streams, k.info, k.media, k.wall, k.clip_prefix + member, k.seqs],
            args=[
                m.stream_id,
                member,
                repr(m.media_start),
                repr(m.wall_start),
                repr(m.wall_end),
                codec.meta_to_json(m),
                enc.token_format,
                enc.n_tokens,
                enc.dim,
                enc.shape,
                enc.tokens,
                enc.vector,
                enc.nbytes,
                k.clip_prefix,
                repr(m.media_end - m.media_start),
                repr(m.wall_end - m.wall_start),
                m.seq,
                uuid.uuid4().hex,
                PUT_EVICT_LIMIT,
                enc.thumbnail,
            ],
        )

    def _measure_spans(self, k: _StreamKeys) -> None:
        """Give a stream written before spans were kept its longest clip per clock, from its clips' metas read in
        chunks (no script loops over it). Writes wait for this (PUT refuses while spans are missing), so no clip
        is left out; set only if still missing, so a concurrent measurement changes nothing."""
        media = wall = 0.0
        n = self._redis.zcard(k.wall)
        for rank in range(0, n, SCAN_CHUNK):
            members = self._redis.zrange(k.wall, rank, rank + SCAN_CHUNK - 1)
            pipe = self._redis.pipeline(transaction=False)
            for member in members:
                pipe.hget(k.clip_prefix + member.decode(), "meta")
            for meta in pipe.execute():
                if meta:
                    c = codec.meta_from_json(meta)
                    media, wall = max(media, c.media_end - c.media_start), max(wall, c.wall_end - c.wall_start)
        self._redis.pipeline(transaction=True).hsetnx(k.info, "media_span", repr(media)).hsetnx(
            k.info, "wall_span", repr(wall)
        ).execute()
        log.info("event=spans_measured info=%s clips=%d media_span=%g wall_span=%g", k.info, n, media, wall)

    def pick(
        self,
        stream_id: str,
        start: float | None,
        end: float | None,
        positions: Positions,
        *,
        clock: Clock = "media",
        with_seqs: bool = False,
    ) -> Picked:
        k = self._keys(stream_id)
        zset = {"media": k.media, "wall": k.wall}[clock]
        bounds = [_bound(start), _bound(end)]
        with self._reachable():
            located = self._locate(
                keys=[k.streams, k.info, zset],
                args=[stream_id, *bounds, k.clip_prefix, clock, repr(SCAN_MARGIN_S)],
            )
            if located == [redis_lua.SPANS_MISSING]:
                self._measure_spans(k)
                located = self._locate(
                    keys=[k.streams, k.info, zset],
                    args=[stream_id, *bounds, k.clip_prefix, clock, repr(SCAN_MARGIN_S)],
                )
            if located is None:
                raise UnknownStream(stream_id)
            hi, j, head_json = located
            head = [codec.meta_from_json(m) for m in head_json]
            n = len(head) + max(0, hi - j)
            wanted = check_positions(positions(n), n)
            if not n:
                return Picked(0, [], None, None, np.empty(0, dtype=np.int64) if with_seqs else None)
            tail = sorted({p for p in (*wanted, 0, n - 1) if p >= len(head)})
            by_position: dict[int, ClipMeta | None] = dict(enumerate(head))
            for part in _chunks(tail, CHUNK):
                runs = _runs(part)
                args = [r for first, last in runs for r in (j + first - len(head), j + last - len(head))]
                for (first, _), metas in zip(runs, self._fetch(keys=[zset], args=[k.clip_prefix, *args]), strict=True):
                    by_position.update((first + i, codec.meta_from_json(m)) for i, m in enumerate(metas))
            seqs = None
            if with_seqs:
                members = [
                    m
                    for r in range(j, hi, SCAN_CHUNK)
                    for m in self._redis.zrange(zset, r, min(r + SCAN_CHUNK, hi) - 1)
                ]
                seqs = np.array([m.seq for m in head] + [int(m) for m in members], dtype=np.int64)
        picked = [c for p in wanted if (c := by_position.get(p)) is not None]  # None: evicted in between
        return Picked(n, picked, by_position.get(0), by_position.get(n - 1), seqs)

    def metas(self, stream_id: str, seqs: Sequence[int]) -> dict[int, ClipMeta]:
        k = self._keys(stream_id)
        wanted = sorted({int(s) for s in seqs})
        pipe = self._redis.pipeline(transaction=False).sismember(k.streams, stream_id)
        for seq in wanted:
            pipe.hget(k.clip_prefix + _member(seq), "meta")
        with self._reachable():
            known, *metas = pipe.execute()
        if not known:
            raise UnknownStream(stream_id)
        return {seq: codec.meta_from_json(m) for seq, m in zip(wanted, metas, strict=True) if m}

    def tokens(self, stream_id: str, seqs: Sequence[int]) -> np.ndarray:
        seqs = [int(s) for s in seqs]
        wanted = sorted(set(seqs))
        k = self._keys(stream_id)
        pipe = self._redis.pipeline(transaction=False)
        pipe.sismember(k.streams, stream_id)
        pipe.hget(k.info, "shape")
        for seq in wanted:
            pipe.hmget(k.clip_prefix + _member(seq), "tokens", "fmt", "ntok", "dim")
        with self._reachable():
            known, shape, *fields = pipe.execute()
        if not known:
            raise UnknownStream(stream_id)
        held = {seq: f for seq, f in zip(wanted, fields, strict=True) if f[0]}
        blobs = {seq: (blob, fmt.decode(), int(n), int(d)) for seq, (blob, fmt, n, d) in held.items()}
        return codec.stack_tokens(stream_id, seqs, None if shape is None else shape.decode(), blobs)

    def put_keys(
        self, stream_id: str, tag: str, seqs: Sequence[int], keys: np.ndarray, *, generation: str | None = None
    ) -> int:
        """A chunk of clips per call (KEYS_CHUNK), each atomic."""
        enc = codec.encode_keys(stream_id, tag, seqs, keys)
        k = self._keys(stream_id)
        stored, evicted = 0, []
        for i in range(0, len(enc.seqs), KEYS_CHUNK):
            pairs = zip(enc.seqs[i : i + KEYS_CHUNK], enc.blobs[i : i + KEYS_CHUNK], strict=True)
            with self._reachable():
                reply = self._put_keys(
                    keys=[k.streams, k.info, k.media, k.wall, k.seqs],
                    args=[
                        stream_id,
                        k.clip_prefix,
                        tag,
                        enc.shape,
                        enc.tokens,
                        enc.width,
                        generation or "",
                        PUT_EVICT_LIMIT,
                        *(x for seq, blob in pairs for x in (_member(seq), blob)),
                    ],
                )
            if reply[0] == -2:
                raise UnknownStream(stream_id)
            if reply[0] == -1:
                codec.check_keys_fit(stream_id, enc, reply[1].decode())  # raises, naming both shapes
            stored += reply[0]
            evicted += [int(m) for m in reply[1]]
        if evicted:
            log.debug("stream %r over its max_bytes: evicted seqs %s on put_keys", stream_id, evicted)
        return stored

    def keys(self, stream_id: str, tag: str, seqs: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        codec.check_tag(tag)
        seqs = [int(s) for s in seqs]
        wanted = sorted(set(seqs))
        k = self._keys(stream_id)
        pipe = self._redis.pipeline(transaction=False).sismember(k.streams, stream_id)
        for seq in wanted:
            pipe.hmget(k.clip_prefix + _member(seq), "ktag", "kshape", "keys")
        with self._reachable():
            known, *fields = pipe.execute()
        if not known:
            raise UnknownStream(stream_id)
        return codec.stack_keys(stream_id, seqs, dict(zip(wanted, fields, strict=True)), tag)

    def thumbnails(self, stream_id: str, seqs: Sequence[int]) -> dict[int, bytes]:
        k = self._keys(stream_id)
        wanted = sorted({int(s) for s in seqs})
        pipe = self._redis.pipeline(transaction=False).sismember(k.streams, stream_id)
        for seq in wanted:
            pipe.hget(k.clip_prefix + _member(seq), "thumb")
        with self._reachable():
            known, *blobs = pipe.execute()
        if not known:
            raise UnknownStream(stream_id)
        return {seq: blob for seq, blob in zip(wanted, blobs, strict=True) if blob}

    def vectors(self, stream_id: str, after: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        k = self._keys(stream_id)
        with self._reachable():
            known, shape, n_seqs, n_clips = (
                self._redis.pipeline(transaction=False)
                .sismember(k.streams, stream_id)
                .hget(k.info, "shape")
                .zcard(k.seqs)
                .zcard(k.wall)
                .execute()
            )
            if not known:
                raise UnknownStream(stream_id)
            if n_seqs < n_clips:  # written before the seq index: add its clips to it, a chunk per call
                for rank in range(0, n_clips, SCAN_CHUNK):
                    self._backfill_seqs(keys=[k.wall, k.seqs], args=[rank, SCAN_CHUNK])
            held: list[tuple[int, Any]] = []
            low = "-inf" if after is None else f"({int(after)}"
            while True:
                members = self._redis.zrangebyscore(k.seqs, low, "+inf", start=0, num=SCAN_CHUNK)
                pipe = self._redis.pipeline(transaction=False)
                for member in members:
                    pipe.hmget(k.clip_prefix + member.decode(), "vector", "fmt", "dim")
                fields = pipe.execute() if members else []
                held += [(int(m), f) for m, f in zip(members, fields, strict=True) if f[0]]  # skip clips evicted since
                if len(members) < SCAN_CHUNK:
                    break
                low = f"({int(members[-1])}"
        vectors = np.empty((len(held), int(shape.split(b"x")[1]) if shape else 0), dtype=np.float32)
        for i, (_, (blob, fmt, dim)) in enumerate(held):
            vectors[i] = codec.decode_vector(blob, fmt.decode(), int(dim))
        return np.array([seq for seq, _ in held], dtype=np.int64), vectors

    def held_seqs(self, stream_id: str) -> np.ndarray:
        k = self._keys(stream_id)
        with self._reachable():
            known, n = self._redis.pipeline(transaction=False).sismember(k.streams, stream_id).zcard(k.wall).execute()
            if not known:
                raise UnknownStream(stream_id)
            members = [m for r in range(0, n, SCAN_CHUNK) for m in self._redis.zrange(k.wall, r, r + SCAN_CHUNK - 1)]
        return np.unique(np.array([int(m) for m in members], dtype=np.int64))

    def streams(self) -> list[str]:
        with self._reachable():
            return sorted(s.decode() for s in self._redis.smembers(self._streams_key))

    def stats(self, stream_id: str) -> StreamStats:
        k = self._keys(stream_id)
        with self._reachable():
            reply = self._stats(keys=[k.streams, k.info, k.wall], args=[stream_id, k.clip_prefix])
        if reply is None:
            raise UnknownStream(stream_id)
        pairs, count, first, last = reply
        info = {pairs[i].decode(): pairs[i + 1].decode() for i in range(0, len(pairs), 2)}
        max_age_s, max_bytes = info.get("max_age_s"), info.get("max_bytes")
        return StreamStats(
            stream_id,
            count,
            int(info.get("bytes", 0)),
            None if first is None else codec.meta_from_json(first),
            None if last is None else codec.meta_from_json(last),
            Retention(None if max_age_s is None else float(max_age_s), None if max_bytes is None else int(max_bytes)),
            int(info.get("evicted", 0)),
            info.get("gen", ""),
        )

    def delete_stream(self, stream_id: str) -> None:
        """Clips go a chunk per call (the stream is listed until the last, so a delete cut short can be repeated),
        then the stream's keys and config in one."""
        k = self._keys(stream_id)
        with self._reachable():
            while True:
                left = self._delete_chunk(
                    keys=[k.streams, k.media, k.wall, k.seqs], args=[stream_id, k.clip_prefix, CHUNK]
                )
                if left == -1:
                    raise UnknownStream(stream_id)
                if left:
                    continue
                deleted = self._delete(keys=[k.streams, k.info, k.media, k.wall, k.seqs, k.configs], args=[stream_id])
                if deleted == 0:
                    raise UnknownStream(stream_id)
                if deleted == 1:
                    break
            self._unlisted(stream_id)
        log.info("deleted stream %r", stream_id)

    def set_retention(self, stream_id: str, retention: Retention) -> None:
        codec.check_stream_id(stream_id)
        k = self._keys(stream_id)
        info = k.info
        pipe = self._redis.pipeline(transaction=True).sadd(k.streams, stream_id)
        pipe.hsetnx(info, "gen", uuid.uuid4().hex)
        pipe.hdel(info, "max_age_s", "max_bytes")
        if retention.max_age_s is not None:
            pipe.hset(info, "max_age_s", repr(float(retention.max_age_s)))
        if retention.max_bytes is not None:
            pipe.hset(info, "max_bytes", int(retention.max_bytes))
        with self._reachable():
            pipe.execute()
            self._listed(stream_id)

    def enforce_retention(self, now: float | None = None) -> dict[str, list[int]]:
        now = time.time() if now is None else now
        evicted: dict[str, list[int]] = {}
        for stream_id in self.streams():
            k = self._keys(stream_id)
            members: list[bytes] = []
            skipped, more = 0, 1
            while more:  # a bounded chunk per call, so puts and reads are not held up
                with self._reachable():
                    chunk, skips, more = self._enforce(
                        keys=[k.streams, k.info, k.media, k.wall, k.seqs],
                        args=[stream_id, repr(float(now)), k.clip_prefix, CHUNK, skipped],
                    )
                members += chunk
                skipped += skips
            if members:
                evicted[stream_id] = [int(m) for m in members]
                log.info("retention evicted %d clips of stream %r", len(members), stream_id)
        return evicted

    def put_stream_config(self, stream_id: str, config: dict[str, Any]) -> None:
        codec.check_stream_id(stream_id)
        sealed = self.cipher.seal(config)
        k = self._keys(stream_id)
        with self._reachable():
            (
                self._redis.pipeline(transaction=True)
                .sadd(k.streams, stream_id)
                .hsetnx(k.info, "gen", uuid.uuid4().hex)
                .hset(k.configs, stream_id, sealed)
                .execute()
            )
            self._listed(stream_id)

    def stream_configs(self) -> dict[str, dict[str, Any]]:
        with self._reachable():
            configs = self._redis.hgetall(self._configs_key)
        return self.cipher.unseal_all({k.decode(): v for k, v in configs.items()})

    def put_alert(self, name: str, config: dict[str, Any]) -> None:
        sealed = self.cipher.seal(config)
        a = self._alert_keys
        with self._reachable():
            self._put_alert(keys=[a.configs, a.state_prefix + check_alert_name(name)], args=[name, sealed])

    def alert_configs(self) -> dict[str, dict[str, Any]]:
        with self._reachable():
            configs = self._redis.hgetall(self._alert_keys.configs)
        return self.cipher.unseal_all({k.decode(): v for k, v in configs.items()})

    def delete_alert(self, name: str) -> bool:
        a = self._alert_keys
        with self._reachable():
            deleted = self._delete_alert(keys=[a.configs, a.state_prefix + name], args=[name])
        return bool(deleted)

    def put_alert_state(self, name: str, stream_id: str, state: dict[str, Any]) -> None:
        with self._reachable():
            self._redis.hset(self._alert_keys.state_prefix + check_alert_name(name), stream_id, json.dumps(state))

    def alert_state(self, name: str, stream_id: str) -> dict[str, Any] | None:
        with self._reachable():
            state = self._redis.hget(self._alert_keys.state_prefix + name, stream_id)
        return None if state is None else json.loads(state)

    def append_event(
        self, record: dict[str, Any], state: tuple[str, str, dict[str, Any]] | None = None
    ) -> tuple[int, bool]:
        key, alert, text = event_row(record)
        a = self._alert_keys
        name, stream_id, state_json = ("", "", "") if state is None else (*state[:2], json.dumps(state[2]))
        keys = [a.next_id, a.keys, a.records, a.ids, a.by_alert_prefix + alert, a.state_prefix + (name or alert)]
        args = [key, text, self.max_events, "1" if state else "", stream_id, state_json, a.by_alert_prefix]
        with self._reachable():
            event_id, created = self._append_event(keys=keys, args=[*args, EVICT_EVENTS])
        return int(event_id), bool(created)

    def events(self, after: int = 0, limit: int = 1000, alert: str | None = None) -> list[dict[str, Any]]:
        a = self._alert_keys
        ids = a.ids if alert is None else a.by_alert_prefix + alert
        with self._reachable():
            flat = self._read_events(keys=[ids, a.records], args=[int(after), min(int(limit), EVENT_PAGE)])
        return [{"id": int(flat[i])} | json.loads(flat[i + 1]) for i in range(0, len(flat), 2)]

    def close(self) -> None:
        self._redis.close()


class RedisClusterStore(RedisStore):
    """RedisStore on a Redis Cluster (redis-py's RedisCluster: it routes each call by key slot and follows MOVED
    after a failover or resharding). Every key of a stream carries the hash tag {s:<stream id>} (never empty, so
    Redis never ignores it, whatever the id), so a stream lives in one slot and each script stays atomic on one node;
    the scripts are the same because a stream's registration and config become keys of its own too (a set holding
    only its id, a hash with one field). Different streams spread over the slots, and so over the masters.

    What must see every stream reads the set `prefix:streams`, an index of the registrations: written after each
    registering write (one SADD more per put, idempotent, so an acknowledged put is always listed), cleared after a
    delete, and filtered against the streams' own keys when read (one pipelined call per node), so a stream left
    in it by a crash between the two is not listed. Layout is the cluster's own: data written by a single Redis
    (keys `prefix:s:<id>:...`) is not read here."""

    client_class = RedisCluster
    kind = "redis cluster"
    unavailable = (
        *RedisStore.unavailable,
        redis.exceptions.ClusterError,  # CLUSTERDOWN while a failover is under way
        redis.exceptions.TryAgainError,  # a slot being migrated
        redis.exceptions.RedisClusterException,  # no node reachable to read the slot map from
    )

    def __init__(self, url: str, prefix: str = "vcflash", **kwargs: Any) -> None:
        if "{" in prefix or "}" in prefix:
            raise ValueError(f"prefix {prefix!r}: braces would change the keys' hash tag")
        super().__init__(url, prefix, **kwargs)

    def _keys(self, stream_id: str) -> _StreamKeys:
        s = f"{self.prefix}:{{s:{stream_id}}}"
        return _StreamKeys(
            f"{s}:info", f"{s}:media", f"{s}:wall", f"{s}:seq", f"{s}:c:", f"{s}:streams", f"{s}:configs"
        )

    def _listed(self, stream_id: str) -> None:
        self._redis.sadd(self._streams_key, stream_id)

    def _unlisted(self, stream_id: str) -> None:
        self._redis.srem(self._streams_key, stream_id)
        if self._redis.sismember(self._keys(stream_id).streams, stream_id):  # written again meanwhile: keep it
            self._redis.sadd(self._streams_key, stream_id)

    def _each(self, call: Callable[[Any, str], Any]) -> list[tuple[str, Any]]:
        """(stream id, reply) for each listed stream, from one pipeline that redis-py sends to each node once."""
        listed = sorted(s.decode() for s in self._redis.smembers(self._streams_key))
        pipe = self._redis.pipeline(transaction=False)
        for stream_id in listed:
            call(pipe, stream_id)
        return list(zip(listed, pipe.execute() if listed else [], strict=True))

    def streams(self) -> list[str]:
        with self._reachable():
            known = self._each(lambda pipe, s: pipe.sismember(self._keys(s).streams, s))
        return [stream_id for stream_id, held in known if held]

    def stream_configs(self) -> dict[str, dict[str, Any]]:
        with self._reachable():
            configs = self._each(lambda pipe, s: pipe.hget(self._keys(s).configs, s))
        return self.cipher.unseal_all({stream_id: v for stream_id, v in configs if v is not None})


def open_redis(url: str, **kwargs: Any) -> RedisStore:
    """A RedisClusterStore if `url` names a Redis Cluster node, else a RedisStore; kwargs go to either.

    `?cluster=yes` or `?cluster=no` in the URL says which; without it one INFO asks the node. A node that cannot be
    reached then gets a RedisStore, which connects when Redis is up (a cluster must be up for its client to start,
    so a deployment that may start before its cluster should say `?cluster=yes`)."""
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    said = query.pop("cluster", [None])[-1]
    if said not in ("yes", "no", None):
        raise ValueError(f"redis URL: cluster={said!r}, expected 'yes' or 'no'")
    if said:  # ours, not redis-py's: it would pass it on to the connection
        url = urlunsplit(parts._replace(query=urlencode(query, doseq=True)))
    cluster = said == "yes" if said else _is_cluster(url, kwargs.get("connect_timeout_s", 0.5))
    return (RedisClusterStore if cluster else RedisStore)(url, **kwargs)


def _is_cluster(url: str, timeout_s: float) -> bool:
    client = redis.Redis.from_url(
        url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 0)
    )
    try:
        return client.info("cluster").get("cluster_enabled") == 1
    except RedisStore.unavailable as e:
        log.warning(
            "redis at %s unreachable (%s): taken for a single Redis (a cluster: ?cluster=yes)", _address(url), e
        )
        return False
    finally:
        client.close()
