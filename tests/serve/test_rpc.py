"""The gRPC plumbing: one error mapping (neutral errors by kind, anything else INTERNAL with nothing for the
client), and health that says SERVING only once a server is ready."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from memory import EmbeddedStore
from memory.server import SERVICE_NAME, MemoryServicer, delete_unless_active
from memory.store import MemoryUnavailable, UnknownStream
from protos.vcflash.v1 import vcflash_pb2_grpc as pb_grpc
from tests.conftest import free_port
from vcflash.serve.errors import AlreadyExists, Exhausted, Invalid, NotFound, Unavailable
from vcflash.serve.lifecycle import Service, ServiceEntry
from vcflash.serve.rpc import status_for
from vcflash.serve.settings import MemorySettings, Settings


@pytest.mark.parametrize(
    ("error", "code", "message"),
    [
        (NotFound("no stream named 'x'"), grpc.StatusCode.NOT_FOUND, "no stream named 'x'"),
        (UnknownStream("cam"), grpc.StatusCode.NOT_FOUND, "unknown stream 'cam'"),
        (Invalid("bad fps"), grpc.StatusCode.INVALID_ARGUMENT, "bad fps"),
        (AlreadyExists("taken"), grpc.StatusCode.ALREADY_EXISTS, "taken"),
        (Exhausted("full"), grpc.StatusCode.RESOURCE_EXHAUSTED, "full"),
        (Unavailable("down"), grpc.StatusCode.UNAVAILABLE, "down"),
        (MemoryUnavailable("redis at x unreachable"), grpc.StatusCode.UNAVAILABLE, "memory unavailable: redis"),
    ],
)
def test_neutral_errors_map_by_kind(error: Exception, code: grpc.StatusCode, message: str) -> None:
    got_code, got_message = status_for(error)
    assert got_code == code and got_message.startswith(message)


@pytest.mark.parametrize("error", [ValueError("/etc/secret"), KeyError("k"), TypeError("t"), RuntimeError("boom")])
def test_anything_else_is_internal_and_says_nothing(error: Exception) -> None:
    assert status_for(error) == (grpc.StatusCode.INTERNAL, "internal error")


def test_neutral_errors_are_still_the_builtins_callers_catch() -> None:
    assert isinstance(Invalid("x"), ValueError) and isinstance(NotFound("x"), KeyError)
    assert str(NotFound("no stream named 'x'")) == "no stream named 'x'"  # not KeyError's repr


@pytest.mark.asyncio
async def test_a_server_is_not_serving_until_ready_has_finished(tmp_path: Path) -> None:
    """The whole server ("") and each service say NOT_SERVING while `ready` runs (an ingest resuming its
    streams): the stock health servicer says SERVING for "" from the start, so a server that then failed to
    resume had passed `vcflash health` and compose's healthcheck before it exited."""
    store = EmbeddedStore(tmp_path / "memory.sqlite3")
    resuming, resumed = asyncio.Event(), asyncio.Event()

    class Resuming(Service):
        async def setup(self) -> tuple[list[ServiceEntry], list[Coroutine[Any, Any, None]]]:
            servicer = MemoryServicer(store, MemorySettings(), functools.partial(delete_unless_active, store, None))
            return [(pb_grpc.add_MemoryServicer_to_server, servicer, SERVICE_NAME)], []

        async def ready(self) -> None:  # after the server is listening
            resuming.set()
            await resumed.wait()

    port = free_port()
    service = Resuming(Settings.from_env({}, address=f"127.0.0.1:{port}", api_token="t" * 32, data_dir=tmp_path))

    async def statuses() -> list[int]:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            return [
                (await stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)).status
                for name in ("", SERVICE_NAME)
            ]

    starting = asyncio.create_task(service.start())
    try:
        await asyncio.wait_for(resuming.wait(), 10)
        assert await statuses() == [health_pb2.HealthCheckResponse.NOT_SERVING] * 2
        resumed.set()
        assert await starting == port
        assert await statuses() == [health_pb2.HealthCheckResponse.SERVING] * 2
    finally:
        resumed.set()
        await starting
        await service.stop(0)
        store.close()
