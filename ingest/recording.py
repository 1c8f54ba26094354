"""Recordings: a stream's video kept as MPEG-TS segment files, and a moment of it cut out as an MP4 by remux.

A URL or file source is stream-copied: the packets its source thread demuxes anyway are written as they are
(no decode, no re-encode) into segments of about `segment_s`, each starting at a keyframe, so any segment plays
on its own. A WebRTC source has no packets we could keep (aiortc decodes them), so its sampled frames are
encoded at the sampled fps with libx264 (ultrafast) instead.

On disk, under `<data dir>/recordings/`, each stream has a directory named by a hash of its name (a user string
never becomes a path) holding a `stream` file with the name, and its segments named by numbers we make:
`<n>_<wall start ms>_<wall end ms>.ts` once finished, `<n>_<wall start ms>.ts.part` while written. The index of
segments and their wall-clock spans is rebuilt from those names at start; a `.part` left by a crash is probed
(its duration read back) and finished, or skipped with a logged reason (and renamed `.broken`) if it cannot be
read; a cut skips a segment it cannot read the same way.

Segments go with their clips (`enforce`: those that end before the stream's first stored clip; all of a stream
whose memory was deleted) and, oldest first, past a stream's `max_bytes`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import re
import shutil
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import av.container
import av.video.stream
import numpy as np

from protos.clip import check_stream_name
from vcflash.serve.errors import Invalid, NotFound

log = logging.getLogger(__name__)

SEGMENT_FORMAT = "mpegts"  # any crash leaves a playable file: no index to write at the end
_FINISHED = re.compile(r"(\d{10})_(\d{1,15})_(\d{1,15})\.ts")
_PART = re.compile(r"(\d{10})_(\d{1,15})\.ts\.part")
_MAX_PENDING = 512  # packets held while a file source's first frame fixes its clock; more are dropped
_MS = Fraction(1, 1000)
_WEBRTC_GOP_S = 2.0  # keyframe interval of encoded WebRTC recordings: a cut starts at most this early


@dataclass(frozen=True)
class Segment:
    """One segment file: its number, wall-clock span (Unix seconds) and size."""

    n: int
    start: float
    end: float
    path: Path
    bytes: int


def stream_dir_name(stream_id: str) -> str:
    """The directory of a stream's recording: a hash of its (checked) name, never the name itself."""
    return hashlib.sha256(check_stream_name(stream_id).encode()).hexdigest()[:32]


class StreamRecording:
    """One stream's segments: the index (read by any thread under a lock) and the files.

    The writer side (`start`, `packet`, `frame_time`, `end`; `frame` for WebRTC) runs in the stream's source
    thread only; `segments`, `prune`, `nbytes` from anywhere."""

    def __init__(self, stream_id: str, root: Path, segment_s: float, max_bytes: int) -> None:
        self.stream_id = stream_id
        self.dir = root / stream_dir_name(stream_id)
        self.segment_s, self.max_bytes = segment_s, max_bytes
        self._lock = threading.Lock()
        self._index: list[Segment] = []  # finished segments, oldest first
        self._next_n = 0
        # the segment being written (source thread only)
        self._out: av.container.OutputContainer | None = None
        self._ostream: av.video.stream.VideoStream | None = None
        self._part: Path | None = None
        self._start = self._end = 0.0
        self._n = 0
        self._template: av.video.stream.VideoStream | None = None
        self._offset: float | None = None  # wall - PTS seconds of this connection, from its decoded frames
        self._pending: list[av.Packet] = []
        self._keyed = False  # this connection has passed its first keyframe
        self._encoder: _FrameEncoder | None = None
        self._load()

    # ---------------------------------------------------------------- index

    def _load(self) -> None:
        """The index from the file names; a `.part` left by a crash is probed and finished, or skipped."""
        if not self.dir.is_dir():
            return
        found: list[Segment] = []
        for path in sorted(self.dir.iterdir()):
            if m := _FINISHED.fullmatch(path.name):
                found.append(Segment(int(m[1]), int(m[2]) / 1000, int(m[3]) / 1000, path, path.stat().st_size))
            elif m := _PART.fullmatch(path.name):
                if (segment := _recover(path, int(m[1]), int(m[2]) / 1000)) is not None:
                    found.append(segment)
        found.sort(key=lambda s: s.n)
        self._index = found
        self._next_n = max((s.n + 1 for s in found), default=0)
        for path in self.dir.glob("*.broken"):  # skipped ones: never used again, new numbers go past them
            if m := _PART.fullmatch(path.name.removesuffix(".broken")):
                self._next_n = max(self._next_n, int(m[1]) + 1)

    def segments(self, start: float | None = None, end: float | None = None, live: bool = False) -> list[Segment]:
        """Finished segments overlapping [start, end), oldest first; `live`: the one being written too (an MPEG-TS
        file reads up to its last complete packet), so the last minute can be cut before its segment ends."""
        with self._lock:
            found = list(self._index)
            part = self._part
            if live and part is not None:
                found.append(Segment(self._n, self._start, self._end, part, 0))
        return [s for s in found if (start is None or s.end > start) and (end is None or s.start < end)]

    def nbytes(self) -> int:
        with self._lock:
            held = sum(s.bytes for s in self._index)
            part = self._part
        if part is not None:
            with contextlib.suppress(OSError):
                held += part.stat().st_size
        return held

    def prune(self, before: float) -> int:
        """Delete the segments that end at or before `before` (wall clock; their names keep milliseconds, hence
        the slack); returns how many."""
        before += 1e-3
        with self._lock:
            gone = [s for s in self._index if s.end <= before]
            self._index = [s for s in self._index if s.end > before]
        for s in gone:
            s.path.unlink(missing_ok=True)
        return len(gone)

    def _cap(self) -> None:
        """Oldest segments out while the stream holds more than `max_bytes`."""
        with self._lock:
            gone = []
            total = sum(s.bytes for s in self._index)
            while self._index and total > self.max_bytes:
                s = self._index.pop(0)
                total -= s.bytes
                gone.append(s)
        for s in gone:
            s.path.unlink(missing_ok=True)
        if gone:
            log.info(
                "event=recording_capped stream=%s deleted=%d max_bytes=%d", self.stream_id, len(gone), self.max_bytes
            )

    # ---------------------------------------------------------------- stream copy (source thread)

    def start(self, stream: av.video.stream.VideoStream) -> None:
        """A new connection (or a file's replay): its packets start a new segment at their first keyframe."""
        self.end()
        self._template, self._offset, self._pending, self._keyed = stream, None, [], False

    def frame_time(self, pts_s: float, wall: float) -> None:
        """A decoded frame's PTS (seconds, the stream's own) and the wall time the pipeline gives it."""
        self._offset = wall - pts_s
        if self._pending:
            pending, self._pending = self._pending, []
            for packet in pending:
                self._guarded(self._write, packet)

    def packet(self, packet: av.Packet) -> None:
        """A demuxed packet, before it is decoded; held until the connection's first frame fixes its clock."""
        if packet.size == 0 or (packet.pts is None and packet.dts is None) or self._template is None:
            return
        if self._offset is None:
            if len(self._pending) < _MAX_PENDING:
                self._pending.append(packet)
            return
        self._guarded(self._write, packet)

    def _guarded(self, write: Callable[..., None], *args: Any) -> None:
        """A recording that cannot be written (disk full, a packet the muxer refuses) never stops the stream: its
        segment is closed and the next keyframe starts another."""
        try:
            write(*args)
        except (av.FFmpegError, OSError, ValueError) as e:
            log.warning("event=recording_failed stream=%s reason=%s", self.stream_id, e)
            self._keyed = False
            with contextlib.suppress(av.FFmpegError, OSError, ValueError):
                self.end(keep_clock=True)

    def _write(self, packet: av.Packet) -> None:
        assert self._template is not None and self._offset is not None
        pts = packet.pts if packet.pts is not None else packet.dts
        tb = packet.time_base or self._template.time_base
        wall = float(pts * tb) + self._offset
        if packet.is_keyframe:
            self._keyed = True
            if self._out is not None and wall - self._start >= self.segment_s:
                self._finish()
        if not self._keyed:  # nothing before a connection's first keyframe can be decoded
            return
        if self._out is None:
            self._open(wall, template=self._template)
        assert self._ostream is not None and self._out is not None
        duration = float(packet.duration * tb) if packet.duration else 0.0  # before muxing rebases it
        packet.stream = self._ostream
        try:
            self._out.mux(packet)
        except (av.FFmpegError, ValueError) as e:  # a bad packet costs itself, not the recording
            log.debug("event=recording_packet_skipped stream=%s reason=%s", self.stream_id, e)
            return
        self._end = max(self._end, wall + duration)

    def _open(self, wall: float, template: av.video.stream.VideoStream | None = None) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "stream").write_text(self.stream_id)
        with self._lock:
            self._n, self._next_n = self._next_n, self._next_n + 1
        part = self.dir / f"{self._n:010d}_{round(wall * 1000)}.ts.part"
        # each packet reaches the file at once: a cut of the last seconds reads the segment being written
        self._out = av.open(str(part), mode="w", format=SEGMENT_FORMAT, options={"flush_packets": "1"})
        with self._lock:  # readers see the segment being written (`segments(live=True)`) from here
            self._start = self._end = wall
            self._part = part
        if template is not None:
            self._ostream = self._out.add_stream_from_template(template)

    def _finish(self) -> None:
        """Close the segment being written and put it in the index under its final name."""
        out, part = self._out, self._part
        with self._lock:
            self._part = None
        self._out = self._ostream = None
        if out is None or part is None:
            return
        try:
            out.close()
        except (av.FFmpegError, OSError) as e:
            log.warning("event=recording_segment_failed stream=%s reason=%s", self.stream_id, e)
        end = max(self._end, self._start + 1e-3)
        path = part.with_name(f"{self._n:010d}_{round(self._start * 1000)}_{round(end * 1000)}.ts")
        try:
            part.rename(path)
            segment = Segment(
                self._n, round(self._start * 1000) / 1000, round(end * 1000) / 1000, path, path.stat().st_size
            )
        except OSError as e:
            log.warning("event=recording_segment_failed stream=%s reason=%s", self.stream_id, e)
            return
        with self._lock:
            self._index.append(segment)
        self._cap()

    def end(self, keep_clock: bool = False) -> None:
        """The connection is over (or the stream stops): finish its segment."""
        encoder, self._encoder = self._encoder, None
        if encoder is not None:
            encoder.flush(self)
        self._finish()
        if not keep_clock:
            self._pending, self._offset = [], None

    # ---------------------------------------------------------------- WebRTC: encode sampled frames

    def frame(self, rgb: np.ndarray, wall: float, fps: float) -> None:
        """A sampled frame (uint8 RGB [H, W, 3]) of a source without packets, encoded at the sampled fps; a new
        segment (and encoder, so it starts with a keyframe) every `segment_s`."""
        size = (rgb.shape[1] // 2 * 2, rgb.shape[0] // 2 * 2)  # yuv420p needs even sides
        if 0 in size:
            return
        if self._encoder is not None and (wall - self._start >= self.segment_s or size != self._encoder.size):
            self.end()
        self._guarded(self._encode, rgb, wall, fps, size)

    def _encode(self, rgb: np.ndarray, wall: float, fps: float, size: tuple[int, int]) -> None:
        if self._encoder is None:
            self._encoder = _FrameEncoder(self, wall, fps, size)
        self._encoder.add(self, rgb, wall)


class _FrameEncoder:
    """libx264 (ultrafast) over one segment's sampled frames, a keyframe at least every `_WEBRTC_GOP_S`: a cut
    starts at most that early. A frame's PTS is its wall time in milliseconds since the segment started."""

    def __init__(self, rec: StreamRecording, wall: float, fps: float, size: tuple[int, int]) -> None:
        rec._open(wall)
        assert rec._out is not None
        gop = max(1, round(fps * _WEBRTC_GOP_S))
        self.stream = rec._out.add_stream(
            "libx264", options={"preset": "ultrafast", "tune": "zerolatency", "g": str(gop)}
        )
        self.stream.width, self.stream.height = size
        self.stream.pix_fmt = "yuv420p"
        self.stream.codec_context.time_base = _MS
        self.fps, self.size, self.last_pts = fps, size, -1

    def add(self, rec: StreamRecording, rgb: np.ndarray, wall: float) -> None:
        assert rec._out is not None
        w, h = self.size
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb[:h, :w]), format="rgb24")
        frame.pts = self.last_pts = max(round((wall - rec._start) * 1000), self.last_pts + 1)
        frame.time_base = _MS
        rec._out.mux(self.stream.encode(frame))
        rec._end = max(rec._end, wall + 1 / self.fps)

    def flush(self, rec: StreamRecording) -> None:
        if rec._out is not None:
            with contextlib.suppress(av.FFmpegError):
                rec._out.mux(self.stream.encode())


def _recover(path: Path, n: int, start: float) -> Segment | None:
    """A segment a crash left unfinished: its span read back from its packets and its final name given; None (and a
    logged reason) when it cannot be read."""
    try:
        with av.open(str(path), mode="r", format=SEGMENT_FORMAT) as container:
            stream = container.streams.video[0]
            first = last = None
            for packet in container.demux(stream):
                pts = packet.pts if packet.pts is not None else packet.dts
                if pts is None:
                    continue
                t = float(pts * stream.time_base) + float((packet.duration or 0) * stream.time_base)
                first = pts * stream.time_base if first is None else first
                last = t if last is None else max(last, t)
        if first is None or last is None:
            raise ValueError("no video packets")
    except (av.FFmpegError, OSError, IndexError, ValueError) as e:
        log.warning("event=recording_segment_skipped path=%s reason=%s", path.name, e)
        with contextlib.suppress(OSError):  # kept for a look, not probed again at the next start
            path.rename(path.with_name(path.name + ".broken"))
        return None
    end = start + max(1e-3, last - float(first))
    final = path.with_name(f"{n:010d}_{round(start * 1000)}_{round(end * 1000)}.ts")
    path.rename(final)
    log.info("event=recording_segment_recovered path=%s", final.name)
    return Segment(n, start, round(end * 1000) / 1000, final, final.stat().st_size)


class Recordings:
    """Every recorded stream of this server, under `root` (the data dir's `recordings/`).

    `max_range_s` bounds one cut (`Invalid` past it), `max_bytes` each stream's segments."""

    def __init__(
        self, root: Path, segment_s: float = 60.0, max_bytes: int = 20_000_000_000, max_range_s: float = 600.0
    ):
        self.root, self.segment_s, self.max_bytes, self.max_range_s = root, segment_s, max_bytes, max_range_s
        self._streams: dict[str, StreamRecording] = {}
        self._lock = threading.Lock()

    def stream(self, stream_id: str) -> StreamRecording:
        """The recording of `stream_id`, its index read from disk the first time."""
        with self._lock:
            rec = self._streams.get(stream_id)
            if rec is None:
                rec = self._streams[stream_id] = StreamRecording(stream_id, self.root, self.segment_s, self.max_bytes)
            return rec

    def stream_ids(self) -> list[str]:
        """Streams with a recording on disk (their names as the `stream` file keeps them)."""
        ids = set(self._streams)
        if self.root.is_dir():
            for d in self.root.iterdir():
                with contextlib.suppress(OSError, Invalid):
                    name = (d / "stream").read_text()
                    if stream_dir_name(name) == d.name:  # a file that does not match its dir is not ours
                        ids.add(name)
        return sorted(ids)

    def nbytes(self, stream_id: str) -> int:
        """Bytes of `stream_id`'s recording on disk (0: none)."""
        with self._lock:
            rec = self._streams.get(stream_id)
        if rec is None and not (self.root / stream_dir_name(stream_id)).is_dir():
            return 0
        return (rec or self.stream(stream_id)).nbytes()

    def delete(self, stream_id: str) -> None:
        """Forget a stream's recording (its memory was deleted)."""
        with self._lock:
            self._streams.pop(stream_id, None)
        shutil.rmtree(self.root / stream_dir_name(stream_id), ignore_errors=True)

    def enforce(self, first_wall: dict[str, float | None], recording: set[str]) -> dict[str, int]:
        """Retention: each stream keeps the segments that reach its first stored clip (`first_wall`: the wall start
        of each stream memory holds, None when it holds no clip: none are kept); a stream memory no longer holds
        loses its whole recording. A stream being recorded now (`recording`) keeps its segments until memory holds
        its first clip. Returns segments deleted per stream."""
        deleted: dict[str, int] = {}
        for stream_id in self.stream_ids():
            if stream_id not in first_wall:
                if stream_id not in recording:
                    n = len(self.stream(stream_id).segments())
                    self.delete(stream_id)
                    deleted[stream_id] = n
                continue
            first = first_wall[stream_id]
            if first is None and stream_id in recording:  # its first clip is on its way
                continue
            if n := self.stream(stream_id).prune(math.inf if first is None else first):
                deleted[stream_id] = n
        for stream_id, n in deleted.items():
            log.info("event=recording_retention stream=%s deleted_segments=%d", stream_id, n)
        return deleted

    def cut(self, stream_id: str, start: float, end: float, out: Path) -> tuple[float, float]:
        """Write the recording of [start, end) (Unix seconds) to `out` as an MP4, by remux: from the last keyframe
        at or before `start` to the first frame at or after `end`. Returns the wall-clock times of the MP4's first
        and last frame. `Invalid`: a bad or too long range; `NotFound`: nothing recorded there. Blocking."""
        check_stream_name(stream_id)
        if not (math.isfinite(start) and math.isfinite(end)) or start >= end:
            raise Invalid(f"a recording range needs finite start < end, got {start} and {end}")
        if end - start > self.max_range_s:
            raise Invalid(
                f"a recording range is at most {self.max_range_s:g} s (VCFLASH_MAX_RECORDING_RANGE_S), "
                f"got {end - start:g} s"
            )
        segments = self.stream(stream_id).segments(start, end, live=True) if self.nbytes(stream_id) else []
        if not segments:
            raise NotFound(f"stream {stream_id!r} has no recording between {start:.3f} and {end:.3f}")
        first_wall, last_wall = _remux(segments, start, end, out)
        if first_wall is None:
            raise NotFound(f"stream {stream_id!r} has no readable recording between {start:.3f} and {end:.3f}")
        return first_wall, last_wall


def _remux(segments: list[Segment], start: float, end: float, out: Path) -> tuple[float | None, float]:
    """The packets of `segments` that cover [start, end) into one MP4 at `out`, their times rebased to the wall
    clock (the first written packet is time 0). A segment that cannot be read, or whose video differs from the
    first one's (a camera that changed resolution), is skipped with a logged reason."""
    t0: float | None = None
    last_wall = 0.0
    last_dts: int | None = None
    with av.open(str(out), mode="w", format="mp4", options={"movflags": "+faststart"}) as container:
        ostream = None
        for segment in segments:
            path = segment.path
            if not path.exists() and path.name.endswith(".part"):  # finished since it was listed: renamed
                path = next(path.parent.glob(f"{segment.n:010d}_*.ts"), path)
            try:
                with av.open(str(path), mode="r", format=SEGMENT_FORMAT) as source:
                    stream = source.streams.video[0]
                    if ostream is None:
                        ostream = container.add_stream_from_template(stream)
                        shape = _shape(stream)
                    elif _shape(stream) != shape:
                        raise ValueError(f"its video {_shape(stream)} differs from the cut's {shape}")
                    tb = stream.time_base
                    base: int | None = None
                    gop: list[tuple[av.Packet, float]] = []  # packets from the last keyframe before `start`
                    for packet in _packets(source, stream):
                        pts = packet.pts if packet.pts is not None else packet.dts
                        base = pts if base is None else base
                        wall = segment.start + float((pts - base) * tb)
                        if wall >= end and t0 is not None:
                            break
                        if t0 is None and wall < start:  # before the range: keep the GOP it may start in
                            if packet.is_keyframe:
                                gop = []
                            gop.append((packet, wall))
                            continue
                        for p, w in [*gop, (packet, wall)]:
                            if t0 is None:
                                if not p.is_keyframe:
                                    continue
                                t0 = w
                            shift = round((segment.start - t0) / tb) - base
                            p.pts = None if p.pts is None else p.pts + shift
                            p.dts = None if p.dts is None else p.dts + shift
                            if last_dts is not None and p.dts is not None and p.dts <= last_dts:
                                p.dts = last_dts + 1
                                p.pts = max(p.pts or 0, p.dts)
                            last_dts = p.dts if p.dts is not None else last_dts
                            p.stream = ostream
                            container.mux(p)
                            last_wall = max(last_wall, w)
                        gop = []
                    if t0 is not None and last_wall >= end:
                        break
            except (av.FFmpegError, OSError, IndexError, ValueError) as e:
                log.warning("event=recording_segment_skipped path=%s reason=%s", segment.path.name, e)
        if t0 is None:
            return None, 0.0
    return t0, last_wall


def _packets(source: av.container.InputContainer, stream: av.video.stream.VideoStream) -> Iterator[av.Packet]:
    for packet in source.demux(stream):
        if packet.size and (packet.pts is not None or packet.dts is not None):
            yield packet


def _shape(stream: av.video.stream.VideoStream) -> tuple[str, int, int]:
    return stream.codec_context.name, stream.codec_context.width, stream.codec_context.height
