"""The WHIP port's limits, with real sockets on 127.0.0.1: idle and slow connections are closed after the timeout, a
slow offer body gets 408, connections over the cap are closed at once, and normal requests keep working."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import pytest_asyncio
from prometheus_client import CollectorRegistry

from ingest.http import create_whip_app, start_http
from ingest.pipeline import IngestManager
from ingest.streams import Streams
from memory.embedded import EmbeddedStore
from memory.records import Retention
from vcflash.serve.settings import IngestSettings, Settings

pytestmark = pytest.mark.asyncio
TOKEN = "http-limits-token"
Connect = Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


@pytest_asyncio.fixture
async def serve(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Connect]]]:
    manager = IngestManager(IngestSettings(), registry=CollectorRegistry())
    store = EmbeddedStore(tmp_path / "memory.sqlite3")
    runners = []

    async def start(**limits: float) -> Connect:
        app = create_whip_app(Streams(manager, store, Retention()), token=TOKEN)
        runner, port = await start_http(app, "127.0.0.1", 0, **limits)  # type: ignore[arg-type]
        runners.append(runner)
        return lambda: asyncio.open_connection("127.0.0.1", port)

    yield start
    for runner in runners:
        await runner.cleanup()
    await manager.close()
    store.close()


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> bool:
    """Whether the server closes the connection (EOF or reset) within `seconds`, reading whatever it sends."""
    try:
        async with asyncio.timeout(seconds):
            while await reader.read(4096):
                pass
    except TimeoutError:
        return False
    except ConnectionError:
        pass
    return True


async def get_healthz(connect: Connect) -> bytes:
    reader, writer = await connect()
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    response = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return response


async def test_idle_and_slow_header_connections_are_closed_after_the_timeout(serve) -> None:  # type: ignore[no-untyped-def]
    connect = await serve(timeout_s=0.5, max_connections=8)
    idle, slow = await connect(), await connect()
    slow[1].write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # a request head that never ends
    t0 = time.monotonic()
    assert await closed_within(idle[0], 5) and await closed_within(slow[0], 5)
    assert 0.3 < time.monotonic() - t0 < 4
    assert (await get_healthz(connect)).startswith(b"HTTP/1.1 200")  # a normal request is quick enough


async def test_a_slow_offer_body_gets_408(serve) -> None:  # type: ignore[no-untyped-def]
    connect = await serve(timeout_s=0.5, max_connections=8)
    reader, writer = await connect()
    writer.write(
        b"POST /whip/cam HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode() + b"\r\n"
        b"Content-Type: application/sdp\r\nContent-Length: 100\r\n\r\nv=0\r\n"
    )
    response = await asyncio.wait_for(reader.read(4096), 5)
    assert response.startswith(b"HTTP/1.1 408"), response
    writer.close()


async def test_connections_over_the_cap_are_closed_and_a_freed_slot_serves_again(serve) -> None:  # type: ignore[no-untyped-def]
    connect = await serve(timeout_s=30.0, max_connections=3)
    held = [await connect() for _ in range(3)]
    await asyncio.sleep(0.1)
    extra_reader, _ = await connect()
    assert await closed_within(extra_reader, 2), "a connection over the cap stayed open"
    for reader, _ in held:
        assert not await closed_within(reader, 0.05)  # the ones under the cap are untouched
    held.pop()[1].close()
    await asyncio.sleep(0.2)
    assert (await get_healthz(connect)).startswith(b"HTTP/1.1 200")
    for _, writer in held:
        writer.close()


async def test_limits_are_settings() -> None:
    s = Settings.from_env({"VCFLASH_HTTP_TIMEOUT_S": "2.5", "VCFLASH_HTTP_MAX_CONNECTIONS": "7"}).server
    assert (s.http_timeout_s, s.http_max_connections) == (2.5, 7)
    with pytest.raises(ValueError, match="VCFLASH_HTTP_MAX_CONNECTIONS"):
        Settings.from_env({"VCFLASH_HTTP_MAX_CONNECTIONS": "0"})
