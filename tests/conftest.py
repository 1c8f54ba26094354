"""Fixtures shared by every test directory: a real redis-server of the tests' own on a free loopback port.

Nothing here touches a Redis the tests did not start.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis


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
        self._next_db = 0  # 0 is `url`'s

    @property
    def url(self) -> str:
        return self.url_for(0)

    def url_for(self, db: int) -> str:
        """A URL for one of the server's numbered databases (0..255)."""
        return f"redis://127.0.0.1:{self.port}/{db}"

    def fresh_url(self) -> str:
        """A URL for a database no other caller got: tests sharing the session's server stay apart."""
        self._next_db += 1
        return self.url_for(self._next_db)

    def start(self) -> None:
        log = self.directory / "redis.log"
        args = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--dir", str(self.directory)]
        args += ["--databases", "256"]
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


@pytest.fixture
def memory_settings(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    """Settings for a fresh memory of the backend in request.param ("embedded" or "redis"): a data dir, and for
    Redis a database of its own on the session's server."""
    if request.param == "redis":
        return {"data_dir": tmp_path, "redis_url": request.getfixturevalue("redis_server").fresh_url()}
    return {"data_dir": tmp_path, "redis_url": None}
