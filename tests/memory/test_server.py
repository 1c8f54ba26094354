"""Memory.ListClips over a real gRPC server on both backends, through the Python client: time ranges select the
clips that overlap them, on either clock, given as seconds or as date-times."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone

import pytest
import pytest_asyncio

from memory import MemoryStore
from memory.server import SERVICE_NAME, MemoryServicer
from protos.vcflash.v1 import vcflash_pb2_grpc as pb_grpc
from tests.memory.conftest import WALL0
from vcflash.client import Client
from vcflash.serve.rpc import create_server, set_serving
from vcflash.serve.settings import MemorySettings

TOKEN = "memory-tests-token-0123456789"


@pytest_asyncio.fixture
async def client(store: MemoryStore, clip, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Client]:
    """A plaintext client of a Memory service over `store`, which holds clips 0-9 of "cam" (clip s covers 4s to
    4s + 4 on both clocks, from WALL0 on the wall clock)."""
    monkeypatch.delenv("VCFLASH_TLS_CA", raising=False)
    for seq in range(10):
        store.put(clip(seq))

    async def delete(stream_id: str) -> None:
        await asyncio.to_thread(store.delete_stream, stream_id)

    entry = (pb_grpc.add_MemoryServicer_to_server, MemoryServicer(store, MemorySettings(), delete), SERVICE_NAME)
    server, port, health = create_server("127.0.0.1:0", [entry], TOKEN, 1 << 20)
    await server.start()
    await set_serving(health, [SERVICE_NAME], True)
    with Client(f"127.0.0.1:{port}", TOKEN, timeout_s=5) as c:
        yield c
    await server.stop(0)


def seqs(c: Client, *args: object, **kwargs: object) -> list[int]:
    return [m.seq for m in c.clips("cam", *args, **kwargs)]


@pytest.mark.asyncio
async def test_list_clips_finds_the_clip_a_short_range_falls_in(client: Client) -> None:
    def check() -> None:
        assert seqs(client, 9.0, 12.0) == [2]  # 3 s inside clip 2, media clock
        assert seqs(client, WALL0 + 9, WALL0 + 12, wall_clock=True) == [2]
        wall = datetime.fromtimestamp(WALL0 + 9, UTC)
        assert seqs(client, wall, wall + timedelta(seconds=3)) == [2]  # date-times: the wall clock
        assert seqs(client, wall.replace(tzinfo=None), None) == list(range(2, 10))  # naive is UTC
        paris = wall.astimezone(timezone(timedelta(hours=1)))
        assert seqs(client, None, paris) == [0, 1, 2]
        assert seqs(client, 8.0, 12.0) == [2]  # clip 1 ends at 8, clip 3 starts at 12: both out
        assert seqs(client, 39.0, None) == [9]
        assert seqs(client, 40.0, None) == []

    await asyncio.to_thread(check)


@pytest.mark.asyncio
async def test_a_range_mixing_clocks_is_refused_before_asking(client: Client) -> None:
    wall = datetime.fromtimestamp(WALL0 + 9, UTC)
    with pytest.raises(ValueError, match="mixes clocks"):
        await asyncio.to_thread(seqs, client, wall, 12.0)
    with pytest.raises(ValueError, match="mixes clocks"):
        await asyncio.to_thread(seqs, client, 9.0, wall)
    # wall_clock reads the number as Unix seconds: one clock, so allowed
    assert await asyncio.to_thread(seqs, client, wall, WALL0 + 12, wall_clock=True) == [2]
