"""Real backends for the memory tests: a private redis-server (tests/conftest.py), a private 3-master Redis Cluster
(cluster_server.py) and SQLite files in tmp_path.

The `store` fixture runs every test against each backend; `make_store` opens another client on the same data
(a reopened file, a new Redis connection) to check what survives. Both seal stream configs: the embedded store
with the key file beside its database, Redis with one key per test (as VCFLASH_SECRET_KEY would give).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from cryptography.fernet import Fernet

from memory import (
    ClipMeta,
    ClipRecord,
    ConfigCipher,
    EmbeddedStore,
    MemoryStore,
    TokenFormat,
    clip_vector,
    open_redis,
)
from tests.memory.cluster_server import redis_cluster  # noqa: F401 (a fixture)

WALL0 = 1_700_000_000.0  # wall time of clip 0
FRAME_DT = 1.0  # seconds between sampled frames: a clip covers 4 s on both clocks


StoreFactory = Callable[..., MemoryStore]


@pytest.fixture(params=["embedded", "redis", "cluster"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreFactory]:
    """Opens a new store object on this test's data each call: `make_store(token_format="fp16", cipher=None)`."""
    opened: list[MemoryStore] = []
    if request.param == "embedded":
        path = tmp_path / "memory.sqlite3"

        def open_(token_format: TokenFormat = "fp16", cipher: ConfigCipher | None = None) -> MemoryStore:
            opened.append(EmbeddedStore(path, token_format=token_format, cipher=cipher))
            return opened[-1]
    else:
        server = request.getfixturevalue("redis_server" if request.param == "redis" else "redis_cluster")
        url, prefix = server.url, f"test-{uuid.uuid4().hex}"
        shared = ConfigCipher(Fernet.generate_key().decode())

        def open_(token_format: TokenFormat = "fp16", cipher: ConfigCipher | None = None) -> MemoryStore:
            # open_redis, as open_store does: a RedisClusterStore for the cluster, found by asking the node
            opened.append(open_redis(url, prefix=prefix, token_format=token_format, cipher=cipher or shared))
            return opened[-1]

    yield open_
    for store in opened:
        store.close()


@pytest.fixture
def store(make_store: StoreFactory) -> MemoryStore:
    return make_store()


def make_clip(seq: int, stream_id: str = "cam", *, dim: int = 64, media0: float = 0.0) -> ClipRecord:
    """Clip `seq` of a stream sampled every FRAME_DT seconds, with random float16 tokens fixed by seq."""
    tokens = np.random.default_rng(seq).standard_normal((64, dim)).astype(np.float16)
    media, wall = media0 + 4 * FRAME_DT * seq, WALL0 + 4 * FRAME_DT * seq
    meta = ClipMeta(
        stream_id=stream_id,
        seq=seq,
        wall_start=wall,
        wall_end=wall + 4 * FRAME_DT,
        media_start=media,
        media_end=media + 4 * FRAME_DT,
        frame_media_times=tuple(media + i * FRAME_DT for i in range(4)),
    )
    return ClipRecord(meta, tokens, clip_vector(tokens))


@pytest.fixture
def clip() -> Callable[..., ClipRecord]:
    """make_clip, for tests to build records."""
    return make_clip
