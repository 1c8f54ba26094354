"""Which decoded frames to keep, by presentation time.

Sampling by PTS rather than by frame count keeps 1 fps meaning 1 fps whatever the source does:
29.97 fps, variable frame rate, dropped packets or a camera that pauses. Pure logic, no I/O.
"""

from __future__ import annotations

import enum
import math

# Slack, in sampling intervals, for PTS that land a rounding error short of an instant.
_TOLERANCE = 1e-6


class Verdict(enum.Enum):
    KEEP = "keep"
    SKIP = "skip"  # between two sampling instants: normal, not a drop
    RESTART = "restart"  # PTS went backwards; the sampler restarted at this frame, which is kept


class FrameSampler:
    """Keeps the first frame at or after each instant ``t0 + k / fps`` (``t0``: the first PTS seen).

    ``slack`` (a fraction of the sampling interval) lets a frame that early count for the instant: keyframes
    1 s apart whose PTS jitter by a millisecond are each kept at 1 fps, not every other one.

    After a forward jump the next instant is the first one after the kept frame, so a gap never
    turns into a burst of frames. A PTS earlier than the previous one means the stream restarted:
    sampling starts over with that frame as ``t0``.
    """

    def __init__(self, fps: float, slack: float = 0.0) -> None:
        if not (math.isfinite(fps) and fps > 0):
            raise ValueError(f"fps must be a positive finite number, got {fps!r}")
        if not 0 <= slack < 0.5:
            raise ValueError(f"slack must be in [0, 0.5), got {slack!r}")
        self.fps = fps
        self._tolerance = max(_TOLERANCE, slack)
        self._t0: float | None = None
        self._next = 0  # index k of the next sampling instant
        self._last_pts = -math.inf

    def offer(self, pts: float) -> Verdict:
        """Whether to keep the frame presented at ``pts`` seconds."""
        if not math.isfinite(pts):
            raise ValueError(f"pts must be finite, got {pts!r}")
        restarted = self._t0 is not None and pts < self._last_pts
        if self._t0 is None or restarted:
            self._t0, self._next = pts, 0
        self._last_pts = pts
        position = (pts - self._t0) * self.fps  # in sampling intervals since t0
        if position < self._next - self._tolerance:
            return Verdict.SKIP
        self._next = math.floor(position + self._tolerance) + 1
        return Verdict.RESTART if restarted else Verdict.KEEP
