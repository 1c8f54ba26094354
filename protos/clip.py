"""The clip in flight, the one type ingest and the encoder share: four sampled frames of one stream with both
clocks, the stream-name rule, and the clip's wire form (`EncodeClipRequest`)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from protos.vcflash.v1 import vcflash_pb2 as pb
from vcflash.serve.errors import Invalid

CLIP_FRAMES = 4
STREAM_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
MIN_FPS = 1e-3  # a clip spans at most 4000 s; below this, 1 / fps overflows the clocks' meaning


def check_stream_name(name: str) -> str:
    if not isinstance(name, str) or not STREAM_NAME.fullmatch(name):
        raise Invalid(f"stream name must match {STREAM_NAME.pattern}, got {str(name)[:80]!r}")
    if not name.strip("."):  # "." and ".." name directories wherever a name becomes a path
        raise Invalid(f"stream name must not be only dots, got {name!r}")
    return name


@dataclass(frozen=True, eq=False)  # eq=False: ndarray fields make value equality ambiguous
class Clip:
    """Four sampled frames of one stream, with both clocks.

    Media times are the frames' PTS in seconds (the stream's own clock); wall times are Unix
    seconds at which each frame was live. A clip covers ``[start, end)``, ``end`` being the last
    frame plus one sampling interval (``1 / fps``). ``frames`` is read-only: clips are shared
    between the queue, the encoder and the memory.
    """

    stream_id: str
    seq: int  # 0, 1, 2, ... per stream; a gap means clips were dropped at ingest
    frames: np.ndarray  # uint8 [4, H, W, 3] RGB
    media_times: tuple[float, ...]
    wall_times: tuple[float, ...]
    fps: float  # the sampling rate the frames were taken at
    thumbnail: bytes = b""  # JPEG of the middle frame before any squash (ingest.thumbnails), b"": none

    def __post_init__(self) -> None:
        shape = self.frames.shape
        if self.frames.dtype != np.uint8 or len(shape) != 4 or shape[0] != CLIP_FRAMES or shape[3] != 3:
            raise Invalid(f"clip frames must be uint8 [{CLIP_FRAMES}, H, W, 3], got {self.frames.dtype} {list(shape)}")
        if shape[1] < 1 or shape[2] < 1:
            raise Invalid(f"clip {self.stream_id}#{self.seq}: empty frames {list(shape)}")
        if not isinstance(self.seq, int | np.integer) or self.seq < 0:
            raise Invalid(f"clip {self.stream_id}: seq must be an integer >= 0, got {self.seq!r}")
        if len(self.media_times) != CLIP_FRAMES or len(self.wall_times) != CLIP_FRAMES:
            raise Invalid(
                f"a clip needs {CLIP_FRAMES} media and wall times, "
                f"got {len(self.media_times)} and {len(self.wall_times)}"
            )
        if not all(math.isfinite(t) for t in (*self.media_times, *self.wall_times)):
            raise Invalid(f"clip {self.stream_id}#{self.seq}: times must be finite")
        if not (math.isfinite(self.fps) and self.fps >= MIN_FPS):
            raise Invalid(f"fps must be >= {MIN_FPS:g}, got {self.fps!r}")
        self.frames.flags.writeable = False

    @property
    def media_start(self) -> float:
        return self.media_times[0]

    @property
    def media_end(self) -> float:
        return self.media_times[-1] + 1.0 / self.fps

    @property
    def wall_start(self) -> float:
        return self.wall_times[0]

    @property
    def wall_end(self) -> float:
        return self.wall_times[-1] + 1.0 / self.fps


def clip_request(clip: Clip) -> pb.EncodeClipRequest:
    frames = np.ascontiguousarray(clip.frames)
    return pb.EncodeClipRequest(
        stream_id=clip.stream_id,
        seq=clip.seq,
        media_times=clip.media_times,
        wall_times=clip.wall_times,
        height=frames.shape[1],
        width=frames.shape[2],
        frames=frames.tobytes(),
        fps=clip.fps,
        thumbnail=clip.thumbnail,
    )


def clip_from_request(r: pb.EncodeClipRequest, max_side: int, max_thumbnail_bytes: int = 262_144) -> Clip:
    """Validate and unpack one clip; `Invalid` names what is wrong."""
    check_stream_name(r.stream_id)
    if len(r.thumbnail) > max_thumbnail_bytes:
        raise Invalid(
            f"clip {r.stream_id}#{r.seq}: thumbnail is {len(r.thumbnail)} bytes, more than {max_thumbnail_bytes} "
            "(VCFLASH_MAX_THUMBNAIL_BYTES)"
        )
    if r.seq < 0 or not (0 < r.height <= max_side and 0 < r.width <= max_side):
        raise Invalid(f"bad clip {r.stream_id}#{r.seq}: seq {r.seq}, size {r.width}x{r.height}")
    expected = CLIP_FRAMES * r.height * r.width * 3
    if len(r.frames) != expected:
        raise Invalid(f"clip {r.stream_id}#{r.seq} has {len(r.frames)} frame bytes, expected {expected}")
    frames = np.frombuffer(r.frames, dtype=np.uint8).reshape(CLIP_FRAMES, r.height, r.width, 3)
    return Clip(r.stream_id, r.seq, frames, tuple(r.media_times), tuple(r.wall_times), r.fps, r.thumbnail)
