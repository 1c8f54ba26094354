"""StreamWorker and IngestManager on real files: clips, accounting, failures, stopping, metrics."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

import ingest.pipeline
from ingest.clips import Clip
from ingest.pipeline import IngestManager, StreamState, StreamStatus
from ingest.source import Frame
from ingest.spec import StreamSpec
from vcflash.serve.settings import IngestSettings

# Ingest mechanics read local test videos: any file is allowed (the file policy has its own tests).
ROOT = Path("/")
FILES = IngestSettings(media_root=ROOT)


def drain(queue: asyncio.Queue[Clip]) -> list[Clip]:
    clips = []
    while not queue.empty():
        clips.append(queue.get_nowait())
    return clips


def assert_accounted(status: StreamStatus) -> None:
    """Every decoded frame is skipped, in an emitted clip, pending, or dropped with a reason."""
    dropped = sum(n for reason, n in status.frames_dropped.items() if reason != "decode_error")
    assert status.frames_in == status.frames_not_sampled + status.frames_sampled
    assert status.frames_sampled == 4 * status.clips_emitted + status.frames_pending + dropped


def metric(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    assert value is not None, f"{name}{labels} not exported"
    return value


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def wait_until(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


@pytest.mark.asyncio
async def test_file_at_1_fps_becomes_five_clips(videos: dict[str, Path]) -> None:
    registry = CollectorRegistry()
    manager = IngestManager(FILES, registry=registry)
    manager.add("cam-1", StreamSpec(str(videos["20s"]), realtime=False))
    status = await manager.wait("cam-1")

    clips = drain(manager.clips)
    assert [c.seq for c in clips] == [0, 1, 2, 3, 4]
    assert [c.media_times for c in clips] == [tuple(float(t) for t in range(s, s + 4)) for s in range(0, 20, 4)]
    assert clips[-1].media_end == pytest.approx(20.0)
    offset = clips[0].wall_start - clips[0].media_start
    for clip in clips:
        assert clip.stream_id == "cam-1"
        assert clip.frames.shape == (4, 48, 64, 3)
        assert [w - offset for w in clip.wall_times] == pytest.approx(clip.media_times, abs=1e-6)

    assert status.state is StreamState.FINISHED and status.error is None
    assert (status.frames_in, status.frames_sampled, status.clips_emitted) == (500, 20, 5)
    assert status.frames_not_sampled == 480 and status.frames_pending == 0
    assert sum(status.frames_dropped.values()) == 0
    assert status.next_seq == 5 and status.last_media_time == 19.0
    assert_accounted(status)

    assert metric(registry, "vcflash_ingest_frames_in_total", stream="cam-1") == 500
    assert metric(registry, "vcflash_ingest_frames_sampled_total", stream="cam-1") == 20
    assert metric(registry, "vcflash_ingest_clips_total", stream="cam-1") == 5
    assert metric(registry, "vcflash_ingest_frames_dropped_total", stream="cam-1", reason="queue_full") == 0
    assert metric(registry, "vcflash_ingest_queue_depth") == 0
    await manager.close()


@pytest.mark.asyncio
async def test_full_queue_drops_clips_and_counts_every_frame(videos: dict[str, Path]) -> None:
    registry = CollectorRegistry()
    manager = IngestManager(IngestSettings(media_root=ROOT, queue_clips=1), registry=registry)
    manager.add("cam", StreamSpec(str(videos["20s"]), realtime=False, fps=1.5))  # 30 sampled: 7 clips and 2 left over
    status = await manager.wait("cam")

    assert status.frames_in == 500 and status.frames_sampled == 30
    assert status.clips_emitted == 1 and status.next_seq == 7
    assert status.frames_dropped["queue_full"] == 24
    assert status.frames_dropped["incomplete_clip"] == 2
    assert_accounted(status)
    assert [c.seq for c in drain(manager.clips)] == [0]
    for reason, count in status.frames_dropped.items():
        assert metric(registry, "vcflash_ingest_frames_dropped_total", stream="cam", reason=reason) == count
    assert metric(registry, "vcflash_ingest_clips_total", stream="cam") == 1
    await manager.close()


@pytest.mark.asyncio
async def test_failing_source_leaves_other_streams_alone(videos: dict[str, Path]) -> None:
    manager = IngestManager(FILES, registry=CollectorRegistry())
    bad_url = f"rtsp://admin:hunter2@127.0.0.1:{closed_port()}/live?token=s3cret"
    manager.add("bad", StreamSpec(bad_url, realtime=False, live=False))
    manager.add("good", StreamSpec(str(videos["20s"]), realtime=False))
    bad, good = await manager.wait("bad"), await manager.wait("good")

    assert bad.state is StreamState.FAILED
    assert bad.error is not None and "cannot open" in bad.error
    for text in (bad.error, bad.url, repr(manager.status())):
        assert "hunter2" not in text and "s3cret" not in text
    assert good.state is StreamState.FINISHED and good.clips_emitted == 5
    assert manager.names() == ["bad", "good"]
    assert set(manager.status()) == {"bad", "good"}
    await manager.close()


@pytest.mark.asyncio
async def test_removing_a_running_stream_stops_it_promptly(videos: dict[str, Path]) -> None:
    registry = CollectorRegistry()
    manager = IngestManager(FILES, registry=registry)
    manager.add("live", StreamSpec(str(videos["20s"]), realtime=True))
    await wait_until(lambda: manager.status()["live"].state is StreamState.RUNNING)

    start = time.monotonic()
    status = await manager.remove("live")
    assert time.monotonic() - start < 0.5
    assert status.state is StreamState.STOPPED
    assert 0 < status.frames_in < 500
    assert_accounted(status)
    assert manager.names() == []
    assert registry.get_sample_value("vcflash_ingest_frames_in_total", {"stream": "live"}) is None
    await wait_until(lambda: not any(t.name == "ingest-live" for t in threading.enumerate()), 0.5)


@pytest.mark.asyncio
async def test_looped_file_keeps_media_time_running(videos: dict[str, Path]) -> None:
    manager = IngestManager(FILES, registry=CollectorRegistry())
    manager.add("loop", StreamSpec(str(videos["2s"]), realtime=False, loop=True), first_seq=10)
    clips = [await asyncio.wait_for(manager.clips.get(), 5) for _ in range(3)]
    status = await manager.remove("loop")

    assert [c.seq for c in clips] == [10, 11, 12]
    assert [t for c in clips for t in c.media_times] == pytest.approx([float(t) for t in range(12)])
    assert status.state is StreamState.STOPPED


def fake_source(pts: list[float]) -> Callable[..., Iterator[Frame]]:
    """Replaces open_frames with synthetic frames at the given PTS."""

    def open_frames(url: str, **kwargs: object) -> Iterator[Frame]:
        for t in pts:
            yield Frame(pts=t, wall_time=1000.0 + t, image=np.zeros((8, 8, 3), np.uint8))

    return open_frames


@pytest.mark.asyncio
async def test_restarted_source_drops_the_partial_clip(monkeypatch: pytest.MonkeyPatch) -> None:
    before = [i / 10 for i in range(60)]  # 0.0 .. 5.9 s: 6 sampled, one clip and two left over
    after = [i / 10 for i in range(45)]  # restarted at 0: 0 .. 4.4 s: 5 sampled
    monkeypatch.setattr(ingest.pipeline, "open_frames", fake_source(before + after))
    manager = IngestManager(FILES, registry=CollectorRegistry())
    manager.add("cam", StreamSpec("http://127.0.0.1/fake", realtime=False))  # open_frames is faked
    status = await manager.wait("cam")

    clips = drain(manager.clips)
    assert [c.media_times for c in clips] == [(0.0, 1.0, 2.0, 3.0), (0.0, 1.0, 2.0, 3.0)]
    assert [c.seq for c in clips] == [0, 1]
    assert status.frames_dropped["discontinuity"] == 2
    assert status.frames_dropped["incomplete_clip"] == 1
    assert_accounted(status)


@pytest.mark.asyncio
async def test_stalled_event_loop_drops_instead_of_buffering(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ingest.pipeline, "open_frames", fake_source([float(t) for t in range(48)]))
    manager = IngestManager(FILES, registry=CollectorRegistry())
    manager.add("cam", StreamSpec("http://127.0.0.1/fake", realtime=False))  # open_frames is faked
    deadline = time.monotonic() + 5
    while manager.status()["cam"].state is not StreamState.FINISHED:  # block the loop while 12 clips are made
        assert time.monotonic() < deadline
        time.sleep(0.01)
    status = await manager.wait("cam")

    assert status.clips_emitted == 8 and status.frames_dropped["loop_busy"] == 16
    assert_accounted(status)


@pytest.mark.asyncio
async def test_stream_names_and_settings_are_validated(videos: dict[str, Path]) -> None:
    manager = IngestManager(FILES, registry=CollectorRegistry())
    for name in ("", "a b", "x" * 65, "cam/1", "ünï"):
        with pytest.raises(ValueError, match="stream name"):
            manager.add(name, StreamSpec(str(videos["2s"])))
    manager.add("cam.1_a-B", StreamSpec(str(videos["2s"]), realtime=False))
    with pytest.raises(ValueError, match="'cam.1_a-B' already exists"):
        manager.add("cam.1_a-B", StreamSpec(str(videos["2s"])))
    with pytest.raises(ValueError, match="fps"):
        manager.add("cam2", StreamSpec(str(videos["2s"]), fps=31))
    with pytest.raises(KeyError, match="nope"):
        await manager.remove("nope")
    await manager.close()
    assert manager.names() == []


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"fps": 0.0}, "FPS"),
        ({"fps": 30.5}, "FPS"),
        ({"queue_clips": 0}, "QUEUE_CLIPS"),
        ({"stop_timeout_s": 0}, "STOP"),
    ],
)
def test_settings_validation(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        IngestSettings(**kwargs)  # type: ignore[arg-type]
