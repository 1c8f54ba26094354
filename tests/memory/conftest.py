"""Real backends for the memory tests: a private redis-server on a free loopback port, and SQLite files in tmp_path.

The `store` fixture runs every test against both backends; `make_store` opens another client on the same data
(a reopened file, a new Redis connection) to check what survives.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import redis

from memory import ClipMeta, ClipRecord, EmbeddedStore, MemoryStore, RedisStore, TokenFormat, clip_vector

WALL0 = 1_700_000_000.0  # wall time of clip 0
FRAME_DT = 1.0  # seconds between sampled frames: a clip covers 4 s on both clocks


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A redis-server subprocess that a test may stop and start again on the same port and directory."""

    def __init__(self, directory: Path, appendonly: bool = False) -> None:
        self.port = free_port()
        self.directory = directory
        self.appendonly = appendonly
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        log = self.directory / "redis.log"
        args = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--dir", str(self.directory)]
        args += ["--appendonly", "yes" if self.appendonly else "no", "--logfile", str(log)]
        self.proc = subprocess.Popen(["redis-server", *args])
        client = redis.Redis(port=self.port, socket_connect_timeout=0.1, socket_timeout=0.1)
        deadline = time.monotonic() + 10
        try:
            while not self._ping(client):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    tail = log.read_text()[-2000:] if log.exists() else "(no log)"
                    raise RuntimeError(f"redis-server on port {self.port} did not start:\n{tail}")
                time.sleep(0.02)
        finally:
            client.close()

    @staticmethod
    def _ping(client: redis.Redis) -> bool:
        try:
            return bool(client.ping())
        except redis.ConnectionError:
            return False

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None


def _server(directory: Path, appendonly: bool = False) -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not on PATH: the Redis backend needs a real server to test against")
    server = RedisServer(directory, appendonly)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One server for the session; tests keep apart by key prefix."""
    yield from _server(tmp_path_factory.mktemp("redis"))


@pytest.fixture
def own_redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A server of this test alone, with an append-only file, for tests that stop and restart it."""
    yield from _server(tmp_path, appendonly=True)


StoreFactory = Callable[..., MemoryStore]


@pytest.fixture(params=["embedded", "redis"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreFactory]:
    """Opens a new store object on this test's data each call: `make_store(token_format="fp16")`."""
    opened: list[MemoryStore] = []
    if request.param == "embedded":
        path = tmp_path / "memory.sqlite3"

        def open_(token_format: TokenFormat = "fp16") -> MemoryStore:
            opened.append(EmbeddedStore(path, token_format=token_format))
            return opened[-1]
    else:
        url, prefix = request.getfixturevalue("redis_server").url, f"test-{uuid.uuid4().hex}"

        def open_(token_format: TokenFormat = "fp16") -> MemoryStore:
            opened.append(RedisStore(url, prefix=prefix, token_format=token_format))
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
