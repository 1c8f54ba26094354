"""WebRTC frames in: one aiortc peer connection per stream, read by the pipeline like any other source.

aiortc runs on the event loop; the pipeline reads frames in the stream's own thread. A small
bounded buffer sits between them: the event loop never waits on the pipeline, and when the
pipeline falls behind the oldest buffered frame is dropped and counted (``frames_dropped``), so
a slow consumer costs frames, never aiortc's receive loop, latency or memory.

Negotiation is non-trickle (WHIP style): the offer carries the sender's candidates, and the
answer is sent once ICE gathering is complete. Only host candidates are used: no STUN, no TURN.

A sender that vanishes without a DELETE (killed, cut off) sends no RTCP BYE and no DTLS close, and ICE
consent checks would notice only after about 30 s; so the session watches for packets itself and fails
once none (RTP, RTCP or DTLS) has come for ``peer_timeout_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import enum
import ipaddress
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction

import aioice.ice
import av
from aiortc import MediaStreamTrack, RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.exceptions import InternalError, InvalidAccessError, InvalidStateError, OperationError
from aiortc.mediastreams import MediaStreamError
from aiortc.sdp import SessionDescription

from ingest.source import Frame, SourceError

logger = logging.getLogger(__name__)

_RTP_TIME_BASE = Fraction(1, 90000)  # video RTP clock, if a frame comes without a time base
_POLL_S = 0.05  # how often the reading thread looks at its stop event while no frame comes

# The local addresses ICE gathers host candidates on, for peer connections negotiated in this
# context; None: aioice's own choice (every interface but loopback).
_HOST_ADDRESSES: contextvars.ContextVar[tuple[str, ...] | None] = contextvars.ContextVar(
    "vcflash_ice_host_addresses", default=None
)


class OfferError(ValueError):
    """The SDP offer cannot be used; the message says why, fit for the client."""


@dataclass(frozen=True)
class WebRTCSettings:
    """How sessions negotiate and buffer.

    ``host_addresses``: the local addresses to gather host candidates on; None lets aioice pick
    every interface but loopback. ``remote_networks``: candidates in an offer outside these
    networks (CIDR) are removed before use, hostnames (mDNS ``.local``) included; None keeps all.
    :meth:`loopback` sets both to 127.0.0.1, so no packet leaves the machine.
    """

    host_addresses: tuple[str, ...] | None = None
    remote_networks: tuple[str, ...] | None = None
    buffer_frames: int = 8  # decoded frames between aiortc and the pipeline thread
    negotiate_timeout_s: float = 10.0  # applying the offer and gathering our candidates
    connect_timeout_s: float = 20.0  # from the answer to the first video frame
    # then: no packet at all from the sender for this long ends the session (failed). Senders send RTCP about
    # every second (browsers, aiortc) even when no video frame is due, so silence means the sender is gone.
    peer_timeout_s: float = 3.0

    def __post_init__(self) -> None:
        if self.buffer_frames < 1:
            raise ValueError(f"buffer_frames must be >= 1, got {self.buffer_frames}")
        for name in ("negotiate_timeout_s", "connect_timeout_s", "peer_timeout_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        if self.host_addresses is not None:
            if not self.host_addresses:
                raise ValueError("host_addresses must name at least one address (or be None)")
            for address in self.host_addresses:
                ipaddress.ip_address(address)  # ValueError names the bad one
        if self.remote_networks is not None:
            for network in self.remote_networks:
                ipaddress.ip_network(network)

    @classmethod
    def loopback(cls, **overrides: object) -> WebRTCSettings:
        """Candidates on 127.0.0.1 only, ours and the peer's: for a server bound to loopback, and tests."""
        return cls(host_addresses=("127.0.0.1",), remote_networks=("127.0.0.0/8",), **overrides)  # type: ignore[arg-type]

    def allows_remote(self, address: str) -> bool:
        if self.remote_networks is None:
            return True
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:  # a hostname, e.g. an mDNS name: resolving it would go on the network
            return False
        return any(ip in ipaddress.ip_network(network) for network in self.remote_networks)


@contextlib.contextmanager
def ice_host_addresses(addresses: Sequence[str] | None) -> Iterator[None]:
    """Gather host candidates on ``addresses`` only, for peer connections negotiated inside this block.

    aioice picks its addresses through one module-level function and leaves loopback out; this
    wraps that function once, so the choice applies per context (task) instead of process-wide.
    Outside such a block aioice behaves as usual.
    """
    _wrap_get_host_addresses()
    token = _HOST_ADDRESSES.set(None if addresses is None else tuple(addresses))
    try:
        yield
    finally:
        _HOST_ADDRESSES.reset(token)


def _wrap_get_host_addresses() -> None:
    current = aioice.ice.get_host_addresses
    if getattr(current, "_vcflash_wrapper", False):
        return

    def get_host_addresses(use_ipv4: bool = True, use_ipv6: bool = True) -> list[str]:
        chosen = _HOST_ADDRESSES.get()
        if chosen is None:
            return current(use_ipv4=use_ipv4, use_ipv6=use_ipv6)
        return [a for a in chosen if (use_ipv4 if ipaddress.ip_address(a).version == 4 else use_ipv6)]

    get_host_addresses._vcflash_wrapper = True  # type: ignore[attr-defined]
    aioice.ice.get_host_addresses = get_host_addresses


def check_offer(sdp: str, settings: WebRTCSettings) -> str:
    """The offer with candidates outside ``settings.remote_networks`` removed; :class:`OfferError` if unusable."""
    if not sdp.lstrip().startswith("v=0"):
        raise OfferError("not an SDP offer: it must start with 'v=0'")
    try:
        parsed = SessionDescription.parse(sdp)
    except Exception as e:  # aiortc's parser raises whatever the bad line makes it raise (often a bare assert)
        detail = f": {e}" if str(e) else ""
        raise OfferError(f"malformed SDP, it cannot be parsed ({type(e).__name__}{detail})") from None
    video = [m for m in parsed.media if m.kind == "video"]
    if not video:
        raise OfferError("the offer has no video: add a video track before creating the offer")
    sent = [m for m in video if m.port != 0 and m.direction in ("sendonly", "sendrecv")]
    if not sent:
        raise OfferError(f"the offer's video is not sent (direction {video[0].direction})")
    if any(m.dtls is None or not m.dtls.fingerprints for m in sent):
        raise OfferError("the offer's video has no DTLS parameters (a=fingerprint and a=setup): WebRTC needs them")

    kept, removed, lines = 0, 0, []
    for line in sdp.splitlines():
        if line.startswith("a=candidate:"):
            fields = line.split()
            if len(fields) < 8 or not settings.allows_remote(fields[4]):
                removed += 1
                continue
            kept += 1
        lines.append(line)
    if removed:
        logger.debug("offer candidates removed=%d kept=%d", removed, kept)
    if not kept:
        allowed = ", ".join(settings.remote_networks or ()) or "any"
        raise OfferError(
            f"the offer has no usable ICE candidates ({removed} outside {allowed}); this endpoint does not "
            "take trickle ICE: wait for ICE gathering to complete before sending the offer"
        )
    return "\r\n".join(lines) + "\r\n"


class FrameBuffer:
    """A bounded, thread-safe frame queue: one writer that must never block, one reader thread.

    A full buffer drops its oldest frame, so the reader always gets the newest frames.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._frames: deque[Frame] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self.received = 0
        self.dropped = 0

    def put(self, frame: Frame) -> bool:
        """Add ``frame``; False if the oldest frame had to go to make room, or the buffer is closed."""
        with self._cond:
            if self._closed:
                return False
            self.received += 1
            dropped = len(self._frames) >= self.capacity
            if dropped:
                self._frames.popleft()
                self.dropped += 1
            self._frames.append(frame)
            self._cond.notify()
        return not dropped

    def get(self, timeout_s: float) -> Frame | None:
        """The oldest frame, waiting up to ``timeout_s``; None if none came. Raises EOFError once closed and empty."""
        with self._cond:
            if not self._frames and not self._closed:
                self._cond.wait(timeout_s)
            if self._frames:
                return self._frames.popleft()
            if self._closed:
                raise EOFError
            return None

    def close(self) -> None:
        """No more frames; the reader still gets those buffered."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def __len__(self) -> int:
        with self._cond:
            return len(self._frames)


class SessionState(enum.StrEnum):
    NEW = "new"
    CONNECTING = "connecting"  # answered, no video frame yet
    RECEIVING = "receiving"  # video frames are arriving
    CLOSED = "closed"  # ended normally: the peer left, the track ended, or closed on request
    FAILED = "failed"  # see ``error``


@dataclass(frozen=True)
class SessionStats:
    """A snapshot of one session.

    ``frames_received == frames_read + frames_dropped + frames_buffered``, where ``frames_read``
    are the frames the pipeline took (its ``frames_in``). ``frames_dropped`` were thrown away
    because the pipeline fell behind (the buffer was full); the pipeline never saw them.
    """

    stream: str
    state: SessionState
    connection_state: str  # aiortc's: new, connecting, connected, failed, closed
    error: str | None
    frames_received: int
    frames_dropped: int
    frames_buffered: int
    frames_read: int
    width: int | None
    height: int | None
    last_media_time: float | None
    last_wall_time: float | None


class WebRTCSession:
    """One peer sending one video track; :meth:`frames` is the stream's ``FrameSource``.

    Create it on the event loop, :meth:`accept` the offer, hand :meth:`frames` to
    ``Streams.add(..., source=session.frames)``. Media time is the track's own clock
    (``frame.pts * frame.time_base``, which aiortc starts at 0 on the first frame and unwraps);
    the stream's :class:`MediaClock` continues it after an earlier session. Wall time is the
    frame's arrival. The session ends, and with it the
    frame iterator, when the peer closes, the connection fails, the track ends, the sender goes silent
    (``settings.peer_timeout_s``), or on :meth:`close`; stopping the stream closes the session too.
    """

    def __init__(self, stream: str, settings: WebRTCSettings | None = None) -> None:
        self.stream = stream
        self.settings = settings or WebRTCSettings()
        self._loop = asyncio.get_running_loop()
        self._pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))  # host candidates only: no STUN, no TURN
        self._buffer = FrameBuffer(self.settings.buffer_frames)
        self._state = SessionState.NEW
        self._error: str | None = None
        self._video: MediaStreamTrack | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._first_frame = asyncio.Event()
        self._closed = asyncio.Event()
        self._closing = False
        self._reading = False
        self._read = 0  # frames the reader took; written by the reading thread
        self._size: tuple[int, int] | None = None
        self._last: tuple[float, float] | None = None  # media and wall time of the last frame received
        self._pc.on("track", self._on_track)
        self._pc.on("connectionstatechange", self._on_connection_state)

    # ---------------------------------------------------------------- event loop

    async def accept(self, offer_sdp: str) -> str:
        """Apply the SDP offer and return the answer, with all our candidates (gathering is complete).

        Raises :class:`OfferError` for an offer that cannot be used, TimeoutError if negotiating
        takes longer than ``settings.negotiate_timeout_s``. On any error the session is closed.
        """
        if self._state is not SessionState.NEW:
            raise RuntimeError(f"session {self.stream} already accepted an offer")
        try:
            sdp = check_offer(offer_sdp, self.settings)
            async with asyncio.timeout(self.settings.negotiate_timeout_s):
                with ice_host_addresses(self.settings.host_addresses):
                    try:
                        await self._pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
                    except OperationError as e:  # the only one aiortc raises for an offer: no codec in common
                        raise OfferError(
                            f"unusable offer: {e} (no codec in common; this server takes VP8 or H.264)"
                        ) from None
                    except (ValueError, InternalError, InvalidAccessError, InvalidStateError) as e:
                        raise OfferError(f"unusable offer: {e}") from None
                    answer = await self._pc.createAnswer()
                    await self._pc.setLocalDescription(answer)  # aiortc gathers all candidates here
        except BaseException:
            await self.close()
            raise
        self._state = SessionState.CONNECTING
        self._spawn(self._watch())
        logger.info("webrtc session answered stream=%s", self.stream)
        return self._pc.localDescription.sdp

    async def close(self, error: str | None = None) -> None:
        """End the session (``error``: it failed); the frame iterator ends once it has read the buffered frames."""
        if self._closing:
            await self._closed.wait()
            return
        self._closing = True
        if self._state not in (SessionState.CLOSED, SessionState.FAILED):
            self._state = SessionState.FAILED if error else SessionState.CLOSED
            self._error = error
        self._buffer.close()
        current = asyncio.current_task()
        for task in list(self._tasks):
            if task is not current:
                task.cancel()
        try:
            await self._pc.close()
        finally:
            self._closed.set()
        log = logger.warning if error else logger.info
        log("webrtc session closed stream=%s state=%s error=%s", self.stream, self._state.value, error)

    async def wait_closed(self) -> None:
        await self._closed.wait()

    @property
    def closed(self) -> bool:
        return self._closing

    def stats(self) -> SessionStats:
        return SessionStats(
            stream=self.stream,
            state=self._state,
            connection_state=self._pc.connectionState,
            error=self._error,
            frames_received=self._buffer.received,
            frames_dropped=self._buffer.dropped,
            frames_buffered=len(self._buffer),
            frames_read=self._read,
            width=self._size[0] if self._size else None,
            height=self._size[1] if self._size else None,
            last_media_time=self._last[0] if self._last else None,
            last_wall_time=self._last[1] if self._last else None,
        )

    def _on_track(self, track: MediaStreamTrack) -> None:
        if track.kind == "video" and self._video is None:
            self._video = track
            self._spawn(self._pump(track))
        else:  # audio, or a second video: read and discard, or aiortc queues its frames forever
            logger.info("webrtc session ignores track stream=%s kind=%s", self.stream, track.kind)
            self._spawn(self._discard(track))

    def _on_connection_state(self) -> None:
        state = self._pc.connectionState
        logger.info("webrtc connection stream=%s state=%s", self.stream, state)
        if state == "failed":
            self._end("the WebRTC connection failed (ICE or DTLS)")
        elif state == "closed":
            self._end(None)

    async def _pump(self, track: MediaStreamTrack) -> None:
        """aiortc's decoded frames into the buffer; never waits on the reader."""
        try:
            while True:
                frame = await track.recv()
                wall = time.time()
                if not isinstance(frame, av.VideoFrame):
                    continue
                media = self._media_time(frame, wall)
                self._last = (media, wall)
                self._size = (frame.width, frame.height)
                if not self._buffer.put(Frame(pts=media, wall_time=wall, image=frame)):
                    self._log_drop()
                if not self._first_frame.is_set():
                    self._first_frame.set()
                    self._state = SessionState.RECEIVING
                    logger.info("webrtc video started stream=%s size=%dx%d", self.stream, frame.width, frame.height)
        except MediaStreamError:  # the track ended: the peer stopped sending or the connection closed
            self._end(None)

    def _log_drop(self) -> None:
        dropped = self._buffer.dropped
        if dropped == 1 or dropped % 100 == 0:  # the first, then every 100th: not once per frame
            logger.warning(
                "webrtc frames dropped stream=%s dropped=%d reason=reader_behind buffer=%d",
                self.stream,
                dropped,
                self._buffer.capacity,
            )

    async def _discard(self, track: MediaStreamTrack) -> None:
        with contextlib.suppress(MediaStreamError):
            while True:
                await track.recv()

    def _media_time(self, frame: av.VideoFrame, wall: float) -> float:
        if frame.pts is None:  # not from aiortc's decoders; follow the arrival clock
            return self._last[0] + (wall - self._last[1]) if self._last else 0.0
        return float(frame.pts * (frame.time_base or _RTP_TIME_BASE))

    async def _watch(self) -> None:
        """Fail the session if no video comes within ``connect_timeout_s`` of the answer, or, once it came, if
        no packet comes from the sender for ``peer_timeout_s``."""
        try:
            async with asyncio.timeout(self.settings.connect_timeout_s):
                await self._first_frame.wait()
        except TimeoutError:
            self._end(
                f"no video within {self.settings.connect_timeout_s:g} s of the answer "
                f"(connection state {self._pc.connectionState})"
            )
            return
        timeout_s = self.settings.peer_timeout_s
        seen, heard = await self._packets_received(), time.monotonic()
        while True:
            await asyncio.sleep(min(0.5, timeout_s / 4))
            packets, now = await self._packets_received(), time.monotonic()
            if packets != seen:
                seen, heard = packets, now
            elif now - heard >= timeout_s:
                self._end(
                    f"the sender went silent: no packet for {now - heard:.1f} s "
                    "(it stopped or lost its network without a DELETE)"
                )
                return

    async def _packets_received(self) -> int:
        """Datagrams received on the peer connection's transports: RTP, RTCP and DTLS (ICE checks not counted)."""
        report = await self._pc.getStats()
        return sum(stats.packetsReceived for stats in report.values() if stats.type == "transport")

    def _end(self, error: str | None) -> None:
        if not self._closing:
            self._spawn(self.close(error))

    def _spawn(self, coro: object) -> None:
        task = self._loop.create_task(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---------------------------------------------------------------- the stream's thread

    def frames(self, stop: threading.Event) -> Iterator[Frame]:
        """The pipeline's ``FrameSource``: frames until the session ends or ``stop`` is set.

        Raises :class:`SourceError` if the session failed (the stream then fails with its reason).
        """
        if self._reading:
            raise RuntimeError(f"session {self.stream} is already being read")
        self._reading = True
        try:
            while not stop.is_set():
                try:
                    frame = self._buffer.get(_POLL_S)
                except EOFError:
                    break
                if frame is not None:
                    self._read += 1
                    yield frame
            if not stop.is_set() and self._error is not None:
                raise SourceError(f"webrtc {self.stream}: {self._error}")
        finally:  # the stream stopped or ended: so does the session
            with contextlib.suppress(RuntimeError):  # the event loop is gone
                self._loop.call_soon_threadsafe(self._end, None)
