"""What the memory holds: one record per 4-frame clip, and the per-stream settings around it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from vcflash.serve.errors import Invalid

Clock = Literal["media", "wall"]
TokenFormat = Literal["fp16", "int8"]


@dataclass(frozen=True)
class ClipMeta:
    """A clip's identity and times, without its tokens.

    Wall times are Unix seconds, media times are seconds on the stream's own clock (PTS). A clip
    covers [start, end): `end` is the last frame's time plus one sampling interval.
    """

    stream_id: str
    seq: int  # 0, 1, 2, ... per stream; (stream_id, seq) is the identity, so writes are idempotent
    wall_start: float
    wall_end: float
    media_start: float
    media_end: float
    frame_media_times: tuple[float, ...]  # one per sampled frame, 4 per clip

    def span(self, clock: Clock) -> tuple[float, float]:
        """[start, end) on `clock`."""
        return (self.media_start, self.media_end) if clock == "media" else (self.wall_start, self.wall_end)


@dataclass(frozen=True)
class ClipRecord:
    meta: ClipMeta
    tokens: np.ndarray  # [64, D] visual tokens in LLM space; stored as fp16 (or int8 + per-token scale)
    vector: np.ndarray  # [D] float32, L2-normalised clip summary for the FAISS index
    thumbnail: bytes = b""  # JPEG of the clip's middle sampled frame (b"": none), counted in the stream's bytes

    @property
    def key(self) -> tuple[str, int]:
        return self.meta.stream_id, self.meta.seq


@dataclass(frozen=True)
class Retention:
    """Per-stream limits; the oldest clips go first. None means no limit."""

    max_age_s: float | None = None
    max_bytes: int | None = None

    def __post_init__(self) -> None:
        if self.max_age_s is not None and self.max_age_s <= 0:
            raise Invalid(f"max_age_s must be > 0, got {self.max_age_s}")
        if self.max_bytes is not None and self.max_bytes <= 0:
            raise Invalid(f"max_bytes must be > 0, got {self.max_bytes}")


@dataclass(frozen=True)
class StreamStats:
    stream_id: str
    clips: int
    bytes: int  # token + vector + thumbnail + key-index bytes held
    first: ClipMeta | None
    last: ClipMeta | None
    retention: Retention = field(default_factory=Retention)
    evicted_clips: int = 0  # removed by retention since the stream was created
    # made when the stream is registered: an index kept elsewhere sees that a stream was deleted and made again
    generation: str = ""


def clip_vector(tokens: np.ndarray) -> np.ndarray:
    """The clip's retrieval vector: the L2-normalised mean of its tokens, float32 [D]."""
    v = np.asarray(tokens, dtype=np.float32).mean(axis=0)
    return v / max(float(np.linalg.norm(v)), 1e-12)
