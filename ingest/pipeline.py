"""Streams in, clips out: one thread per source, one bounded clip queue for all streams.

Sources block (decoding, network reads, real-time pacing), so each runs in its own daemon thread
and never waits on the event loop: finished clips are handed over with ``call_soon_threadsafe``
and ``put_nowait``. When the queue is full the clip is dropped and counted, so a slow encoder costs
frames, never ingest latency or memory.

A frame's wall time is this server's clock when it arrived, or, for an RTSP stream that asks
(``StreamSpec.camera_clock``), the camera's own clock from its RTCP sender reports once one has come, unless
that is further than ``camera_clock_max_skew_s`` from ours. A clip never mixes the two.

A live source (RTSP, RTMP, ...) that fails to open, drops, stalls or decodes nothing is reopened with
exponential backoff until the stream is removed; a file that fails, fails for good. So does a source that
refuses us (401, 403, 404) a few times in a row: retrying cannot fix credentials, and would lock the account
of a camera that counts bad logins.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

from prometheus_client import REGISTRY, CollectorRegistry

from hico.pixels import squash_resize
from ingest.clips import ClipGrouper
from ingest.clock import MediaClock
from ingest.keyframes import ALL_FRAMES, SLACK, KeyframeGate, KeyframeState
from ingest.metrics import DropReason, IngestMetrics
from ingest.recording import StreamRecording
from ingest.sampler import FrameSampler, Verdict
from ingest.source import (
    Frame,
    SourceError,
    SourceRefused,
    UnsafeSourceError,
    check_source,
    open_frames,
    redact_text,
    redact_url,
)
from ingest.spec import StreamSpec
from ingest.thumbnails import THUMBNAIL_FRAME, make_thumbnail
from protos.clip import CLIP_FRAMES, Clip, check_stream_name
from vcflash.serve.errors import AlreadyExists, Exhausted, Invalid, NotFound, excerpt
from vcflash.serve.settings import IngestSettings

logger = logging.getLogger(__name__)

# Clips handed to the event loop but not yet queued, per stream; more means the loop is stalled.
_MAX_HANDOFFS = 8
# A disconnect for the same reason as the one before is logged at warning level once in this many: retrying
# every second, a camera that is away for hours would otherwise fill the log.
_LOG_REPEATS_EVERY = 60

# StreamStatus.clock: where wall times come from. A camera clock too far from ours is "server (camera clock off by
# +1000.0 s)" for the rest of the connection.
SERVER_CLOCK = "server"
CAMERA_CLOCK = "camera"
WAITING_FOR_REPORT = "camera (waiting for sender report)"  # this server's clock until the camera's first report


FrameSource = Callable[[threading.Event], Iterator[Frame]]  # frames until the event is set


class StreamState(enum.StrEnum):
    STARTING = "starting"  # opening the source
    RUNNING = "running"  # frames are flowing
    RECONNECTING = "reconnecting"  # live sources (RTSP) between attempts
    FINISHED = "finished"  # a file ended
    FAILED = "failed"  # see the status's error
    STOPPED = "stopped"  # stopped on request


ENDED = frozenset({StreamState.FINISHED, StreamState.FAILED, StreamState.STOPPED})


class StreamExists(AlreadyExists, ValueError):
    """The name is taken: ALREADY_EXISTS for clients, and the ValueError the manager has always raised."""


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
    clock: str = SERVER_CLOCK  # where wall times come from: SERVER_CLOCK, CAMERA_CLOCK, WAITING_FOR_REPORT, ...
    # what is decoded: "all frames", "keyframes only", or for a keyframes-only stream "all frames (...)" and why
    decode: str = ALL_FRAMES


class StreamWorker:
    """Runs one source in its own thread: decode, sample, group into clips, hand them to the queue.

    A live source (``spec.is_live``) is reopened after every failure, waiting per
    ``settings.reconnect``, until stopped; meanwhile the state is ``reconnecting`` and ``error`` says
    why. A connection that decodes no frame within ``settings.first_frame_timeout_s`` is such a
    failure. A source that refuses us (401, 403, 404: :class:`SourceRefused`) ``settings.refused_tries``
    times in a row fails, its error starting with the reason ("unauthorized: ..."); a file fails at
    once. The partial clip at a disconnect is dropped (``disconnect``) and clip numbering continues.
    Each connection starts a new sampler, and the stream's ``clock`` (a :class:`MediaClock`) shifts
    its media times to go on from the last frame plus the time the stream was away (at least one
    sampling interval): media time never goes back and keeps pace with wall time. The first
    connection's media times are its PTS unchanged, unless ``clock`` continues a stream that came
    before (resumed after a restart, or replaced). Reconnecting applies to URLs opened here, not to
    a ``source`` hook.

    With ``spec.camera_clock`` a frame's wall time is the camera's clock (``Frame.camera_time``) once the
    connection's first sender report has come, and this server's before. A camera clock further than
    ``settings.camera_clock_max_skew_s`` from ours is ignored for the rest of the connection (a warning, once per
    stream, gives the skew). When a connection's clock changes, its partial clip is dropped (``discontinuity``):
    a clip's wall times come from one clock. Media time, and the gaps the media clock measures, stay on ours.

    With ``spec.keyframes_only`` (a URL opened here) a :class:`KeyframeGate` measures the keyframe interval and
    every frame is decoded while it is unknown (each connection's first GOP) or longer than the sampling period,
    so the stream is never sampled below ``fps``; ``status().decode`` and the ``keyframe_interval_seconds`` and
    ``keyframes_fallback`` metrics say which, and a warning is logged when it falls back.
    """

    def __init__(
        self,
        name: str,
        spec: StreamSpec,
        clips: asyncio.Queue[Clip],
        metrics: IngestMetrics,
        settings: IngestSettings,
        *,
        first_seq: int = 0,
        clock: MediaClock | None = None,
        source: FrameSource | None = None,
        recorder: StreamRecording | None = None,
    ) -> None:
        assert spec.fps is not None, "an admitted spec has its fps: see IngestManager.admit"
        self.name = check_stream_name(name)
        self.spec = spec
        self.fps = spec.fps
        self.clock = clock or MediaClock()
        self._source = source  # frames from elsewhere (a WebRTC track); default: open the URL with PyAV
        self._recorder = recorder  # keeps the video: the URL's packets as they are, or a hook's sampled frames
        self._settings = settings  # timeouts, frame_size (squash sampled frames to S x S), reconnect, refused_tries
        self._safe_url = redact_url(spec.source)
        self._clips = clips
        self._live = source is None and spec.is_live
        self._camera_clock = spec.camera_clock  # wall time from Frame.camera_time where frames carry it (RTSP)
        self._on_camera = False  # this connection's last frame took the camera's clock (source thread only)
        self._camera_skew: float | None = None  # a camera clock ignored on this connection: how far off it was
        self._told_camera = self._told_skew = False  # logged once per stream: the camera clock used; ignored
        self._keyframes = (
            KeyframeGate(self.fps, on_change=self._keyframes_changed)
            if spec.keyframes_only and source is None
            else None
        )
        self._sampler = self._new_sampler()
        self._grouper = ClipGrouper(name, self.fps, first_seq)  # both used by the source thread only
        self._size: tuple[int, int] | None = None  # (width, height) of the first sampled frame
        self._connected_at: float | None = None  # monotonic time of this connection's first frame
        self._stop = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._done: asyncio.Future[None] | None = None
        self._thread: threading.Thread | None = None
        self._dropping = False  # logging state of queue_full drops, event loop only
        self._repeats = 0  # disconnects in a row for the same reason, source thread only

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
        self._clock_name = WAITING_FOR_REPORT if self._camera_clock else SERVER_CLOCK

        self._m_in = metrics.frames_in.labels(name)
        self._m_sampled = metrics.frames_sampled.labels(name)
        self._m_clips = metrics.clips.labels(name)
        self._m_reconnects = metrics.reconnects.labels(name)
        self._m_dropped = {reason: metrics.frames_dropped.labels(name, reason.value) for reason in DropReason}
        if (gate := self._keyframes) is not None:  # read at scrape time
            metrics.keyframe_interval.labels(name).set_function(lambda: gate.state.interval_s or math.nan)
            metrics.keyframes_fallback.labels(name).set_function(lambda: float(gate.state.fallback))

    def start(self) -> None:
        """Start the source thread; call from the event loop that consumes the clip queue."""
        if self._loop is not None:
            raise RuntimeError(f"stream {self.name} already started")
        self._loop = asyncio.get_running_loop()
        self._done = self._loop.create_future()
        self._thread = threading.Thread(target=self._run, name=f"ingest-{self.name}", daemon=True)
        self._thread.start()
        spec = self.spec
        logger.info(
            "stream started stream=%s url=%s fps=%g live=%s realtime=%s loop_file=%s transport=%s listen=%s "
            "keyframes_only=%s camera_clock=%s first_seq=%d",
            self.name,
            self._safe_url,
            self.fps,
            self._live,
            spec.realtime,
            spec.loop,
            spec.transport,
            spec.listen,
            spec.keyframes_only,
            self._camera_clock,
            self._next_seq,
        )

    async def wait(self) -> StreamStatus:
        """Wait until the source ends (a file finishes, fails or is stopped); all its clips are handed over."""
        if self._done is None:
            raise RuntimeError(f"stream {self.name} not started")
        await asyncio.shield(self._done)
        return self.status()

    async def stop(self, timeout_s: float = 5.0) -> StreamStatus:
        """Ask the source to stop and wait up to ``timeout_s`` for its thread; a blocking open or network read
        is aborted at once and its connection closed (see :func:`ingest.source.open_frames`)."""
        self._stop.set()
        if self._done is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._done), timeout_s)
                # the thread resolved _done as its last act: joining it takes a moment, and then it is gone
                if self._thread is not None:
                    await asyncio.to_thread(self._thread.join, timeout_s)
            except TimeoutError:
                logger.warning("stream stop timed out stream=%s timeout_s=%g", self.name, timeout_s)
        return self.status()

    @property
    def hooked(self) -> bool:
        """Whether frames come from a hook (a WebRTC session), not from opening the source."""
        return self._source is not None

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
                clock=self._clock_name,
                decode=ALL_FRAMES if self._keyframes is None else self._keyframes.state.describe(self.fps),
            )

    # ---------------------------------------------------------------- source thread

    def _run(self) -> None:
        try:
            state, error = self._ingest()
        except Exception as e:  # a bug must fail this stream only, and its text may echo the URL
            state, error = StreamState.FAILED, redact_text(f"{type(e).__name__}: {e}", self.spec.source)
            logger.exception("stream crashed stream=%s", self.name)
        if self._recorder is not None:
            self._recorder.end()
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
        """Read the source to its end; reopen a live one after each failure until stopped or refused for good."""
        attempt = 0  # reconnects since the last healthy connection
        refused = 0  # refusals (401, 403, 404) in a row
        while True:
            self._sampler, self._connected_at = self._new_sampler(), None
            if self._keyframes is not None:
                self._keyframes.connect()  # decode every frame until this connection's keyframe interval is known
            self.clock.connect(min_gap_s=1 / self.fps)
            if self._camera_clock:  # each connection waits for its own first sender report
                self._on_camera, self._camera_skew = False, None
                with self._lock:
                    self._clock_name = WAITING_FOR_REPORT
            try:
                self._read()
                if not self._live:
                    return StreamState.FINISHED, None
                reason, refused = f"{self._safe_url}: the stream ended", 0
            except UnsafeSourceError as e:  # refused again at a reconnect (the policy changed): never retried
                return StreamState.FAILED, str(e)
            except SourceError as e:
                refused = refused + 1 if isinstance(e, SourceRefused) else 0
                if isinstance(e, SourceRefused) and (refused >= self._settings.refused_tries or not self._live):
                    return StreamState.FAILED, self._gave_up(e, refused)
                if not self._live:
                    return StreamState.FAILED, str(e)
                reason = str(e)
            if self._stop.is_set():
                return StreamState.STOPPED, None
            if (
                self._connected_at is not None
                and time.monotonic() - self._connected_at >= self._settings.reconnect.reset_after_s
            ):
                attempt = 0
            delay = self._settings.reconnect.delay(attempt)
            attempt += 1
            self._disconnected(reason, delay)
            if self._stop.wait(delay):
                return StreamState.STOPPED, None
            with self._lock:
                self._reconnects += 1
            self._m_reconnects.inc()

    def _new_sampler(self) -> FrameSampler:
        # keyframes-only: a keyframe a hair early (PTS jitter, 29.97 fps) still counts for its sampling instant
        return FrameSampler(self.fps, slack=SLACK if self._keyframes is not None else 0.0)

    def _keyframes_changed(self, before: KeyframeState, after: KeyframeState) -> None:
        if after.fallback:
            logger.warning(
                "stream keyframes too far apart, decoding every frame stream=%s keyframe_interval_s=%.3f "
                "sampling_period_s=%.3f: keyframes only would sample %.3g fps instead of %g",
                self.name,
                after.interval_s,
                1 / self.fps,
                1 / after.interval_s if after.interval_s else 0.0,
                self.fps,
            )
        elif not after.decode_all:
            log = logger.info if before.fallback else logger.debug
            log("stream decoding keyframes only stream=%s keyframe_interval_s=%.3f", self.name, after.interval_s)

    def _gave_up(self, e: SourceRefused, tries: int) -> str:
        return (
            f"{e.reason}: {e} ({tries} {'try' if tries == 1 else 'tries in a row'}); "
            f"fix the source, then restart the stream (vcflash streams restart {self.name})"
        )

    def _read(self) -> None:
        """One connection: every frame into the sampler until the source ends or ``stop`` is set."""
        spec = self.spec
        frames = (
            self._source(self._stop)
            if self._source is not None
            else open_frames(
                spec.source,
                realtime=spec.realtime,
                stop=self._stop,
                loop=spec.loop,
                live=self._live,
                transport=spec.transport,
                listen=spec.listen,
                keyframes=self._keyframes,
                camera_clock=spec.camera_clock,
                timeout_s=self._settings.source_timeout_s,
                first_frame_timeout_s=self._settings.first_frame_timeout_s,
                media_root=self._settings.media_root,
                allow_files=self._settings.media_root is not None,
                max_frame_pixels=self._settings.max_frame_pixels,
                on_decode_error=lambda: self._drop(DropReason.DECODE_ERROR, 1),
                recorder=self._recorder,
            )
        )
        with contextlib.closing(frames):  # closes the container before anyone hears the stream ended
            for frame in frames:
                self._on_frame(frame)

    def _disconnected(self, reason: str, delay: float) -> None:
        dropped = self._grouper.discard()
        with self._lock:
            repeated = self._state is StreamState.RECONNECTING and self._error == reason
            self._state, self._error, self._partial = StreamState.RECONNECTING, reason, 0
            reconnects = self._reconnects
        self._drop(DropReason.DISCONNECT, dropped)
        self._repeats = self._repeats + 1 if repeated else 0
        log = logger.debug if self._repeats % _LOG_REPEATS_EVERY else logger.warning
        log(
            "stream disconnected stream=%s reason=%s dropped=%d reconnects=%d retry_in_s=%.2f repeats=%d",
            self.name,
            reason,
            dropped,
            reconnects,
            delay,
            self._repeats,
        )

    def _on_frame(self, frame: Frame) -> None:
        if self._connected_at is None:
            self._connected_at = time.monotonic()
        media = self.clock.media_time(frame.pts, frame.wall_time)  # our clock: the time a reconnect was away
        on_camera = self._on_camera
        wall = self._wall_time(frame) if self._camera_clock else frame.wall_time
        verdict = self._sampler.offer(media)
        switch_dropped = self._grouper.discard() if self._on_camera != on_camera else 0  # one clock per clip
        restart_dropped = 0
        if verdict is Verdict.RESTART:
            restart_dropped = self._grouper.discard()
            logger.warning("stream restarted stream=%s media_time=%.3f dropped=%d", self.name, media, restart_dropped)
        clip = None
        if verdict is not Verdict.SKIP:
            rgb = frame.to_rgb(self._size)
            self._size = self._size or (rgb.shape[1], rgb.shape[0])
            # the clip's middle frame, as decoded (aspect kept), before the squash below
            thumbnail = make_thumbnail(rgb) if self._grouper.pending == THUMBNAIL_FRAME else b""
            if self._recorder is not None and self._source is not None:  # a hook has no packets to keep
                self._recorder.frame(rgb, wall, self.fps)
            if (size := self._settings.frame_size) is not None:  # a queued clip holds 4 x S x S x 3 bytes
                rgb = squash_resize(rgb, size)
            clip = self._grouper.add(rgb, media, wall, thumbnail)
        with self._lock:
            self._frames_in += 1
            resumed = self._state is StreamState.RECONNECTING
            if self._state is not StreamState.RUNNING:
                self._state, self._error = StreamState.RUNNING, None
            self._partial = self._grouper.pending  # a switch of clocks may empty it on a frame not sampled
            if verdict is Verdict.SKIP:
                self._not_sampled += 1
            else:
                self._sampled += 1
                self._last_media, self._last_wall = media, wall
                self._next_seq = self._grouper.next_seq
        if resumed:
            logger.info(
                "stream reconnected stream=%s media_time=%.3f reconnects=%d", self.name, media, self._reconnects
            )
        self._m_in.inc()
        if verdict is not Verdict.SKIP:
            self._m_sampled.inc()
        self._drop(DropReason.DISCONTINUITY, switch_dropped + restart_dropped)
        if clip is not None:
            self._hand_off(clip)

    def _wall_time(self, frame: Frame) -> float:
        """The frame's wall time for a ``camera_clock`` stream: the camera's once it reports, if close to ours."""
        if frame.camera_time is None or self._camera_skew is not None:  # no report yet, or one too far off
            return frame.wall_time
        skew = frame.camera_time - frame.wall_time
        limit = self._settings.camera_clock_max_skew_s
        if abs(skew) > limit:
            self._on_camera, self._camera_skew = False, skew
            with self._lock:
                self._clock_name = f"{SERVER_CLOCK} (camera clock off by {skew:+.1f} s)"
            log = logger.debug if self._told_skew else logger.warning
            self._told_skew = True
            log(
                "stream camera clock ignored stream=%s skew_s=%+.3f max_skew_s=%g: wall times stay on this "
                "server's clock for this connection (VCFLASH_CAMERA_CLOCK_MAX_SKEW_S)",
                self.name,
                skew,
                limit,
            )
            return frame.wall_time
        if not self._on_camera:
            self._on_camera = True
            with self._lock:
                self._clock_name = CAMERA_CLOCK
            log = logger.debug if self._told_camera else logger.info
            self._told_camera = True
            log("stream camera clock used stream=%s skew_s=%+.3f", self.name, skew)
        return frame.camera_time

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
    """The streams of one service: admit, add, remove, status. One failing source never touches the others.

    All streams share one bounded queue, ``clips``; the encoder side consumes it. Metrics go to
    ``registry``; use one manager per registry.
    """

    def __init__(self, settings: IngestSettings | None = None, *, registry: CollectorRegistry = REGISTRY) -> None:
        self.settings = settings or IngestSettings()
        self.clips: asyncio.Queue[Clip] = asyncio.Queue(maxsize=self.settings.queue_clips)
        self.metrics = IngestMetrics(registry)
        self.metrics.track_queue(self.clips.qsize)
        self._workers: dict[str, StreamWorker] = {}

    def admit(self, spec: StreamSpec, hooked: bool = False) -> StreamSpec:
        """``spec`` as this server runs it (its default fps filled in), or ``Invalid`` if it is over a limit or
        its source is not allowed (see :func:`ingest.source.check_source`; ``hooked``: frames come from a hook,
        e.g. WebRTC, and the source is only a name)."""
        s = self.settings
        if len(spec.source) > s.max_source_chars:
            raise Invalid(f"source is longer than {s.max_source_chars} characters")
        fps = s.fps if spec.fps is None else spec.fps
        if fps > s.max_fps:
            raise Invalid(f"fps must be <= {s.max_fps:g}, got {fps!r}")
        if not hooked:
            try:
                check_source(spec.source, media_root=s.media_root)
            except UnsafeSourceError as e:
                raise Invalid(str(e)) from None
        return replace(spec, fps=fps)

    def add(
        self,
        name: str,
        spec: StreamSpec,
        *,
        first_seq: int = 0,
        clock: MediaClock | None = None,
        source: FrameSource | None = None,
        recorder: StreamRecording | None = None,
    ) -> StreamStatus:
        """Start stream ``name`` (see :class:`StreamSpec`); call from the event loop.

        The one place a stream is admitted: its name, the stream limit and the spec's limits are checked
        here. ``first_seq`` and ``clock`` continue a stream that came before (a restart, a WHIP sender
        publishing again): its clip numbering and its media clock. ``source`` gives frames from elsewhere
        (a WebRTC session) instead of opening ``spec.source``. ``recorder`` keeps its video (``spec.record``).
        """
        check_stream_name(name)
        spec = self.admit(spec, hooked=source is not None)
        if name in self._workers:
            state = self._workers[name].status().state
            hint = f" ({state.value}: restart it, or remove it first)" if state in ENDED else ""
            raise StreamExists(f"stream {name!r} already exists{hint}")
        if len(self._workers) >= self.settings.max_streams:
            raise Exhausted(f"this server takes at most {self.settings.max_streams} streams")
        worker = StreamWorker(
            name,
            spec,
            self.clips,
            self.metrics,
            self.settings,
            first_seq=first_seq,
            clock=clock,
            source=source,
            recorder=recorder,
        )
        worker.start()
        self._workers[name] = worker
        return worker.status()

    async def remove(self, name: str) -> StreamStatus:
        """Stop stream ``name`` and forget it; returns its last status."""
        worker = self._workers.pop(name, None)
        if worker is None:
            raise NotFound(f"no stream named {excerpt(name)}")
        status = await worker.stop(self.settings.stop_timeout_s)
        self.metrics.forget(name)
        logger.info("stream removed stream=%s state=%s", name, status.state.value)
        return status

    async def wait(self, name: str) -> StreamStatus:
        """Wait until stream ``name``'s source ends."""
        return await self.worker(name).wait()

    def worker(self, name: str) -> StreamWorker:
        try:
            return self._workers[name]
        except KeyError:
            raise NotFound(f"no stream named {excerpt(name)}") from None

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
