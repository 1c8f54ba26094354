"""Source URLs from API callers: only camera schemes and allowed files reach FFmpeg; secrets never reach logs.

Hostile URLs (request smuggling through CR/LF, FFmpeg meta-protocols reading local files, paths out of
the media root) are refused before any socket or file is touched; every open pins FFmpeg's protocols.
All network traffic here stays on 127.0.0.1.
"""

from __future__ import annotations

import functools
import http.server
import os
import random
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import av
import pytest

import ingest.source
from ingest.source import (
    ALLOWED_SCHEMES,
    SOURCE_PROTOCOLS,
    CheckedSource,
    Frame,
    SourceError,
    UnsafeSourceError,
    check_source,
    check_source_options,
    is_live_url,
    open_frames,
    redact_text,
    redact_url,
)
from tests.listener import Listener


def read_all(url: str | Path, **kwargs: Any) -> list[Frame]:
    return list(open_frames(str(url), realtime=False, stop=threading.Event(), **kwargs))


@pytest.fixture
def listener() -> Iterator[Listener]:
    server = Listener()
    yield server
    server.close()


@pytest.fixture
def http_root(tmp_path: Path, videos: dict[str, Path]) -> Iterator[tuple[str, Path]]:
    """An HTTP server on 127.0.0.1 serving a fresh directory that holds 2s.ts; yields its URL and the directory."""
    root = tmp_path / "www"
    root.mkdir()
    (root / "2s.ts").write_bytes(videos["2s_ts"].read_bytes())
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None  # type: ignore[method-assign]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", root
    server.shutdown()
    server.server_close()


def playlist(segment: str) -> str:
    return f"#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXT-X-MEDIA-SEQUENCE:0\n#EXTINF:2.0,\n{segment}\n#EXT-X-ENDLIST\n"


# ---------------------------------------------------------------- what check_source refuses

HOSTILE = [
    "gopher://127.0.0.1:6379/_FLUSHALL%0d%0a",
    "concat:/etc/passwd|/etc/hostname|x.txt",
    "subfile,,start,0,end,100,,:/etc/passwd",
    "async:file:/etc/passwd",
    "async:http://127.0.0.1/x",
    "data:text/plain;base64,aGVsbG8=",
    "pipe:0",
    "fd:3",
    "unix:/var/run/docker.sock",
    "file:/etc/passwd",
    "file:///etc/passwd",
    "FILE:///etc/passwd",
    "cache:http://127.0.0.1/x",
    "crypto:/etc/passwd",
    "crypto+http://127.0.0.1/x",
    "tee:/tmp/x",
    "hls+http://127.0.0.1/x.m3u8",
    "hls+file:/etc/x.m3u8",
    "ftp://127.0.0.1/x",
    "tcp://127.0.0.1:6379",
    "tls://127.0.0.1:443",
    "rtp://127.0.0.1:5004",
    "rtmpt://127.0.0.1/app/x",
    "rtmpe://127.0.0.1/app/x",
    "httpproxy://127.0.0.1:3128",
    "icecast://127.0.0.1/x",
    "sctp://127.0.0.1:1",
    "zmq:tcp://127.0.0.1:1",
    "prompeg://127.0.0.1:1",
    "md5:",
    "ipfs://x",
    "C:\\videos\\a.mp4",
    "javascript:alert(1)",
    " rtsp://127.0.0.1/x",
]


@pytest.mark.parametrize("url", HOSTILE)
@pytest.mark.parametrize("allow_files", [False, True])
def test_schemes_outside_the_allow_list_are_refused(url: str, allow_files: bool) -> None:
    with pytest.raises(UnsafeSourceError) as caught:
        check_source(url, media_root=None, allow_files=allow_files)
    assert isinstance(caught.value, ValueError)
    message = str(caught.value)
    assert message.startswith("refused source ")
    for scheme in ALLOWED_SCHEMES:
        assert f"{scheme}://" in message  # the message says what is allowed


def test_the_allow_list_is_what_a_camera_needs() -> None:
    assert ALLOWED_SCHEMES == {"rtsp", "rtsps", "rtmp", "rtmps", "srt", "http", "https", "udp"}
    assert set(SOURCE_PROTOCOLS) == ALLOWED_SCHEMES
    for scheme, protocols in SOURCE_PROTOCOLS.items():
        names = set(protocols.split(","))
        assert not names & {"file", "concat", "subfile", "pipe", "fd", "data", "crypto", "async", "cache", "unix"}
        assert ("tls" in names) == (scheme in {"rtsps", "rtmps", "http", "https"}), scheme  # http may redirect


@pytest.mark.parametrize(
    "url",
    [
        "rtsp://127.0.0.1:6379/x\r\nFLUSHALL\r\n",
        "rtsp://127.0.0.1:6379/x\nFLUSHALL",
        "rtsp://127.0.0.1:6379/x\rFLUSHALL",
        "rtsp://127.0.0.1/x%0d%0aFLUSHALL%0d%0a",
        "rtsp://127.0.0.1/x%0D%0AFLUSHALL",
        "rtsp://127.0.0.1/x%0aFLUSHALL",
        "rtsp://127.0.0.1/x%250d%250aFLUSHALL",  # decoded twice
        "rtsp://127.0.0.1/x%00",
        "rtsp://127.0.0.1/x%7f",
        "rtsp://user%0d%0aX:pw@127.0.0.1/x",
        "http://127.0.0.1/x?a=%0d%0aSet-Cookie:x",
        "http://127.0.0.1/x#%0a",
        "http://127.0.0.1/x\x00y",
        "http://127.0.0.1/x\ty",
        "http://127.0.0.1/x y",
        "http://127.0.0.1/x\x85y",
        "http://127.0.0.1/x\u2028y",
        "http://127.0.0.1/x\u00a0y",
        "udp://127.0.0.1:1234\n",
    ],
)
def test_control_characters_and_whitespace_are_refused(url: str) -> None:
    with pytest.raises(UnsafeSourceError, match="control character|whitespace") as caught:
        check_source(url, media_root=None)
    message = str(caught.value)
    assert "\r" not in message and "\n" not in message  # the quoted prefix is escaped: no log injection


def test_control_characters_in_a_file_path_are_refused(tmp_path: Path) -> None:
    with pytest.raises(UnsafeSourceError, match="control character"):
        check_source(f"{tmp_path}/a\nb.mp4", media_root=tmp_path)


@pytest.mark.parametrize(
    "url",
    [
        "rtsp:127.0.0.1/x",
        "rtsp:/127.0.0.1/x",
        "rtsp:///x",
        "rtsp://",
        "rtsp://user:pw@/x",
        "rtsp://:554/x",
        "http://[::1/x",
        "http://[::1]]/x",
        "http://h:99999/x",
        "http://h:0/x",
        "http://h:port/x",
        "http://h%2fx/",
        "http://münchen.example/x",
    ],
)
def test_network_urls_need_a_valid_host(url: str) -> None:
    with pytest.raises(UnsafeSourceError, match="host"):
        check_source(url, media_root=None)


def test_refusals_quote_only_a_short_redacted_prefix() -> None:
    url = "gopher://admin:hunter2@127.0.0.1:6379/_" + "A" * 500 + "?token=s3cret"
    with pytest.raises(UnsafeSourceError) as caught:
        check_source(url, media_root=None)
    message = str(caught.value)
    assert "hunter2" not in message and "admin" not in message and "s3cret" not in message
    assert "'gopher://***@127.0.0.1:6379/_AAAA" in message and "A" * 60 not in message
    with pytest.raises(UnsafeSourceError, match="a source must be a string"):
        check_source(b"rtsp://127.0.0.1/x", media_root=None)  # type: ignore[arg-type]
    with pytest.raises(UnsafeSourceError, match="empty"):
        check_source("", media_root=None, allow_files=True)
    with pytest.raises(UnsafeSourceError, match="longer than"):
        check_source("rtsp://127.0.0.1/" + "x" * 70_000, media_root=None)


# ---------------------------------------------------------------- what check_source accepts


@pytest.mark.parametrize(
    ("url", "target"),
    [
        ("rtsp://admin:p@ss@cam.local:554/Streaming/Channels/101", None),
        ("rtsps://cam.local/live?token=abc", None),
        ("rtmp://a.rtmp.youtube.com/live2/xxxx-xxxx-xxxx", None),
        ("rtmps://live-api-s.facebook.com:443/rtmp/KEY", None),
        ("srt://10.0.0.5:9000?mode=caller&passphrase=0123456789", None),
        ("udp://@239.0.0.1:1234", None),
        ("udp://0.0.0.0:1234?fifo_size=100000", None),
        ("http://127.0.0.1:8080/live.ts", None),
        ("https://cdn.example.com/v/index.m3u8?X-Amz-Signature=abc", None),
        ("rtsp://[::1]:8554/cam", None),
        ("rtsp://[fe80::1%25eth0]:554/cam", None),
        ("http://h/my%20video.mp4?q=100%25", None),
        ("RTSP://Cam.local/x", "rtsp://Cam.local/x"),
    ],
)
def test_camera_urls_are_accepted(url: str, target: str | None) -> None:
    checked = check_source(url, media_root=None)
    assert checked == CheckedSource(target or url, (target or url).split(":")[0])
    assert not checked.is_file
    assert checked.protocol_whitelist == SOURCE_PROTOCOLS[checked.scheme]


def test_files_need_permission(tmp_path: Path) -> None:
    video = tmp_path / "a.mp4"
    with pytest.raises(UnsafeSourceError, match="local files are not allowed"):
        check_source(str(video), media_root=None)  # a service without a media root
    with pytest.raises(UnsafeSourceError, match="local files are not allowed"):
        check_source(str(video), media_root=tmp_path, allow_files=False)
    assert check_source(str(video), media_root=tmp_path) == CheckedSource(str(video), "file")
    assert check_source(str(video), media_root=None, allow_files=True).protocol_whitelist == "file"


def test_files_stay_inside_the_media_root(tmp_path: Path) -> None:
    root, outside = tmp_path / "media", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret.mp4").write_bytes(b"x")
    (root / "a.mp4").write_bytes(b"x")
    (root / "escape.mp4").symlink_to(outside / "secret.mp4")
    (root / "escape_dir").symlink_to(outside, target_is_directory=True)
    (root / "inside.mp4").symlink_to(root / "a.mp4")
    real_root = root.resolve()

    assert check_source("a.mp4", media_root=root).target == str(real_root / "a.mp4")  # relative to the root
    assert check_source("sub/../a.mp4", media_root=root).target == str(real_root / "a.mp4")
    assert check_source(str(root / "a.mp4"), media_root=str(root)).target == str(real_root / "a.mp4")
    assert check_source("inside.mp4", media_root=root).target == str(real_root / "a.mp4")  # a symlink within
    assert check_source("./12:30.mp4", media_root=root).target == str(real_root / "12:30.mp4")
    for path in [
        "../outside/secret.mp4",
        "sub/../../outside/secret.mp4",
        str(outside / "secret.mp4"),
        "/etc/passwd",
        "escape.mp4",  # a symlink out of the root
        "escape_dir/secret.mp4",
        str(root / "escape.mp4"),
        str(tmp_path / "media-other" / "x.mp4"),  # a sibling sharing the root's name as a prefix
    ]:
        with pytest.raises(UnsafeSourceError, match="outside the media root"):
            check_source(path, media_root=root)
    for path in ["file:a.mp4", "file:///" + str(root / "a.mp4"), "12:30.mp4", "subfile,,start,0,end,9,,:a.mp4"]:
        with pytest.raises(UnsafeSourceError, match="not allowed|may not start"):
            check_source(path, media_root=root)


def test_options_and_liveness_never_raise_on_garbage() -> None:
    for url in ["http://[::1", "rtsp://h:99999999/x", "", "::", "whip://cam"]:
        is_live_url(url)
        check_source_options(url, transport="tcp", listen=False)
    assert is_live_url("RTSP://h/x") and is_live_url("udp://@239.0.0.1:1") and not is_live_url("http://h/x")
    assert not is_live_url("tcp://h:1") and not is_live_url("rtp://h:1")
    with pytest.raises(ValueError, match=r"listen needs an rtsp:// URL, got 'http://\*\*\*@\[::1"):
        check_source_options("http://u:p@[::1", transport="tcp", listen=True)


# ---------------------------------------------------------------- open_frames: nothing reaches the network


@pytest.mark.parametrize(
    "template",
    [
        "gopher://127.0.0.1:{port}/_FLUSHALL%0d%0a",
        "gopher://127.0.0.1:{port}/_SET%20x%201%0d%0aQUIT%0d%0a",
        "rtsp://127.0.0.1:{port}/x\r\nFLUSHALL\r\n",
        "rtsp://127.0.0.1:{port}/x%0d%0aFLUSHALL%0d%0a",
        "rtsp://127.0.0.1:{port}/x%250d%250aFLUSHALL",
        "http://127.0.0.1:{port}/x\r\nFLUSHALL\r\n",
        "http://127.0.0.1:{port}/%0d%0aFLUSHALL",
        "rtmp://127.0.0.1:{port}/app/x\nFLUSHALL",
        "tcp://127.0.0.1:{port}",
        "tls://127.0.0.1:{port}",
        "async:tcp://127.0.0.1:{port}",
        "cache:http://127.0.0.1:{port}/x",
        "concat:tcp://127.0.0.1:{port}|x",
        "rtp://127.0.0.1:{port}",
    ],
)
def test_hostile_urls_never_reach_the_service_they_name(listener: Listener, template: str) -> None:
    url = template.format(port=listener.port)
    for kwargs in ({}, {"live": True}, {"allow_files": True, "loop": True}):
        with pytest.raises(UnsafeSourceError):
            read_all(url, timeout_s=1.0, **kwargs)
    with pytest.raises(UnsafeSourceError):
        read_all(url, timeout_s=1.0, listen=True)  # listen checks the URL before the RTSP-only rule
    time.sleep(0.1)
    assert listener.connections == 0 and listener.received == b""


def test_the_listener_does_hear_a_legit_url(listener: Listener) -> None:
    """The control for the test above: the same listener sees an allowed URL's traffic."""
    with pytest.raises(SourceError):
        read_all(f"rtsp://127.0.0.1:{listener.port}/cam", timeout_s=0.5)
    deadline = time.monotonic() + 2
    while not listener.received and time.monotonic() < deadline:
        time.sleep(0.01)
    assert listener.connections >= 1 and listener.received.startswith(b"OPTIONS rtsp://127.0.0.1:")


def test_meta_protocols_over_a_real_file_are_refused(videos: dict[str, Path]) -> None:
    video = str(videos["2s_ts"])
    assert len(read_all(video)) == 50  # the file itself plays
    for url in [
        f"concat:{video}|{video}",
        f"subfile,,start,0,end,100000,,:{video}",
        f"file:{video}",
        f"async:file:{video}",
        f"cache:{video}",
        f"crypto:{video}",
    ]:
        with pytest.raises(UnsafeSourceError):
            read_all(url)


def test_open_frames_keeps_files_in_the_media_root(tmp_path: Path, videos: dict[str, Path]) -> None:
    root, outside = tmp_path / "media", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "a.ts").write_bytes(videos["2s_ts"].read_bytes())
    (outside / "secret.ts").write_bytes(videos["2s_ts"].read_bytes())
    (root / "link.ts").symlink_to(outside / "secret.ts")

    assert len(read_all("a.ts", media_root=root)) == 50
    assert len(read_all(root / "a.ts", media_root=root, allow_files=None)) == 50
    for path in ["../outside/secret.ts", outside / "secret.ts", "link.ts"]:
        with pytest.raises(UnsafeSourceError, match="outside the media root"):
            read_all(path, media_root=root)
    with pytest.raises(UnsafeSourceError, match="local files are not allowed"):
        read_all(root / "a.ts", media_root=None, allow_files=None)  # a service without a media root


def test_a_local_playlist_or_concat_script_opens_no_other_file(tmp_path: Path, videos: dict[str, Path]) -> None:
    """FFmpeg's HLS demuxer reads local segments anywhere: a playlist inside the root must not reach out of it."""
    root, outside = tmp_path / "media", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    secret = outside / "secret.ts"
    secret.write_bytes(videos["2s_ts"].read_bytes())
    (root / "escape.m3u8").write_text(playlist(str(secret)))
    (root / "escape_rel.m3u8").write_text(playlist("../outside/secret.ts"))
    (root / "escape.ffconcat").write_text("ffconcat version 1.0\nfile ../outside/secret.ts\n")
    for name in ["escape.m3u8", "escape_rel.m3u8", "escape.ffconcat"]:
        with pytest.raises(SourceError, match="cannot open"):
            read_all(name, media_root=root)


def test_devices_fifos_and_directories_are_not_files(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.ts"
    os.mkfifo(fifo)
    start = time.monotonic()
    for path in [fifo, tmp_path, Path("/dev/zero")]:
        with pytest.raises(SourceError, match="not a regular file"):
            read_all(path, timeout_s=1.0)
    assert time.monotonic() - start < 1.0  # nothing waited for a writer


# ---------------------------------------------------------------- FFmpeg's protocol whitelist on every open


def test_every_open_pins_the_protocols_of_its_scheme(monkeypatch: pytest.MonkeyPatch, videos: dict[str, Path]) -> None:
    calls: list[tuple[object, dict[str, Any]]] = []

    def refuse(file: object, *args: object, **kwargs: Any) -> None:
        calls.append((file, kwargs))
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr(ingest.source.av, "open", refuse)
    for scheme in sorted(ALLOWED_SCHEMES):
        calls.clear()
        with pytest.raises(SourceError, match="Connection refused"):
            read_all(f"{scheme}://127.0.0.1:9/x", timeout_s=0.5)
        assert [kwargs["options"]["protocol_whitelist"] for _, kwargs in calls] == [SOURCE_PROTOCOLS[scheme]]
    calls.clear()
    with pytest.raises(SourceError):
        read_all("rtsp://127.0.0.1:9/x", listen=True)
    assert calls[0][1]["options"]["protocol_whitelist"] == "rtsp,rtp,udp,tcp"
    calls.clear()
    with pytest.raises(SourceError):
        read_all(videos["2s"])
    file, kwargs = calls[0]
    assert not isinstance(file, str) and kwargs["options"]["protocol_whitelist"] == "file"
    assert kwargs["io_open"] is ingest.source._refuse_nested  # the open file may open nothing else


def test_http_playlists_reach_no_local_file(http_root: tuple[str, Path], videos: dict[str, Path]) -> None:
    base, www = http_root
    local = str(videos["2s_ts"])
    (www / "ok.m3u8").write_text(playlist("2s.ts"))
    (www / "file.m3u8").write_text(playlist(f"file://{local}"))
    (www / "bare.m3u8").write_text(playlist(local))
    (www / "concat.m3u8").write_text(playlist(f"concat:{local}|{local}"))
    (www / "concat.ffconcat").write_text(f"ffconcat version 1.0\nfile file:{local}\n")
    (www / "data.m3u8").write_text(playlist("data:video/mp2t;base64,AAAA"))

    assert len(read_all(f"{base}/ok.m3u8")) == 50  # HLS over http still plays
    for name in ["file.m3u8", "bare.m3u8", "concat.m3u8", "concat.ffconcat", "data.m3u8"]:
        with pytest.raises(SourceError):
            read_all(f"{base}/{name}", timeout_s=3.0)


def test_an_sdp_over_http_opens_no_udp_socket(http_root: tuple[str, Path]) -> None:
    """Without the whitelist FFmpeg's SDP demuxer binds RTP/UDP ports and waits; with it, it fails at once."""
    base, www = http_root
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sdp = f"v=0\no=- 0 0 IN IP4 127.0.0.1\ns=x\nc=IN IP4 127.0.0.1\nt=0 0\nm=video {port} RTP/AVP 96\n"
    (www / "cam.sdp").write_text(sdp + "a=rtpmap:96 H264/90000\n")
    start = time.monotonic()
    with pytest.raises(SourceError, match="cannot open"):
        read_all(f"{base}/cam.sdp", timeout_s=5.0)
    assert time.monotonic() - start < 2.0


# ---------------------------------------------------------------- checked again at every open


class CountingCheck:
    """check_source that counts its calls and refuses from call ``refuse_from`` on (a changed policy).

    Only calls from the thread that made it count: a reader thread another test left winding down
    calls the same module attribute and must not move this test's count.
    """

    def __init__(self, refuse_from: int | None = None) -> None:
        self.calls = 0
        self.refuse_from = refuse_from
        self._check = ingest.source.check_source
        self._thread = threading.get_ident()

    def __call__(self, url: str, **kwargs: Any) -> CheckedSource:
        if threading.get_ident() != self._thread:
            return self._check(url, **kwargs)
        self.calls += 1
        if self.refuse_from is not None and self.calls >= self.refuse_from:
            raise UnsafeSourceError("refused source: policy changed")
        return self._check(url, **kwargs)


def test_each_reconnect_checks_again(monkeypatch: pytest.MonkeyPatch, listener: Listener) -> None:
    """A live source is reopened by calling open_frames again: each call checks before it connects."""
    check = CountingCheck()
    monkeypatch.setattr(ingest.source, "check_source", check)
    url = f"rtsp://127.0.0.1:{listener.port}/cam"
    for attempt in range(1, 3):
        with pytest.raises(SourceError):
            read_all(url, timeout_s=0.5)
        assert check.calls >= attempt
    connections, calls = listener.connections, check.calls
    check.refuse_from = calls + 1  # e.g. the URL is no longer allowed after a restart
    with pytest.raises(UnsafeSourceError):
        read_all(url, timeout_s=0.5)
    time.sleep(0.2)
    assert listener.connections == connections >= 1


def test_each_replay_of_a_file_checks_again(tmp_path: Path, videos: dict[str, Path]) -> None:
    root, outside = tmp_path / "media", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "a.ts").write_bytes(videos["2s_ts"].read_bytes())
    (outside / "secret.ts").write_bytes(videos["2s_ts"].read_bytes())
    link = root / "loop.ts"
    link.symlink_to(root / "a.ts")
    frames = []
    with pytest.raises(UnsafeSourceError, match="outside the media root"):
        for frame in open_frames("loop.ts", realtime=False, stop=threading.Event(), loop=True, media_root=root):
            frames.append(frame)
            if len(frames) == 10:  # during the first pass, the link is turned out of the root
                link.unlink()
                link.symlink_to(outside / "secret.ts")
    assert len(frames) == 50


def test_each_listening_slice_checks_again(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ingest.source, "check_source", check := CountingCheck(refuse_from=4))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(UnsafeSourceError):
        read_all(f"rtsp://127.0.0.1:{port}/live", listen=True, timeout_s=1.0)
    assert check.calls == 4 and time.monotonic() - start < 4  # two checks up front, then one per 1 s slice


# ---------------------------------------------------------------- redaction

SECRET = "s3cretV4lue"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (f"http://h/v.mp4?password={SECRET}&fps=1", "http://h/v.mp4?password=***&fps=1"),
        (f"http://h/v?p={SECRET}&u=bob", "http://h/v?p=***&u=bob"),
        (f"http://h/v?user=bob&pw={SECRET}&pwd={SECRET}", "http://h/v?user=bob&pw=***&pwd=***"),
        (f"http://h/v?pass={SECRET}&k={SECRET}&key={SECRET}", "http://h/v?pass=***&k=***&key=***"),
        (f"http://h/v?sig={SECRET}&signature={SECRET}", "http://h/v?sig=***&signature=***"),
        (f"http://h/v?apikey={SECRET}&api_key={SECRET}", "http://h/v?apikey=***&api_key=***"),
        (
            f"https://b.s3.amazonaws.com/v?X-Amz-Algorithm=AWS4&X-Amz-Credential={SECRET}&X-Amz-Security-Token={SECRET}",
            "https://b.s3.amazonaws.com/v?X-Amz-Algorithm=***&X-Amz-Credential=***&X-Amz-Security-Token=***",
        ),
        (f"http://h/v?token={SECRET}==&x=1", "http://h/v?token=***&x=1"),  # base64 "=" in the value
        (f"http://h/v?pass%77ord={SECRET}", "http://h/v?pass%77ord=***"),
        (f"http://h/v#access_token={SECRET}", "http://h/v#access_token=***"),
        (f"http://h?token={SECRET}", "http://h?token=***"),
        (
            f"rtsp://10.0.0.2/user=admin&password={SECRET}&channel=1&stream=0.sdp",
            "rtsp://10.0.0.2/user=admin&password=***&channel=1&stream=0.sdp",
        ),
        (
            f"rtsp://10.0.0.2:554/user=admin_password={SECRET}_channel=1_stream=0.sdp?real_stream",
            "rtsp://10.0.0.2:554/user=admin_password=***_channel=1_stream=0.sdp?real_stream",
        ),
        (f"rtsp://cam/live;password={SECRET};user=bob", "rtsp://cam/live;password=***;user=bob"),
        (f"rtsp://cam/v.cgi?loginuse=admin&loginpas={SECRET}", "rtsp://cam/v.cgi?loginuse=admin&loginpas=***"),
        (f"rtmp://a.rtmp.youtube.com/live2/{SECRET}", "rtmp://a.rtmp.youtube.com/live2/***"),
        (f"rtmps://live-api-s.facebook.com/rtmp/{SECRET}?s_bl=1", "rtmps://live-api-s.facebook.com/rtmp/***?s_bl=1"),
        (f"RTMP://live.twitch.tv/app/{SECRET}/", "RTMP://live.twitch.tv/app/***/"),
        ("rtmp://h/live", "rtmp://h/live"),  # an application, no key
        (f"srt://h:9000?mode=caller&passphrase={SECRET}", "srt://h:9000?mode=caller&passphrase=***"),
        (f"rtsp://admin:{SECRET}@cam/x", "rtsp://***@cam/x"),
        (f"rtsp://admin:a@{SECRET}@cam/x", "rtsp://***@cam/x"),
        (f"rtsp://admin:a?{SECRET}@cam/x", "rtsp://***@cam/x"),
        (f"rtsp://admin:a#{SECRET}@cam/x", "rtsp://***@cam/x"),
        (f"rtsp://admin:a/{SECRET}@cam/x", "rtsp://***@cam/x"),
        (f"rtsp:admin:{SECRET}@cam/x", "rtsp:***@cam/x"),
        (f"http://{SECRET}@[::1]:8080/x", "http://***@[::1]:8080/x"),
        (f"gopher://u:{SECRET}@h:70/_x", "gopher://***@h:70/_x"),
        ("http://h/v?fps=1&quality=hd&flag", "http://h/v?fps=1&quality=hd&flag"),
        ("/data/videos/a@b.mp4", "/data/videos/a@b.mp4"),
        ("/data/password=x.mp4", "/data/password=x.mp4"),  # a plain path is a file name
        ("file:///data/v.mp4", "file:///data/v.mp4"),
    ],
)
def test_redact_url_masks_every_credential_shape(url: str, expected: str) -> None:
    redacted = redact_url(url)
    assert redacted == expected
    assert SECRET not in redacted
    assert redact_url(redacted) == redacted  # idempotent


def test_redact_url_never_raises_and_is_idempotent_on_garbage() -> None:
    garbage = [
        "http://[::1",
        "http://[::1]]:x/",
        "http://h:99999999999/x",
        "rtsp://[zz]:-1/",
        "http://@",
        "://",
        ":",
        "",
        "%",
        "http://h/%zz?%=%&=&&;;==",
        "rtmp:///",
        "a" * 10_000,
    ]
    rng = random.Random(7)
    alphabet = "htprsm:/@[]?#&;=%_.-0123456789aAkey\r\n\x00 é"
    garbage += ["".join(rng.choice(alphabet) for _ in range(rng.randrange(40))) for _ in range(2000)]
    for url in garbage:
        once = redact_url(url)
        assert isinstance(once, str) and redact_url(once) == once, url


def test_redact_text_redacts_every_url_it_quotes() -> None:
    url = f"rtmp://h/live/{SECRET}"
    text = (
        f"cannot open '{url}': redirected to http://u:{SECRET}@10.0.0.9/x?sig={SECRET}, "
        f"then rtsp://cam/user=admin&password={SECRET}&channel=1 and http://plain/x"
    )
    redacted = redact_text(text, url)
    assert SECRET not in redacted
    assert redacted == (
        "cannot open 'rtmp://h/live/***': redirected to http://***@10.0.0.9/x?sig=***, "
        "then rtsp://cam/user=admin&password=***&channel=1 and http://plain/x"
    )
    assert redact_text(redacted, url) == redacted


def test_open_errors_never_carry_the_rtmp_key_or_path_passwords(listener: Listener) -> None:
    for url in [
        f"rtmp://127.0.0.1:{listener.port}/live/{SECRET}",
        f"rtsp://127.0.0.1:{listener.port}/user=admin&password={SECRET}&channel=1",
        f"http://127.0.0.1:{listener.port}/v.ts?pw={SECRET}",
    ]:
        with pytest.raises(SourceError) as caught:
            read_all(url, timeout_s=0.5)
        assert SECRET not in str(caught.value)


def test_a_refused_source_is_a_value_error_not_a_source_error() -> None:
    """The pipeline retries SourceErrors of live sources; a refused URL must fail for good instead."""
    assert issubclass(UnsafeSourceError, ValueError) and not issubclass(UnsafeSourceError, SourceError)
    with pytest.raises(ValueError):
        read_all("rtsp://127.0.0.1:1/x\r\n", live=True)


def test_pyav_is_the_ffmpeg_that_opens(videos: dict[str, Path]) -> None:
    """Sanity: the library under test is the one whose protocol handling the tests above rely on."""
    assert av.open is not None and len(read_all(videos["2s_ts"], media_root=videos["2s_ts"].parent)) == 50
