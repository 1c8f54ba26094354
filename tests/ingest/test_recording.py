"""Recording at ingest (ingest/recording.py): a live RTSP camera (the GStreamer test server) stream-copied into
segments by the stream's own source thread, a WebRTC-like hooked source's sampled frames encoded, and the per-stream
cap and retention rules on segments a file source made."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import av
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from ingest.pipeline import IngestManager
from ingest.recording import Recordings
from ingest.source import Frame, open_frames
from ingest.spec import StreamSpec
from tests.ingest.test_rtsp import RtspServer, needs_gstreamer, wait_for
from tests.ingest.test_rtsp import rtsp_server as rtsp_server  # the fixture
from vcflash.serve.errors import Invalid, NotFound
from vcflash.serve.settings import IngestSettings


def decoded(path: Path) -> list[av.VideoFrame]:
    with av.open(str(path)) as container:
        return list(container.decode(video=0))


@needs_gstreamer
@pytest.mark.asyncio
async def test_a_camera_is_stream_copied_into_segments_and_cut(
    rtsp_server: Callable[..., RtspServer], tmp_path: Path
) -> None:
    server = rtsp_server(gop=10)  # 320x240 H.264 at 25 fps, a keyframe every 0.4 s
    recordings = Recordings(tmp_path, segment_s=1.0)
    recording = recordings.stream("cam")
    manager = IngestManager(IngestSettings(frame_size=32), registry=CollectorRegistry())
    manager.add("cam", StreamSpec(server.url(), fps=1.0, record=True), recorder=recording)
    try:
        await wait_for(lambda: len(recording.segments()) >= 3, 15, "three finished segments")
        live = recording.segments(live=True)[-1]  # the segment being written is cut from too
        await wait_for(lambda: recording.segments(live=True)[-1].end - live.start > 0.6, 5, "0.6 s written")
        first, _ = recordings.cut("cam", live.start + 0.1, live.start + 0.5, tmp_path / "live.mp4")
        assert first == pytest.approx(live.start, abs=1e-3) and len(decoded(tmp_path / "live.mp4")) >= 10
    finally:
        await manager.close()
    segments = recording.segments()[:3]  # a fourth, short, was finished by the stop
    assert all(0.99 <= s.end - s.start <= 1.5 for s in segments), segments  # cut at the first keyframe after 1 s
    assert all(b.start - a.end < 0.1 for a, b in zip(segments, segments[1:], strict=False))  # no gaps
    assert abs(segments[0].start - time.time()) < 30  # on the wall clock

    start, end = segments[0].start + 0.5, segments[2].end - 0.2
    first, last = recordings.cut("cam", start, end, tmp_path / "cut.mp4")
    frames = decoded(tmp_path / "cut.mp4")
    assert (frames[0].width, frames[0].height) == (320, 240)  # the camera's own video, not re-encoded
    assert start - 0.41 < first <= start and last >= end - 0.08
    times = [first + f.time for f in frames]
    assert times[-1] >= end - 0.08
    assert len(frames) == pytest.approx((times[-1] - times[0]) * 25 + 1, abs=3)


@pytest.mark.asyncio
async def test_a_hooked_source_records_its_sampled_frames(tmp_path: Path) -> None:
    """A WebRTC session has no packets to keep: its sampled frames (2 fps of 10) are encoded, H.264."""
    t0 = time.time()
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]

    def frames(stop: threading.Event) -> Iterator[Frame]:
        for i in range(60):  # 6 s at 10 fps, each second its colour
            image = np.full((48, 64, 3), colours[i // 20], dtype=np.uint8)
            yield Frame(pts=i / 10, wall_time=t0 + i / 10, image=image)

    recordings = Recordings(tmp_path, segment_s=2.0)
    recording = recordings.stream("phone")
    manager = IngestManager(IngestSettings(frame_size=32), registry=CollectorRegistry())
    spec = StreamSpec("whip://phone", fps=2.0, realtime=False, resume=False, record=True)
    manager.add("phone", spec, source=frames, recorder=recording)
    await manager.wait("phone")
    await manager.close()
    segments = recording.segments()
    assert [round(s.start - t0, 1) for s in segments] == [0.0, 2.0, 4.0]

    first, last = recordings.cut("phone", t0 + 1.2, t0 + 4.8, tmp_path / "cut.mp4")
    out = decoded(tmp_path / "cut.mp4")
    assert first == pytest.approx(t0, abs=1e-3)  # from the keyframe that starts the first segment
    assert [round(first + f.time - t0, 2) for f in out] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5]
    for f in out:
        second = round(first + f.time - t0, 2)
        mean = f.to_ndarray(format="rgb24").reshape(-1, 3).mean(0)
        assert np.abs(mean - colours[int(second // 2)]).max() < 20, (second, mean)


@pytest.fixture
def recorded(tmp_path: Path) -> tuple[Recordings, float]:
    """A 10 s file (keyframe each second) recorded in 2 s segments; its first frame's wall time."""
    from vcflash.media import write_test_video

    video = write_test_video(tmp_path / "10s.mp4", seconds=10, fps=25, size=(64, 48))
    recordings = Recordings(tmp_path / "recordings", segment_s=2.0, max_bytes=10**9, max_range_s=60)
    walls = [
        f.wall_time
        for f in open_frames(str(video), realtime=False, stop=threading.Event(), recorder=recordings.stream("cam"))
    ]
    return recordings, walls[0]


def test_retention_keeps_what_reaches_the_first_clip(recorded: tuple[Recordings, float]) -> None:
    recordings, w0 = recorded
    assert len(recordings.stream("cam").segments()) == 5
    assert recordings.enforce({"cam": w0 + 4.5}, set()) == {"cam": 2}  # [0, 2) and [2, 4) end before the clip
    assert [round(s.start - w0) for s in recordings.stream("cam").segments()] == [4, 6, 8]
    assert recordings.enforce({"cam": None}, {"cam"}) == {}  # recording now, its first clip on its way
    assert recordings.enforce({}, {"cam"}) == {}  # memory does not know it yet
    assert recordings.enforce({"cam": None}, set()) == {"cam": 3}  # memory holds none of its clips
    recordings.stream("cam")
    assert recordings.nbytes("cam") == 0


def test_deleted_memory_takes_the_whole_recording(recorded: tuple[Recordings, float]) -> None:
    recordings, _ = recorded
    assert recordings.stream_ids() == ["cam"]
    assert recordings.enforce({}, set()) == {"cam": 5}
    assert recordings.stream_ids() == [] and recordings.nbytes("cam") == 0
    assert list(recordings.root.iterdir()) == []


def test_a_stream_over_its_cap_loses_its_oldest_segments(tmp_path: Path) -> None:
    from vcflash.media import write_test_video

    video = write_test_video(tmp_path / "10s.mp4", seconds=10, fps=25, size=(64, 48))
    probe = Recordings(tmp_path / "probe", segment_s=2.0)
    for _ in open_frames(str(video), realtime=False, stop=threading.Event(), recorder=probe.stream("cam")):
        pass
    sizes = [s.bytes for s in probe.stream("cam").segments()]
    capped = Recordings(tmp_path / "capped", segment_s=2.0, max_bytes=sizes[-1] + sizes[-2] + 100)
    for _ in open_frames(str(video), realtime=False, stop=threading.Event(), recorder=capped.stream("cam")):
        pass
    assert [s.n for s in capped.stream("cam").segments()] == [3, 4]
    assert capped.nbytes("cam") <= capped.max_bytes


def test_a_restart_rebuilds_the_index_from_the_names(recorded: tuple[Recordings, float]) -> None:
    recordings, w0 = recorded
    again = Recordings(recordings.root, segment_s=2.0, max_range_s=60)
    assert again.stream("cam").segments() == recordings.stream("cam").segments()
    again.cut("cam", w0 + 1, w0 + 3, recordings.root / "cut.mp4")
    with pytest.raises(NotFound):
        again.cut("cam", w0 + 20, w0 + 30, recordings.root / "cut.mp4")
    with pytest.raises(NotFound):
        again.cut("other", w0, w0 + 1, recordings.root / "cut.mp4")
    with pytest.raises(Invalid, match="at most 60 s"):
        again.cut("cam", w0, w0 + 61, recordings.root / "cut.mp4")
    with pytest.raises(Invalid):
        again.cut("../cam", w0, w0 + 1, recordings.root / "cut.mp4")
