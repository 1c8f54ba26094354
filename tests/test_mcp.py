"""`vcflash mcp` (issue 15) as a real process, driven by the `mcp` SDK's own client over stdio and over streamable
HTTP: the tools and their schemas, list_cameras, camera_status, ask (equal to `ask-live` on the same request, with
its moments), get_thumbnails (JPEG images), a tool error, and the HTTP endpoint's bearer token."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx2
import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

from hico import VideoChatFlash
from tests.test_app import TOKEN, LoopThread, Served, free_port, start_app, wait_done, wait_for
from tests.test_openai_api import tiny_model
from vcflash.media import write_test_video

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "What moves across the screen?"
TOOLS = {"list_cameras", "camera_status", "ask", "search", "get_thumbnails"}


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> VideoChatFlash:
    return tiny_model(tmp_path_factory)


@pytest.fixture(scope="module")
def served(model: VideoChatFlash, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """An App holding stream `lobby` (3 clips)."""
    video = write_test_video(tmp_path_factory.mktemp("videos") / "12s.mp4", seconds=12, fps=25, size=(64, 48))
    runner = LoopThread()
    s = start_app(runner, model, data_dir=tmp_path_factory.mktemp("data"))
    try:
        s.client.add_stream("lobby", str(video), fps=1, realtime=False)
        wait_done(s.client, "lobby")
        yield s
    finally:
        s.stop()
        runner.close()


def command(served: Served, *extra: str) -> list[str]:
    return [sys.executable, "-m", "vcflash.cli", "mcp", "--address", served.address, "--token", TOKEN, *extra]


def environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VCFLASH_")}
    return env | {"PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def http_url(served: Served) -> Iterator[str]:
    port = free_port()
    process = subprocess.Popen(
        command(served, "--http-port", str(port)), cwd=ROOT, env=environment(), stderr=subprocess.PIPE, text=True
    )
    try:

        def up() -> bool:
            try:
                httpx2.get(f"http://127.0.0.1:{port}/mcp", timeout=1)
                return True
            except httpx2.TransportError:
                assert process.poll() is None, process.stderr.read() if process.stderr else ""
                return False

        wait_for(up, "vcflash mcp to listen", timeout_s=30, every_s=0.2)
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        process.terminate()
        process.wait(10)


def structured(result: Any) -> dict[str, Any]:
    assert not result.is_error, result.content
    return result.structured_content or json.loads(result.content[0].text)


async def exercise(client: Client, served: Served) -> None:
    tools = {t.name: t for t in (await client.list_tools()).tools}
    assert set(tools) == TOOLS  # alerts: not until they exist
    ask = tools["ask"]
    assert set(ask.input_schema["required"]) == {"question", "cameras"}
    assert ask.input_schema["properties"]["cameras"]["type"] == "array"
    assert "ISO 8601" in json.dumps(ask.input_schema["properties"]["start"])
    assert all(t.description and len(t.description) > 80 for t in tools.values())

    cameras = structured(await client.call_tool("list_cameras", {}))["cameras"]
    assert [(c["name"], c["clips"], c["running"]) for c in cameras] == [("lobby", 3, True)]
    assert cameras[0]["first"].endswith("Z")
    status = structured(await client.call_tool("camera_status", {"camera": "lobby"}))
    assert status["clips_stored"] == 3 and status["state"] == "finished"

    events = list(served.client.ask(["lobby"], QUESTION, max_new_tokens=24))  # `vcflash ask-live`
    live = events[-1]
    got = structured(await client.call_tool("ask", {"question": QUESTION, "cameras": ["lobby"], "max_new_tokens": 24}))
    assert got["answer"] == live.answer
    assert [m["seq"] for m in got["moments"]] == [e.clip.seq for e in live.evidence] == [0, 1, 2]

    clip = live.evidence[1].clip  # a range inside the second clip, as ISO date-times, asked both ways
    start, end = (
        datetime.fromtimestamp(t, UTC).replace(tzinfo=None) for t in (clip.wall_start + 0.1, clip.wall_end - 0.1)
    )
    ranged = list(served.client.ask(["lobby"], QUESTION, start=start, end=end, max_new_tokens=24))[-1]
    arguments = {"question": QUESTION, "cameras": ["lobby"], "max_new_tokens": 24}
    got = structured(await client.call_tool("ask", arguments | {"start": start.isoformat(), "end": end.isoformat()}))
    assert got["answer"] == ranged.answer and [m["seq"] for m in got["moments"]] == [1]

    found = served.client.search(["lobby"], QUESTION, limit=2)  # `vcflash search`
    got = structured(await client.call_tool("search", {"question": QUESTION, "cameras": ["lobby"], "limit": 2}))
    assert [(m["first_seq"], m["last_seq"], m["score"]) for m in got["moments"]] == [
        (m.first_seq, m.last_seq, m.score) for m in found.moments
    ]
    assert got["moments"] and len(got["moments"]) <= 2 and got["clips_scored"] == found.clips_scored == 3
    assert all(m["start"].endswith("Z") and m["wall_start"] < m["wall_end"] for m in got["moments"])

    shots = await client.call_tool("get_thumbnails", {"camera": "lobby", "limit": 2})
    assert not shots.is_error
    index, *images = shots.content
    assert [t["seq"] for t in json.loads(index.text)["thumbnails"]] == [0, 1]
    assert [i.mime_type for i in images] == ["image/jpeg"] * 2
    assert base64.b64decode(images[0].data)[:2] == b"\xff\xd8"

    missing = await client.call_tool("ask", {"question": QUESTION, "cameras": ["nobody"]})
    assert missing.is_error and "NOT_FOUND" in missing.content[0].text


def test_stdio(served: Served) -> None:
    async def run() -> None:
        params = StdioServerParameters(
            command=command(served)[0], args=command(served)[1:], env=environment(), cwd=ROOT
        )
        async with Client(params) as client:
            await exercise(client, served)

    asyncio.run(run())


def test_streamable_http(served: Served, http_url: str) -> None:
    async def run() -> None:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with create_mcp_http_client(headers=headers) as http:
            async with Client(streamable_http_client(http_url, http_client=http)) as client:
                await exercise(client, served)

    asyncio.run(run())


def test_streamable_http_needs_the_token(http_url: str) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789"}):
        answer = httpx2.post(
            http_url,
            json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
            headers=headers | {"Accept": "application/json, text/event-stream"},
        )
        assert answer.status_code == 401
