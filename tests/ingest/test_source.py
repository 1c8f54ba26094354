"""open_frames on real files and URLs; redact_url."""

from __future__ import annotations

import functools
import http.server
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import av
import numpy as np
import pytest

from ingest.source import Frame, SourceError, open_frames, redact_url


def read_all(url: str | Path, *, realtime: bool) -> list[Frame]:
    return list(open_frames(str(url), realtime=realtime, stop=threading.Event()))


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def http_root(videos: dict[str, Path]) -> Iterator[str]:
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(videos["2s_ts"].parent))
    handler.log_message = lambda *args: None  # type: ignore[method-assign]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_file_frames_have_pts_and_consistent_wall_times(videos: dict[str, Path]) -> None:
    frames = read_all(videos["2s"], realtime=False)
    assert len(frames) == 50
    assert [f.pts for f in frames] == pytest.approx([i / 25 for i in range(50)])
    wall0 = frames[0].wall_time
    assert [f.wall_time - wall0 for f in frames] == pytest.approx([f.pts for f in frames], abs=1e-6)
    assert abs(wall0 - time.time()) < 5
    assert isinstance(frames[0].image, av.VideoFrame)  # converted only on request
    rgb = frames[0].to_rgb()
    assert rgb.shape == (48, 64, 3) and rgb.dtype == np.uint8


def test_fast_mode_is_fast(videos: dict[str, Path]) -> None:
    start = time.monotonic()
    frames = read_all(videos["20s"], realtime=False)
    assert len(frames) == 500 and frames[-1].pts == pytest.approx(19.96)
    assert time.monotonic() - start < 2.0


def test_realtime_paces_to_the_media_clock(videos: dict[str, Path]) -> None:
    start = time.monotonic()
    frames = read_all(videos["2s"], realtime=True)
    elapsed = time.monotonic() - start
    assert len(frames) == 50
    assert 1.8 <= elapsed < 3.0


def test_stop_ends_realtime_playback_promptly(videos: dict[str, Path]) -> None:
    stop = threading.Event()
    stopped_at: list[float] = []

    def request_stop() -> None:
        stopped_at.append(time.monotonic())
        stop.set()

    frames = open_frames(str(videos["20s"]), realtime=True, stop=stop)
    next(frames)
    threading.Timer(0.2, request_stop).start()
    rest = list(frames)
    assert time.monotonic() - stopped_at[0] < 0.1
    assert 0 < len(rest) < 100


def test_loop_replays_with_both_clocks_running_on(videos: dict[str, Path]) -> None:
    stop = threading.Event()
    frames = []
    for frame in open_frames(str(videos["2s"]), realtime=False, stop=stop, loop=True):
        frames.append(frame)
        if len(frames) == 120:
            stop.set()
    assert len(frames) == 120
    assert [f.pts for f in frames] == pytest.approx([i / 25 for i in range(120)])
    assert frames[119].wall_time - frames[0].wall_time == pytest.approx(119 / 25, abs=1e-6)


def test_reads_over_http(http_root: str) -> None:
    frames = read_all(f"{http_root}/2s.ts", realtime=False)
    assert len(frames) == 50
    assert frames[-1].pts - frames[0].pts == pytest.approx(1.96)


def test_to_rgb_scales_to_a_requested_size(videos: dict[str, Path]) -> None:
    frame = read_all(videos["2s"], realtime=False)[0]
    assert frame.to_rgb((32, 24)).shape == (24, 32, 3)
    array = Frame(pts=0.0, wall_time=0.0, image=np.zeros((48, 64, 3), np.uint8))
    assert array.to_rgb() is array.image
    assert array.to_rgb((32, 24)).shape == (24, 32, 3)


def test_missing_file_raises_source_error(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match=r"cannot open .*missing\.mp4: No such file"):
        read_all(tmp_path / "missing.mp4", realtime=False)


def test_garbage_file_raises_source_error(tmp_path: Path) -> None:
    path = tmp_path / "garbage.mp4"
    path.write_bytes(b"not a video" * 100)
    with pytest.raises(SourceError, match="garbage.mp4"):
        read_all(path, realtime=False)


def test_source_errors_never_carry_credentials() -> None:
    url = f"http://admin:hunter2@127.0.0.1:{closed_port()}/live.ts?token=s3cret&quality=hd"
    with pytest.raises(SourceError) as caught:
        read_all(url, realtime=False)
    message = str(caught.value)
    assert "hunter2" not in message and "s3cret" not in message and "admin" not in message
    assert "***@127.0.0.1" in message and "quality=hd" in message
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("rtsp://user:pass@cam.local:554/stream1", "rtsp://***@cam.local:554/stream1"),
        ("rtsp://user@cam.local/x", "rtsp://***@cam.local/x"),
        ("rtsp://user:p@ss@cam.local/x", "rtsp://***@cam.local/x"),
        ("https://cdn.example/v.m3u8?token=abc&x=1", "https://cdn.example/v.m3u8?token=***&x=1"),
        (
            "http://h/v.mp4?Password=a&access_token=b&X-Amz-Signature=c&api_key=d&fps=1",
            "http://h/v.mp4?Password=***&access_token=***&X-Amz-Signature=***&api_key=***&fps=1",
        ),
        ("http://example.com/video.mp4", "http://example.com/video.mp4"),
        ("http://example.com/v.mp4?a=1&flag", "http://example.com/v.mp4?a=1&flag"),
        ("/data/videos/a@b.mp4", "/data/videos/a@b.mp4"),
        ("file:///data/v.mp4", "file:///data/v.mp4"),
    ],
)
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected
