"""Sources that misbehave, against real peers on 127.0.0.1: an HTTP camera that never sends a keyframe, refuses
us (401, 403, 404) or stalls mid-stream, and a TCP server that accepts an RTSP connection and never answers.

Each is driven through IngestManager with short timeouts, and checked from both ends: the stream's state and
error, and what the peer saw (requests made, connections closed).
"""

from __future__ import annotations

import asyncio
import io
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import av
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from ingest.pipeline import IngestManager, StreamState
from ingest.spec import StreamSpec
from vcflash.serve.settings import Backoff, IngestSettings

FPS, SIZE = 25, (64, 48)
FAST = IngestSettings(
    source_timeout_s=30.0,  # longer than any test: only what is under test ends a connection
    first_frame_timeout_s=1.0,
    reconnect=Backoff(initial_s=0.1, max_s=0.2, jitter=0.0),
)


def transport_stream(keyframes: bool) -> bytes:
    """2 s of 64x48 H.264 in MPEG-TS, a keyframe each second; without ``keyframes`` their IDR slices are cut out,
    so SPS, PPS and P-frames still arrive but no frame can ever be decoded."""
    packets = []
    with av.open(io.BytesIO(), mode="w", format="mpegts") as scratch:
        encoder = scratch.add_stream("libx264", rate=FPS, options={"preset": "ultrafast", "g": str(FPS), "bf": "0"})
        encoder.width, encoder.height, encoder.pix_fmt = *SIZE, "yuv420p"
        for i in range(2 * FPS):
            frame = av.VideoFrame.from_ndarray(np.full((SIZE[1], SIZE[0], 3), i * 5, np.uint8), format="rgb24")
            frame.pts = i
            packets += encoder.encode(frame)
        packets += encoder.encode()
    out = io.BytesIO()
    with av.open(out, mode="w", format="mpegts") as container:
        stream = container.add_stream("h264", rate=FPS)
        stream.width, stream.height = SIZE
        for packet in packets:
            if packet.is_keyframe and not keyframes:
                units = bytes(packet).split(b"\x00\x00\x01")
                cut = av.Packet(b"\x00\x00\x01".join(u for u in units if not u or u[0] & 0x1F != 5))  # 5: IDR slice
                cut.pts, cut.dts, cut.time_base = packet.pts, packet.dts, packet.time_base
                packet = cut
            packet.stream = stream
            container.mux(packet)
    return out.getvalue()


@dataclass
class HttpCamera:
    """A camera's HTTP endpoint, by path: ``/live.ts`` sends 2 s of video then stalls with the connection open,
    ``/nokey.ts`` sends video without keyframes forever, ``/401``, ``/403``, ``/404`` answer those statuses.

    ``requests`` counts requests by path, ``logins`` those of them with credentials (FFmpeg sends them only when
    challenged: one request more per open); ``closed`` is set for a path once its client hung up.
    """

    url: str
    requests: Counter[str] = field(default_factory=Counter)
    logins: Counter[str] = field(default_factory=Counter)
    closed: dict[str, threading.Event] = field(default_factory=dict)
    sent: dict[str, threading.Event] = field(default_factory=dict)


@pytest.fixture(scope="module")
def streams() -> dict[str, bytes]:
    return {"/live.ts": transport_stream(keyframes=True), "/nokey.ts": transport_stream(keyframes=False)}


@pytest.fixture
def camera(streams: dict[str, bytes]) -> Iterator[HttpCamera]:
    camera = HttpCamera("")
    for path in ("/live.ts", "/nokey.ts"):
        camera.closed[path], camera.sent[path] = threading.Event(), threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            camera.requests[self.path] += 1
            camera.logins[self.path] += "Authorization" in self.headers
            if self.path in ("/401", "/403", "/404"):
                status = int(self.path[1:])
                self.send_response(status)
                if status == 401:
                    self.send_header("WWW-Authenticate", 'Basic realm="camera"')
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            data = streams[self.path]
            self.send_response(200)
            self.send_header("Content-Type", "video/mp2t")
            self.end_headers()
            try:
                if self.path == "/live.ts":
                    self.wfile.write(data)
                    self.wfile.flush()
                    camera.sent[self.path].set()
                    self.connection.settimeout(60)
                    while self.connection.recv(4096):  # stalled: nothing more to send, wait for the client to go
                        pass
                else:
                    while True:  # the same keyframe-less 2 s again and again, at about 25 KB/s
                        for start in range(0, len(data), 188 * 4):
                            self.wfile.write(data[start : start + 188 * 4])
                            time.sleep(0.02)
                        camera.sent[self.path].set()
            except OSError:  # the client hung up
                pass
            camera.closed[self.path].set()

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    camera.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield camera
    server.shutdown()
    server.server_close()


async def wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"not {what} within {timeout_s} s"
        await asyncio.sleep(0.01)


@pytest.mark.asyncio
@pytest.mark.parametrize("live", [True, False])
async def test_a_stream_that_never_decodes_a_frame_times_out(camera: HttpCamera, live: bool) -> None:
    manager = IngestManager(FAST, registry=CollectorRegistry())
    url = f"{camera.url}/nokey.ts"
    manager.add("nokey", StreamSpec(url, fps=5.0, live=live))
    error = f"{url}: no video frame decoded within 1 s of opening (no keyframe came, or the video cannot be decoded)"
    if live:  # a live source goes on trying: each connection ends after 1 s with the reason
        await wait_for(lambda: manager.status()["nokey"].reconnects >= 2, 5, "reconnected twice")
        status = manager.status()["nokey"]
        assert status.state is StreamState.RECONNECTING and status.error == error
        assert camera.requests["/nokey.ts"] >= 2
        status = await manager.remove("nokey")
    else:  # a file fails for good
        status = await asyncio.wait_for(manager.wait("nokey"), 5)
        assert status.state is StreamState.FAILED and status.error == error
        assert camera.requests["/nokey.ts"] == 1
        await manager.close()
    assert camera.sent["/nokey.ts"].is_set()  # packets came: it was the decoding that never started
    assert status.frames_in == 0


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("path", "reason", "says"),
    [
        ("/401", "unauthorized", "Server returned 401 Unauthorized (authorization failed)"),
        ("/403", "forbidden", "Server returned 403 Forbidden (access denied)"),
        ("/404", "not found", "Server returned 404 Not Found"),
    ],
)
async def test_a_refusing_camera_is_tried_three_times_then_fails(
    camera: HttpCamera, path: str, reason: str, says: str
) -> None:
    manager = IngestManager(FAST, registry=CollectorRegistry())
    url = camera.url.replace("//", "//viewer:wrong-s3cret@") + path
    manager.add("live", StreamSpec(url, live=True))
    live = await asyncio.wait_for(manager.wait("live"), 5)
    await asyncio.sleep(0.5)  # more than the backoff: nobody tries again
    logins = 3 if path == "/401" else 0  # the password went out once per try, only when asked for
    assert (camera.requests[path] - camera.logins[path], camera.logins[path]) == (3, logins)

    safe_url = f"{camera.url.replace('//', '//***@')}{path}"
    assert live.state is StreamState.FAILED and live.reconnects == 2
    assert live.error == (
        f"{reason}: cannot open {safe_url}: {says} (3 tries in a row); "
        "fix the source, then restart the stream (vcflash streams restart live)"
    )
    manager.add("file", StreamSpec(url, live=False))  # a file is not retried at all
    file = await asyncio.wait_for(manager.wait("file"), 5)
    assert file.state is StreamState.FAILED and file.error is not None
    assert file.error.startswith(f"{reason}: cannot open {safe_url}: {says} (1 try)")
    assert camera.requests[path] - camera.logins[path] == 4
    await manager.close()


class SilentServer:
    """A TCP server on 127.0.0.1 that accepts one connection, reads the request, and never answers: a camera
    whose RTSP server hangs. ``closed`` is set once the client closes the connection."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.request = b""
        self.accepted, self.closed = threading.Event(), threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        connection, _ = self.sock.accept()
        with connection:
            self.accepted.set()
            connection.settimeout(60)
            try:
                while data := connection.recv(4096):
                    self.request += data
            except OSError:
                pass
            self.closed.set()

    def close(self) -> None:
        self.sock.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("stuck", ["opening", "reading"])
async def test_removing_a_stuck_source_closes_its_connection_at_once(camera: HttpCamera, stuck: str) -> None:
    settings = IngestSettings(source_timeout_s=30.0, stop_timeout_s=5.0)  # neither ends it during the test
    manager = IngestManager(settings, registry=CollectorRegistry())
    silent = SilentServer()
    try:
        if stuck == "opening":  # the RTSP OPTIONS is never answered: av.open waits
            manager.add("stuck", StreamSpec(f"rtsp://127.0.0.1:{silent.port}/cam"))
            await wait_for(lambda: silent.request.startswith(b"OPTIONS "), 5, "asked")
            closed = silent.closed
        else:  # frames came, then the camera went quiet with the connection open: a read waits
            manager.add("stuck", StreamSpec(f"{camera.url}/live.ts", fps=5.0, live=True))
            await wait_for(lambda: manager.status()["stuck"].frames_in > 0 and camera.sent["/live.ts"].is_set(), 5, "")
            await asyncio.sleep(0.3)  # every frame sent is decoded: the reader is blocked
            closed = camera.closed["/live.ts"]
        assert manager.status()["stuck"].state in (StreamState.STARTING, StreamState.RUNNING)
        assert not closed.is_set()

        start = time.monotonic()
        status = await manager.remove("stuck")
        removed_s = time.monotonic() - start
        assert await asyncio.to_thread(closed.wait, 1.0), "the connection is still open"
        closed_s = time.monotonic() - start
    finally:
        silent.close()
    assert removed_s < 1.0 and closed_s < 1.0, (removed_s, closed_s)
    assert status.state is StreamState.STOPPED and status.error is None
    assert not any(t.name == "ingest-stuck" for t in threading.enumerate())
