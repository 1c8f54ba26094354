"""Durable timestamped token memory: Redis or an embedded file-backed store, plus a FAISS clip index (issue 3)."""

from __future__ import annotations

from pathlib import Path

from memory.embedded import EmbeddedStore
from memory.index import ClipIndex
from memory.records import ClipMeta, ClipRecord, Clock, Retention, StreamStats, TokenFormat, clip_vector
from memory.redis_store import RedisStore
from memory.store import MemoryStore, MemoryUnavailable, UnknownStream

__all__ = [
    "ClipIndex",
    "ClipMeta",
    "ClipRecord",
    "Clock",
    "EmbeddedStore",
    "MemoryStore",
    "MemoryUnavailable",
    "RedisStore",
    "Retention",
    "StreamStats",
    "TokenFormat",
    "UnknownStream",
    "clip_vector",
    "open_store",
]


def open_store(redis_url: str | None, data_dir: Path, token_format: TokenFormat = "fp16") -> MemoryStore:
    """Redis when a URL is given, so processes share one memory; else a file in data_dir for a single process."""
    if redis_url:
        return RedisStore(redis_url, token_format=token_format)
    data_dir = Path(data_dir)
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # stream configs hold camera passwords
    return EmbeddedStore(data_dir / "memory.sqlite3", token_format=token_format)
