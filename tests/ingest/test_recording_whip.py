"""A WHIP stream published with ``?record=1``: its sampled frames are encoded (H.264) into the stream's recording,
and a cut of it plays the frames the clips were made of (an aiortc sender whose frames carry a counter)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import av
import pytest
import pytest_asyncio
from aiohttp import ClientSession
from prometheus_client import CollectorRegistry

from ingest.http import create_whip_app, start_http
from ingest.pipeline import IngestManager
from ingest.recording import Recordings
from ingest.streams import Streams
from ingest.webrtc import WebRTCSettings
from memory.embedded import EmbeddedStore
from memory.records import Retention
from tests.ingest.test_webrtc import (
    HEIGHT,
    ROOT,
    TOKEN,
    WIDTH,
    Whip,
    next_clip,
    read_pattern,
    sender,
)
from tests.ingest.test_webrtc import loopback_only as loopback_only  # the fixture
from vcflash.serve.settings import IngestSettings


@pytest_asyncio.fixture
async def whip(loopback_only: None, tmp_path: Path) -> AsyncIterator[tuple[Whip, Recordings]]:
    manager = IngestManager(IngestSettings(media_root=ROOT, stop_timeout_s=2.0), registry=CollectorRegistry())
    store = EmbeddedStore(tmp_path / "memory.sqlite3")
    recordings = Recordings(tmp_path / "recordings", segment_s=60.0)
    streams = Streams(manager, store, Retention(), recordings=recordings)
    app = create_whip_app(streams, token=TOKEN, webrtc=WebRTCSettings.loopback(connect_timeout_s=10.0))
    runner, port = await start_http(app, "127.0.0.1", 0)
    async with ClientSession() as http:
        try:
            yield Whip(manager, app, f"http://127.0.0.1:{port}", http), recordings
        finally:
            await runner.cleanup()
            await manager.close()
            store.close()


@pytest.mark.asyncio
async def test_a_whip_stream_records_its_sampled_frames(whip: tuple[Whip, Recordings], tmp_path: Path) -> None:
    w, recordings = whip
    async with sender() as peer:
        status, _, answer = await peer.publish(w, "pc", query="?fps=2&record=1")
        assert status == 201, answer
        assert w.manager.worker("pc").spec.record
        clips = [await next_clip(w.manager, 10.0), await next_clip(w.manager, 6.0)]
        assert (await w.delete("pc"))[0] == 200  # the stream stops: its segment is finished
    (segment,) = recordings.stream("pc").segments()
    start, end = clips[0].wall_times[0], clips[1].wall_times[-1] + 1e-3
    assert segment.start <= start + 1e-3 and segment.end >= end  # its name keeps milliseconds

    first, _ = recordings.cut("pc", start, end, tmp_path / "cut.mp4")
    with av.open(str(tmp_path / "cut.mp4")) as container:
        frames = list(container.decode(video=0))
    assert (frames[0].width, frames[0].height) == (WIDTH, HEIGHT)
    # the clips' frames, at the sampled 2 fps, each the picture its clip holds
    walls = [first + f.time for f in frames]
    sampled = [t for clip in clips for t in clip.wall_times]
    assert all(any(abs(w - t) < 2e-3 for w in walls) for t in sampled), (walls, sampled)
    counters = {round(first + f.time, 3): read_pattern(f.to_ndarray(format="rgb24")) for f in frames}
    for clip in clips:
        for t, image in zip(clip.wall_times, clip.frames, strict=True):
            got = next(c for w, c in counters.items() if abs(w - t) < 2e-3)
            assert got == read_pattern(image), (t, got)
    assert len(set(counters.values())) == len(frames)  # every frame a different picture
    assert abs(time.time() - first) < 30
