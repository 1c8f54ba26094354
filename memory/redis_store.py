"""The memory in Redis, shared by every process of a deployment.

Writes and multi-key reads are Lua scripts (memory.redis_lua), so each is atomic and one round trip; token
fetches are one pipeline. The client never retries and uses short socket timeouts: a dead Redis must surface as
MemoryUnavailable within a second rather than stall a question, and the connection pool reconnects by itself on
the next call once Redis is back. `rediss://` URLs connect over TLS (redis-py; `?ssl_ca_certs=/path/ca.pem` for a
private CA). Stream configs are sealed (memory.secrets) with a key every service of the deployment must share.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

import numpy as np
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

import memory.codec as codec
import memory.redis_lua as redis_lua
from memory.records import ClipMeta, ClipRecord, Clock, Retention, StreamStats, TokenFormat
from memory.secrets import ConfigCipher
from memory.store import SCAN_MARGIN_S, MemoryStore, MemoryUnavailable, UnknownStream

log = logging.getLogger(__name__)


class _StreamKeys(NamedTuple):
    info: str  # hash: shape, bytes, evicted, max_age_s, max_bytes, media_span, wall_span
    media: str  # sorted set: member -> media_start
    wall: str  # sorted set: member -> wall_start
    clip_prefix: str  # + member: hash of meta, fmt, ntok, dim, tokens, vector, nbytes, wall_end


def _member(seq: int) -> str:
    """Zero-padded so that members with equal times sort by seq."""
    return f"{seq:020d}"


def _below(t: float | None) -> str:
    """ZRANGEBYSCORE's max for scores under t (None: no limit)."""
    return "+inf" if t is None else f"({float(t)!r}"


class RedisStore(MemoryStore):
    def __init__(
        self,
        url: str,
        prefix: str = "vcflash",
        token_format: TokenFormat = "fp16",
        socket_timeout_s: float = 0.5,
        connect_timeout_s: float = 0.5,
        cipher: ConfigCipher | None = None,
    ) -> None:
        """`cipher` seals stream configs; without one they cannot be written or read (a ValueError says so)."""
        self.prefix = prefix
        self.token_format = codec.check_format(token_format)
        self.cipher = cipher or ConfigCipher()
        self._redis = redis.Redis.from_url(
            url,
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=connect_timeout_s,
            socket_read_size=1 << 20,  # tokens come in 200 KB values: 32 KB reads (the default) double a fetch
            retry=Retry(NoBackoff(), 0),
        )
        kw = self._redis.connection_pool.connection_kwargs
        where = kw.get("path") or f"{kw.get('host')}:{kw.get('port')}"
        self._where = f"redis at {where}/{kw.get('db', 0)}"  # for messages: the URL may hold a password
        self._streams_key = f"{prefix}:streams"
        self._configs_key = f"{prefix}:configs"
        self._put = self._redis.register_script(redis_lua.PUT)
        self._enforce = self._redis.register_script(redis_lua.ENFORCE)
        self._clips = self._redis.register_script(redis_lua.CLIPS)
        self._stats = self._redis.register_script(redis_lua.STATS)
        self._delete = self._redis.register_script(redis_lua.DELETE)
        log.info("redis memory at %s, prefix %r (%s tokens)", self._where, prefix, self.token_format)

    @contextmanager
    def _reachable(self) -> Iterator[None]:
        try:
            yield
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as e:
            raise MemoryUnavailable(f"{self._where} unreachable: {e}") from e

    def _keys(self, stream_id: str) -> _StreamKeys:
        s = f"{self.prefix}:s:{stream_id}"
        return _StreamKeys(f"{s}:info", f"{s}:media", f"{s}:wall", f"{s}:c:")

    def put(self, record: ClipRecord) -> bool:
        enc = codec.encode(record, self.token_format)
        m = enc.meta
        k = self._keys(m.stream_id)
        member = _member(m.seq)
        with self._reachable():
            reply = self._put(
                keys=[self._streams_key, k.info, k.media, k.wall, k.clip_prefix + member],
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
                ],
            )
        if reply[0] == -1:
            raise ValueError(f"stream {m.stream_id!r} holds {reply[1].decode()} tokens, clip {m.seq} has {enc.shape}")
        if reply[0] == 1 and reply[1]:
            log.debug("stream %r over its max_bytes: evicted seqs %s on put", m.stream_id, [int(x) for x in reply[1]])
        return reply[0] == 1

    def clips(
        self, stream_id: str, start: float | None = None, end: float | None = None, *, clock: Clock = "media"
    ) -> list[ClipMeta]:
        k = self._keys(stream_id)
        zset = {"media": k.media, "wall": k.wall}[clock]
        with self._reachable():
            metas = self._clips(
                keys=[self._streams_key, k.info, zset],
                args=[
                    stream_id,
                    "" if start is None else repr(float(start)),
                    _below(end),
                    k.clip_prefix,
                    clock,
                    repr(SCAN_MARGIN_S),
                ],
            )
        if metas is None:
            raise UnknownStream(stream_id)
        clips = [codec.meta_from_json(m) for m in metas]
        return clips if start is None else [m for m in clips if m.span(clock)[1] > start]

    def tokens(self, stream_id: str, seqs: Sequence[int]) -> np.ndarray:
        seqs = [int(s) for s in seqs]
        wanted = sorted(set(seqs))
        k = self._keys(stream_id)
        pipe = self._redis.pipeline(transaction=False)
        pipe.sismember(self._streams_key, stream_id)
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

    def vectors(self, stream_id: str) -> tuple[np.ndarray, np.ndarray]:
        k = self._keys(stream_id)
        with self._reachable():
            known, shape, members = (
                self._redis.pipeline(transaction=False)
                .sismember(self._streams_key, stream_id)
                .hget(k.info, "shape")
                .zrange(k.wall, 0, -1)
                .execute()
            )
            if not known:
                raise UnknownStream(stream_id)
            members.sort()
            pipe = self._redis.pipeline(transaction=False)
            for member in members:
                pipe.hmget(k.clip_prefix + member.decode(), "vector", "fmt", "dim")
            fields = pipe.execute()
        held = [(int(m), f) for m, f in zip(members, fields, strict=True) if f[0]]  # skip clips evicted in between
        vectors = np.empty((len(held), int(shape.split(b"x")[1]) if shape else 0), dtype=np.float32)
        for i, (_, (blob, fmt, dim)) in enumerate(held):
            vectors[i] = codec.decode_vector(blob, fmt.decode(), int(dim))
        return np.array([seq for seq, _ in held], dtype=np.int64), vectors

    def streams(self) -> list[str]:
        with self._reachable():
            return sorted(s.decode() for s in self._redis.smembers(self._streams_key))

    def stats(self, stream_id: str) -> StreamStats:
        k = self._keys(stream_id)
        with self._reachable():
            reply = self._stats(keys=[self._streams_key, k.info, k.wall], args=[stream_id, k.clip_prefix])
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
        )

    def delete_stream(self, stream_id: str) -> None:
        k = self._keys(stream_id)
        with self._reachable():
            deleted = self._delete(
                keys=[self._streams_key, k.info, k.media, k.wall, self._configs_key], args=[stream_id, k.clip_prefix]
            )
        if not deleted:
            raise UnknownStream(stream_id)
        log.info("deleted stream %r", stream_id)

    def set_retention(self, stream_id: str, retention: Retention) -> None:
        codec.check_stream_id(stream_id)
        info = self._keys(stream_id).info
        pipe = self._redis.pipeline(transaction=True).sadd(self._streams_key, stream_id)
        pipe.hdel(info, "max_age_s", "max_bytes")
        if retention.max_age_s is not None:
            pipe.hset(info, "max_age_s", repr(float(retention.max_age_s)))
        if retention.max_bytes is not None:
            pipe.hset(info, "max_bytes", int(retention.max_bytes))
        with self._reachable():
            pipe.execute()

    def enforce_retention(self, now: float | None = None) -> dict[str, list[int]]:
        now = time.time() if now is None else now
        evicted: dict[str, list[int]] = {}
        for stream_id in self.streams():
            k = self._keys(stream_id)
            with self._reachable():  # one script per stream, so puts to other streams are not held up
                members = self._enforce(
                    keys=[self._streams_key, k.info, k.media, k.wall], args=[stream_id, repr(float(now)), k.clip_prefix]
                )
            if members:
                evicted[stream_id] = [int(m) for m in members]
                log.info("retention evicted %d clips of stream %r", len(members), stream_id)
        return evicted

    def put_stream_config(self, stream_id: str, config: dict[str, Any]) -> None:
        codec.check_stream_id(stream_id)
        sealed = self.cipher.seal(config)
        with self._reachable():
            (
                self._redis.pipeline(transaction=True)
                .sadd(self._streams_key, stream_id)
                .hset(self._configs_key, stream_id, sealed)
                .execute()
            )

    def stream_configs(self) -> dict[str, dict[str, Any]]:
        with self._reachable():
            configs = self._redis.hgetall(self._configs_key)
        return self.cipher.unseal_all({k.decode(): v for k, v in configs.items()})

    def close(self) -> None:
        self._redis.close()
