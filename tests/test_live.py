"""Live streams into the all-in-one service: a WebRTC (WHIP) sender all the way to an Ask, and eight
concurrent streams with every sampled frame accounted for."""

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aioice.ice
import av
import numpy as np
import pytest
import pytest_asyncio
from aiohttp import ClientSession
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription, VideoStreamTrack
from prometheus_client import CollectorRegistry

from hico import VideoChatFlash
from hico.checkpoint import make_tiny_checkpoint
from ingest.spec import StreamSpec
from ingest.webrtc import ice_host_addresses
from reasoner.engine import AskParams, AskResult
from vcflash.app import App
from vcflash.media import write_test_video
from vcflash.serve.settings import Settings

TOKEN = "live-secret-token-7c1e"
LOOPBACK = ["127.0.0.1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def wait_until(predicate, timeout_s: float, what: str) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


class MovingSquare(VideoStreamTrack):
    async def recv(self) -> av.VideoFrame:
        pts, time_base = await self.next_timestamp()
        image = np.zeros((120, 160, 3), dtype=np.uint8)
        x = (pts // 3000) % 120
        image[40:80, x : x + 40] = (220, 30, 30)
        frame = av.VideoFrame.from_ndarray(image, format="rgb24")
        frame.pts, frame.time_base = pts, time_base
        return frame


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> VideoChatFlash:
    return VideoChatFlash.from_pretrained(make_tiny_checkpoint(tmp_path_factory.mktemp("tiny")))


@pytest_asyncio.fixture
async def app(model: VideoChatFlash, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[App]:
    monkeypatch.setattr(aioice.ice, "get_host_addresses", lambda use_ipv4=True, use_ipv6=True: list(LOOPBACK))
    settings = Settings.from_env(
        {},
        data_dir=tmp_path / "data",
        address="127.0.0.1:0",
        api_token=TOKEN,
        metrics_port=0,
        http_port=free_port(),
        max_wait_ms=10,
        media_root=Path("/"),  # a test video in pytest's temp dir plays as a live stream
    )
    service = App(settings, model, registry=CollectorRegistry())
    await service.start()
    try:
        yield service
    finally:
        await service.stop()


@pytest.mark.asyncio
async def test_webrtc_sender_to_memory_to_an_answer(app: App) -> None:
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver(MovingSquare(), direction="sendonly")
    try:
        with ice_host_addresses(LOOPBACK):
            await pc.setLocalDescription(await pc.createOffer())
        url = f"http://127.0.0.1:{app.settings.server.http_port}/whip/door"
        headers = {"Content-Type": "application/sdp", "Authorization": f"Bearer {TOKEN}"}
        async with ClientSession() as http:
            async with http.post(url, data=pc.localDescription.sdp, headers=headers) as response:
                assert response.status == 201, await response.text()
                answer = await response.text()
            await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
            await wait_until(lambda: app.streams.stored["door"] >= 2, 20, "two clips of the WebRTC stream stored")
            async with http.delete(url, headers=headers) as response:
                assert response.status == 200
    finally:
        await pc.close()

    clips = app.store.clips("door")
    assert [c.seq for c in clips[:2]] == [0, 1]
    assert clips[0].media_end <= clips[1].media_start and abs(clips[0].wall_start - time.time()) < 30
    events = await asyncio.to_thread(
        lambda: list(app.reasoner.ask(AskParams(["door"], "What moves?", max_new_tokens=2)))
    )
    result = events[-1]
    assert isinstance(result, AskResult) and [e.clip.seq for e in result.evidence][:2] == [0, 1]


@pytest.mark.asyncio
async def test_eight_concurrent_streams_lose_no_frame_unaccounted(app: App, tmp_path: Path) -> None:
    video = write_test_video(tmp_path / "cam.mp4", seconds=6, fps=25, size=(160, 120))
    names = [f"cam{i}" for i in range(8)]
    for name in names:
        await app.streams.add(name, StreamSpec(str(video), fps=2.0, realtime=True))
    manager = app.streams.manager
    await wait_until(lambda: all(s.state.value == "finished" for s in manager.status().values()), 30, "streams")
    await wait_until(
        lambda: all(app.streams.stored[n] == manager.status()[n].clips_emitted for n in names), 30, "clips stored"
    )
    for name, s in manager.status().items():
        dropped = sum(s.frames_dropped.values()) - s.frames_dropped["decode_error"]
        assert s.frames_in == 150 and s.frames_sampled == 12, name  # 6 s at 25 fps, sampled at 2 fps
        assert s.frames_sampled == 4 * s.clips_emitted + dropped + s.frames_pending, name
        assert s.clips_emitted == 3 and dropped == 0, name  # this box keeps up with 8 streams
        assert [c.seq for c in app.store.clips(name)] == [0, 1, 2]
