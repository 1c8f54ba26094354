"""Decoded frames with presentation times from anything FFmpeg opens (files, http(s), ...).

Reading is blocking and runs in the caller's thread; the pipeline gives each stream its own
thread. Frames stay as decoded ``av.VideoFrame``s until someone asks for RGB, because the
conversion costs more than decoding and most frames are never sampled.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit

import av
import av.container
import av.stream
import av.video.stream
import numpy as np

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 10.0
_MASK = "***"
# Query parameters whose names contain one of these hold secrets (token, access_token, X-Amz-Signature, ...).
_SECRET_PARAMS = ("pass", "pwd", "token", "secret", "key", "auth", "sig", "credential")


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


def _redact_param(param: str) -> str:
    name, eq, _ = param.partition("=")
    return f"{name}={_MASK}" if eq and any(s in name.lower() for s in _SECRET_PARAMS) else param


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
    timeout_s: float = DEFAULT_TIMEOUT_S,
    on_decode_error: Callable[[], None] | None = None,
) -> Iterator[Frame]:
    """Decoded frames of ``url`` in presentation order, until it ends or ``stop`` is set.

    ``realtime`` paces playback to the media clock (a file then behaves like a live stream);
    otherwise frames come as fast as they decode. Either way a frame's wall time is the wall time
    of the first frame plus its PTS offset, so both clocks stay consistent. ``loop`` replays the
    source at its end with both clocks running on, so media time never goes backwards.
    ``timeout_s`` bounds opening and each network read. Undecodable packets are skipped and
    reported through ``on_decode_error``. Raises :class:`SourceError` when the source cannot be
    opened, read, or has no video frames.
    """
    safe_url = redact_url(url)
    origin: tuple[float, float, float] | None = None  # media, wall and monotonic time of the first frame
    pass_start: float | None = None  # media time at which a replay starts
    while not stop.is_set():
        with _open(url, safe_url, timeout_s) as container:
            stream = _video_stream(container, safe_url)
            interval = _frame_interval(stream)
            shift: float | None = None  # media time = PTS + shift within this pass
            media: float | None = None
            for frame in _decode(container, stream, safe_url, on_decode_error):
                if frame.time is None:  # no PTS: follow the previous frame
                    media = (pass_start or 0.0) if media is None else media + interval
                else:
                    if shift is None:
                        shift = 0.0 if pass_start is None else pass_start - frame.time
                    media = frame.time + shift
                if origin is None:
                    origin = (media, time.time(), time.monotonic())
                offset = media - origin[0]
                if realtime:
                    delay = origin[2] + offset - time.monotonic()
                    if delay > 0 and stop.wait(delay):
                        return
                yield Frame(pts=media, wall_time=origin[1] + offset, image=frame)
                if stop.is_set():
                    return
            if media is None:
                raise SourceError(f"{safe_url}: no video frames could be decoded")
            pass_start = media + interval
        if not loop:
            return
        logger.info("source replaying url=%s media_time=%.3f", safe_url, pass_start)


def _open(url: str, safe_url: str, timeout_s: float) -> av.container.InputContainer:
    try:
        return av.open(url, mode="r", timeout=timeout_s)
    except (av.FFmpegError, OSError) as e:  # their text repeats the URL, credentials included: keep the reason
        raise SourceError(f"cannot open {safe_url}: {e.strerror or type(e).__name__}") from None


def _video_stream(container: av.container.InputContainer, safe_url: str) -> av.video.stream.VideoStream:
    """The first real video stream; cover art (an attached picture) is not video."""
    for stream in container.streams.video:
        if not stream.disposition & av.stream.Disposition.attached_pic:
            stream.thread_type = "AUTO"
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
    safe_url: str,
    on_decode_error: Callable[[], None] | None,
) -> Iterator[av.VideoFrame]:
    try:
        for packet in container.demux(stream):
            try:
                frames = packet.decode()
            except av.FFmpegError as e:
                logger.debug("source skipped packet url=%s pts=%s reason=%s", safe_url, packet.pts, e.strerror)
                if on_decode_error is not None:
                    on_decode_error()
                continue
            yield from frames
    except av.FFmpegError as e:
        raise SourceError(f"reading {safe_url} failed: {e.strerror}") from None
