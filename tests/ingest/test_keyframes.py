"""Keyframes-only decoding never samples below the requested rate: the keyframe interval is measured and every
frame is decoded while keyframes come further apart than the sampling period (ingest/keyframes.py)."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import av
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from ingest.clips import Clip
from ingest.keyframes import KEYFRAMES, MEASURING, RETURN_AFTER, SLACK, KeyframeGate, KeyframeState
from ingest.pipeline import IngestManager, StreamStatus
from ingest.sampler import FrameSampler, Verdict
from ingest.server import SERVICE_NAME, IngestServicer
from ingest.spec import StreamSpec
from ingest.streams import Streams
from memory.embedded import EmbeddedStore
from memory.records import Retention
from memory.server import SERVICE_NAME as MEMORY
from memory.server import MemoryServicer
from protos.vcflash.v1 import vcflash_pb2_grpc as pb_grpc
from vcflash.cli import main
from vcflash.serve.rpc import create_server
from vcflash.serve.settings import IngestSettings, MemorySettings

FILES = IngestSettings(media_root=Path("/"))
TOKEN = "keyframes-tests-token-0123456789"


def write_h264(path: Path, seconds: int, keyframes_at: set[int], fps: int = 25) -> Path:
    """A 64x48 H.264 MP4 whose keyframes (IDR) are exactly the frames numbered in ``keyframes_at``."""
    with av.open(str(path), mode="w") as container:
        options = {"preset": "ultrafast", "g": "100000", "sc_threshold": "0", "forced-idr": "1"}
        stream = container.add_stream("libx264", rate=fps, options=options)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(seconds * fps):
            image = np.full((48, 64, 3), (i * 7) % 256, np.uint8)
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pict_type = av.video.frame.PictureType.I if i in keyframes_at else av.video.frame.PictureType.NONE
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    with av.open(str(path)) as container:  # the file has the keyframes asked for, and only those
        video = container.streams.video[0]
        keys = [round(float(p.pts * video.time_base) * fps) for p in container.demux(video) if p.is_keyframe]
    assert keys == sorted(keyframes_at), keys
    return path


def metric(registry: CollectorRegistry, name: str, stream: str) -> float | None:
    return registry.get_sample_value(name, {"stream": stream})


def drain(queue: asyncio.Queue[Clip]) -> list[Clip]:
    clips = []
    while not queue.empty():
        clips.append(queue.get_nowait())
    return clips


def sample_times(clips: list[Clip]) -> list[float]:
    return [t for clip in clips for t in clip.media_times]


def assert_accounted(status: StreamStatus) -> None:
    dropped = sum(n for reason, n in status.frames_dropped.items() if reason != "decode_error")
    assert status.frames_in == status.frames_not_sampled + status.frames_sampled
    assert status.frames_sampled == 4 * status.clips_emitted + status.frames_pending + dropped


# ---------------------------------------------------------------- the gate alone


def test_gate_measures_then_decodes_keyframes_only_when_they_come_often_enough() -> None:
    changes: list[tuple[KeyframeState, KeyframeState]] = []
    gate = KeyframeGate(1.0, on_change=lambda before, after: changes.append((before, after)))
    assert gate.decode_all and gate.state.describe(1.0) == MEASURING  # nothing measured yet: decode everything
    gate.keyframe(10.0)
    assert gate.decode_all and gate.state.interval_s is None
    gate.keyframe(11.0)
    assert not gate.decode_all and gate.state == KeyframeState(False, False, 1.0)
    assert gate.state.describe(1.0) == KEYFRAMES and len(changes) == 1
    gate.keyframe(11.5)  # shorter is fine too
    assert not gate.decode_all and gate.state.interval_s == 0.5


def test_gate_falls_back_on_a_long_interval_and_returns_after_several_short_ones() -> None:
    changes: list[KeyframeState] = []
    gate = KeyframeGate(1.0, on_change=lambda before, after: changes.append(after))
    for t in (0.0, 1.0, 2.0, 6.0):  # 4 s GOP: keyframes only would sample 0.25 fps
        gate.keyframe(t)
    assert gate.state == KeyframeState(True, True, 4.0)
    assert gate.state.describe(1.0) == "all frames (keyframes 4 s apart, longer than the 1 s sampling period)"
    for i in range(1, RETURN_AFTER):  # short again: one or two short intervals are not enough
        gate.keyframe(6.0 + i)
        assert gate.state == KeyframeState(True, True, 4.0)
    gate.keyframe(6.0 + RETURN_AFTER)
    assert gate.state == KeyframeState(False, False, 1.0)
    assert [(s.decode_all, s.fallback) for s in changes] == [(False, False), (True, True), (False, False)]


def test_gate_tolerates_a_hair_over_the_period_and_pts_going_back() -> None:
    gate = KeyframeGate(1.0)
    for i in range(5):  # 29.97 fps, 30-frame GOP: 1.001 s apart, within the slack
        gate.keyframe(i * 1.001)
    assert not gate.decode_all and gate.state.interval_s == pytest.approx(1.001)
    gate.keyframe(0.0)  # a replay or a restarted camera clock: nothing to measure
    assert not gate.decode_all and gate.state.interval_s == pytest.approx(1.001)
    gate.keyframe(1.0 + 1.5 * SLACK)  # beyond the slack
    assert gate.state.fallback


def test_gate_measures_each_connection_again() -> None:
    gate = KeyframeGate(2.0)
    for t in (0.0, 0.5):
        gate.keyframe(t)
    assert not gate.decode_all
    gate.connect()
    assert gate.decode_all and not gate.state.fallback  # measuring, the last interval still shown
    gate.keyframe(100.0)  # not measured against the previous connection's keyframe
    assert gate.decode_all
    gate.keyframe(100.5)
    assert not gate.decode_all


def test_sampler_slack_keeps_every_jittered_keyframe() -> None:
    keyframes = [0.0, 0.999, 2.001, 2.999, 4.0, 4.998]  # 1 s apart, a millisecond or two either way
    strict, slack = FrameSampler(1.0), FrameSampler(1.0, slack=SLACK)
    assert [strict.offer(t) for t in keyframes].count(Verdict.KEEP) == 3  # without slack: every other one, 0.5 fps
    assert all(slack.offer(t) is Verdict.KEEP for t in keyframes)


# ---------------------------------------------------------------- real H.264 files through the pipeline


@pytest.mark.asyncio
async def test_long_gop_falls_back_to_every_frame_and_keeps_the_rate(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_h264(tmp_path / "gop100.mp4", seconds=12, keyframes_at={0, 100, 200})  # a keyframe every 4 s
    registry = CollectorRegistry()
    manager = IngestManager(FILES, registry=registry)
    manager.add("cam", StreamSpec(str(path), fps=1.0, realtime=False, keyframes_only=True))
    status = await manager.wait("cam")
    clips = drain(manager.clips)

    times = sample_times(clips)
    assert times == pytest.approx([float(i) for i in range(12)], abs=1e-6)  # 1 fps, not 0.25
    assert status.frames_in == 300 and status.frames_sampled == 12 and status.clips_emitted == 3
    assert status.decode == "all frames (keyframes 4 s apart, longer than the 1 s sampling period)"
    assert metric(registry, "vcflash_ingest_keyframes_fallback", "cam") == 1
    assert metric(registry, "vcflash_ingest_keyframe_interval_seconds", "cam") == 4.0
    warnings = [r.getMessage() for r in caplog.records if "keyframes too far apart" in r.getMessage()]
    assert len(warnings) == 1 and "keyframe_interval_s=4.000" in warnings[0] and "0.25 fps instead of 1" in warnings[0]
    assert_accounted(status)
    await manager.remove("cam")
    assert metric(registry, "vcflash_ingest_keyframes_fallback", "cam") is None


@pytest.mark.asyncio
async def test_short_gop_stays_on_keyframes_and_a_gop_that_shortens_returns_to_them(tmp_path: Path) -> None:
    short = write_h264(tmp_path / "gop12.mp4", seconds=12, keyframes_at=set(range(0, 300, 12)))  # 0.48 s GOP
    # 4 s GOPs, then 1 s GOPs from 8 s on: falls back, then keyframes only once three 1 s GOPs came
    shortens = write_h264(tmp_path / "shortens.mp4", seconds=16, keyframes_at={0, 100, *range(200, 400, 25)})
    registry = CollectorRegistry()
    manager = IngestManager(FILES, registry=registry)
    manager.add("short", StreamSpec(str(short), fps=1.0, realtime=False, keyframes_only=True))
    manager.add("shortens", StreamSpec(str(shortens), fps=1.0, realtime=False, keyframes_only=True))
    statuses = {name: await manager.wait(name) for name in ("short", "shortens")}
    clips: dict[str, list[Clip]] = {"short": [], "shortens": []}
    for clip in drain(manager.clips):
        clips[clip.stream_id].append(clip)

    short_status = statuses["short"]
    assert short_status.decode == KEYFRAMES
    assert short_status.frames_in == 12 + 24  # the first GOP in full (12 frames), then the other 24 keyframes
    assert metric(registry, "vcflash_ingest_keyframes_fallback", "short") == 0
    assert metric(registry, "vcflash_ingest_keyframe_interval_seconds", "short") == pytest.approx(0.48)
    steps = np.diff(sample_times(clips["short"]))
    assert len(steps) == 11 and np.all(steps <= 1.0 + 0.48 + 1e-6)  # every sampling instant served by a keyframe
    assert_accounted(short_status)

    status = statuses["shortens"]
    assert status.decode == KEYFRAMES and metric(registry, "vcflash_ingest_keyframes_fallback", "shortens") == 0
    # every frame before the keyframe at 11 s (which ends the third 1 s GOP in a row), then keyframes 11..15
    assert status.frames_in == 11 * 25 + 5
    assert sample_times(clips["shortens"]) == pytest.approx([float(i) for i in range(16)], abs=1e-6)
    assert_accounted(status)
    await manager.close()


@pytest.mark.asyncio
async def test_a_replayed_file_keeps_its_decision(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    path = write_h264(tmp_path / "gop100.mp4", seconds=8, keyframes_at={0, 100})
    registry = CollectorRegistry()
    manager = IngestManager(FILES, registry=registry)
    manager.add("cam", StreamSpec(str(path), fps=1.0, realtime=False, loop=True, keyframes_only=True))
    clips = [await asyncio.wait_for(manager.clips.get(), 20) for _ in range(5)]  # 20 s: into the third pass
    status = await manager.remove("cam")

    times = sample_times(clips)
    assert np.diff(times) == pytest.approx([1.0] * (len(times) - 1), abs=1e-6)
    assert status.decode.startswith("all frames (keyframes 4 s apart")
    assert sum("keyframes too far apart" in r.getMessage() for r in caplog.records) == 1  # said once, not per pass


@pytest.mark.asyncio
async def test_streams_ls_says_a_keyframes_only_stream_decodes_every_frame(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`vcflash streams ls` (StreamStatus.decode, through gRPC) says why a keyframes-only stream decodes all frames."""
    path = write_h264(tmp_path / "gop100.mp4", seconds=8, keyframes_at={0, 100})
    store = EmbeddedStore(tmp_path / "memory.sqlite3")
    streams = Streams(IngestManager(FILES, registry=CollectorRegistry()), store, Retention())
    entries = [
        (pb_grpc.add_IngestServicer_to_server, IngestServicer(streams), SERVICE_NAME),
        (pb_grpc.add_MemoryServicer_to_server, MemoryServicer(store, MemorySettings(), streams.delete_memory), MEMORY),
    ]
    grpc_server, port, _ = create_server("127.0.0.1:0", entries, TOKEN, 1 << 20)
    await grpc_server.start()
    cli = ["--address", f"127.0.0.1:{port}", "--token", TOKEN]
    try:
        add = ["streams", "add", "cam", str(path), "--fast", "--keyframes-only", *cli]
        assert await asyncio.to_thread(main, add) == 0
        await asyncio.wait_for(streams.manager.wait("cam"), 20)
        capsys.readouterr()
        assert await asyncio.to_thread(main, ["streams", "ls", *cli]) == 0
        out = capsys.readouterr().out
        assert "\tdecode: all frames (keyframes 4 s apart, longer than the 1 s sampling period)" in out
        assert await asyncio.to_thread(main, ["streams", "ls", "--json", *cli]) == 0
        assert json.loads(capsys.readouterr().out)[0]["decode"].startswith("all frames (keyframes 4 s apart")
    finally:
        await grpc_server.stop(None)
        await streams.manager.close()
        store.close()
