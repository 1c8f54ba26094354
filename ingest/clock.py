"""A stream's media clock across its connections: media time never goes back and keeps pace with wall time."""

from __future__ import annotations

from typing import Self


class MediaClock:
    """Turns each connection's presentation times into the stream's media time.

    A new connection (an RTSP reconnect, a WHIP sender publishing again) restarts its own clock near 0, and
    downstream needs a stream's media time to never go back and to keep pace with wall time. So each
    connection's times are shifted to go on from the stream's last frame plus the wall time the stream was
    away, at least `min_gap_s` (one sampling interval, so the sampler sees no restart). Until the stream has
    a last frame, times are the PTS unchanged: a new stream's first connection keeps its own clock.

    One stream's thread at a time uses it; a stream that replaces an ended one (or resumes a stored one)
    takes over its clock and continues it.
    """

    def __init__(self) -> None:
        self.last: tuple[float, float] | None = None  # media and wall time of the stream's last frame
        self._offset = 0.0  # added to this connection's PTS
        self._rebase = True  # the next frame is a new connection's first
        self._min_gap_s = 0.0

    @classmethod
    def after(cls, media: float, wall: float) -> Self:
        """A clock that continues after (media, wall): where a stored stream's last clip ended."""
        clock = cls()
        clock.last = (media, wall)
        return clock

    def connect(self, min_gap_s: float) -> None:
        """A new connection starts; its first frame comes at least `min_gap_s` after the last one."""
        self._rebase, self._min_gap_s = True, min_gap_s

    def media_time(self, pts: float, wall: float) -> float:
        """The stream's media time of a frame with this PTS that arrived (or was live) at `wall`."""
        if self._rebase:
            self._rebase = False
            if self.last is not None:
                last_media, last_wall = self.last
                self._offset = last_media + max(wall - last_wall, self._min_gap_s) - pts
        media = pts + self._offset
        self.last = (media, wall)
        return media
