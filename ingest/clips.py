"""Sampled frames grouped into the 4-frame clips the encoder turns into 64 tokens each."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CLIP_FRAMES = 4


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

    def __post_init__(self) -> None:
        shape = self.frames.shape
        if self.frames.dtype != np.uint8 or len(shape) != 4 or shape[0] != CLIP_FRAMES or shape[3] != 3:
            raise ValueError(
                f"clip frames must be uint8 [{CLIP_FRAMES}, H, W, 3], got {self.frames.dtype} {list(shape)}"
            )
        if len(self.media_times) != CLIP_FRAMES or len(self.wall_times) != CLIP_FRAMES:
            raise ValueError(
                f"a clip needs {CLIP_FRAMES} media and wall times, "
                f"got {len(self.media_times)} and {len(self.wall_times)}"
            )
        if not self.fps > 0:
            raise ValueError(f"fps must be > 0, got {self.fps!r}")
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


class ClipGrouper:
    """Collects sampled frames into clips with consecutive ``seq`` numbers from ``first_seq``.

    ``first_seq`` lets a restarted stream continue its numbering, since ``(stream_id, seq)`` is a
    clip's identity downstream.
    """

    def __init__(self, stream_id: str, fps: float, first_seq: int = 0) -> None:
        if first_seq < 0:
            raise ValueError(f"first_seq must be >= 0, got {first_seq}")
        self.stream_id = stream_id
        self.fps = fps
        self.next_seq = first_seq
        self._frames: list[np.ndarray] = []
        self._media: list[float] = []
        self._wall: list[float] = []

    @property
    def pending(self) -> int:
        """Frames waiting for the rest of their clip."""
        return len(self._frames)

    def add(self, frame: np.ndarray, media_time: float, wall_time: float) -> Clip | None:
        """Buffer one RGB frame; returns the clip it completes, if any."""
        if self._frames and frame.shape != self._frames[0].shape:
            raise ValueError(
                f"stream {self.stream_id}: frame shape {list(frame.shape)} differs from "
                f"{list(self._frames[0].shape)} earlier in the clip"
            )
        self._frames.append(frame)
        self._media.append(media_time)
        self._wall.append(wall_time)
        if len(self._frames) < CLIP_FRAMES:
            return None
        clip = Clip(
            stream_id=self.stream_id,
            seq=self.next_seq,
            frames=np.stack(self._frames),
            media_times=tuple(self._media),
            wall_times=tuple(self._wall),
            fps=self.fps,
        )
        self.next_seq += 1
        self.discard()
        return clip

    def discard(self) -> int:
        """Drop the partial clip (a stream restart or its end); returns how many frames were dropped."""
        dropped = len(self._frames)
        self._frames.clear()
        self._media.clear()
        self._wall.clear()
        return dropped
