"""Whether a keyframes-only stream may skip the frames between its keyframes at its sampling rate.

Decoding keyframes only samples at the requested rate only if keyframes come at least that often: a camera
with a 2 s or 4 s GOP sampled at 1 fps would give 0.5 or 0.25 fps. The gate measures the keyframe interval
from the keyframe packets' PTS (the demuxer sees every packet whatever the decoder skips) and has the source
decode every frame while it is unknown or longer than the sampling period, so sampling never falls below the
requested rate. Each connection starts decoding every frame until two keyframes have been seen: one GOP of
full decoding per connection. Switches happen at a keyframe packet, so the decoder never starts mid-GOP; a
camera that lengthens its GOP mid-connection is only caught at the keyframe that ends the long GOP, so that
one GOP is sampled from its keyframe alone (the fallback, its log line and metrics follow at once).
Pure logic, no I/O; written by the source thread, read by anyone (each read is one snapshot).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

# Keyframes may be this much further apart than the sampling period and still be sampled from alone: a
# 29.97 fps camera with a 30-frame GOP has keyframes 1.001 s apart. The sampler accepts a frame this early
# (``FrameSampler(slack=...)``), so such a stream loses at most one sample in 1 / slack, never every other one.
SLACK = 0.01
# After a fallback, keyframes only again once this many intervals in a row were short enough: one lost or
# late keyframe does not make a stream flip back and forth.
RETURN_AFTER = 3

ALL_FRAMES = "all frames"
KEYFRAMES = "keyframes only"
MEASURING = "all frames (measuring the keyframe interval)"


@dataclass(frozen=True, slots=True)
class KeyframeState:
    """One reading of a gate: what the source decodes and why."""

    decode_all: bool  # every frame is decoded (measuring, or fallen back)
    fallback: bool  # ... because keyframes came further apart than the sampling period
    interval_s: float | None  # the latest keyframe interval measured (PTS of two keyframes in a row)

    def describe(self, fps: float) -> str:
        """StreamStatus.decode of a keyframes-only stream."""
        if self.fallback:
            return (
                f"{ALL_FRAMES} (keyframes {self.interval_s:.3g} s apart, longer than the "
                f"{1 / fps:.3g} s sampling period)"
            )
        return MEASURING if self.decode_all else KEYFRAMES


class KeyframeGate:
    """Measures a keyframes-only stream's keyframe interval and says whether every frame must be decoded.

    ``on_change(before, after)`` (called from the source thread) hears each change of ``decode_all`` or ``fallback``.
    """

    def __init__(self, fps: float, on_change: Callable[[KeyframeState, KeyframeState], None] | None = None) -> None:
        if not (math.isfinite(fps) and fps > 0):
            raise ValueError(f"fps must be a positive finite number, got {fps!r}")
        self.fps = fps
        self.period_s = 1 / fps
        self._on_change = on_change
        self.state = KeyframeState(decode_all=True, fallback=False, interval_s=None)
        self._last: float | None = None  # the previous keyframe's PTS, seconds
        self._short = 0  # intervals in a row within the period (+ slack)

    @property
    def decode_all(self) -> bool:
        return self.state.decode_all

    def connect(self) -> None:
        """A new connection: decode every frame until its keyframe interval is measured again."""
        self._last, self._short = None, 0
        self._set(KeyframeState(True, self.state.fallback, self.state.interval_s))

    def restart(self) -> None:
        """The PTS start over (a file replayed): forget the last keyframe, keep deciding as before."""
        self._last = None

    def keyframe(self, pts: float) -> None:
        """A keyframe packet presented at ``pts`` seconds (decode order)."""
        last, self._last = self._last, pts
        if last is None or not pts > last:  # the first one, or the PTS went back: nothing to measure
            return
        interval = pts - last
        if interval > self.period_s * (1 + SLACK):
            self._short = 0
            self._set(KeyframeState(True, True, interval))
            return
        self._short += 1
        if not self.state.fallback or self._short >= RETURN_AFTER:  # fallen back: the long interval still stands
            self._set(KeyframeState(False, False, interval))

    def _set(self, state: KeyframeState) -> None:
        before, self.state = self.state, state
        if _mode(state) != _mode(before) and self._on_change is not None:
            self._on_change(before, state)


def _mode(state: KeyframeState) -> tuple[bool, bool]:
    return state.decode_all, state.fallback
