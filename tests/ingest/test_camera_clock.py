"""The camera's own clock as wall time (`camera_clock`), opt-in per stream: the conversion, the spec, and end to
end against a GStreamer camera whose RTCP sender reports run 1000 s ahead of this host's clock."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from ingest.clips import Clip
from ingest.pipeline import CAMERA_CLOCK, SERVER_CLOCK, WAITING_FOR_REPORT, IngestManager, StreamStatus
from ingest.server import SERVICE_NAME, IngestServicer
from ingest.source import Frame, camera_wall_time, open_frames, prft_wallclock_us
from ingest.spec import StreamSpec
from ingest.streams import Streams
from memory.embedded import EmbeddedStore
from memory.records import Retention
from memory.server import SERVICE_NAME as MEMORY
from memory.server import MemoryServicer
from protos.vcflash.v1 import vcflash_pb2_grpc as pb_grpc
from tests.ingest.test_rtsp import (
    FAST,
    FPS,
    TOKEN,
    RtspServer,
    assert_accounted,
    closed_port,
    needs_gstreamer,
    wait_for,
)
from vcflash.cli import main
from vcflash.serve.errors import Invalid
from vcflash.serve.rpc import create_server
from vcflash.serve.settings import IngestSettings, MemorySettings

AHEAD_S = 1000.0  # the test camera's clock minus ours
TRUSTING = replace(FAST, camera_clock_max_skew_s=3600.0)  # takes the camera's clock 1000 s off
REPORT_WITHIN_S = 8.0  # GStreamer sends its first sender report 1-3 s after PLAY; this leaves room on a busy host
TB = Fraction(1, 90000)  # the RTP video clock
SLACK_S = 10.0  # how long a clip may wait in the queue before a test takes it (the clocks are 1000 s apart)


# ---------------------------------------------------------------------------- conversion


def test_a_frame_is_as_far_from_the_report_on_the_camera_clock_as_its_pts_is() -> None:
    report_us, report_pts = 1_796_187_174_606_600, 169_200  # FFmpeg's PRFT at that packet
    assert camera_wall_time(report_us, report_pts, report_pts, TB) == pytest.approx(1_796_187_174.6066, abs=1e-6)
    later = camera_wall_time(report_us, report_pts, report_pts + 3600, TB)  # the next frame at 25 fps
    assert later == pytest.approx(1_796_187_174.6466, abs=1e-6)
    earlier = camera_wall_time(report_us, report_pts, report_pts - 7200, TB)  # out of a decoder holding frames back
    assert earlier == pytest.approx(1_796_187_174.5266, abs=1e-6)
    assert camera_wall_time(report_us, 40, 41, Fraction(1, 25)) == pytest.approx(1_796_187_174.6466, abs=1e-6)


def test_the_side_data_holds_microseconds_since_the_unix_epoch() -> None:
    side_data = struct.pack("@qi4x", 1_796_187_174_606_600, 24)  # AVProducerReferenceTime as rtpdec.c fills it
    assert len(side_data) == 16 and prft_wallclock_us(side_data) == 1_796_187_174_606_600
    assert prft_wallclock_us(struct.pack("@qi", -5, 0)) == -5
    with pytest.raises(ValueError, match="needs 12 bytes, got 8"):
        prft_wallclock_us(b"\0" * 8)


# ---------------------------------------------------------------------------- the spec


def test_camera_clock_is_kept_in_the_config_and_off_for_older_ones() -> None:
    spec = StreamSpec("rtsp://cam/live", fps=2.0, camera_clock=True)
    config = spec.to_config(active=True)
    assert config["camera_clock"] is True and StreamSpec.from_config(config) == spec
    old = {"source": "rtsp://cam/live", "fps": 1.0, "realtime": True, "loop": False, "transport": "udp", "active": True}
    assert StreamSpec.from_config(old).camera_clock is False
    assert StreamSpec("rtsps://cam/live", listen=True, camera_clock=True).camera_clock  # a pushing camera reports too


@pytest.mark.parametrize("source", ["/videos/door.mp4", "rtmp://relay/app/key", "http://u:p@cam/x.mjpg", "whip://d"])
def test_camera_clock_needs_rtsp(source: str) -> None:
    with pytest.raises(Invalid, match=r"camera_clock needs an rtsp:// or rtsps:// URL \(RTCP sender reports\)") as e:
        StreamSpec(source, camera_clock=True)
    assert "u:p" not in str(e.value)


# ---------------------------------------------------------------------------- a real camera


@pytest.fixture
def camera() -> Iterator[RtspServer]:
    """A live camera whose sender reports say it is 1000 s later than it is here."""
    server = RtspServer(closed_port(), clock_offset_s=AHEAD_S)
    server.start()
    yield server
    server.kill()


def read_frames(url: str, camera_clock: bool, enough: Callable[[list[Frame]], bool], **options: str) -> list[Frame]:
    """Frames of ``url`` until ``enough`` of them have come (at most 18 s: a broken clock fails, never hangs)."""
    stop, frames = threading.Event(), []
    timer = threading.Timer(REPORT_WITHIN_S + 10, stop.set)
    timer.start()
    try:
        for frame in open_frames(url, realtime=True, stop=stop, camera_clock=camera_clock, **options):  # type: ignore[arg-type]
            frames.append(frame)
            if enough(frames):
                break
    finally:
        timer.cancel()
    return frames


@needs_gstreamer
@pytest.mark.parametrize("transport", ["tcp", "udp"])
def test_frames_carry_the_clock_of_the_cameras_sender_reports(camera: RtspServer, transport: str) -> None:
    def enough(frames: list[Frame]) -> bool:  # 3 s at 25 fps after the first report: past a second report
        return sum(f.camera_time is not None for f in frames) >= 75

    frames = read_frames(camera.url(), True, enough, transport=transport)

    reported = [f for f in frames if f.camera_time is not None]
    assert len(reported) == 75, f"{len(frames)} frames, no sender report"
    first = frames.index(reported[0])
    assert first > 0 and len(frames) - first == 75  # our clock alone until the first report, then every frame
    assert reported[0].wall_time - frames[0].wall_time < REPORT_WITHIN_S
    skews = [f.camera_time - f.wall_time for f in reported]  # type: ignore[operator]
    assert all(AHEAD_S - 3 < s < AHEAD_S + 0.05 for s in skews), skews  # captured there before it arrived here
    # Every frame's camera time is its own PTS on the camera clock: a constant apart (well within a millisecond)
    # across reports. Taking FFmpeg's first report as it comes would put the first frame a frame (40 ms) off.
    offsets = [f.camera_time - f.pts for f in reported]  # type: ignore[operator]
    assert max(offsets) - min(offsets) < 1e-3, offsets[:3]


@needs_gstreamer
def test_without_camera_clock_no_frame_carries_it(camera: RtspServer) -> None:
    frames = read_frames(camera.url(), False, lambda frames: frames[-1].wall_time - frames[0].wall_time > 4.0)
    assert frames[-1].wall_time - frames[0].wall_time > 4.0  # past the first sender reports
    assert all(f.camera_time is None for f in frames)


def clip_skew(clip: Clip) -> float:
    """How far the clip's wall times are from now, when it is taken from the queue (it may have waited there a
    while: never ahead, a few seconds behind); asserts they come from one clock."""
    skews = [w - time.time() for w in clip.wall_times]
    assert max(skews) - min(skews) < 1.5, clip.wall_times
    return skews[-1]


async def collect(
    manager: IngestManager, wanted: dict[str, int], on_camera: bool = False, timeout_s: float = 20.0
) -> dict[str, list[tuple[Clip, float]]]:
    """Each stream's clips with their skews (see :func:`clip_skew`), until ``wanted[name]`` have come; with
    ``on_camera``, until that many are on the camera's clock (a skew near +1000 s)."""
    clips: dict[str, list[tuple[Clip, float]]] = {name: [] for name in wanted}
    deadline = time.monotonic() + timeout_s

    def counted(name: str) -> int:
        return sum(skew > AHEAD_S / 2 for _, skew in clips[name]) if on_camera else len(clips[name])

    while any(counted(name) < n for name, n in wanted.items()):
        clip = await asyncio.wait_for(manager.clips.get(), deadline - time.monotonic())
        clips[clip.stream_id].append((clip, clip_skew(clip)))
    return clips


@needs_gstreamer
@pytest.mark.asyncio
async def test_clips_take_the_camera_clock_once_it_reports(camera: RtspServer) -> None:
    """A trusting server stamps a camera_clock stream with the camera's clock once it reports, never mixing clocks
    in a clip; media time is untouched."""
    manager = IngestManager(TRUSTING, registry=CollectorRegistry())
    added = manager.add("cam", StreamSpec(camera.url(), fps=FPS, camera_clock=True))
    assert added.clock == WAITING_FOR_REPORT
    clips, skews = zip(*(await collect(manager, {"cam": 3}, on_camera=True))["cam"], strict=True)
    status = await manager.remove("cam")

    on_camera = [s > AHEAD_S / 2 for s in skews]
    assert on_camera == sorted(on_camera)  # ours until the first report, the camera's after
    assert all(AHEAD_S - SLACK_S < s < AHEAD_S + 0.1 for s in skews if s > AHEAD_S / 2), skews
    assert all(-SLACK_S < s < 0.1 for s in skews if s < AHEAD_S / 2), skews
    camera_clips = [c for c, on in zip(clips, on_camera, strict=True) if on]
    # the camera's clock is the frames' own PTS on it, and media time is the PTS: the two stay a constant apart
    gaps = [w - m for c in camera_clips for w, m in zip(c.wall_times, c.media_times, strict=True)]
    assert max(gaps) - min(gaps) < 1e-3, gaps
    media = [t for c in clips for t in c.media_times]
    assert media[0] < 10 and all(b > a for a, b in zip(media, media[1:], strict=False))  # from when we joined
    assert [c.seq for c in clips] == list(range(len(clips)))
    assert status.clock == CAMERA_CLOCK and status.last_wall_time is not None
    assert status.last_wall_time - time.time() > AHEAD_S - 2
    assert status.frames_dropped["discontinuity"] <= 3  # at most the partial clip of the switch
    assert_accounted(status)


async def wait_reviving(camera: RtspServer, predicate: Callable[[], bool], what: str) -> None:
    """`wait_for` with room for the camera to be revived once: GStreamer's RTSP server aborts now and then when two
    clients set up its shared media at once (`gst_rtsp_media_get_rates: assertion failed`, seen under load), which
    is the test camera failing, not ingest; ingest reconnects to the revived camera like to any rebooted one."""
    try:
        await wait_for(lambda: camera.revive() and predicate(), 2 * REPORT_WITHIN_S, what)
    except AssertionError as e:
        raise AssertionError(f"{e}; camera revived {camera.revived} times, now {camera.describe()}") from None


@needs_gstreamer
@pytest.mark.asyncio
async def test_a_camera_clock_too_far_off_is_ignored_with_one_warning_per_stream(
    camera: RtspServer, caplog: pytest.LogCaptureFixture
) -> None:
    """With the default limit (300 s) a camera 1000 s off keeps the server's clock, reconnect after reconnect;
    a stream without camera_clock never looks at it."""
    caplog.set_level(logging.DEBUG, logger="ingest.pipeline")
    manager = IngestManager(FAST, registry=CollectorRegistry())
    assert manager.settings.camera_clock_max_skew_s == 300.0
    manager.add("far", StreamSpec(camera.url(), fps=FPS, camera_clock=True))
    manager.add("plain", StreamSpec(camera.url(), fps=FPS))
    ignored = re.compile(r"server \(camera clock off by \+99\d\.\d s\)")
    await wait_reviving(camera, lambda: bool(ignored.fullmatch(manager.status()["far"].clock)), "ignored")
    clips = await collect(manager, {"far": 2, "plain": 2})
    camera.kill()
    await wait_for(lambda: manager.status()["far"].clock == WAITING_FOR_REPORT, 5, "waiting for the camera again")
    camera.start()
    await wait_for(lambda: manager.status()["far"].reconnects >= 1, 10, "reconnected")
    await wait_reviving(camera, lambda: bool(ignored.fullmatch(manager.status()["far"].clock)), "ignored again")
    for name, more in (await collect(manager, {"far": 2, "plain": 2})).items():
        clips[name] += more
    statuses: dict[str, StreamStatus] = {name: await manager.remove(name) for name in ("far", "plain")}

    skews = {name: [skew for _, skew in clips[name]] for name in clips}
    assert all(-SLACK_S < s < 0.1 for name in skews for s in skews[name]), skews  # all on this server's clock
    assert statuses["plain"].clock == SERVER_CLOCK and ignored.fullmatch(statuses["far"].clock)
    messages = [(r.levelno, r.getMessage()) for r in caplog.records if "camera clock ignored stream=far" in r.message]
    levels = [level for level, _ in messages]  # a warning once per stream, then one debug line per reconnect
    assert levels[0] == logging.WARNING and levels[1:] and set(levels[1:]) == {logging.DEBUG}, messages
    assert re.match(r"stream camera clock ignored stream=far skew_s=\+99\d\.\d{3} max_skew_s=300: ", messages[0][1])
    assert not [r for r in caplog.records if "camera clock" in r.message and "stream=plain" in r.message]


@needs_gstreamer
@pytest.mark.asyncio
async def test_camera_clock_through_the_cli_grpc_and_memory(
    camera: RtspServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`vcflash streams add --camera-clock` (Client.add_stream, AddStreamRequest.camera_clock) reaches the stream
    and its stored config; `streams ls` shows the clock in use."""
    store = EmbeddedStore(tmp_path / "memory.sqlite3")
    streams = Streams(IngestManager(TRUSTING, registry=CollectorRegistry()), store, Retention())
    entries = [
        (pb_grpc.add_IngestServicer_to_server, IngestServicer(streams), SERVICE_NAME),
        (pb_grpc.add_MemoryServicer_to_server, MemoryServicer(store, MemorySettings(), streams.delete_memory), MEMORY),
    ]
    grpc_server, port, _ = create_server("127.0.0.1:0", entries, TOKEN, 1 << 20)
    await grpc_server.start()
    cli = ["--address", f"127.0.0.1:{port}", "--token", TOKEN]
    try:
        add = ["streams", "add", "cam", camera.url(), "--fps", str(FPS), "--camera-clock", *cli]
        assert await asyncio.to_thread(main, add) == 0
        assert capsys.readouterr().out == f"cam: starting ({camera.url()}, 5 fps)\n"
        assert store.stream_configs()["cam"]["camera_clock"] is True  # a restarted server resumes it so
        await wait_for(lambda: streams.status("cam").clock == CAMERA_CLOCK, REPORT_WITHIN_S, "on the camera clock")
        assert await asyncio.to_thread(main, ["streams", "ls", *cli]) == 0
        assert "\tclock: camera" in capsys.readouterr().out
        assert await asyncio.to_thread(main, ["streams", "ls", "--json", *cli]) == 0
        assert json.loads(capsys.readouterr().out)[0]["clock"] == "camera"

        refused = ["streams", "add", "file", "/videos/door.mp4", "--camera-clock", *cli]
        assert await asyncio.to_thread(main, refused) == 1
        assert capsys.readouterr().err == (
            "vcflash: error: INVALID_ARGUMENT: camera_clock needs an rtsp:// or rtsps:// URL (RTCP sender reports), "
            "got '/videos/door.mp4'\n"
        )
    finally:
        await grpc_server.stop(None)
        await streams.manager.close()
        store.close()


# ---------------------------------------------------------------------------- the rules, frame by frame

W0 = 1_796_000_000.0  # this server's clock at the first synthetic frame


def synthetic(camera_offset: Callable[[int], float | None]) -> Callable[[threading.Event], Iterator[Frame]]:
    """A source hook: 100 frames at 25 fps (4 s), frame i carrying the camera's clock ``camera_offset(i)`` from ours."""

    def frames(stop: threading.Event) -> Iterator[Frame]:
        for i in range(100):
            pts = i / 25
            offset = camera_offset(i)
            camera = None if offset is None else W0 + pts + offset
            yield Frame(pts=pts, wall_time=W0 + pts, image=np.zeros((8, 8, 3), np.uint8), camera_time=camera)

    return frames


@pytest.mark.asyncio
async def test_each_clip_has_one_clock_and_a_camera_clock_off_too_far_is_dropped_for_good(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Sampling 5 of 25 fps (frames 0, 5, 10, ...): the camera's first report comes mid-clip, with frame 28 (not
    sampled) or 30."""
    caplog.set_level(logging.WARNING, logger="ingest.pipeline")
    manager = IngestManager(IngestSettings(), registry=CollectorRegistry())
    url = "rtsp://127.0.0.1/synthetic"  # frames come from the hook

    def behind_then_jumps(i: int) -> float | None:  # 50 ms behind, then set 1000 s on (frame 60), then back
        return None if i < 30 else 1000.0 if 60 <= i < 80 else -0.05

    sources = {
        "cam": (True, synthetic(lambda i: None if i < 28 else -0.05)),
        "jumps": (True, synthetic(behind_then_jumps)),
        "far": (True, synthetic(lambda i: None if i < 30 else 1000.0)),
        "plain": (False, synthetic(lambda i: None if i < 30 else -0.05)),
    }
    for name, (camera_clock, source) in sources.items():
        manager.add(name, StreamSpec(url, fps=FPS, camera_clock=camera_clock), source=source)
    statuses = {name: await manager.wait(name) for name in sources}
    clips: dict[str, list[Clip]] = {name: [] for name in sources}
    while not manager.clips.empty():
        clip = manager.clips.get_nowait()
        clips[clip.stream_id].append(clip)
    await manager.close()

    def offsets(name: str) -> list[list[float]]:  # each clip's wall times minus ours, to the millisecond
        return [[round(w - W0 - m, 3) for w, m in zip(c.wall_times, c.media_times, strict=True)] for c in clips[name]]

    # frames 0-15 make a clip on our clock; 20 and 25 are dropped when frame 28 brings the camera's
    assert offsets("cam") == [[0.0] * 4] + [[-0.05] * 4] * 3
    assert statuses["cam"].frames_dropped["discontinuity"] == 2 and statuses["cam"].clock == CAMERA_CLOCK
    assert [c.media_times[0] for c in clips["cam"]] == pytest.approx([0.0, 1.2, 2.0, 2.8])  # media time: ours
    # frames 30-55 on the camera's clock (one clip, 50 left over), then 60 is 1000 s off: ours from there on,
    # even when the camera's clock comes back (80)
    assert offsets("jumps") == [[0.0] * 4, [-0.05] * 4, [0.0] * 4, [0.0] * 4]
    assert statuses["jumps"].frames_dropped["discontinuity"] == 2 + 2
    assert offsets("far") == offsets("plain") == [[0.0] * 4] * 5  # never taken: no clip lost either
    assert statuses["far"].frames_dropped["discontinuity"] == 0
    assert (statuses["far"].clock, statuses["jumps"].clock) == ("server (camera clock off by +1000.0 s)",) * 2
    assert statuses["plain"].clock == SERVER_CLOCK
    for status in statuses.values():
        assert_accounted(status)
    warnings = sorted(r.getMessage().split(": ")[0] for r in caplog.records if "camera clock ignored" in r.message)
    assert warnings == [
        "stream camera clock ignored stream=far skew_s=+1000.000 max_skew_s=300",
        "stream camera clock ignored stream=jumps skew_s=+1000.000 max_skew_s=300",
    ]
