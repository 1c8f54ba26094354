"""Durable timestamped token memory: Redis or an embedded file-backed store, plus a FAISS clip index (issue 3)."""

from __future__ import annotations

from pathlib import Path

from memory.codec import MAX_THUMBNAIL_BYTES, check_format
from memory.embedded import EmbeddedStore
from memory.index import ClipIndex
from memory.records import ClipMeta, ClipRecord, Clock, Retention, StreamStats, TokenFormat, clip_vector
from memory.redis_store import RedisClusterStore, RedisStore, open_redis
from memory.secrets import KEY_FILE, ConfigCipher
from memory.store import MAX_EVENTS, MemoryStore, MemoryUnavailable, Picked, UnknownStream
from vcflash.serve.settings import private_dir

__all__ = [
    "ClipIndex",
    "ClipMeta",
    "ClipRecord",
    "Clock",
    "ConfigCipher",
    "EmbeddedStore",
    "MemoryStore",
    "MemoryUnavailable",
    "Picked",
    "RedisClusterStore",
    "RedisStore",
    "Retention",
    "StreamStats",
    "TokenFormat",
    "UnknownStream",
    "clip_vector",
    "open_redis",
    "open_store",
]


def open_store(
    redis_url: str | None,
    data_dir: Path,
    token_format: TokenFormat | str = "fp16",
    secret_key: str | None = None,
    redis_timeout_s: float = 0.5,
    max_thumbnail_bytes: int = MAX_THUMBNAIL_BYTES,
    max_events: int = MAX_EVENTS,
) -> MemoryStore:
    """Redis or a Redis Cluster when a URL is given, so processes share one memory; else a file in data_dir.

    Stream configs are sealed with `secret_key` (VCFLASH_SECRET_KEY), else with DATA_DIR/secret.key, made when
    first needed (so a Redis service that never writes configs makes no file). `redis_timeout_s` bounds each Redis
    call and connection (VCFLASH_REDIS_TIMEOUT_S); a clip's thumbnail over `max_thumbnail_bytes` is refused; the
    newest `max_events` alert event records are kept (VCFLASH_MAX_EVENTS)."""
    token_format = check_format(token_format)
    cipher = ConfigCipher(secret_key, Path(data_dir) / KEY_FILE)
    if redis_url:
        return open_redis(  # a RedisClusterStore where the URL names a cluster node
            redis_url,
            token_format=token_format,
            socket_timeout_s=redis_timeout_s,
            connect_timeout_s=redis_timeout_s,
            cipher=cipher,
            max_thumbnail_bytes=max_thumbnail_bytes,
            max_events=max_events,
        )
    path = private_dir(Path(data_dir)) / "memory.sqlite3"
    return EmbeddedStore(
        path, token_format=token_format, cipher=cipher, max_thumbnail_bytes=max_thumbnail_bytes, max_events=max_events
    )
