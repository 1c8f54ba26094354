"""Recordings end to end (issue 13): `vcflash up` with `record=True` stream-copies a file source into MPEG-TS
segments, cuts a wall-clock moment as an MP4 by remux over HTTP (bearer token), and through the client and the CLI;
GetStats and ListStreams count the bytes; retention and deleting a stream's memory take the segments; a restarted
server finds them again."""

from __future__ import annotations

import io
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import av
import pytest

from hico import VideoChatFlash
from hico.checkpoint import make_tiny_checkpoint
from ingest.recording import stream_dir_name
from tests.test_app import TOKEN, LoopThread, Served, free_port, start_app, wait_done
from vcflash import cli
from vcflash.app import App
from vcflash.media import write_test_video

FPS = 25
SEGMENT_S = 2.0  # the video (one keyframe a second) makes segments of 2 s
MAX_RANGE_S = 30.0


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> VideoChatFlash:
    return VideoChatFlash.from_pretrained(make_tiny_checkpoint(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_test_video(tmp_path_factory.mktemp("videos") / "12s.mp4", seconds=12, fps=FPS, size=(64, 48))


def start_recording_app(model: VideoChatFlash, data_dir: Path, port: int) -> tuple[Served, LoopThread]:
    runner = LoopThread()
    served = start_app(
        runner,
        model,
        http_port=port,
        data_dir=data_dir,
        record_segment_s=SEGMENT_S,
        max_recording_range_s=MAX_RANGE_S,
    )
    return served, runner


@pytest.fixture(scope="module")
def served(
    model: VideoChatFlash, video: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Served, int, float]]:
    """An App holding stream cam (12 s recorded, 3 clips); yields it, its HTTP port and cam's first wall time."""
    port = free_port()
    s, runner = start_recording_app(model, tmp_path_factory.mktemp("data"), port)
    try:
        s.client.add_stream("cam", str(video), fps=1, realtime=False, record=True)
        wait_done(s.client, "cam")
        first = s.client.clips("cam")[0].wall_start
        yield s, port, first
    finally:
        s.stop()
        runner.close()


def get(port: int, path: str, token: str | None = TOKEN) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def frame_times(mp4: bytes) -> list[float]:
    with av.open(io.BytesIO(mp4)) as container:
        return [f.time for f in container.decode(video=0)]


def check_cut(mp4: bytes, first_wall: float, start: float, end: float) -> None:
    """The MP4 decodes and its frames, placed on the wall clock, cover [start, end) at the source's rate."""
    times = [first_wall + t for t in frame_times(mp4)]
    assert times[0] <= start + 1e-3 and times[0] > start - 1.01  # from the keyframe (1 s GOP) before start
    assert times[-1] >= end - 1.5 / FPS
    assert len(times) == pytest.approx((times[-1] - times[0]) * FPS + 1, abs=1)  # every frame, no gaps


def test_a_recorded_file_is_kept_in_segments_counted_in_stats(served: tuple[Served, int, float]) -> None:
    s, _, _ = served
    root = s.settings.server.data_dir / "recordings" / stream_dir_name("cam")
    segments = sorted(root.glob("*.ts"))
    assert len(segments) == 6, segments  # 12 s in segments of 2 s
    assert (root / "stream").read_text() == "cam"
    for path in segments:
        with av.open(str(path)) as container:  # each plays on its own: it starts with a keyframe
            packets = [p for p in container.demux(video=0) if p.size]
            assert packets[0].is_keyframe and len(packets) == 2 * FPS
    total = sum(p.stat().st_size for p in segments)
    (stats,) = s.client.stats("cam")
    assert stats.recording_bytes == total
    assert s.client.stream("cam").recording_bytes == total


def test_http_cuts_a_moment_as_an_mp4_for_the_token_holder_only(served: tuple[Served, int, float]) -> None:
    s, port, w0 = served
    start, end = w0 + 3.3, w0 + 7.1  # across three segments
    status, headers, body = get(port, f"/v1/streams/cam/recording.mp4?start={start}&end={end}")
    assert status == 200 and headers["Content-Type"] == "video/mp4"
    check_cut(body, float(headers["X-Recording-Start"]), start, end)

    path = f"/v1/streams/cam/recording.mp4?start={start}&end={end}"
    assert get(port, path, token=None)[0] == 401
    assert get(port, path, token="wrong-token-0123456789")[0] == 401
    assert get(port, "/v1/streams/nope/recording.mp4?start=1&end=2", token=None)[0] == 401  # nothing said before
    assert get(port, f"/v1/streams/nope/recording.mp4?start={start}&end={end}")[0] == 404
    assert get(port, f"/v1/streams/cam/recording.mp4?start={w0 + 100}&end={w0 + 110}")[0] == 404  # after it
    assert get(port, f"/v1/streams/cam/recording.mp4?start={w0 - 60}&end={w0 - 50}")[0] == 404  # before it
    status, _, body = get(port, f"/v1/streams/cam/recording.mp4?start={w0}&end={w0 + MAX_RANGE_S + 1}")
    assert status == 400 and b"VCFLASH_MAX_RECORDING_RANGE_S" in body  # a huge range is bounded
    for query in (f"start={end}&end={start}", "start=1", "start=nan&end=2", "start=x&end=2", "start=1&end=inf"):
        status, _, body = get(port, f"/v1/streams/cam/recording.mp4?{query}")
        assert status == 400, (query, status, body)
    for name in ("a%20b", "cam%0A", "x" * 65, "%2E%2E", "cam%2F..%2Fcam"):
        status, _, body = get(port, f"/v1/streams/{name}/recording.mp4?start={start}&end={end}")
        assert status in (400, 404), (name, status)
        assert b"Traceback" not in body


def test_the_client_and_the_cli_write_the_mp4(
    served: tuple[Served, int, float],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    s, port, w0 = served
    url = f"http://127.0.0.1:{port}"
    start, end = w0 + 8.5, w0 + 11.0
    from vcflash.client import Client

    with Client(s.address, TOKEN, http_url=url) as c:
        first, last = c.recording("cam", start, end, tmp_path / "a.mp4")
        check_cut((tmp_path / "a.mp4").read_bytes(), first, start, end)
        assert first <= start and last >= end - 1.5 / FPS
        with pytest.raises(urllib.error.HTTPError) as e:
            c.recording("cam", w0 + 100, w0 + 101, tmp_path / "b.mp4")
        assert e.value.code == 404

    monkeypatch.setenv("VCFLASH_API_TOKEN", TOKEN)
    out = tmp_path / "cli.mp4"
    argv = ["memory", "recording", "cam", str(start), str(end), str(out), "--address", s.address, "--http-url", url]
    assert cli.main(argv) == 0
    check_cut(out.read_bytes(), first, start, end)
    capsys.readouterr()
    assert cli.main(["streams", "ls", "--address", s.address]) == 0
    (line,) = [row for row in capsys.readouterr().out.splitlines() if row.startswith("cam\t")]
    assert f"recording {s.client.stream('cam').recording_bytes / 1e6:.1f} MB" in line


def test_retention_and_deleted_memory_take_the_segments(served: tuple[Served, int, float], video: Path) -> None:
    s, _, _ = served
    c = s.client
    c.add_stream("aged", str(video), fps=1, realtime=False, record=True, retention_max_age_s=3600)
    wait_done(c, "aged")
    clips = c.clips("aged")
    app: App = s.app
    recording = app.streams.recordings.stream("aged")  # type: ignore[union-attr]
    assert len(recording.segments()) == 6
    # an hour after clip 0 ended, retention takes it: the segments before clip 1 go with it
    app.store.enforce_retention(now=clips[0].wall_end + 3600 + 0.5)
    s.runner.run(app.streams.sweep_recordings())
    kept = recording.segments()
    assert [round(x.start - clips[0].wall_start) for x in kept] == [4, 6, 8, 10]
    assert c.stats("aged")[0].recording_bytes == sum(x.bytes for x in kept)

    c.remove_stream("aged", delete_memory=True)
    assert not (s.settings.server.data_dir / "recordings" / stream_dir_name("aged")).exists()


def test_a_restarted_server_finds_its_segments_and_skips_a_broken_one(
    model: VideoChatFlash, video: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    s, runner = start_recording_app(model, tmp_path, port)
    try:
        s.client.add_stream("cam", str(video), fps=1, realtime=False, record=True)
        wait_done(s.client, "cam")
        w0 = s.client.clips("cam")[0].wall_start
    finally:
        s.stop()
        runner.close()
    root = tmp_path / "recordings" / stream_dir_name("cam")
    segments = sorted(root.glob("*.ts"))
    segments[2].write_bytes(b"\x00garbage" * 100)  # a damaged segment (4-6 s)
    last = segments[-1]  # a crash left the last one unfinished: its name has no end yet
    last.rename(root / (last.name.rsplit("_", 1)[0] + ".ts.part"))
    (root / "0000000099_1000.ts.part").write_bytes(b"not a transport stream")

    s, runner = start_recording_app(model, tmp_path, port)
    try:
        status, headers, body = get(port, f"/v1/streams/cam/recording.mp4?start={w0 + 10.2}&end={w0 + 11.9}")
        assert status == 200  # the recovered segment
        check_cut(body, float(headers["X-Recording-Start"]), w0 + 10.2, w0 + 11.9)
        assert "0000000099_1000.ts.part" in caplog.text and "recording_segment_skipped" in caplog.text
        assert (root / "0000000099_1000.ts.part.broken").exists()

        caplog.clear()
        status, headers, body = get(port, f"/v1/streams/cam/recording.mp4?start={w0 + 1.2}&end={w0 + 9.0}")
        assert status == 200  # the damaged segment is skipped with a logged reason, the rest is there
        assert segments[2].name in caplog.text and "recording_segment_skipped" in caplog.text
        times = [float(headers["X-Recording-Start"]) + t for t in frame_times(body)]
        assert times[0] == pytest.approx(w0 + 1.0, abs=2e-3) and times[-1] >= w0 + 9.0 - 1.5 / FPS  # keyframe at 1 s
        assert not [t for t in times if w0 + 4.0 + 1e-3 < t < w0 + 6.0 - 1e-3]  # its 2 s are a gap
        assert s.client.stats("cam")[0].recording_bytes > 0
    finally:
        s.stop()
        runner.close()
