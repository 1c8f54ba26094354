"""Streams in, clips out: one thread per source, one bounded clip queue for all streams.

Sources block (decoding, network reads, real-time pacing), so each runs in its own daemon thread
and never waits on the event loop: finished clips are handed over with ``call_soon_threadsafe``
and ``put_nowait``. When the queue is full the clip is dropped and counted, so a slow encoder costs
frames, never ingest latency or memory.

A live source (RTSP, RTMP, ...) that fails to open, drops or stalls is reopened with exponential
backoff until the stream is removed; a file that fails, fails for good.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import math
import random
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import REGISTRY, CollectorRegistry

from hico.video import squash_resize
from ingest.clips import CLIP_FRAMES, Clip, ClipGrouper
from ingest.metrics import DropReason, IngestMetrics
from ingest.sampler import FrameSampler, Verdict
from ingest.source import (
    DEFAULT_TIMEOUT_S,
    Frame,
    SourceError,
    Transport,
    check_source_options,
    is_live_url,
    open_frames,
    redact_text,
    redact_url,
)

logger = logging.getLogger(__name__)

STREAM_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
MAX_FPS = 30.0
# Clips handed to the event loop but not yet queued, per stream; more means the loop is stalled.
_MAX_HANDOFFS = 8


FrameSource = Callable[[threading.Event], Iterator[Frame]]  # frames until the event is set


class StreamState(enum.StrEnum):
    STARTING = "starting"  # opening the source
    RUNNING = "running"  # frames are flowing
    RECONNECTING = "reconnecting"  # live sources (RTSP) between attempts
    FINISHED = "finished"  # a file ended
    FAILED = "failed"  # see the status's error
    STOPPED = "stopped"  # stopped on request


def check_stream_name(name: str) -> str:
    if not STREAM_NAME.fullmatch(name):
        raise ValueError(f"stream name must match {STREAM_NAME.pattern}, got {name!r}")
    return name


def check_fps(fps: float) -> float:
    if not (math.isfinite(fps) and 0 < fps <= MAX_FPS):
        raise ValueError(f"fps must be in (0, {MAX_FPS:g}], got {fps!r}")
    return fps


@dataclass(frozen=True)
class Backoff:
    """Waits between reconnects of a live source: ``initial_s`` doubling up to ``max_s``.

    Each wait is spread by +-``jitter`` (a fraction) at random, so cameras that dropped together
    (a switch rebooting) do not all come back in the same instant. A connection that delivered
    frames for ``reset_after_s`` was healthy: the wait after it starts again from ``initial_s``.
    """

    initial_s: float = 0.5
    max_s: float = 30.0
    jitter: float = 0.2
    reset_after_s: float = 60.0

    def __post_init__(self) -> None:
        for name in ("initial_s", "max_s", "reset_after_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"backoff {name} must be a positive number of seconds, got {value!r}")
        if self.max_s < self.initial_s:
            raise ValueError(f"backoff max_s ({self.max_s!r}) must be >= initial_s ({self.initial_s!r})")
        if not 0 <= self.jitter < 1:
            raise ValueError(f"backoff jitter must be in [0, 1), got {self.jitter!r}")

    def delay(self, attempt: int) -> float:
        """Seconds to wait before reconnect ``attempt`` (0 for the first after a healthy connection)."""
        base = min(self.max_s, self.initial_s * 2.0 ** min(attempt, 64))
        return base * (1 + self.jitter * random.uniform(-1, 1))


@dataclass(frozen=True)
class IngestSettings:
    queue_size: int = 256  # clips, shared by all streams
    fps: float = 1.0  # default sampling rate
    source_timeout_s: float = DEFAULT_TIMEOUT_S  # opening and each network read
    stop_timeout_s: float = 5.0  # how long stopping a stream waits for its thread
    frame_size: int | None = None  # the encoder's input size S: sampled frames are squashed to S x S
    reconnect: Backoff = Backoff()  # live sources only

    def __post_init__(self) -> None:
        if self.queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {self.queue_size}")
        check_fps(self.fps)
        for name in ("source_timeout_s", "stop_timeout_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")


@dataclass(frozen=True)
class StreamStatus:
    """A snapshot of one stream.

    Every decoded frame is accounted for: ``frames_in == frames_not_sampled + frames_sampled`` and
    ``frames_sampled == 4 * clips_emitted + frames_pending + dropped`` (all reasons but
    ``decode_error``, which counts packets that never became frames).
    """

    name: str
    url: str  # redacted
    state: StreamState
    error: str | None  # redacted
    fps: float
    frames_in: int
    frames_sampled: int
    frames_not_sampled: int
    frames_dropped: dict[str, int]  # by DropReason value
    frames_pending: int  # sampled, not yet queued: the partial clip and clips on their way to the queue
    clips_emitted: int
    next_seq: int  # the seq of the next clip this stream makes
    last_media_time: float | None
    last_wall_time: float | None
    reconnects: int  # times a live source was reopened after it failed, dropped or stalled


class StreamWorker:
    """Runs one source in its own thread: decode, sample, group into clips, hand them to the queue.

    A live URL (``live``, default by its scheme) is reopened after every failure, waiting per
    ``reconnect``, until stopped; meanwhile the state is ``reconnecting`` and ``error`` says why.
    The partial clip at a disconnect is dropped (``disconnect``) and clip numbering continues.
    Each connection starts a new sampler, and its media times are shifted to go on from the last
    frame plus the time the stream was away (at least one sampling interval): a new RTSP session
    restarts its clock near 0, and downstream needs a stream's media time to never go back and to
    keep pace with wall time. The first connection's media times are its PTS unchanged.
    Reconnecting applies to URLs opened here, not to a ``source`` hook.
    """

    def __init__(
        self,
        name: str,
        url: str,
        clips: asyncio.Queue[Clip],
        metrics: IngestMetrics,
        *,
        fps: float = 1.0,
        realtime: bool = True,
        loop_file: bool = False,
        first_seq: int = 0,
        resume_from: tuple[float, float] | None = None,
        source_timeout_s: float = DEFAULT_TIMEOUT_S,
        source: FrameSource | None = None,
        frame_size: int | None = None,
        live: bool | None = None,
        transport: Transport = "tcp",
        listen: bool = False,
        keyframes_only: bool = False,
        reconnect: Backoff | None = None,
    ) -> None:
        self.name = check_stream_name(name)
        self._source = source  # frames from elsewhere (a WebRTC track); default: open `url` with PyAV
        self._frame_size = frame_size  # squash sampled frames to the encoder's S x S at once
        self.fps = check_fps(fps)
        self._url = url
        self._safe_url = redact_url(url)
        self._clips = clips
        self._realtime = realtime
        self._loop_file = loop_file
        self._source_timeout_s = source_timeout_s
        check_source_options(url, transport=transport, listen=listen)
        self._live = source is None and (listen or (is_live_url(url) if live is None else live))
        self._transport: Transport = transport
        self._listen = listen
        self._keyframes_only = keyframes_only
        self._reconnect = reconnect or Backoff()
        self._sampler = FrameSampler(fps)
        self._grouper = ClipGrouper(name, fps, first_seq)  # both used by the source thread only
        self._size: tuple[int, int] | None = None  # (width, height) of the first sampled frame
        self._offset = 0.0  # added to this connection's PTS: see the class docstring
        self._rebase = False  # the next frame is a new connection's first
        # Media and wall time of the last frame read; given when resuming a stream stored before a restart,
        # so its first connection is shifted like a reconnect and media time never goes back.
        self._last_frame: tuple[float, float] | None = resume_from
        self._connected_at: float | None = None  # monotonic time of this connection's first frame
        self._stop = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._done: asyncio.Future[None] | None = None
        self._dropping = False  # logging state of queue_full drops, event loop only

        self._lock = threading.Lock()  # guards the fields below: the source thread writes, the loop reads
        self._state = StreamState.STARTING
        self._error: str | None = None
        self._frames_in = self._sampled = self._not_sampled = self._clips_emitted = 0
        self._partial = self._in_flight = 0
        self._dropped = dict.fromkeys(DropReason, 0)
        self._next_seq = first_seq
        self._last_media: float | None = None
        self._last_wall: float | None = None
        self._reconnects = 0

        self._m_in = metrics.frames_in.labels(name)
        self._m_sampled = metrics.frames_sampled.labels(name)
        self._m_clips = metrics.clips.labels(name)
        self._m_reconnects = metrics.reconnects.labels(name)
        self._m_dropped = {reason: metrics.frames_dropped.labels(name, reason.value) for reason in DropReason}

    def start(self) -> None:
        """Start the source thread; call from the event loop that consumes the clip queue."""
        if self._loop is not None:
            raise RuntimeError(f"stream {self.name} already started")
        self._loop = asyncio.get_running_loop()
        self._done = self._loop.create_future()
        threading.Thread(target=self._run, name=f"ingest-{self.name}", daemon=True).start()
        logger.info(
            "stream started stream=%s url=%s fps=%g live=%s realtime=%s loop_file=%s transport=%s listen=%s "
            "keyframes_only=%s first_seq=%d",
            self.name,
            self._safe_url,
            self.fps,
            self._live,
            self._realtime,
            self._loop_file,
            self._transport,
            self._listen,
            self._keyframes_only,
            self._next_seq,
        )

    async def wait(self) -> StreamStatus:
        """Wait until the source ends (a file finishes, fails or is stopped); all its clips are handed over."""
        if self._done is None:
            raise RuntimeError(f"stream {self.name} not started")
        await asyncio.shield(self._done)
        return self.status()

    async def stop(self, timeout_s: float = 5.0) -> StreamStatus:
        """Ask the source to stop and wait up to ``timeout_s`` for its thread (a network read may hold it)."""
        self._stop.set()
        if self._done is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._done), timeout_s)
            except TimeoutError:
                logger.warning("stream stop timed out stream=%s timeout_s=%g", self.name, timeout_s)
        return self.status()

    def status(self) -> StreamStatus:
        with self._lock:
            return StreamStatus(
                name=self.name,
                url=self._safe_url,
                state=self._state,
                error=self._error,
                fps=self.fps,
                frames_in=self._frames_in,
                frames_sampled=self._sampled,
                frames_not_sampled=self._not_sampled,
                frames_dropped={reason.value: n for reason, n in self._dropped.items()},
                frames_pending=self._partial + CLIP_FRAMES * self._in_flight,
                clips_emitted=self._clips_emitted,
                next_seq=self._next_seq,
                last_media_time=self._last_media,
                last_wall_time=self._last_wall,
                reconnects=self._reconnects,
            )

    # ---------------------------------------------------------------- source thread

    def _run(self) -> None:
        try:
            state, error = self._ingest()
        except Exception as e:  # a bug must fail this stream only, and its text may echo the URL
            state, error = StreamState.FAILED, redact_text(f"{type(e).__name__}: {e}", self._url)
            logger.exception("stream crashed stream=%s", self.name)
        if state is StreamState.FINISHED and self._stop.is_set():
            state = StreamState.STOPPED
        leftover = self._grouper.discard()
        with self._lock:
            self._state, self._error, self._partial = state, error, 0
        self._drop(DropReason.INCOMPLETE_CLIP, leftover)
        log = logger.warning if state is StreamState.FAILED else logger.info
        log("stream ended stream=%s state=%s error=%s", self.name, state.value, error)
        try:
            self._loop_call(self._finish)
        except RuntimeError:  # the event loop is gone: nobody is waiting
            pass

    def _ingest(self) -> tuple[StreamState, str | None]:
        """Read the source to its end; reopen a live one after each failure until stopped."""
        attempt = 0  # reconnects since the last healthy connection
        while True:
            self._sampler, self._rebase, self._connected_at = FrameSampler(self.fps), True, None
            try:
                self._read()
                if not self._live:
                    return StreamState.FINISHED, None
                reason = f"{self._safe_url}: the stream ended"
            except SourceError as e:
                if not self._live:
                    return StreamState.FAILED, str(e)
                reason = str(e)
            if self._stop.is_set():
                return StreamState.STOPPED, None
            if (
                self._connected_at is not None
                and time.monotonic() - self._connected_at >= self._reconnect.reset_after_s
            ):
                attempt = 0
            delay = self._reconnect.delay(attempt)
            attempt += 1
            self._disconnected(reason, delay)
            if self._stop.wait(delay):
                return StreamState.STOPPED, None
            with self._lock:
                self._reconnects += 1
            self._m_reconnects.inc()

    def _read(self) -> None:
        """One connection: every frame into the sampler until the source ends or ``stop`` is set."""
        frames = (
            self._source(self._stop)
            if self._source is not None
            else open_frames(
                self._url,
                realtime=self._realtime,
                stop=self._stop,
                loop=self._loop_file,
                live=self._live,
                transport=self._transport,
                listen=self._listen,
                keyframes_only=self._keyframes_only,
                timeout_s=self._source_timeout_s,
                on_decode_error=lambda: self._drop(DropReason.DECODE_ERROR, 1),
            )
        )
        with contextlib.closing(frames):  # closes the container before anyone hears the stream ended
            for frame in frames:
                self._on_frame(frame)

    def _disconnected(self, reason: str, delay: float) -> None:
        dropped = self._grouper.discard()
        with self._lock:
            self._state, self._error, self._partial = StreamState.RECONNECTING, reason, 0
            reconnects = self._reconnects
        self._drop(DropReason.DISCONNECT, dropped)
        logger.warning(
            "stream disconnected stream=%s reason=%s dropped=%d reconnects=%d retry_in_s=%.2f",
            self.name,
            reason,
            dropped,
            reconnects,
            delay,
        )

    def _on_frame(self, frame: Frame) -> None:
        if self._rebase:
            self._rebase, self._connected_at = False, time.monotonic()
            if self._last_frame is not None:
                last_media, last_wall = self._last_frame
                away = max(frame.wall_time - last_wall, 1 / self.fps)
                self._offset = last_media + away - frame.pts
        media = frame.pts + self._offset
        self._last_frame = (media, frame.wall_time)
        verdict = self._sampler.offer(media)
        restart_dropped = 0
        if verdict is Verdict.RESTART:
            restart_dropped = self._grouper.discard()
            logger.warning("stream restarted stream=%s media_time=%.3f dropped=%d", self.name, media, restart_dropped)
        clip = None
        if verdict is not Verdict.SKIP:
            rgb = frame.to_rgb(self._size)
            self._size = self._size or (rgb.shape[1], rgb.shape[0])
            if self._frame_size is not None:  # a queued clip then holds 4 x S x S x 3 bytes, whatever the camera
                rgb = squash_resize(rgb, self._frame_size)
            clip = self._grouper.add(rgb, media, frame.wall_time)
        with self._lock:
            self._frames_in += 1
            resumed = self._state is StreamState.RECONNECTING
            if self._state is not StreamState.RUNNING:
                self._state, self._error = StreamState.RUNNING, None
            if verdict is Verdict.SKIP:
                self._not_sampled += 1
            else:
                self._sampled += 1
                self._last_media, self._last_wall = media, frame.wall_time
                self._partial = self._grouper.pending
                self._next_seq = self._grouper.next_seq
        if resumed:
            logger.info(
                "stream reconnected stream=%s media_time=%.3f reconnects=%d", self.name, media, self._reconnects
            )
        self._m_in.inc()
        if verdict is not Verdict.SKIP:
            self._m_sampled.inc()
        self._drop(DropReason.DISCONTINUITY, restart_dropped)
        if clip is not None:
            self._hand_off(clip)

    def _hand_off(self, clip: Clip) -> None:
        with self._lock:
            stalled = self._in_flight >= _MAX_HANDOFFS
            if not stalled:
                self._in_flight += 1
        if stalled:
            logger.warning("clip dropped stream=%s seq=%d reason=loop_busy", self.name, clip.seq)
            self._drop(DropReason.LOOP_BUSY, CLIP_FRAMES)
        else:
            self._loop_call(self._deliver, clip)

    def _drop(self, reason: DropReason, frames: int) -> None:
        if frames:
            with self._lock:
                self._dropped[reason] += frames
            self._m_dropped[reason].inc(frames)

    def _loop_call(self, callback: Callable[..., None], *args: object) -> None:
        assert self._loop is not None, "started before any frame is read"
        self._loop.call_soon_threadsafe(callback, *args)

    # ---------------------------------------------------------------- event loop

    def _deliver(self, clip: Clip) -> None:
        try:
            self._clips.put_nowait(clip)
            queued = True
        except asyncio.QueueFull:
            queued = False
        with self._lock:
            self._in_flight -= 1
            if queued:
                self._clips_emitted += 1
        if queued:
            self._m_clips.inc()
        else:
            self._drop(DropReason.QUEUE_FULL, CLIP_FRAMES)
        if self._dropping != (not queued):  # log when drops start and stop, not once per clip
            self._dropping = not queued
            logger.warning(
                "clip queue %s stream=%s seq=%d queue_size=%d",
                "full, dropping clips" if self._dropping else "accepting clips again",
                self.name,
                clip.seq,
                self._clips.maxsize,
            )

    def _finish(self) -> None:
        assert self._done is not None
        if not self._done.done():
            self._done.set_result(None)


class IngestManager:
    """The streams of one service: add, remove, status. One failing source never touches the others.

    All streams share one bounded queue, ``clips``; the encoder side consumes it. Metrics go to
    ``registry``; use one manager per registry.
    """

    def __init__(self, settings: IngestSettings | None = None, *, registry: CollectorRegistry = REGISTRY) -> None:
        self.settings = settings or IngestSettings()
        self.clips: asyncio.Queue[Clip] = asyncio.Queue(maxsize=self.settings.queue_size)
        self.metrics = IngestMetrics(registry)
        self.metrics.track_queue(self.clips.qsize)
        self._workers: dict[str, StreamWorker] = {}

    def add(
        self,
        name: str,
        url: str,
        *,
        fps: float | None = None,
        realtime: bool = True,
        loop_file: bool = False,
        first_seq: int = 0,
        resume_from: tuple[float, float] | None = None,
        source: FrameSource | None = None,
        live: bool | None = None,
        transport: Transport = "tcp",
        listen: bool = False,
        keyframes_only: bool = False,
    ) -> StreamStatus:
        """Start ingesting ``url`` as stream ``name``; call from the event loop.

        ``realtime`` plays files at their own pace, as a live stream would arrive; ``first_seq``
        continues a restarted stream's clip numbering, and ``resume_from`` (media and wall time
        where its stored clips end) its media clock. ``live`` (default: by the URL's scheme;
        say ``True`` for an HTTP live stream) reads as frames arrive and reconnects with backoff.
        ``transport`` (RTSP: tcp or udp), ``listen`` (RTSP: wait for a camera to push) and
        ``keyframes_only`` (decode keyframes only) are passed to :func:`ingest.source.open_frames`.
        """
        if name in self._workers:
            raise ValueError(f"stream {name!r} already exists")
        worker = StreamWorker(
            name,
            url,
            self.clips,
            self.metrics,
            fps=self.settings.fps if fps is None else fps,
            realtime=realtime,
            loop_file=loop_file,
            first_seq=first_seq,
            resume_from=resume_from,
            source_timeout_s=self.settings.source_timeout_s,
            source=source,
            frame_size=self.settings.frame_size,
            live=live,
            transport=transport,
            listen=listen,
            keyframes_only=keyframes_only,
            reconnect=self.settings.reconnect,
        )
        worker.start()
        self._workers[name] = worker
        return worker.status()

    async def remove(self, name: str) -> StreamStatus:
        """Stop stream ``name`` and forget it; returns its last status."""
        worker = self._workers.pop(name, None)
        if worker is None:
            raise KeyError(f"no stream named {name!r}")
        status = await worker.stop(self.settings.stop_timeout_s)
        self.metrics.forget(name)
        logger.info("stream removed stream=%s state=%s", name, status.state.value)
        return status

    async def wait(self, name: str) -> StreamStatus:
        """Wait until stream ``name``'s source ends."""
        return await self._worker(name).wait()

    def names(self) -> list[str]:
        return sorted(self._workers)

    def status(self) -> dict[str, StreamStatus]:
        return {name: worker.status() for name, worker in sorted(self._workers.items())}

    async def close(self) -> None:
        """Stop every stream (their clips already queued stay in ``clips``)."""
        workers = list(self._workers.values())
        self._workers.clear()
        await asyncio.gather(*(worker.stop(self.settings.stop_timeout_s) for worker in workers))
        for worker in workers:
            self.metrics.forget(worker.name)

    def _worker(self, name: str) -> StreamWorker:
        try:
            return self._workers[name]
        except KeyError:
            raise KeyError(f"no stream named {name!r}") from None
