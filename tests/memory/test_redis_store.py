"""What only the Redis backend has: outages, recovery, and its key space."""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Callable

import pytest
import redis
from cryptography.fernet import Fernet

from memory import ConfigCipher, MemoryUnavailable, RedisStore, Retention


def fails_fast(call: Callable[[], object], limit_s: float = 2.0) -> None:
    t0 = time.monotonic()
    with pytest.raises(MemoryUnavailable, match="127.0.0.1"):
        call()
    assert time.monotonic() - t0 < limit_s


def test_dead_redis_is_reported_fast_and_the_store_recovers(own_redis_server, clip) -> None:
    with RedisStore(own_redis_server.url, prefix="outage") as store:
        assert store.put(clip(0))
        own_redis_server.stop()
        fails_fast(lambda: store.put(clip(1)))
        fails_fast(lambda: store.clips("cam"))
        fails_fast(lambda: store.tokens("cam", [0]))
        fails_fast(lambda: store.stats("cam"))
        fails_fast(store.enforce_retention)

        own_redis_server.start()  # same port and directory; the append-only file brings clip 0 back
        assert store.put(clip(1))
        assert [m.seq for m in store.clips("cam")] == [0, 1]
        assert store.tokens("cam", [0, 1]).shape == (2, 64, 64)


def test_hung_redis_times_out_and_the_store_recovers(own_redis_server, clip) -> None:
    with RedisStore(own_redis_server.url, prefix="hang", socket_timeout_s=0.3) as store:
        store.put(clip(0))
        os.kill(own_redis_server.proc.pid, signal.SIGSTOP)
        try:
            fails_fast(lambda: store.clips("cam"), limit_s=1.0)
        finally:
            os.kill(own_redis_server.proc.pid, signal.SIGCONT)
        assert [m.seq for m in store.clips("cam")] == [0]


def test_deleting_every_stream_leaves_no_keys(redis_server, clip) -> None:
    prefix = f"test-{uuid.uuid4().hex}"
    with RedisStore(redis_server.url, prefix=prefix, cipher=ConfigCipher(Fernet.generate_key().decode())) as store:
        for seq in range(5):
            store.put(clip(seq, "cam"))
            store.put(clip(seq, "door"))
        store.set_retention("cam", Retention(max_bytes=30_000))
        store.put_stream_config("cam", {"fps": 1})
        store.enforce_retention()
        for stream_id in store.streams():
            store.delete_stream(stream_id)
    client = redis.Redis.from_url(redis_server.url)
    try:
        assert client.keys(f"{prefix}:*") == []
    finally:
        client.close()
