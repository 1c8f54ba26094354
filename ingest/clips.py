"""Sampled frames grouped into the 4-frame clips the encoder turns into 64 tokens each."""

from __future__ import annotations

import numpy as np

from protos.clip import CLIP_FRAMES, Clip


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
        self._thumbnail = b""

    @property
    def pending(self) -> int:
        """Frames waiting for the rest of their clip."""
        return len(self._frames)

    def add(self, frame: np.ndarray, media_time: float, wall_time: float, thumbnail: bytes = b"") -> Clip | None:
        """Buffer one RGB frame (`thumbnail`: the clip's, given with one of its frames); returns the clip it
        completes, if any."""
        if self._frames and frame.shape != self._frames[0].shape:
            raise ValueError(
                f"stream {self.stream_id}: frame shape {list(frame.shape)} differs from "
                f"{list(self._frames[0].shape)} earlier in the clip"
            )
        self._frames.append(frame)
        self._media.append(media_time)
        self._wall.append(wall_time)
        self._thumbnail = thumbnail or self._thumbnail
        if len(self._frames) < CLIP_FRAMES:
            return None
        clip = Clip(
            stream_id=self.stream_id,
            seq=self.next_seq,
            frames=np.stack(self._frames),
            media_times=tuple(self._media),
            wall_times=tuple(self._wall),
            fps=self.fps,
            thumbnail=self._thumbnail,
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
        self._thumbnail = b""
        return dropped
