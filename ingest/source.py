"""Decoded frames with presentation times from anything FFmpeg opens: files, http(s), RTSP, RTMP, ...

Reading is blocking and runs in the caller's thread; the pipeline gives each stream its own
thread. Frames stay as decoded ``av.VideoFrame``s until someone asks for RGB, because the
conversion costs more than decoding and most frames are never sampled.

A *live* source (a camera, a relay: RTSP, RTMP, SRT, ...) is read as it arrives: never paced, and
a frame's wall time is when it arrived. A finite one (a file) can be paced to its own clock.
Reconnecting a live source that drops is the pipeline's job; one call here is one connection.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal
from urllib.parse import SplitResult, urlsplit

import av
import av.container
import av.stream
import av.video.stream
import numpy as np

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 10.0
# Schemes of sources that are live by nature. http(s) is not among them: a URL cannot tell an HTTP
# live stream from a file on a web server, so callers say so (``live=True``).
LIVE_SCHEMES = frozenset({"rtsp", "rtsps", "rtmp", "rtmps", "rtmpt", "rtmpe", "srt", "udp", "rtp", "tcp"})
RTSP_SCHEMES = frozenset({"rtsp", "rtsps"})
# A listener waits for a publisher in slices this long, so that ``stop`` is heard between them.
LISTEN_SLICE_S = 1

Transport = Literal["tcp", "udp"]
TRANSPORTS: tuple[Transport, ...] = ("tcp", "udp")

_MASK = "***"
# Query parameters whose names contain one of these hold secrets (token, access_token, X-Amz-Signature, ...).
_SECRET_PARAMS = ("pass", "pwd", "token", "secret", "key", "auth", "sig", "credential")
# userinfo runs to the last "@" of the authority: a password may hold "@" too.
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/?#\s]*@")


class SourceError(Exception):
    """The source cannot be opened or read any further; the message never holds credentials."""


def redact_url(url: str) -> str:
    """``url`` fit for logs and errors: ``user:password@`` becomes ``***@``, secret query values ``***``."""
    parts = urlsplit(url)
    if not parts.scheme or not parts.netloc:
        return url  # a plain path
    userinfo, at, host = parts.netloc.rpartition("@")
    netloc = f"{_MASK}@{host}" if at else host
    query = "&".join(_redact_param(param) for param in parts.query.split("&")) if parts.query else ""
    return SplitResult(parts.scheme, netloc, parts.path, query, parts.fragment).geturl()


def redact_text(text: str, url: str) -> str:
    """``text`` (an FFmpeg or library message) with ``url`` redacted, and any other ``scheme://user@`` too.

    FFmpeg's messages may quote the URL as given or as it rewrote it (a redirect, an RTSP control URL).
    """
    return _USERINFO.sub(rf"\g<scheme>{_MASK}@", text.replace(url, redact_url(url)))


def _redact_param(param: str) -> str:
    name, eq, _ = param.partition("=")
    return f"{name}={_MASK}" if eq and any(s in name.lower() for s in _SECRET_PARAMS) else param


def is_live_url(url: str) -> bool:
    """Whether ``url`` names a live stream by its scheme (RTSP, RTMP, SRT, ...), not a file."""
    return urlsplit(url).scheme.lower() in LIVE_SCHEMES


def check_source_options(url: str, *, transport: str, listen: bool) -> None:
    """Raise ``ValueError`` for options that cannot work, before any thread or socket is started."""
    if transport not in TRANSPORTS:
        raise ValueError(f"transport must be one of {TRANSPORTS}, got {transport!r}")
    if listen and urlsplit(url).scheme.lower() not in RTSP_SCHEMES:
        raise ValueError(f"listen needs an rtsp:// URL, got {redact_url(url)}")


@dataclass(frozen=True, slots=True)
class Frame:
    """One decoded frame: media time (PTS seconds), wall time (Unix seconds it was live), the image."""

    pts: float
    wall_time: float
    image: av.VideoFrame | np.ndarray  # decoded, not yet converted; or RGB uint8 [H, W, 3]

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
    keyframes_only: bool = False,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    on_decode_error: Callable[[], None] | None = None,
) -> Iterator[Frame]:
    """Decoded frames of ``url`` in presentation order, until it ends or ``stop`` is set.

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
    ``keyframes_only`` has the decoder skip all but keyframes, so sampling 1 fps from a stream
    with a 1 s GOP costs a fraction of a full decode; the sampler then picks among keyframes.
    ``timeout_s`` bounds opening and each network read (a stalled stream fails after it).
    Undecodable packets are skipped and reported through ``on_decode_error``. Raises
    :class:`SourceError` when the source cannot be opened, read, or has no video frames.
    """
    check_source_options(url, transport=transport, listen=listen)
    safe_url = redact_url(url)
    rtsp = urlsplit(url).scheme.lower() in RTSP_SCHEMES
    live = listen or (is_live_url(url) if live is None else live)
    # FFmpeg 5+ names the RTSP socket I/O timeout "timeout", in microseconds ("stimeout" is gone); PyAV's own
    # timeout below also bounds every read, whatever the protocol.
    options = {"rtsp_transport": transport, "timeout": str(round(timeout_s * 1e6))} if rtsp else {}
    origin: tuple[float, float, float] | None = None  # media, wall and monotonic time of the first file frame
    pass_start: float | None = None  # media time at which a replay starts
    while not stop.is_set():
        container = (
            _listen(url, safe_url, options, timeout_s, stop) if listen else _open(url, safe_url, options, timeout_s)
        )
        if container is None:
            return
        with container:
            stream = _video_stream(container, safe_url, keyframes_only)
            interval = _frame_interval(stream)
            shift: float | None = None  # media time = PTS + shift within this pass
            media: float | None = None
            for frame in _decode(container, stream, url, timeout_s, on_decode_error):
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
                yield Frame(pts=media, wall_time=wall, image=frame)
                if stop.is_set():
                    return
            if media is None:
                raise SourceError(f"{safe_url}: no video frames could be decoded")
            pass_start = media + interval
        if live or not loop:
            return
        logger.info("source replaying url=%s media_time=%.3f", safe_url, pass_start)


def _open(url: str, safe_url: str, options: dict[str, str], timeout_s: float) -> av.container.InputContainer:
    try:
        return av.open(url, mode="r", options=options, timeout=timeout_s)
    except (av.FFmpegError, OSError) as e:  # str(e) repeats the URL, credentials included: keep the reason
        raise SourceError(f"cannot open {safe_url}: {_reason(e, url)}") from None


def _listen(
    url: str, safe_url: str, options: dict[str, str], timeout_s: float, stop: threading.Event
) -> av.container.InputContainer | None:
    """The pushed stream once a publisher connects; ``None`` if ``stop`` is set first.

    FFmpeg's own ``listen_timeout`` (whole seconds) bounds each wait: PyAV's open timeout alone
    makes a listener fail at once (OverflowError) in FFmpeg 7+.
    """
    options = options | {"rtsp_flags": "listen", "listen_timeout": str(LISTEN_SLICE_S)}
    while not stop.is_set():
        try:
            return av.open(url, mode="r", options=options, timeout=(LISTEN_SLICE_S + timeout_s, timeout_s))
        except TimeoutError:  # nobody published during this slice
            continue
        except (av.FFmpegError, OSError) as e:
            raise SourceError(f"cannot listen on {safe_url}: {_reason(e, url)}") from None
    return None


def _reason(error: av.FFmpegError | OSError, url: str) -> str:
    return redact_text(error.strerror or type(error).__name__, url)


def _video_stream(
    container: av.container.InputContainer, safe_url: str, keyframes_only: bool
) -> av.video.stream.VideoStream:
    """The first real video stream; cover art (an attached picture) is not video."""
    for stream in container.streams.video:
        if not stream.disposition & av.stream.Disposition.attached_pic:
            stream.thread_type = "AUTO"
            if keyframes_only:  # the decoder still parses every packet but reconstructs keyframes only
                stream.codec_context.skip_frame = "NONKEY"
            return stream
    raise SourceError(f"{safe_url}: no video stream")


def _frame_interval(stream: av.video.stream.VideoStream) -> float:
    """Seconds between frames, for PTS-less frames and for where a replay starts; 0 if unknown."""
    for rate in (stream.average_rate, stream.guessed_rate):
        if rate and rate > 0:
            return float(1 / rate)
    return 0.0


def _decode(
    container: av.container.InputContainer,
    stream: av.video.stream.VideoStream,
    url: str,
    timeout_s: float,
    on_decode_error: Callable[[], None] | None,
) -> Iterator[av.VideoFrame]:
    safe_url = redact_url(url)
    asked = time.monotonic()  # when the next packet was asked for: the consumer's time is not silence
    try:
        for packet in container.demux(stream):
            try:
                frames = packet.decode()
            except av.FFmpegError as e:
                logger.debug("source skipped packet url=%s pts=%s reason=%s", safe_url, packet.pts, _reason(e, url))
                if on_decode_error is not None:
                    on_decode_error()
                frames = []
            yield from frames
            asked = time.monotonic()
    except av.FFmpegError as e:
        waited_s = time.monotonic() - asked
        if waited_s >= 0.9 * timeout_s:  # FFmpeg's socket timeout or PyAV's read timeout: both say little
            raise SourceError(f"reading {safe_url} stalled: no data for {waited_s:.1f} s") from None
        raise SourceError(f"reading {safe_url} failed: {_reason(e, url)}") from None
