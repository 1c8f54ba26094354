"""WHIP ingest with real WebRTC peers on loopback: an aiortc sender, headless Chromium, and the errors.

Every peer keeps its ICE candidates on 127.0.0.1: the sender through ``ice_host_addresses``, the
server through ``WebRTCSettings.loopback()``, and as a safety net aioice's address lookup is
patched to loopback for the whole test. No STUN or TURN server is configured anywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aioice.ice
import av
import numpy as np
import pytest
import pytest_asyncio
from aiohttp import ClientSession, web
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription, VideoStreamTrack
from aiortc.mediastreams import AudioStreamTrack
from prometheus_client import CollectorRegistry

from ingest.clips import Clip
from ingest.http import WHIP, create_whip_app, start_http
from ingest.pipeline import IngestManager, StreamState
from ingest.source import Frame
from ingest.spec import StreamSpec
from ingest.streams import Streams
from ingest.webrtc import FrameBuffer, WebRTCSession, WebRTCSettings, ice_host_addresses
from memory.embedded import EmbeddedStore
from memory.records import Retention
from vcflash.serve.settings import IngestSettings

# Ingest mechanics read local test videos: any file is allowed (the file policy has its own tests).
ROOT = Path("/")
FILES = IngestSettings(media_root=ROOT)

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SDP = {"Content-Type": "application/sdp"}
LOOPBACK = ["127.0.0.1"]

# The sender's frames: a 16-bit frame counter, one bit per 40 x 120 block, black or white.
WIDTH, HEIGHT, SENDER_FPS = 320, 240, 30
BITS, COLS, BLOCK_W, BLOCK_H = 16, 8, 40, 120


def pattern(counter: int) -> np.ndarray:
    image = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    for bit in range(BITS):
        if counter >> bit & 1:
            row, col = divmod(bit, COLS)
            image[row * BLOCK_H : (row + 1) * BLOCK_H, col * BLOCK_W : (col + 1) * BLOCK_W] = 255
    return image


def read_pattern(image: np.ndarray) -> int:
    counter = 0
    for bit in range(BITS):
        row, col = divmod(bit, COLS)
        block = image[row * BLOCK_H + 10 : (row + 1) * BLOCK_H - 10, col * BLOCK_W + 10 : (col + 1) * BLOCK_W - 10]
        counter |= int(block.mean() > 128) << bit
    return counter


class CounterTrack(VideoStreamTrack):
    """320x240 at 30 fps (VideoStreamTrack's pacing); frame n shows n, presented at n / 30 s."""

    async def recv(self) -> av.VideoFrame:
        pts, time_base = await self.next_timestamp()
        frame = av.VideoFrame.from_ndarray(pattern(int(pts * time_base * SENDER_FPS + 0.5)), format="rgb24")
        frame.pts, frame.time_base = pts, time_base
        return frame


def candidate_addresses(sdp: str) -> list[str]:
    return [line.split()[4] for line in sdp.splitlines() if line.startswith("a=candidate:")]


@dataclass
class Whip:
    manager: IngestManager
    app: web.Application
    url: str  # http://127.0.0.1:port
    http: ClientSession

    async def post(self, stream: str, sdp: str, *, headers: dict[str, str] | None = None, query: str = ""):
        async with self.http.post(
            f"{self.url}/whip/{stream}{query}", data=sdp, headers=AUTH | SDP if headers is None else headers
        ) as response:
            return response.status, response.headers.copy(), await response.text()

    async def delete(self, stream: str) -> tuple[int, str]:
        async with self.http.delete(f"{self.url}/whip/{stream}", headers=AUTH) as response:
            return response.status, await response.text()


@pytest.fixture
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Anything that gathers candidates without choosing its addresses gets loopback too."""
    monkeypatch.setattr(aioice.ice, "get_host_addresses", lambda use_ipv4=True, use_ipv6=True: list(LOOPBACK))


@pytest_asyncio.fixture
async def whip(loopback_only: None, tmp_path: Path) -> AsyncIterator[Whip]:
    manager = IngestManager(IngestSettings(media_root=ROOT, stop_timeout_s=2.0), registry=CollectorRegistry())
    store = EmbeddedStore(tmp_path / "memory.sqlite3")
    streams = Streams(manager, store, Retention())
    app = create_whip_app(streams, token=TOKEN, webrtc=WebRTCSettings.loopback(connect_timeout_s=10.0))
    runner, port = await start_http(app, "127.0.0.1", 0)
    async with ClientSession() as http:
        try:
            yield Whip(manager, app, f"http://127.0.0.1:{port}", http)
        finally:
            await runner.cleanup()  # closes the sessions
            await manager.close()
            store.close()


class Sender:
    """An aiortc peer sending one CounterTrack, negotiated over WHIP."""

    def __init__(self, *, audio: bool = False, video: bool = True) -> None:
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        if video:
            self.pc.addTransceiver(CounterTrack(), direction="sendonly")
        if audio:
            self.pc.addTransceiver(AudioStreamTrack(), direction="sendonly")

    async def offer(self) -> str:
        with ice_host_addresses(LOOPBACK):
            await self.pc.setLocalDescription(await self.pc.createOffer())
        return self.pc.localDescription.sdp

    async def publish(self, whip: Whip, stream: str, query: str = "") -> tuple[int, dict, str]:
        status, headers, body = await whip.post(stream, await self.offer(), query=query)
        if status == 201:
            await self.pc.setRemoteDescription(RTCSessionDescription(sdp=body, type="answer"))
        return status, headers, body

    async def close(self) -> None:
        await self.pc.close()


@contextlib.asynccontextmanager
async def sender(**kwargs: bool) -> AsyncIterator[Sender]:
    s = Sender(**kwargs)
    try:
        yield s
    finally:
        await s.close()


async def next_clip(manager: IngestManager, timeout_s: float) -> Clip:
    return await asyncio.wait_for(manager.clips.get(), timeout_s)


async def wait_until(predicate, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


# ---------------------------------------------------------------------------- aiortc sender


@pytest.mark.asyncio
async def test_aiortc_sender_streams_1_fps_clips_until_delete(whip: Whip) -> None:
    async with asyncio.timeout(25), sender() as peer:
        status, headers, answer = await peer.publish(whip, "pc")
        assert status == 201, answer
        assert headers["Content-Type"] == "application/sdp"
        assert headers["Location"] == "/whip/pc"
        assert answer.startswith("v=0")
        addresses = candidate_addresses(answer)
        assert addresses and set(addresses) == {"127.0.0.1"}  # the server's setting, not the patch alone
        assert whip.manager.status()["pc"].url == "whip://pc"

        clips = [await next_clip(whip.manager, 10.0), await next_clip(whip.manager, 6.0)]
        now = time.time()
        media = [t for clip in clips for t in clip.media_times]
        for clip, seq in zip(clips, (0, 1), strict=True):
            assert (clip.stream_id, clip.seq, clip.fps) == ("pc", seq, 1.0)
            assert clip.frames.shape == (4, HEIGHT, WIDTH, 3)
            assert all(now - 10 < t <= now for t in clip.wall_times)
        assert media[0] < 1 / SENDER_FPS + 1e-6  # media time starts at the first frame
        assert all(0.99 < b - a < 1.0 + 1.5 / SENDER_FPS for a, b in zip(media, media[1:], strict=False))
        # The picture is the frame its media time says: counter / 30 s == media time, frame for frame.
        counters = [read_pattern(frame) for clip in clips for frame in clip.frames]
        offsets = [c / SENDER_FPS - t for c, t in zip(counters, media, strict=True)]
        assert max(offsets) - min(offsets) < 1e-6, (counters, media)
        assert counters == sorted(counters) and len(set(counters)) == 8

        async with whip.http.get(f"{whip.url}/whip/pc", headers=AUTH) as response:
            assert response.status == 200
            info = await response.json()
        assert info["session"]["state"] == "receiving"
        assert info["session"]["connection_state"] == "connected"
        assert (info["session"]["width"], info["session"]["height"]) == (WIDTH, HEIGHT)
        assert info["stream"]["state"] == "running" and info["stream"]["clips_emitted"] == 2

        session = whip.app[WHIP].sessions["pc"]
        status, body = await whip.delete("pc")
        assert status == 200, body
        info = json.loads(body)
        assert info["stream"]["state"] == StreamState.STOPPED
        assert info["session"]["state"] == "closed"
        assert session.closed and "pc" not in whip.manager.names() and "pc" not in whip.app[WHIP].sessions
        await wait_until(lambda: peer.pc.connectionState == "closed")  # the sender hears the session end
        assert (await whip.delete("pc"))[0] == 404


@pytest.mark.asyncio
async def test_sender_leaving_finishes_stream_and_republishing_continues_it(whip: Whip) -> None:
    events: list[tuple[str, int]] = []
    whip.app[WHIP].on_add = lambda name, status: events.append((name, status.next_seq))
    async with asyncio.timeout(20):
        async with sender() as first:
            status, _, body = await first.publish(whip, "cam-2", query="?fps=4")
            assert status == 201, body
            clip = await next_clip(whip.manager, 8.0)
            assert (clip.seq, clip.fps) == (0, 4.0)
            session = whip.app[WHIP].sessions["cam-2"]
        # The sender closed its peer connection: the session ends, the stream finishes on its own.
        final = await asyncio.wait_for(whip.manager.wait("cam-2"), 8.0)
        assert final.state is StreamState.FINISHED and final.error is None
        assert session.stats().state == "closed"
        stats = session.stats()
        assert stats.frames_received == stats.frames_read + stats.frames_dropped + stats.frames_buffered
        while not whip.manager.clips.empty():
            last = whip.manager.clips.get_nowait()
            clip = last
        next_seq = whip.manager.status()["cam-2"].next_seq

        async with sender() as second:  # the same name again (OBS reconnecting): carries on
            status, _, body = await second.publish(whip, "cam-2", query="?fps=4")
            assert status == 201, body
            resumed = await next_clip(whip.manager, 8.0)
            assert resumed.seq == next_seq
            assert resumed.media_start > clip.media_times[-1]
            assert (await whip.delete("cam-2"))[0] == 200
        assert events == [("cam-2", 0), ("cam-2", next_seq)]


@pytest.mark.asyncio
async def test_slow_reader_drops_oldest_frames_and_never_blocks_aiortc(loopback_only: None) -> None:
    async with asyncio.timeout(15), sender() as peer:
        session = WebRTCSession("slow", WebRTCSettings.loopback(buffer_frames=3))
        answer = await session.accept(await peer.offer())
        await peer.pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
        await wait_until(lambda: session.stats().frames_received >= 20, 8.0)  # nobody reads yet
        stats = session.stats()
        assert stats.frames_buffered == 3 and stats.frames_dropped == stats.frames_received - 3

        stop, got = threading.Event(), []

        def read() -> None:
            for frame in session.frames(stop):
                got.append(frame)
                if len(got) == 10:
                    stop.set()

        await asyncio.to_thread(read)
        pts = [frame.pts for frame in got]
        assert pts == sorted(pts) and len(got) == 10
        stats = session.stats()
        assert stats.frames_received == stats.frames_read + stats.frames_dropped + stats.frames_buffered
        assert stats.frames_read == 10
        await wait_until(lambda: session.closed)  # the reader stopping closes the session
        await session.wait_closed()


@pytest.mark.asyncio
async def test_sender_that_never_connects_fails_the_stream(whip: Whip) -> None:
    whip.app[WHIP].webrtc = WebRTCSettings.loopback(connect_timeout_s=1.0)
    async with asyncio.timeout(10):
        async with sender() as ghost, sender() as rival:  # the ghost never applies the answer
            offers = await asyncio.gather(ghost.offer(), rival.offer())
            results = await asyncio.gather(*(whip.post("ghost", offer) for offer in offers))
            assert sorted(status for status, _, _ in results) == [201, 409]  # one name, one publisher
            final = await asyncio.wait_for(whip.manager.wait("ghost"), 5.0)
        assert final.state is StreamState.FAILED
        assert "no video within 1 s of the answer" in final.error, final.error
        assert whip.app[WHIP].sessions["ghost"].stats().state == "failed"
        assert (await whip.delete("ghost"))[0] == 200


@pytest.mark.asyncio
async def test_killed_sender_fails_the_stream_within_5_s(whip: Whip) -> None:
    """A sender process killed outright (no DELETE, no BYE, no DTLS close): ICE consent alone would take 30 s."""
    script = Path(__file__).with_name("whip_sender.py")
    sender_process = await asyncio.create_subprocess_exec(
        sys.executable, str(script), f"{whip.url}/whip/gone", TOKEN, stdout=asyncio.subprocess.PIPE
    )
    try:
        async with asyncio.timeout(30):
            assert sender_process.stdout is not None
            assert await sender_process.stdout.readline() == b"published\n"
            await next_clip(whip.manager, 15.0)
            assert whip.manager.status()["gone"].state is StreamState.RUNNING
            sender_process.kill()
            killed = time.monotonic()
            final = await whip.manager.wait("gone")
            detected_s = time.monotonic() - killed
    finally:
        with contextlib.suppress(ProcessLookupError):
            sender_process.kill()
        await sender_process.wait()

    assert detected_s < 5.0, detected_s
    assert final.state is StreamState.FAILED
    assert final.error is not None and "the sender went silent: no packet for 3." in final.error, final.error
    assert whip.app[WHIP].sessions["gone"].stats().state == "failed"


# ---------------------------------------------------------------------------- headless Chromium

PAGE = """<!doctype html><meta charset="utf-8"><title>whip sender</title><script>
const log = (message) => fetch("/log", {method: "POST", body: String(message)});
(async () => {
  try {
    const media = await navigator.mediaDevices.getUserMedia({video: true});
    const pc = new RTCPeerConnection({iceServers: []});
    pc.onconnectionstatechange = () => log("connection " + pc.connectionState);
    for (const track of media.getVideoTracks()) pc.addTrack(track, media);
    await pc.setLocalDescription(await pc.createOffer());
    await new Promise((resolve) => {
      if (pc.iceGatheringState === "complete") return resolve();
      pc.onicegatheringstatechange = () => pc.iceGatheringState === "complete" && resolve();
    });
    const response = await fetch(WHIP_URL, {
      method: "POST",
      headers: {"Content-Type": "application/sdp", "Authorization": "Bearer " + TOKEN},
      body: pc.localDescription.sdp,
    });
    const answer = await response.text();
    if (response.status !== 201) throw new Error("WHIP answered " + response.status + ": " + answer);
    await pc.setRemoteDescription({type: "answer", sdp: answer});
    log("answered " + response.headers.get("Location"));
  } catch (error) {
    log("error " + error);
  }
})();
</script>"""


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(chromium() is None, reason="chromium is not installed (apt-get install chromium)")
@pytest.mark.asyncio
async def test_headless_chromium_fake_camera_publishes_over_whip(whip: Whip, tmp_path: Path) -> None:
    messages: list[str] = []

    async def page(request: web.Request) -> web.Response:
        script = f"const WHIP_URL = {json.dumps(whip.url + '/whip/cam')}; const TOKEN = {json.dumps(TOKEN)};"
        return web.Response(text=PAGE.replace("<script>", f"<script>{script}", 1), content_type="text/html")

    async def log(request: web.Request) -> web.Response:
        messages.append(await request.text())
        return web.Response(status=204)

    site = web.Application()
    site.router.add_get("/", page)
    site.router.add_post("/log", log)
    runner, port = await start_http(site, "127.0.0.1", 0)  # another origin: the POST needs CORS
    browser_log = tmp_path / "chromium.log"
    with browser_log.open("wb") as output:
        browser = await asyncio.create_subprocess_exec(
            chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--use-fake-device-for-media-stream",
            "--use-fake-ui-for-media-stream",
            "--allow-loopback-in-peer-connection",
            "--remote-debugging-port=0",
            f"http://127.0.0.1:{port}/",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=output,
            stderr=output,
            start_new_session=True,  # its own process group: its helpers are killed with it
        )
    try:
        async with asyncio.timeout(20):
            try:
                clip = await next_clip(whip.manager, 15.0)
            except TimeoutError:
                pytest.fail(
                    f"no clip from chromium in 15 s; page: {messages}; browser: {browser_log.read_text()[-2000:]}"
                )
            assert clip.stream_id == "cam" and clip.seq == 0
            assert clip.frames.shape[0] == 4 and clip.frames.shape[-1] == 3
            assert clip.frames.std() > 1  # the fake camera's moving picture, not an empty frame
            await wait_until(lambda: "connection connected" in messages)
            assert "answered /whip/cam" in messages, messages
            status, body = await whip.delete("cam")
            assert status == 200 and json.loads(body)["stream"]["state"] == StreamState.STOPPED
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(browser.pid, signal.SIGKILL)
        await browser.wait()
        await runner.cleanup()


# ---------------------------------------------------------------------------- errors


@pytest.mark.asyncio
async def test_whip_rejects_bad_requests_with_clear_statuses(whip: Whip) -> None:
    async with asyncio.timeout(15):
        async with sender() as peer:
            offer = await peer.offer()

        assert (await whip.post("x", offer, headers=SDP))[0] == 401
        status, headers, body = await whip.post("x", offer, headers={"Authorization": "Bearer nope"} | SDP)
        assert (status, headers["WWW-Authenticate"]) == (401, 'Bearer error="invalid_token"') and "invalid" in body
        status, _, body = await whip.post("x", offer, headers=AUTH | {"Content-Type": "text/plain"})
        assert status == 415 and "application/sdp" in body
        status, _, body = await whip.post("x", offer, headers=AUTH)
        assert status == 415
        status, _, body = await whip.post("x", "v=0\r\n" + "a=x\r\n" * 20_000)
        assert status == 413 and "larger than 65536 bytes" in body

        async def chunks():  # no Content-Length: the limit holds while reading
            for _ in range(100):
                yield b"a=x" * 1000 + b"\r\n"

        async with whip.http.post(f"{whip.url}/whip/x", data=chunks(), headers=AUTH | SDP) as response:
            assert response.status == 413
        status, _, body = await whip.post("x", "hello, not sdp")
        assert status == 400 and "not an SDP offer" in body
        status, _, body = await whip.post("x", "v=0\r\nm=video notaport RTP/AVP x\r\n")
        assert status == 400 and "malformed SDP" in body, body
        status, _, body = await whip.post("bad name!", offer)
        assert status == 400 and "stream name" in body
        status, _, body = await whip.post("x", offer, query="?fps=0")
        assert status == 400 and "fps" in body

        async with sender(audio=True, video=False) as audio_only:
            status, _, body = await whip.post("x", await audio_only.offer())
        assert status == 400 and "no video" in body

        h265 = offer.replace("VP8/90000", "H265/90000").replace("H264/90000", "H265/90000")
        status, _, body = await whip.post("x", h265)
        assert status == 400 and "no codec in common" in body, body
        far = offer.replace(" 127.0.0.1 ", " 192.0.2.1 ")  # text only: nothing is sent there
        status, _, body = await whip.post("x", far)
        assert status == 400 and "no usable ICE candidates" in body and "trickle" in body
        trickle = "\r\n".join(line for line in offer.splitlines() if not line.startswith("a=candidate:"))
        assert (await whip.post("x", trickle))[0] == 400

        assert (await whip.delete("nobody"))[0] == 404
        assert whip.manager.names() == []

        def forever(stop: threading.Event):
            while not stop.wait(0.05):
                yield Frame(pts=time.monotonic(), wall_time=time.time(), image=np.zeros((8, 8, 3), np.uint8))

        whip.manager.add("busy", StreamSpec("test://busy"), source=forever)  # any live stream holds its name
        status, _, body = await whip.post("busy", offer)
        assert status == 409 and "already exists" in body

        async def refuse(name: str, status: object) -> None:
            raise web.HTTPServiceUnavailable(text="too many streams\n")

        whip.app[WHIP].on_add = refuse
        async with sender() as peer:
            status, _, body = await peer.publish(whip, "refused")
        assert (status, body) == (503, "too many streams\n")
        assert "refused" not in whip.manager.names() and "refused" not in whip.app[WHIP].sessions

        async with whip.http.options(
            f"{whip.url}/whip/x",
            headers={"Origin": "http://127.0.0.1:1", "Access-Control-Request-Method": "POST"},
        ) as response:
            assert response.status == 204
            assert response.headers["Access-Control-Allow-Origin"] == "*"
            assert "Authorization" in response.headers["Access-Control-Allow-Headers"]
            assert response.headers["Accept-Post"] == "application/sdp"
        async with whip.http.get(f"{whip.url}/healthz") as response:
            assert response.status == 200


def test_frame_buffer_keeps_newest_and_counts_drops() -> None:
    buffer = FrameBuffer(2)
    frames = [Frame(pts=i, wall_time=0.0, image=np.zeros((2, 2, 3), np.uint8)) for i in range(5)]
    assert [buffer.put(f) for f in frames] == [True, True, False, False, False]
    assert (buffer.received, buffer.dropped, len(buffer)) == (5, 3, 2)
    assert buffer.get(0.0).pts == 3
    assert buffer.get(0.0).pts == 4
    assert buffer.get(0.01) is None
    buffer.put(frames[0])
    buffer.close()
    assert not buffer.put(frames[1])
    assert buffer.get(0.0).pts == 0  # frames buffered before closing are still read
    with pytest.raises(EOFError):
        buffer.get(0.0)


def test_ice_host_addresses_applies_per_context(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(aioice.ice, "get_host_addresses", lambda use_ipv4=True, use_ipv6=True: ["198.51.100.7"])
    with ice_host_addresses(["127.0.0.1", "::1"]):
        assert aioice.ice.get_host_addresses(use_ipv4=True, use_ipv6=True) == ["127.0.0.1", "::1"]
        assert aioice.ice.get_host_addresses(use_ipv4=True, use_ipv6=False) == ["127.0.0.1"]
        with ice_host_addresses(None):
            assert aioice.ice.get_host_addresses(use_ipv4=True, use_ipv6=True) == ["198.51.100.7"]
    assert aioice.ice.get_host_addresses(use_ipv4=True, use_ipv6=True) == ["198.51.100.7"]


def test_settings_validate_and_loopback_filters_remote_candidates() -> None:
    settings = WebRTCSettings.loopback()
    assert settings.allows_remote("127.0.0.1") and settings.allows_remote("127.0.1.1")
    assert not settings.allows_remote("192.0.2.1") and not settings.allows_remote("abcd.local")
    assert WebRTCSettings().allows_remote("abcd.local")
    with pytest.raises(ValueError):
        WebRTCSettings(host_addresses=("not-an-ip",))
    with pytest.raises(ValueError):
        WebRTCSettings(buffer_frames=0)


@pytest.mark.asyncio
async def test_start_http_keeps_candidates_on_loopback_when_bound_there(tmp_path: Path) -> None:
    store = EmbeddedStore(tmp_path / "memory.sqlite3")
    app = create_whip_app(Streams(IngestManager(FILES, registry=CollectorRegistry()), store, Retention()), token=None)
    assert app[WHIP].webrtc is None
    runner, port = await start_http(app, "127.0.0.1", 0)
    try:
        assert port > 0 and app[WHIP].settings == WebRTCSettings.loopback()
    finally:
        await runner.cleanup()
        store.close()
