"""Decoded frames with presentation times from camera and relay URLs (RTSP, RTMP, SRT, UDP, HTTP) and files.

Reading is blocking and runs in the caller's thread; the pipeline gives each stream its own
thread. Frames stay as decoded ``av.VideoFrame``s until someone asks for RGB, because the
conversion costs more than decoding and most frames are never sampled.

A *live* source (a camera, a relay: RTSP, RTMP, SRT, ...) is read as it arrives: never paced, and
a frame's wall time is when it arrived. A finite one (a file) can be paced to its own clock. An RTSP
camera's own clock, from its RTCP sender reports, comes beside it when asked (``camera_clock``).
Reconnecting a live source that drops is the pipeline's job; one call here is one connection.
Setting the caller's ``stop`` event aborts a blocking open or read at once (see :class:`_StopAwareClock`),
so a stream stopped while its camera hangs closes the connection instead of waiting out the read timeout.

Sources come from API callers, so FFmpeg never sees a URL that :func:`check_source` has not passed:
FFmpeg opens far more than cameras (``concat:``, ``subfile:``, ``data:``, ``pipe:``, ``file:``,
``gopher:``, ``tcp:``, ...), and a URL carrying CR/LF writes raw commands to whatever service it
names. Every open also pins the FFmpeg protocols it may use (``protocol_whitelist``), so a
playlist, a redirect or an SDP cannot lead elsewhere, and a local file is opened here and handed
to FFmpeg as an open file that may open nothing else (no HLS playlist or concat script reads
other files).
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import math
import os
import re
import stat
import struct
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Literal
from urllib.parse import unquote, unquote_to_bytes

import av
import av.container
import av.container.core
import av.error
import av.stream
import av.video.stream
import numpy as np

from ingest.keyframes import KeyframeGate
from vcflash.serve.errors import excerpt

if TYPE_CHECKING:
    from ingest.recording import StreamRecording

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 10.0
DEFAULT_FIRST_FRAME_TIMEOUT_S = 15.0  # VCFLASH_FIRST_FRAME_TIMEOUT_S: a connection decoding no frame by then ends
DEFAULT_MAX_FRAME_PIXELS = 4096 * 4096  # VCFLASH_MAX_FRAME_PIXELS: larger decoded frames are scaled down
# The URL schemes a source may have, each with the FFmpeg protocols it may use (its protocol_whitelist):
# what pulling from a camera, an encoder or a relay needs, and nothing that reads local files or talks
# raw TCP. RTSP carries media interleaved (tcp) or as RTP over UDP, and its "listen" mode is a TCP
# server; RTMP(S) is RTMP over tcp (tls); HTTP(S) may redirect between the two, and an HLS/DASH
# playlist fetched over it may reference http(s) segments only (not file:, not crypto: so
# AES-encrypted HLS does not play). Left out: tcp/rtp (raw sockets a camera does not need, and tcp://
# is the primitive of request smuggling), rtmpt/rtmpe/rtmpte (HTTP-tunnelled and Adobe-encrypted
# RTMP: obsolete), ftp, and every meta-protocol (concat, subfile, async, cache, crypto, tee, hls+, ...).
# SRT needs an FFmpeg built with libsrt, which PyAV's wheels are not.
SOURCE_PROTOCOLS: Mapping[str, str] = MappingProxyType(
    {
        "rtsp": "rtsp,rtp,udp,tcp",
        "rtsps": "rtsp,rtp,udp,tcp,tls",
        "rtmp": "rtmp,tcp",
        "rtmps": "rtmps,tcp,tls",
        "srt": "srt",
        "udp": "udp",
        "http": "http,https,tcp,tls",
        "https": "http,https,tcp,tls",
    }
)
ALLOWED_SCHEMES = frozenset(SOURCE_PROTOCOLS)
FILE_SCHEME = "file"  # CheckedSource.scheme of a local file (never accepted as a "file:" prefix)
MAX_SOURCE_CHARS = 65536  # a sanity bound on the work a check does; services have their own, smaller limit
# Schemes of sources that are live by nature. http(s) is not among them: a URL cannot tell an HTTP
# live stream from a file on a web server, so callers say so (``live=True``).
LIVE_SCHEMES = ALLOWED_SCHEMES - {"http", "https"}
RTSP_SCHEMES = frozenset({"rtsp", "rtsps"})
# A listener waits for a publisher in slices this long, so that ``stop`` is heard between them.
LISTEN_SLICE_S = 1

Transport = Literal["tcp", "udp"]
TRANSPORTS: tuple[Transport, ...] = ("tcp", "udp")

_MASK = "***"
# Parameters (query, fragment, path ";name=" or "/name=value&...") whose names contain one of these hold
# secrets (token, access_token, X-Amz-Signature, apikey, passphrase, loginpas, ...); so do these short names.
_SECRET_WORDS = ("pas", "pwd", "token", "secret", "key", "auth", "sig", "credential", "session", "cookie")
_SECRET_NAMES = frozenset({"p", "pw", "pwd", "pass", "k", "key", "pin", "psk"})
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*(?=:)")
# scheme ":" and up to two slashes; the authority follows.
_URL_HEAD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*:/{0,2})")
# A URL inside a message: up to whitespace, a quote or an angle bracket, less the punctuation ending a sentence.
_URL_IN_TEXT = re.compile(r"(?<![A-Za-z0-9+.-])[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]*?(?=[.,;:!?)\]]*(?:[\s'\"<>]|$))")
# A path parameter ("/user=admin&password=...", ";password=...", XMEye's "/user=admin_password=..._channel=1"):
# a name after a separator, its value up to the next separator or "_name=".
_PATH_PARAM = re.compile(
    r"(?:(?<=[/;&_,])|^)(?P<name>[A-Za-z][A-Za-z0-9.-]*)=(?P<value>(?:(?![/;&,]|_[A-Za-z][A-Za-z0-9.-]*=).)*)"
)
_QUERY_PARAM = re.compile(r"(?P<name>[^&;#=]+)=(?P<value>[^&;#]*)")
# host[:port] as FFmpeg reads it: a DNS name or IPv4 address, or an IPv6 literal (with a zone) in brackets.
_HOST_PORT = re.compile(
    r"(?P<host>[A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+(?:%25[A-Za-z0-9._~-]+)?\])(?::(?P<port>[0-9]{1,5}))?"
)
_PREFIX_CHARS = 48


class SourceError(Exception):
    """The source cannot be opened or read any further; the message never holds credentials."""


class SourceRefused(SourceError):
    """The source answered 401, 403 or 404 (RTSP or HTTP): ``reason`` is "unauthorized", "forbidden" or
    "not found". Retrying the same URL cannot help, and a camera may lock an account after a burst of bad logins."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


# FFmpeg's errors for a source that refuses us, by what they mean to an operator.
_REFUSALS: tuple[tuple[type[av.FFmpegError], str], ...] = (
    (av.error.HTTPUnauthorizedError, "unauthorized"),
    (av.error.HTTPForbiddenError, "forbidden"),
    (av.error.HTTPNotFoundError, "not found"),
)


class UnsafeSourceError(ValueError):
    """:func:`check_source` refused a source: a scheme other than :data:`ALLOWED_SCHEMES`, a file where files
    are not allowed or outside the media root, a control character. The message quotes a short redacted prefix."""


@dataclass(frozen=True, slots=True)
class CheckedSource:
    """A source that :func:`check_source` accepted.

    ``target`` is what is opened: the URL (scheme lower-cased), or the resolved absolute path of a local
    file; ``scheme`` one of :data:`ALLOWED_SCHEMES` or :data:`FILE_SCHEME`.
    """

    target: str
    scheme: str

    @property
    def is_file(self) -> bool:
        return self.scheme == FILE_SCHEME

    @property
    def protocol_whitelist(self) -> str:
        """FFmpeg's ``protocol_whitelist`` for this source."""
        return "file" if self.is_file else SOURCE_PROTOCOLS[self.scheme]


def check_source(url: str, *, media_root: Path | str | None, allow_files: bool | None = None) -> CheckedSource:
    """``url`` if it is a source FFmpeg may open here; raises :class:`UnsafeSourceError` (a ``ValueError``) if not.

    Accepted: an URL with a scheme in :data:`ALLOWED_SCHEMES` (``scheme://host[:port]...``), with no control
    character or whitespace, raw or percent-encoded (``%0d%0a``); and, where files are allowed, a plain
    local path (no ``scheme:`` prefix, no ``file:``), resolved (symlinks followed, ``..`` removed) and, if
    ``media_root`` is given, inside it (a relative path is then taken from ``media_root``). ``allow_files``
    defaults to ``media_root is not None``: a service passes its configured media directory or ``None``,
    and with ``None`` refuses local files. ``allow_files=True`` without a root accepts any path (the
    trusted callers: tests and scripts). Pure and cheap: no I/O but resolving a file's path.
    """
    if allow_files is None:
        allow_files = media_root is not None
    if not isinstance(url, str):
        raise UnsafeSourceError(f"a source must be a string, not {type(url).__name__}; {_allowed(allow_files)}")
    if not url:
        raise _refused(url, "it is empty", allow_files)
    if len(url) > MAX_SOURCE_CHARS:
        raise _refused(url, f"it is longer than {MAX_SOURCE_CHARS} characters", allow_files)
    if any(_is_control(c) for c in url):
        raise _refused(url, "it holds a control character", allow_files)
    scheme = _SCHEME.match(url)
    if scheme is None:
        return _check_file(url, media_root, allow_files)
    if _has_encoded_control(url):
        raise _refused(url, "it holds a percent-encoded control character", allow_files)
    name = scheme[0].lower()
    if name not in ALLOWED_SCHEMES:
        raise _refused(url, f"scheme {name[:16]!r} is not allowed", allow_files)
    if any(c.isspace() for c in url):
        raise _refused(url, "it holds whitespace", allow_files)
    rest = url[scheme.end() + 1 :]
    if not rest.startswith("//"):
        raise _refused(url, f"{name}: needs //host", allow_files)
    authority = re.split(r"[/?#]", rest[2:], maxsplit=1)[0]
    host = _HOST_PORT.fullmatch(authority.rpartition("@")[2])
    if host is None or (host["port"] is not None and not 0 < int(host["port"]) < 65536):
        raise _refused(url, "it has no valid host[:port]", allow_files)
    return CheckedSource(name + url[scheme.end() :], name)


def _check_file(url: str, media_root: Path | str | None, allow_files: bool) -> CheckedSource:
    if not allow_files:
        raise _refused(url, "local files are not allowed here", allow_files)
    if ":" in url.split("/", 1)[0]:  # FFmpeg would read "name:" as a protocol ("subfile,,start,0,end,9,,:x" too)
        raise _refused(url, "a local path may not start with 'name:' (write ./name:...)", allow_files)
    try:
        path = Path(url)
        if media_root is None:
            return CheckedSource(str(path.resolve()), FILE_SCHEME)
        root = Path(media_root).resolve()
        resolved = (root / path).resolve()  # an absolute path replaces the root
    except (OSError, RuntimeError, ValueError):  # a symlink loop, a NUL, ...
        raise _refused(url, "its path cannot be resolved", allow_files) from None
    if not resolved.is_relative_to(root):
        raise _refused(url, "it is outside the media root", allow_files)
    return CheckedSource(str(resolved), FILE_SCHEME)


def _is_control(c: str) -> bool:
    return ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F or c in "\u2028\u2029"


def _has_encoded_control(url: str) -> bool:
    """Whether percent-decoding ``url`` (repeatedly: %250d is %0d once decoded) gives a control byte."""
    text = url
    for _ in range(4):
        if "%" not in text:
            return False
        raw = unquote_to_bytes(text)
        if any(b < 0x20 or b == 0x7F for b in raw):
            return True
        decoded = raw.decode("latin-1")
        if decoded == text:
            return False
        text = decoded
    return "%" in text  # still encoded after four rounds: refuse rather than guess


def _refused(url: str, reason: str, allow_files: bool) -> UnsafeSourceError:
    return UnsafeSourceError(f"refused source {_prefix(url)}: {reason}; {_allowed(allow_files)}")


def _allowed(allow_files: bool) -> str:
    schemes = ", ".join(f"{s}://" for s in sorted(ALLOWED_SCHEMES))
    files = ", or a local file path (inside the media root, if one is set)" if allow_files else ""
    return f"allowed: {schemes} URLs with a host{files}"


def _prefix(url: str) -> str:
    """A short, redacted, printable prefix of ``url`` for messages."""
    safe = redact_url(url)
    short = safe[:_PREFIX_CHARS] + ("..." if len(safe) > _PREFIX_CHARS else "")
    return repr(short)  # escapes CR, LF and other control characters


def redact_url(url: str) -> str:
    """``url`` fit for logs and errors; idempotent, and never raises, whatever ``url`` holds.

    Masked with ``***``: any userinfo (``user:password@``, including a password with "@", "?", "#" or
    "/"), the values of query, fragment and path parameters (``?token=``, ``;password=``,
    ``/user=admin&password=...``) whose names look secret (see ``_SECRET_WORDS``, ``_SECRET_NAMES``,
    ``X-Amz-*``), and the stream key that ends an ``rtmp*://host/app/key`` URL. Plain paths stay as they are.
    """
    try:
        return _redact_url(url)
    except Exception:  # a bug here must not hide the real error, nor leak the URL: say nothing about it
        return "<source>"


def _redact_url(url: str) -> str:
    head = _URL_HEAD.match(url)
    if head is None:
        return url  # a plain path
    start = head.end("head")
    end = _authority_end(url, start)
    at = url.rfind("@", start, end)  # FFmpeg's userinfo runs to the last "@" of the authority
    if at < 0:  # a password holding "?" or "#" ends the authority early: take the last "@" before the path
        slash = url.find("/", start)
        at = url.rfind("@", start, len(url) if slash < 0 else slash)
    if at < 0 and _bad_port(url[start:end]):  # "user:pa/ss@host": a password holding "/"
        at = url.find("@", end)
    if at >= 0:
        host_end = _authority_end(url, at + 1)
        at = max(at, url.rfind("@", at + 1, host_end))  # the host keeps no "@": a second pass finds the same
    host_start = at + 1 if at >= 0 else start
    end = _authority_end(url, host_start)
    userinfo = f"{_MASK}@" if at >= 0 else ""
    return head["head"] + userinfo + url[host_start:end] + _redact_rest(head["head"], url[end:])


def _authority_end(url: str, start: int) -> int:
    """Where the authority that starts at ``start`` ends: at the first "/", "?" or "#", as FFmpeg reads it."""
    ends = [i for i in (url.find(c, start) for c in "/?#") if i >= 0]
    return min(ends, default=len(url))


def _bad_port(authority: str) -> bool:
    """Whether ``authority`` has a ":" that starts no port: "user:pass" cut short by a "/" in the password."""
    _, _, after = authority.rpartition("]")
    _, colon, port = after.partition(":")
    return bool(colon) and not port.isdigit()


def _redact_rest(head: str, rest: str) -> str:
    """Path, query and fragment (what follows the authority), secrets masked."""
    path, hash_, fragment = rest.partition("#")
    path, question, query = path.partition("?")
    path = _PATH_PARAM.sub(_mask_param, path)
    if head.lower().startswith("rtmp"):
        path = _mask_rtmp_key(path)
    query = _QUERY_PARAM.sub(_mask_param, query)
    fragment = _QUERY_PARAM.sub(_mask_param, fragment)
    return path + question + query + hash_ + fragment


def _mask_param(match: re.Match[str]) -> str:
    return f"{match['name']}={_MASK}" if _is_secret(match["name"]) else match[0]


def _is_secret(name: str) -> bool:
    name = unquote(name).strip().lower()
    return name in _SECRET_NAMES or name.startswith("x-amz-") or any(w in name for w in _SECRET_WORDS)


def _mask_rtmp_key(path: str) -> str:
    """``/app/KEY`` -> ``/app/***``: RTMP's last path segment (the stream name) is the publisher's key."""
    segments = path.split("/")
    named = [i for i, segment in enumerate(segments) if segment]
    if len(named) >= 2:
        segments[named[-1]] = _MASK
    return "/".join(segments)


def redact_text(text: str, url: str) -> str:
    """``text`` (an FFmpeg or library message) with ``url`` redacted, and any other URL in it too.

    FFmpeg's messages may quote the URL as given or as it rewrote it (a redirect, an RTSP control URL).
    """
    try:
        if url:
            text = text.replace(url, redact_url(url))
        return _URL_IN_TEXT.sub(lambda m: redact_url(m[0]), text)
    except Exception:  # never raise while reporting another error
        return "<message withheld>"


def _scheme_of(url: str) -> str:
    """``url``'s scheme, lower-cased; "" for a plain path or anything else."""
    match = _SCHEME.match(url) if isinstance(url, str) else None
    return match[0].lower() if match else ""


def is_live_url(url: str) -> bool:
    """Whether ``url`` names a live stream by its scheme (RTSP, RTMP, SRT, UDP), not a file."""
    return _scheme_of(url) in LIVE_SCHEMES


def check_source_options(url: str, *, transport: str, listen: bool, camera_clock: bool = False) -> None:
    """Raise ``ValueError`` for options that cannot work, before any thread or socket is started."""
    if transport not in TRANSPORTS:
        raise ValueError(f"transport must be one of {TRANSPORTS}, got {excerpt(str(transport))}")
    if listen and _scheme_of(url) not in RTSP_SCHEMES:
        raise ValueError(f"listen needs an rtsp:// URL, got {excerpt(redact_url(url))}")
    if camera_clock and _scheme_of(url) not in RTSP_SCHEMES:  # only FFmpeg's RTP demuxer reads sender reports
        raise ValueError(
            f"camera_clock needs an rtsp:// or rtsps:// URL (RTCP sender reports), got {excerpt(redact_url(url))}"
        )


@dataclass(frozen=True, slots=True)
class Frame:
    """One decoded frame: media time (PTS seconds), wall time (Unix seconds it was live), the image.

    ``camera_time`` is the camera's own clock (Unix seconds) for the frame, from RTCP sender reports: only
    from :func:`open_frames` with ``camera_clock``, once a report has come; ``wall_time`` stays this server's.
    """

    pts: float
    wall_time: float
    image: av.VideoFrame | np.ndarray  # decoded, not yet converted; or RGB uint8 [H, W, 3]
    camera_time: float | None = None

    def to_rgb(self, size: tuple[int, int] | None = None) -> np.ndarray:
        """uint8 ``[H, W, 3]``, scaled to ``size`` = (width, height) if given and different."""
        image = self.image
        if isinstance(image, np.ndarray):
            if size is None or (image.shape[1], image.shape[0]) == size:
                return image
            image = av.VideoFrame.from_ndarray(image, format="rgb24")
        if size is None or (image.width, image.height) == size:
            return image.to_ndarray(format="rgb24")
        return image.to_ndarray(format="rgb24", width=size[0], height=size[1])


def open_frames(
    url: str,
    *,
    realtime: bool,
    stop: threading.Event,
    loop: bool = False,
    live: bool | None = None,
    transport: Transport = "tcp",
    listen: bool = False,
    keyframes: KeyframeGate | None = None,
    camera_clock: bool = False,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    first_frame_timeout_s: float | None = DEFAULT_FIRST_FRAME_TIMEOUT_S,
    on_decode_error: Callable[[], None] | None = None,
    media_root: Path | str | None = None,
    allow_files: bool | None = True,
    max_frame_pixels: int | None = DEFAULT_MAX_FRAME_PIXELS,
    recorder: StreamRecording | None = None,
) -> Iterator[Frame]:
    """Decoded frames of ``url`` in presentation order, until it ends or ``stop`` is set.

    ``url`` passes :func:`check_source` (with ``media_root`` and ``allow_files``) before every open:
    each replay of a file, each listening slice, each call (a reconnect); a refused one raises
    :class:`UnsafeSourceError` (a ``ValueError``) before any socket or file is touched. The default,
    ``allow_files=True`` without a root, opens any local file: right for tests and scripts, not for a
    service, which passes its media directory or ``None`` (see :func:`check_source`).

    ``live`` (default: by the URL's scheme, see :func:`is_live_url`; always with ``listen``) reads
    frames as they come, with media time = PTS and wall time = arrival; ``realtime`` and ``loop``
    then do nothing. For a file, ``realtime`` paces playback to the media clock (the file then
    behaves like a live stream), otherwise frames come as fast as they decode; a frame's wall time
    is the wall time of the first frame plus its PTS offset, so both clocks stay consistent.
    ``loop`` replays a file at its end with both clocks running on, so media time never goes
    backwards.

    RTSP only: ``transport`` carries the media interleaved on the RTSP connection (tcp, robust
    through NATs and firewalls) or as RTP over UDP (less latency, loses packets under load);
    ``listen`` makes this side the server that a camera or ``ffmpeg -f rtsp`` pushes to
    (ANNOUNCE/RECORD) instead of pulling, waiting for a publisher until ``stop``.
    ``keyframes`` (keyframes-only decoding) has the decoder skip all but keyframes while the gate allows it:
    sampling 1 fps from a stream with a 1 s GOP then costs a fraction of a full decode, and the sampler picks
    among keyframes. The gate hears every keyframe packet's PTS and asks for every frame to be decoded while the
    keyframe interval is unknown or longer than the sampling period (see :class:`ingest.keyframes.KeyframeGate`).
    ``camera_clock`` (RTSP only) gives each frame the camera's own clock as ``Frame.camera_time`` once its
    first RTCP sender report has come (see :class:`_SenderReportClock`); whether to trust it is the caller's call.
    ``timeout_s`` bounds opening and each network read (a stalled stream fails after it).
    ``first_frame_timeout_s`` (None: no limit) bounds the time from opening to the first decoded frame: a
    stream whose packets never decode (no keyframe ever comes, an undecodable codec) fails instead of
    connecting forever. Setting ``stop`` aborts a blocking open or read at once; the iterator then just ends.
    Undecodable packets are skipped and reported through ``on_decode_error``. A decoded frame with more than
    ``max_frame_pixels`` pixels (None: no limit) is scaled down to fit, aspect kept, in its own pixel format
    (swscale) before anyone converts it to RGB: a 16000 x 16000 PNG never becomes a 768 MB RGB array. Raises
    :class:`SourceError` when the source cannot be opened, read, or has no video frames, and its subclass
    :class:`SourceRefused` when it answers 401, 403 or 404.
    ``recorder`` gets every demuxed packet as it is (stream copy, see :mod:`ingest.recording`), and each decoded
    frame's PTS with its wall time, which place the packets on the wall clock.
    """

    def check() -> CheckedSource:
        return check_source(url, media_root=media_root, allow_files=allow_files)

    check_source_options(check().target, transport=transport, listen=listen, camera_clock=camera_clock)
    safe_url = redact_url(url)
    rtsp = _scheme_of(url) in RTSP_SCHEMES
    live = listen or (is_live_url(url) if live is None else live)
    # FFmpeg 5+ names the RTSP socket I/O timeout "timeout", in microseconds ("stimeout" is gone); PyAV's own
    # timeout below also bounds every read, whatever the protocol.
    options = {"rtsp_transport": transport, "timeout": str(round(timeout_s * 1e6))} if rtsp else {}
    if live:  # frames carry their times: no reading 20 more (0.8 s at 25 fps) at each connect to guess a frame rate
        options["fpsprobesize"] = "0"
    origin: tuple[float, float, float] | None = None  # media, wall and monotonic time of the first file frame
    pass_start: float | None = None  # media time at which a replay starts
    while not stop.is_set():
        with contextlib.ExitStack() as resources:
            try:
                with _interrupt_on(stop):
                    container = (
                        _listen(check, url, safe_url, options, timeout_s, stop)
                        if listen
                        else _open(check(), url, safe_url, options, timeout_s, resources)
                    )
            except SourceError:
                if stop.is_set():  # the open was aborted on request
                    return
                raise
            if container is None:
                return
            resources.enter_context(container)
            if keyframes is not None:
                keyframes.restart()  # a replayed file's PTS start over
            stream = _video_stream(container, safe_url, keyframes)
            if recorder is not None:  # one segment never spans two connections or replays
                recorder.start(stream)
                resources.callback(recorder.end)
            interval = _frame_interval(stream)
            reports = _SenderReportClock(stream.time_base) if camera_clock and stream.time_base else None
            shift: float | None = None  # media time = PTS + shift within this pass
            media: float | None = None
            for frame in _decode(
                container,
                stream,
                url,
                timeout_s,
                first_frame_timeout_s,
                stop,
                on_decode_error,
                reports,
                keyframes,
                recorder,
            ):
                camera = None if reports is None else reports.time(frame.pts)
                frame = fit_frame(frame, max_frame_pixels, safe_url)
                if frame.time is None:  # no PTS: follow the previous frame
                    media = (pass_start or 0.0) if media is None else media + interval
                else:
                    if shift is None:
                        shift = 0.0 if pass_start is None else pass_start - frame.time
                    media = frame.time + shift
                if live:
                    wall = time.time()
                else:
                    if origin is None:
                        origin = (media, time.time(), time.monotonic())
                    offset = media - origin[0]
                    wall = origin[1] + offset
                    if realtime:
                        delay = origin[2] + offset - time.monotonic()
                        if delay > 0 and stop.wait(delay):
                            return
                if recorder is not None and frame.time is not None:
                    recorder.frame_time(frame.time, wall)
                yield Frame(pts=media, wall_time=wall, image=frame, camera_time=camera)
                if stop.is_set():
                    return
            if stop.is_set():  # a read aborted on request
                return
            if media is None:
                raise SourceError(f"{safe_url}: no video frames could be decoded")
            pass_start = media + interval
        if live or not loop:
            return
        logger.info("source replaying url=%s media_time=%.3f", safe_url, pass_start)


def fit_frame(frame: av.VideoFrame, max_pixels: int | None, safe_url: str = "") -> av.VideoFrame:
    """``frame``, or a copy scaled down (aspect kept) to at most ``max_pixels`` pixels when it has more."""
    width, height = frame.width, frame.height
    if max_pixels is None or width * height <= max_pixels:
        return frame
    scale = math.sqrt(max_pixels / (width * height))
    w, h = max(1, math.floor(width * scale)), max(1, math.floor(height * scale))
    logger.debug("source frame scaled url=%s from=%dx%d to=%dx%d", safe_url, width, height, w, h)
    small = frame.reformat(width=w, height=h)
    small.pts, small.time_base = frame.pts, frame.time_base
    return small


def _open(
    source: CheckedSource,
    url: str,
    safe_url: str,
    options: dict[str, str],
    timeout_s: float,
    resources: contextlib.ExitStack,
) -> av.container.InputContainer:
    options = options | {"protocol_whitelist": source.protocol_whitelist}
    try:
        if source.is_file:
            file = resources.enter_context(_open_file(source.target))
            return av.open(file, mode="r", options=options, timeout=timeout_s, io_open=_refuse_nested)
        return av.open(source.target, mode="r", options=options, timeout=timeout_s)
    except (av.FFmpegError, OSError) as e:  # str(e) repeats the URL, credentials included: keep the reason
        message = f"cannot open {safe_url}: {_reason(e, url)}"
        refusal = next((reason for kind, reason in _REFUSALS if isinstance(e, kind)), None)
        raise (SourceError(message) if refusal is None else SourceRefused(message, refusal)) from None


def _open_file(path: str) -> io.FileIO:
    """``path`` (resolved by :func:`check_source`) open for reading, if it is still a regular file there.

    No symlink may have replaced it since it was checked (``O_NOFOLLOW``), and a FIFO or a device is
    refused before anything waits on it (``O_NONBLOCK``).
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        os.set_blocking(fd, True)
        file = io.FileIO(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    file.name = path  # type: ignore[misc]  # FFmpeg guesses formats by the name's extension too
    return file


def _refuse_nested(url: str, flags: int, options: dict[str, str]) -> None:
    """PyAV's ``io_open`` for a local file: an HLS playlist, a concat script, an MOV reference may open nothing."""
    raise PermissionError(errno.EPERM, "a local source may not open other files or URLs")


def _listen(
    check: Callable[[], CheckedSource],
    url: str,
    safe_url: str,
    options: dict[str, str],
    timeout_s: float,
    stop: threading.Event,
) -> av.container.InputContainer | None:
    """The pushed stream once a publisher connects; ``None`` if ``stop`` is set first.

    FFmpeg's own ``listen_timeout`` (whole seconds) bounds each wait: PyAV's open timeout alone
    makes a listener fail at once (OverflowError) in FFmpeg 7+. ``url`` is checked again before each wait.
    """
    options = options | {"rtsp_flags": "listen", "listen_timeout": str(LISTEN_SLICE_S)}
    while not stop.is_set():
        source = check()
        try:
            return av.open(
                source.target,
                mode="r",
                options=options | {"protocol_whitelist": source.protocol_whitelist},
                timeout=(LISTEN_SLICE_S + timeout_s, timeout_s),
            )
        except TimeoutError:  # nobody published during this slice
            continue
        except (av.FFmpegError, OSError) as e:
            if stop.is_set():  # aborted on request
                return None
            raise SourceError(f"cannot listen on {safe_url}: {_reason(e, url)}") from None
    return None


class _StopAwareClock:
    """Stands in for the ``time`` module inside ``av.container.core``: ``monotonic()`` leaps ahead in a thread
    whose stop event (:func:`_interrupt_on`) is set.

    PyAV aborts a blocking FFmpeg call (connecting, opening, a network read) when ``time.monotonic()``, read
    from FFmpeg's interrupt callback about every 100 ms, passes the call's start plus its timeout; it has no
    other way to abort one from outside. Once ``stop`` is set every reading in that thread is a further 1e9 s
    on, so a call in flight, or one starting, is aborted at its next check and the container can be closed:
    stopping a stream whose camera hangs closes its socket within a fraction of a second, not after the read
    timeout. Other threads, and threads without a stop event, see the real clock.
    """

    def __init__(self, real: object) -> None:
        self.real = real
        self.local = threading.local()  # .stop: the thread's event; .leap: seconds added so far

    def monotonic(self) -> float:
        now = self.real.monotonic()  # type: ignore[attr-defined]
        stop = getattr(self.local, "stop", None)
        if stop is None or not stop.is_set():
            return now
        self.local.leap = getattr(self.local, "leap", 0.0) + 1e9  # still increasing: PyAV refuses a clock going back
        return now + self.local.leap

    def __getattr__(self, name: str) -> object:
        return getattr(self.real, name)


def _stop_clock() -> _StopAwareClock:
    core = av.container.core
    clock = getattr(core, "time", None)
    if not isinstance(clock, _StopAwareClock):
        assert clock is not None and hasattr(clock, "monotonic"), "PyAV's interrupt callback reads time.monotonic()"
        clock = core.time = _StopAwareClock(clock)
    return clock


@contextlib.contextmanager
def _interrupt_on(stop: threading.Event) -> Iterator[None]:
    """Abort this thread's blocking FFmpeg calls inside the block once ``stop`` is set (see :class:`_StopAwareClock`).

    Only opening and reading are aborted, never closing: an RTSP TEARDOWN still goes out when a stream stops.
    """
    local = _stop_clock().local
    previous = getattr(local, "stop", None)
    local.stop = stop
    try:
        yield
    finally:
        local.stop = previous


def _interruptible(packets: Iterator[av.Packet], stop: threading.Event) -> Iterator[av.Packet]:
    """``packets``, each read aborted once ``stop`` is set (the consumer's time between reads is not)."""
    while True:
        with _interrupt_on(stop):
            packet = next(packets, None)
        if packet is None:
            return
        yield packet


def _reason(error: av.FFmpegError | OSError, url: str) -> str:
    return redact_text(error.strerror or type(error).__name__, url)


def _video_stream(
    container: av.container.InputContainer, safe_url: str, keyframes: KeyframeGate | None
) -> av.video.stream.VideoStream:
    """The first real video stream; cover art (an attached picture) is not video."""
    for stream in container.streams.video:
        if not stream.disposition & av.stream.Disposition.attached_pic:
            stream.thread_type = "AUTO"
            if keyframes is not None:
                _skip_frames(stream, keyframes)
            return stream
    raise SourceError(f"{safe_url}: no video stream")


def _skip_frames(stream: av.video.stream.VideoStream, keyframes: KeyframeGate) -> None:
    """Decode keyframes only (the decoder still parses every packet) or every frame, as the gate says now."""
    skip = "DEFAULT" if keyframes.decode_all else "NONKEY"
    if stream.codec_context.skip_frame != skip:
        stream.codec_context.skip_frame = skip


def _frame_interval(stream: av.video.stream.VideoStream) -> float:
    """Seconds between frames, for PTS-less frames and for where a replay starts; 0 if unknown."""
    for rate in (stream.average_rate, stream.guessed_rate):
        if rate and rate > 0:
            return float(1 / rate)
    return 0.0


# ---------------------------------------------------------------- the camera's clock

# FFmpeg's AVProducerReferenceTime (libavcodec/packet.h), native layout: int64_t wallclock (microseconds since
# the Unix epoch), int flags (rtpdec.c sets 24), padded to 16 bytes.
_PRFT = struct.Struct("@qi")


def prft_wallclock_us(data: bytes) -> int:
    """The wall clock (microseconds since the Unix epoch) of a packet's ``AV_PKT_DATA_PRFT`` side data."""
    if len(data) < _PRFT.size:
        raise ValueError(f"producer reference time needs {_PRFT.size} bytes, got {len(data)}")
    wallclock_us, _flags = _PRFT.unpack_from(data)
    return wallclock_us


def camera_wall_time(wallclock_us: int, reference_pts: int, pts: int, time_base: Fraction) -> float:
    """The camera's wall clock (Unix seconds) at presentation time ``pts``.

    ``wallclock_us`` is the camera's clock (microseconds since the Unix epoch) at ``reference_pts``, as FFmpeg
    gives it for an RTP packet from the last RTCP sender report; the camera's clock runs on with the RTP clock
    from there, so a frame ``pts - reference_pts`` ticks of ``time_base`` later (or earlier: decode order) was
    that much later on it. Both PTS are in ``time_base``, the stream's.
    """
    return wallclock_us / 1e6 + float((pts - reference_pts) * time_base)


class _SenderReportClock:
    """The camera's wall clock for one connection's frames, from the RTCP sender reports FFmpeg has read.

    FFmpeg's RTP demuxer (libavformat/rtpdec.c) attaches to every packet after the camera's first sender report
    the camera's clock at that packet's RTP timestamp (``AV_PKT_DATA_PRFT``; ``InputContainer.start_time_realtime``
    stays unset for RTSP), renewed with each report. It is read from packets as they are demuxed (decoders do
    not pass it on to frames), and a frame's time follows from the latest one by the PTS difference. The first
    packet that carries one is skipped: FFmpeg's parser hands a report that arrives mid-frame to the frame
    before, one frame interval early (measured against the reports on the wire, TCP and UDP).
    """

    def __init__(self, time_base: Fraction) -> None:
        self.time_base = time_base
        self.reference: tuple[int, int] | None = None  # (camera clock in µs, PTS) of the latest packet with a report
        self._seen = False  # a packet with a report has come (the first is skipped)

    def packet(self, packet: av.Packet) -> None:
        if packet.pts is None or not packet.has_sidedata("prft"):
            return
        wallclock_us = prft_wallclock_us(bytes(packet.get_sidedata("prft")))
        if self._seen:
            self.reference = (wallclock_us, packet.pts)
        self._seen = True

    def time(self, pts: int | None) -> float | None:
        """The camera's clock at ``pts`` (the stream's time base); None before a report or without a PTS."""
        if self.reference is None or pts is None:
            return None
        return camera_wall_time(*self.reference, pts, self.time_base)


def _demux(
    container: av.container.InputContainer,
    stream: av.video.stream.VideoStream,
    url: str,
    on_decode_error: Callable[[], None] | None,
) -> Iterator[av.Packet]:
    """The stream's packets. A packet of a stream announced mid-file (damaged MPEG-TS, a camera adding a track)
    makes PyAV's demuxer raise IndexError after reading it: skip it as a decode error and read on."""
    while True:
        try:
            yield from container.demux(stream)
            return
        except IndexError:
            logger.debug("source skipped a packet of an unannounced stream url=%s", redact_url(url))
            if on_decode_error is not None:
                on_decode_error()


def _decode(
    container: av.container.InputContainer,
    stream: av.video.stream.VideoStream,
    url: str,
    timeout_s: float,
    first_frame_timeout_s: float | None,
    stop: threading.Event,
    on_decode_error: Callable[[], None] | None,
    reports: _SenderReportClock | None = None,
    keyframes: KeyframeGate | None = None,
    recorder: StreamRecording | None = None,
) -> Iterator[av.VideoFrame]:
    """The stream's frames; ends quietly when a read is aborted because ``stop`` was set. ``reports`` reads each
    packet's sender-report clock before the packet is decoded; ``keyframes`` hears each keyframe packet's PTS
    before it is decoded, so a switch between keyframes only and every frame happens at a keyframe."""
    safe_url = redact_url(url)
    asked = time.monotonic()  # when the next packet was asked for: the consumer's time is not silence
    deadline = asked + (math.inf if first_frame_timeout_s is None else first_frame_timeout_s)
    waiting = True  # for the first frame
    try:
        for packet in _interruptible(_demux(container, stream, url, on_decode_error), stop):
            if reports is not None:
                reports.packet(packet)
            if keyframes is not None and packet.is_keyframe:
                pts = packet.dts if packet.pts is None else packet.pts
                if pts is not None and stream.time_base:
                    keyframes.keyframe(float(pts * stream.time_base))
                    _skip_frames(stream, keyframes)
            try:
                frames = packet.decode()
            except av.FFmpegError as e:
                logger.debug("source skipped packet url=%s pts=%s reason=%s", safe_url, packet.pts, _reason(e, url))
                if on_decode_error is not None:
                    on_decode_error()
                frames = []
            if recorder is not None:  # after decoding: muxing rebases the packet's times in place
                recorder.packet(packet)
            if frames:
                waiting = False
            elif waiting and time.monotonic() > deadline:  # packets come, but nothing decodes from them
                raise SourceError(
                    f"{safe_url}: no video frame decoded within {first_frame_timeout_s:g} s of opening "
                    "(no keyframe came, or the video cannot be decoded)"
                )
            yield from frames
            asked = time.monotonic()
    except av.FFmpegError as e:
        if stop.is_set():
            return
        waited_s = time.monotonic() - asked
        if waited_s >= 0.9 * timeout_s:  # FFmpeg's socket timeout or PyAV's read timeout: both say little
            raise SourceError(f"reading {safe_url} stalled: no data for {waited_s:.1f} s") from None
        raise SourceError(f"reading {safe_url} failed: {_reason(e, url)}") from None
