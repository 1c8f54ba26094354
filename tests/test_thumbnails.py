"""Viewable evidence end to end (issue 13, first slice): `vcflash up` on both memory backends keeps each clip's
middle frame as a JPEG, served by Memory.GetThumbnails, by HTTP GET on the WHIP port and by `vcflash memory
thumbnails`. The source is a video whose colour changes every second, so each thumbnail shows which frame it is."""

from __future__ import annotations

import io
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from hico import VideoChatFlash
from hico.checkpoint import make_tiny_checkpoint
from tests.test_app import TOKEN, LoopThread, Served, code_of, free_port, start_app, wait_done
from vcflash import cli
from vcflash.media import write_video

SECONDS, FPS = 16, 10  # 16 s at 1 fps: 4 clips
SIZE = (128, 72)  # 16:9, so a thumbnail is 320 x 180


def colour(second: int) -> tuple[int, int, int]:
    return ((40 * second) % 200 + 30, 200 - (25 * second) % 150, (70 * second) % 220 + 20)


def decode(jpeg: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))


def check_thumbnail(jpeg: bytes, seq: int) -> None:
    image = decode(jpeg)
    assert image.shape == (180, 320, 3)
    middle = 4 * seq + 2  # a clip samples seconds 4 seq .. 4 seq + 3; its thumbnail is the third of them
    assert np.abs(image.reshape(-1, 3).mean(0) - colour(middle)).max() < 12, (seq, image.reshape(-1, 3).mean(0))


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> VideoChatFlash:
    return VideoChatFlash.from_pretrained(make_tiny_checkpoint(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    w, h = SIZE
    frames = (np.full((h, w, 3), colour(i // FPS), dtype=np.uint8) for i in range(SECONDS * FPS))
    return write_video(tmp_path_factory.mktemp("videos") / "colours.mp4", frames, FPS)


@pytest.fixture(scope="module", params=["embedded", "redis"])
def served(
    request: pytest.FixtureRequest, model: VideoChatFlash, video: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Served, int]]:
    """An App with its HTTP port on, holding stream cam (4 clips); yields it and the HTTP port."""
    redis_url = request.getfixturevalue("redis_server").fresh_url() if request.param == "redis" else None
    runner = LoopThread()
    port = free_port()
    s = start_app(runner, model, http_port=port, data_dir=tmp_path_factory.mktemp("data"), redis_url=redis_url)
    try:
        s.client.add_stream("cam", str(video), fps=1, realtime=False)
        wait_done(s.client, "cam")
        yield s, port
    finally:
        s.stop()
        runner.close()


def get(port: int, path: str, token: str | None = TOKEN) -> tuple[int, str, bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, r.headers["Content-Type"], r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read()


def test_each_stored_clip_has_its_middle_frame_as_a_320_px_jpeg(served: tuple[Served, int]) -> None:
    c = served[0].client
    thumbnails = list(c.thumbnails("cam"))
    assert [t.clip.seq for t in thumbnails] == [0, 1, 2, 3]
    for t in thumbnails:
        check_thumbnail(t.jpeg, t.clip.seq)
    assert [t.clip.seq for t in c.thumbnails("cam", 4, 12)] == [1, 2]  # the clips that overlap the range
    assert [t.clip.seq for t in c.thumbnails("cam", limit=3)] == [0, 1, 2]
    wall = c.thumbnails("cam", thumbnails[1].clip.wall_start, thumbnails[2].clip.wall_end, wall_clock=True)
    assert [t.clip.seq for t in wall] == [1, 2]
    (stats,) = c.stats("cam")
    assert stats.bytes > sum(len(t.jpeg) for t in thumbnails)  # counted in the stream's bytes

    assert code_of(lambda: list(c.thumbnails("nope"))) == grpc.StatusCode.NOT_FOUND
    for name in ("", "..", "a/b", "x" * 65, "cam\n"):
        assert code_of(lambda n=name: list(c.thumbnails(n))) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: list(c.thumbnails("cam", 8, 4))) == grpc.StatusCode.INVALID_ARGUMENT


def test_http_serves_a_thumbnail_to_the_token_holder_only(served: tuple[Served, int]) -> None:
    s, port = served
    (first,) = list(s.client.thumbnails("cam", limit=1))
    status, kind, body = get(port, "/v1/streams/cam/thumbnails/0.jpg")
    assert (status, kind, body) == (200, "image/jpeg", first.jpeg)
    check_thumbnail(get(port, "/v1/streams/cam/thumbnails/3.jpg")[2], 3)

    assert get(port, "/v1/streams/cam/thumbnails/0.jpg", token=None)[0] == 401
    assert get(port, "/v1/streams/cam/thumbnails/0.jpg", token="wrong-token-0123456789")[0] == 401
    assert get(port, "/v1/streams/nope/thumbnails/0.jpg")[0] == 404  # an unknown stream
    assert get(port, "/v1/streams/cam/thumbnails/4.jpg")[0] == 404  # an unknown clip
    assert get(port, f"/v1/streams/cam/thumbnails/{2**64}.jpg")[0] == 404
    assert get(port, "/v1/streams/cam/thumbnails/-1.jpg")[0] == 404
    assert get(port, "/v1/streams/nope/thumbnails/0.jpg", token=None)[0] == 401  # nothing said before the token
    for name in ("a%20b", "cam%0A", "x" * 65, "%2E%2E", "cam%2F..%2Fcam"):
        status, _, body = get(port, f"/v1/streams/{name}/thumbnails/0.jpg")
        assert status in (400, 404), (name, status)
        assert b"Traceback" not in body


def test_the_cli_writes_a_range_s_thumbnails(
    served: tuple[Served, int], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s, _ = served
    monkeypatch.setenv("VCFLASH_API_TOKEN", TOKEN)
    out = tmp_path / "thumbs"
    argv = ["memory", "thumbnails", "cam", str(out), "--address", s.address, "--from", "4", "--to", "12"]
    assert cli.main(argv) == 0
    files = sorted(out.iterdir())
    assert [f.name for f in files] == ["0000000001.jpg", "0000000002.jpg"]
    for seq, f in zip((1, 2), files, strict=True):
        check_thumbnail(f.read_bytes(), seq)
