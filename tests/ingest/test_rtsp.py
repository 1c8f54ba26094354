"""Live RTSP ingest against real peers on 127.0.0.1: a GStreamer camera (pull) and ffmpeg publishing (push).

Reconnects, credentials and keyframe-only decoding are checked end to end through IngestManager.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from ingest.clips import Clip
from ingest.pipeline import IngestManager, StreamState, StreamStatus
from ingest.server import SERVICE_NAME, IngestServicer
from ingest.source import open_frames, redact_text
from ingest.spec import StreamSpec
from ingest.streams import Streams
from memory.embedded import EmbeddedStore
from memory.records import Retention
from protos.vcflash.v1 import vcflash_pb2_grpc as pb_grpc
from vcflash.cli import main
from vcflash.serve.rpc import create_server
from vcflash.serve.settings import Backoff, IngestSettings

# Ingest mechanics read local test videos: any file is allowed (the file policy has its own tests).
ROOT = Path("/")
FILES = IngestSettings(media_root=ROOT)

SYSTEM_PYTHON = "/usr/bin/python3"  # Debian's, with python3-gi and gir1.2-gst-rtsp-server-1.0
SERVER_SCRIPT = Path(__file__).with_name("rtsp_server.py")
FPS = 5.0  # sampling rate in these tests: a clip every 0.8 s
# Short timeouts and waits, so that a drop is noticed and healed within a test's budget.
FAST = IngestSettings(media_root=ROOT, source_timeout_s=3.0, reconnect=Backoff(initial_s=0.2, max_s=1.0, jitter=0.0))
TOKEN = "rtsp-tests-token-0123456789"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def drain(queue: asyncio.Queue[Clip]) -> list[Clip]:
    clips = []
    while not queue.empty():
        clips.append(queue.get_nowait())
    return clips


def metric(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def assert_accounted(status: StreamStatus) -> None:
    """Every decoded frame is skipped, in an emitted clip, pending, or dropped with a reason."""
    dropped = sum(n for reason, n in status.frames_dropped.items() if reason != "decode_error")
    assert status.frames_in == status.frames_not_sampled + status.frames_sampled
    assert status.frames_sampled == 4 * status.clips_emitted + status.frames_pending + dropped


def _gstreamer_missing() -> str | None:
    probe = "import gi; gi.require_version('GstRtspServer', '1.0'); from gi.repository import GstRtspServer"
    try:
        subprocess.run([SYSTEM_PYTHON, "-c", probe], check=True, capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as e:
        return (
            f"{SYSTEM_PYTHON} with GstRtspServer is needed (apt-get install python3-gi gir1.2-gst-rtsp-server-1.0): {e}"
        )
    return None


needs_gstreamer = pytest.mark.skipif(bool(missing := _gstreamer_missing()), reason=missing or "")
needs_ffmpeg = pytest.mark.skipif(
    shutil.which("ffmpeg") is None, reason="the ffmpeg binary is needed (apt-get install ffmpeg)"
)


class RtspServer:
    """tests/ingest/rtsp_server.py in a subprocess: a live 320x240 25 fps H.264 camera, GOP 25; with
    ``clock_offset_s``, a camera whose clock (in its RTCP sender reports) is that far off ours."""

    def __init__(
        self,
        port: int,
        mount: str = "/cam",
        auth: str | None = None,
        clock_offset_s: float | None = None,
        gop: int | None = None,
    ) -> None:
        self.port, self.mount, self.auth, self.clock_offset_s, self.gop = port, mount, auth, clock_offset_s, gop
        self.process: subprocess.Popen[bytes] | None = None
        self.revived = 0

    def url(self, userinfo: str = "") -> str:
        return f"rtsp://{userinfo}127.0.0.1:{self.port}{self.mount}"

    def start(self, timeout_s: float = 10.0) -> None:
        command = [SYSTEM_PYTHON, str(SERVER_SCRIPT), str(self.port), self.mount]
        if self.clock_offset_s is not None:
            command.append(f"--clock-offset={self.clock_offset_s}")
        if self.gop is not None:
            command.append(f"--gop={self.gop}")
        self.stderr = tempfile.TemporaryFile()  # kept for `describe`: why a server died
        self.process = subprocess.Popen(
            [*command, *(["--auth", self.auth] if self.auth else [])], stdout=subprocess.PIPE, stderr=self.stderr
        )
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], timeout_s)
        line = self.process.stdout.readline() if ready else b""
        if not line.startswith(b"ready"):
            self.kill()
            raise RuntimeError(f"RTSP server on port {self.port} did not start within {timeout_s} s: {line!r}")

    def describe(self) -> str:
        """Whether the server still runs (or its exit status) and the end of what it wrote to stderr."""
        if self.process is None:
            return "not running"
        self.stderr.seek(0)
        tail = self.stderr.read()[-2000:].decode(errors="replace")
        return f"exit status {self.process.poll()}, stderr {tail!r}"

    def revive(self, at_most: int = 2) -> bool:
        """Start the server again if it died by itself, at most ``at_most`` times (on a loaded CI machine GStreamer's
        RTSP server has died while two clients set up its shared media at once). True, for use in a wait predicate."""
        if self.process is not None and self.process.poll() is not None and self.revived < at_most:
            self.revived += 1
            self.kill()
            self.start()
        return True

    def kill(self) -> None:
        """SIGKILL: the camera vanishes without a TEARDOWN, as when it loses power."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(5)
            self.process.stdout.close()  # type: ignore[union-attr]
            self.stderr.close()
            self.process = None


@pytest.fixture
def rtsp_server() -> Iterator[Callable[..., RtspServer]]:
    servers: list[RtspServer] = []

    def start(**kwargs: str | float) -> RtspServer:
        server = RtspServer(closed_port(), **kwargs)
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.kill()


def publish(url: str, seconds: float = 30.0) -> subprocess.Popen[bytes]:
    """ffmpeg pushing a live 320x240 test pattern to ``url`` (ANNOUNCE/RECORD over TCP)."""
    command = "ffmpeg -nostdin -loglevel error -re -f lavfi -i testsrc=size=320x240:rate=25"
    options = "-pix_fmt yuv420p -c:v libx264 -preset ultrafast -tune zerolatency -g 25 -f rtsp -rtsp_transport tcp"
    return subprocess.Popen([*command.split(), "-t", str(seconds), *options.split(), url], stderr=subprocess.DEVNULL)


async def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"not {what} within {timeout_s} s"
        await asyncio.sleep(0.01)


async def take(manager: IngestManager, n: int, timeout_s: float = 10.0) -> list[Clip]:
    """The next ``n`` clips; a timeout fails with every stream's status, which says why none came."""
    clips: list[Clip] = []
    for _ in range(n):
        try:
            clips.append(await asyncio.wait_for(manager.clips.get(), timeout_s))
        except TimeoutError:
            statuses = {name: manager.worker(name).status() for name in manager.names()}
            raise AssertionError(f"clip {len(clips) + 1} of {n} not within {timeout_s} s: {statuses}") from None
    return clips


def assert_live_clips(clips: list[Clip]) -> None:
    """Consecutive seq from 0, media time never going back (not even across reconnects), 320x240 frames."""
    assert [c.seq for c in clips] == list(range(len(clips)))
    media = [t for c in clips for t in c.media_times]
    assert all(b > a for a, b in zip(media, media[1:], strict=False)), media
    assert all(b.media_start >= a.media_end - 1e-6 for a, b in zip(clips, clips[1:], strict=False))
    wall = [t for c in clips for t in c.wall_times]
    assert all(b >= a for a, b in zip(wall, wall[1:], strict=False)), wall
    for clip in clips:
        assert clip.frames.shape == (4, 240, 320, 3)


@needs_gstreamer
@pytest.mark.asyncio
@pytest.mark.parametrize("transport", ["tcp", "udp"])
async def test_pulls_a_camera(rtsp_server: Callable[..., RtspServer], transport: str) -> None:
    server = rtsp_server()
    registry = CollectorRegistry()
    manager = IngestManager(FAST, registry=registry)
    manager.add("cam", StreamSpec(server.url(), fps=FPS, transport=transport))  # type: ignore[arg-type]
    clips = []
    for _ in range(3):
        clips += await take(manager, 1)
        assert abs(clips[-1].wall_times[-1] - time.time()) < 1.5  # live: wall time is arrival, not paced
    status = await manager.remove("cam")

    assert_live_clips(clips)
    steps = [b - a for c in clips for a, b in zip(c.media_times, c.media_times[1:], strict=False)]
    assert steps == pytest.approx([1 / FPS] * len(steps), abs=0.045)  # a sample per 1/FPS, within a frame
    assert status.state is StreamState.STOPPED and status.reconnects == 0 and status.error is None
    assert 0 < status.frames_in and sum(status.frames_dropped.values()) == status.frames_dropped["incomplete_clip"]
    assert_accounted(status)


@needs_gstreamer
@pytest.mark.asyncio
async def test_credentials_never_leak(rtsp_server: Callable[..., RtspServer], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    server = rtsp_server(auth="viewer:hunter2")
    manager = IngestManager(FAST, registry=CollectorRegistry())
    manager.add("cam", StreamSpec(server.url("viewer:hunter2@"), fps=FPS))
    manager.add("intruder", StreamSpec(server.url("viewer:wrong-s3cret@"), fps=FPS))
    clip = (await take(manager, 1))[0]
    intruder = await asyncio.wait_for(manager.wait("intruder"), 5)  # refused three times: no more logins
    statuses = await manager.remove("cam"), await manager.remove("intruder")

    assert clip.stream_id == "cam"
    assert intruder.state is StreamState.FAILED and intruder.clips_emitted == 0 and intruder.reconnects == 2
    assert intruder.error == (
        f"unauthorized: cannot open {server.url('***@')}: Server returned 401 Unauthorized (authorization failed) "
        "(3 tries in a row); fix the source, then restart the stream (vcflash streams restart intruder)"
    )
    for text in (caplog.text, repr(statuses), repr(intruder)):
        assert "hunter2" not in text and "wrong-s3cret" not in text and "viewer" not in text
    assert "401 Unauthorized" in caplog.text


@needs_gstreamer
@pytest.mark.asyncio
async def test_camera_dies_and_returns(rtsp_server: Callable[..., RtspServer]) -> None:
    server = rtsp_server()
    registry = CollectorRegistry()
    manager = IngestManager(FAST, registry=registry)
    manager.add("cam", StreamSpec(server.url(), fps=FPS))
    clips = await take(manager, 2)
    await wait_for(lambda: manager.status()["cam"].frames_sampled % 4 == 2, 5, "halfway through a clip")
    server.kill()
    await wait_for(lambda: manager.status()["cam"].state is StreamState.RECONNECTING, 3, "reconnecting")
    down = manager.status()["cam"]
    assert down.error is not None and server.url() in down.error
    assert down.frames_dropped["disconnect"] >= 2  # the partial clip
    await asyncio.sleep(1.0)  # a few refused attempts while the camera is away
    server.start()
    await wait_for(lambda: manager.status()["cam"].state is StreamState.RUNNING, 10, "running again")
    clips += await take(manager, 2)
    status = manager.status()["cam"]
    exported = [
        metric(registry, "vcflash_ingest_reconnects_total", stream="cam"),
        metric(registry, "vcflash_ingest_frames_dropped_total", stream="cam", reason="disconnect"),
    ]
    await manager.remove("cam")

    assert_live_clips(clips)  # seq goes on without a gap; media time jumps forward by the outage
    assert clips[2].media_start - clips[1].media_end >= 1.0
    assert status.state is StreamState.RUNNING and status.error is None
    assert status.reconnects >= 2 and exported == [status.reconnects, status.frames_dropped["disconnect"]]
    assert_accounted(status)


@needs_gstreamer
@pytest.mark.asyncio
async def test_refused_camera_fails_then_restarts_on_request(
    rtsp_server: Callable[..., RtspServer], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """401 and 404 stop after three tries, and `vcflash streams restart` (RestartStream) tries again."""
    server = rtsp_server(auth="viewer:new-pass")  # someone changed the camera's password
    store = EmbeddedStore(tmp_path / "memory.sqlite3")
    streams = Streams(IngestManager(FAST, registry=CollectorRegistry()), store, Retention())
    entry = (pb_grpc.add_IngestServicer_to_server, IngestServicer(streams), SERVICE_NAME)
    grpc_server, port, _ = create_server("127.0.0.1:0", [entry], TOKEN, 1 << 20)
    await grpc_server.start()
    cli = ["--address", f"127.0.0.1:{port}", "--token", TOKEN]
    fixed = RtspServer(server.port, auth="viewer:old-pass")
    try:
        await streams.add("cam", StreamSpec(server.url("viewer:old-pass@"), fps=FPS))
        await streams.add("nope", StreamSpec(f"rtsp://viewer:new-pass@127.0.0.1:{server.port}/nope", fps=FPS))
        cam = await asyncio.wait_for(streams.manager.wait("cam"), 10)
        nope = await asyncio.wait_for(streams.manager.wait("nope"), 10)
        await asyncio.sleep(1.5)  # longer than any wait between tries: nobody tries again
        assert [s.reconnects for s in streams.manager.status().values()] == [2, 2]
        assert cam.state is StreamState.FAILED and cam.error == (
            f"unauthorized: cannot open {server.url('***@')}: Server returned 401 Unauthorized (authorization failed) "
            "(3 tries in a row); fix the source, then restart the stream (vcflash streams restart cam)"
        )
        assert nope.state is StreamState.FAILED and nope.error is not None
        nope_url = f"rtsp://***@127.0.0.1:{server.port}/nope"
        assert nope.error.startswith(f"not found: cannot open {nope_url}: Server returned 404 Not Found (3 tries")

        with pytest.raises(ValueError, match=r"'cam' already exists \(failed: restart it, or remove it first\)"):
            await streams.add("cam", StreamSpec(server.url("viewer:old-pass@"), fps=FPS))

        server.kill()  # the camera's password is put back
        await asyncio.to_thread(fixed.start)
        assert await asyncio.to_thread(main, ["streams", "restart", "cam", *cli]) == 0
        assert capsys.readouterr().out == f"cam: starting ({server.url('***@')}, 5 fps)\n"
        clip = (await take(streams.manager, 1))[0]
        assert (clip.stream_id, clip.seq) == ("cam", 0) and streams.status("cam").state is StreamState.RUNNING

        assert await asyncio.to_thread(main, ["streams", "restart", "cam", *cli]) == 1  # it runs: nothing to do
        assert capsys.readouterr().err == (
            "vcflash: error: FAILED_PRECONDITION: stream 'cam' is running: only an ended stream can be restarted\n"
        )
    finally:
        await grpc_server.stop(None)
        await streams.manager.close()
        fixed.kill()
        store.close()


@needs_gstreamer
@pytest.mark.asyncio
async def test_camera_back_after_4_s_is_read_within_2_s_of_its_return(rtsp_server: Callable[..., RtspServer]) -> None:
    """The default reconnect waits (0.5 s, then 1 s, each +-20%): 4 s away cost at most 4 + 2 s of video.
    Doubling on to 30 s, the waits would have tried at 0.5, 1.5, 3.5 and next at 7.5 s."""
    server = rtsp_server()
    manager = IngestManager(replace(FAST, reconnect=IngestSettings().reconnect), registry=CollectorRegistry())
    manager.add("cam", StreamSpec(server.url(), fps=FPS))
    await take(manager, 1)
    server.kill()
    down = time.time()
    last_before = manager.status()["cam"].last_wall_time
    assert last_before is not None
    await asyncio.sleep(4.0)
    await asyncio.to_thread(server.start)
    up = time.time()
    while (clip := (await take(manager, 1))[0]).wall_times[0] < down:  # clips made before the outage
        pass
    status = await manager.remove("cam")

    back = clip.wall_times[0]  # the first frame sampled after the outage
    assert back - up <= 2.0, (back - up, status.reconnects)
    assert back - last_before <= (up - down) + 2.0
    assert status.reconnects >= 4


class Relay:
    """A TCP relay on 127.0.0.1 in front of a camera, keeping what the client sent (the RTSP requests)."""

    def __init__(self, port: int) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port, self.upstream, self.sent = self.listener.getsockname()[1], port, bytearray()
        self.closed = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def requests(self) -> list[str]:
        return [line.split()[0] for line in self.sent.decode(errors="replace").splitlines() if "RTSP/1.0" in line]

    def _serve(self) -> None:
        client, _ = self.listener.accept()
        camera = socket.create_connection(("127.0.0.1", self.upstream))
        threading.Thread(target=self._down, args=(camera, client), daemon=True).start()
        with client, camera:
            try:
                while data := client.recv(65536):
                    self.sent += data
                    camera.sendall(data)
            except OSError:
                pass
        self.closed.set()

    @staticmethod
    def _down(camera: socket.socket, client: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := camera.recv(65536):
                client.sendall(data)


@needs_gstreamer
@pytest.mark.asyncio
async def test_stopping_a_stream_still_tears_the_session_down(rtsp_server: Callable[..., RtspServer]) -> None:
    """Stopping aborts blocking reads (see the stuck-source tests), but never the goodbye: the camera hears
    TEARDOWN and frees the session (cameras allow a handful)."""
    relay = Relay(rtsp_server().port)
    manager = IngestManager(FAST, registry=CollectorRegistry())
    manager.add("cam", StreamSpec(f"rtsp://127.0.0.1:{relay.port}/cam", fps=FPS))
    await take(manager, 1)
    status = await manager.remove("cam")
    assert await asyncio.to_thread(relay.closed.wait, 2.0)
    assert status.state is StreamState.STOPPED
    assert relay.requests() == ["OPTIONS", "DESCRIBE", "SETUP", "PLAY", "TEARDOWN"]


@needs_gstreamer
@pytest.mark.asyncio
async def test_stalled_camera_times_out_and_recovers(rtsp_server: Callable[..., RtspServer]) -> None:
    server = rtsp_server()
    assert server.process is not None
    manager = IngestManager(replace(FAST, source_timeout_s=1.0), registry=CollectorRegistry())
    manager.add("cam", StreamSpec(server.url(), fps=FPS))
    clips = await take(manager, 1)
    server.process.send_signal(signal.SIGSTOP)  # connection open, no data: only a read timeout notices
    try:
        await wait_for(lambda: manager.status()["cam"].state is StreamState.RECONNECTING, 3, "reconnecting")
        error = manager.status()["cam"].error
        assert error is not None and re.fullmatch(rf"reading {server.url()} stalled: no data for 1\.\d s", error)
    finally:
        server.process.send_signal(signal.SIGCONT)
    clips += await take(manager, 2)
    status = await manager.remove("cam")

    assert_live_clips(clips)
    assert status.reconnects >= 1


@pytest.mark.asyncio
async def test_nothing_listening_is_retried_not_fatal(videos: dict[str, Path]) -> None:
    manager = IngestManager(FAST, registry=CollectorRegistry())
    bad_url = f"rtsp://admin:hunter2@127.0.0.1:{closed_port()}/live?token=s3cret"
    manager.add("bad", StreamSpec(bad_url, fps=FPS))
    manager.add("good", StreamSpec(str(videos["20s"]), realtime=False))
    good = await manager.wait("good")
    await wait_for(lambda: manager.status()["bad"].reconnects >= 2, 3, "retried twice")
    bad = manager.status()["bad"]

    assert good.state is StreamState.FINISHED and good.clips_emitted == 5
    assert bad.state is StreamState.RECONNECTING
    assert bad.error is not None and bad.error.startswith("cannot open rtsp://***@127.0.0.1:")
    assert bad.error.endswith("/live?token=***: Connection refused")
    start = time.monotonic()
    removed = await manager.remove("bad")
    assert time.monotonic() - start < 0.5
    assert removed.state is StreamState.STOPPED and "hunter2" not in repr(removed)
    await wait_for(lambda: not any(t.name == "ingest-bad" for t in threading.enumerate()), 1, "thread gone")
    await manager.close()


@needs_ffmpeg
@pytest.mark.asyncio
async def test_camera_pushes_to_a_listening_stream() -> None:
    url = f"rtsp://127.0.0.1:{closed_port()}/live"
    manager = IngestManager(FAST, registry=CollectorRegistry())
    manager.add("pushed", StreamSpec(url, fps=FPS, listen=True))
    publishers = [publish(url)]
    try:
        clips = await take(manager, 2)
        publishers[0].send_signal(signal.SIGINT)  # ffmpeg ends the session cleanly (TEARDOWN)
        await wait_for(lambda: manager.status()["pushed"].reconnects >= 1, 5, "listening again")
        assert manager.status()["pushed"].error == f"{url}: the stream ended"
        await asyncio.sleep(0.3)  # the listener is bound again
        publishers.append(publish(url))
        clips += await take(manager, 2)
    finally:
        for publisher in publishers:
            publisher.kill()
            publisher.wait(5)
    status = await manager.remove("pushed")

    assert_live_clips(clips)
    assert status.reconnects >= 1 and status.state is StreamState.STOPPED
    assert_accounted(status)


def test_listener_with_no_publisher_stops_promptly() -> None:
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    start = time.monotonic()
    frames = list(open_frames(f"rtsp://127.0.0.1:{closed_port()}/live", realtime=False, stop=stop, listen=True))
    assert frames == [] and time.monotonic() - start < 2.0


@pytest.mark.asyncio
async def test_keyframes_only_decodes_one_frame_in_25(videos: dict[str, Path]) -> None:
    registry = CollectorRegistry()
    manager = IngestManager(FILES, registry=registry)
    manager.add("full", StreamSpec(str(videos["20s"]), realtime=False))
    manager.add("key", StreamSpec(str(videos["20s"]), realtime=False, keyframes_only=True))  # GOP 25 at 25 fps
    full, key = await manager.wait("full"), await manager.wait("key")
    clips: dict[str, list[Clip]] = {"full": [], "key": []}
    for clip in drain(manager.clips):
        clips[clip.stream_id].append(clip)

    # the first GOP is decoded in full while the keyframe interval is measured, then the 19 keyframes after it
    assert (full.frames_in, key.frames_in) == (500, 25 + 19)
    assert key.frames_sampled == 20 and key.clips_emitted == 5
    assert (full.decode, key.decode) == ("all frames", "keyframes only")
    assert metric(registry, "vcflash_ingest_keyframes_fallback", stream="key") == 0
    assert metric(registry, "vcflash_ingest_keyframe_interval_seconds", stream="key") == 1.0
    assert metric(registry, "vcflash_ingest_keyframes_fallback", stream="full") is None
    assert [c.media_times for c in clips["key"]] == [c.media_times for c in clips["full"]]
    assert_accounted(key)
    await manager.close()


@needs_gstreamer
@pytest.mark.asyncio
async def test_keyframes_only_camera_falls_back_when_its_gop_is_longer_than_the_sampling_period(
    rtsp_server: Callable[..., RtspServer],
) -> None:
    server = rtsp_server(gop=12)  # a keyframe every 0.48 s
    registry = CollectorRegistry()
    manager = IngestManager(FAST, registry=registry)
    manager.add("fast", StreamSpec(server.url(), fps=FPS, keyframes_only=True))  # samples every 0.2 s
    try:
        clips = await take(manager, 3)
    except AssertionError as e:
        raise AssertionError(f"{e}; RTSP server: {server.describe()}") from None
    # The second client once the first plays: with both setting up the test camera's shared media at once, the
    # camera (GStreamer's RTSP server) was gone twice in loaded full-suite runs, both clients refused.
    manager.add("slow", StreamSpec(server.url(), fps=1.0, keyframes_only=True))
    deadline = time.monotonic() + 10
    while manager.worker("slow").status().decode != "keyframes only" and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    before = [manager.worker(name).status().frames_in for name in ("fast", "slow")]
    await asyncio.sleep(2.0)  # both play the same camera meanwhile
    after = [manager.worker(name).status().frames_in for name in ("fast", "slow")]
    fast, slow = await manager.remove("fast"), await manager.remove("slow")

    steps = [b - a for c in clips for a, b in zip(c.media_times, c.media_times[1:], strict=False)]
    assert steps and steps == pytest.approx([1 / FPS] * len(steps), abs=0.045)  # 5 fps, not one per 0.48 s
    assert fast.decode == "all frames (keyframes 0.48 s apart, longer than the 0.2 s sampling period)"
    assert slow.decode == "keyframes only"
    decoded = [b - a for a, b in zip(before, after, strict=True)]  # in the same 2 s: 25 fps against 1 in 12
    assert decoded[0] > 4 * decoded[1] and decoded[1] > 0, decoded  # the camera sent the same; "slow" its keyframes
    assert_accounted(fast)


def test_bad_options_are_refused_before_anything_starts() -> None:
    manager = IngestManager(FILES, registry=CollectorRegistry())
    with pytest.raises(ValueError, match="transport must be one of"):
        manager.add("cam", StreamSpec("rtsp://127.0.0.1:1/x", transport="http"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"listen needs an rtsp:// URL, got 'http://\*\*\*@h/x'"):
        manager.add("cam", StreamSpec("http://u:p@h/x", listen=True))
    assert manager.names() == []


def test_backoff_doubles_to_its_cap_with_bounded_jitter() -> None:
    assert [Backoff(jitter=0).delay(n) for n in range(8)] == [0.5, 1, 2, 4, 8, 16, 30, 30]
    assert Backoff(jitter=0).delay(10_000) == 30
    delays = [Backoff(initial_s=1, jitter=0.2).delay(0) for _ in range(200)]
    assert 0.8 <= min(delays) < max(delays) <= 1.2
    for kwargs, match in [({"initial_s": 0}, "INITIAL_S"), ({"max_s": 0.1}, "max_s"), ({"jitter": 1}, "JITTER")]:
        with pytest.raises(ValueError, match=match):
            Backoff(**kwargs)  # type: ignore[arg-type]


def test_ffmpeg_messages_are_redacted_whatever_url_they_quote() -> None:
    url = "rtsp://admin:p@ss@cam.local/live?token=s3cret"
    message = f"Server returned 401 for '{url}', then redirected to rtsp://admin:p@ss@10.0.0.9/x and rtsp://b/c"
    assert redact_text(message, url) == (
        "Server returned 401 for 'rtsp://***@cam.local/live?token=***', "
        "then redirected to rtsp://***@10.0.0.9/x and rtsp://b/c"
    )
