"""FrameSampler: which frames survive, by presentation time."""

from __future__ import annotations

import math
import random

import pytest

from ingest.sampler import FrameSampler, Verdict


def kept(pts: list[float], fps: float) -> list[int]:
    sampler = FrameSampler(fps)
    return [i for i, t in enumerate(pts) if sampler.offer(t) is not Verdict.SKIP]


def reference(pts: list[float], fps: float) -> list[int]:
    """Brute force for monotonic PTS: the first frame at or after every instant, each frame once."""
    t0, chosen = pts[0], set()
    for k in range(int((pts[-1] - t0) * fps) + 1):
        instant = t0 + k / fps
        chosen.add(next(i for i, t in enumerate(pts) if t >= instant - 1e-9))
    return sorted(chosen)


def test_25fps_to_1fps_keeps_every_25th_frame() -> None:
    assert kept([i / 25 for i in range(250)], 1.0) == list(range(0, 250, 25))


def test_ntsc_29_97_fps() -> None:
    pts = [i * 1001 / 30000 for i in range(900)]
    indices = kept(pts, 1.0)
    assert indices[:4] == [0, 30, 60, 90]
    assert indices == reference(pts, 1.0)
    assert len(indices) == math.floor(pts[-1]) + 1


def test_fps_2() -> None:
    assert kept([i / 25 for i in range(100)], 2.0) == [0, 13, 25, 38, 50, 63, 75, 88]


def test_variable_frame_rate_matches_reference() -> None:
    rng = random.Random(7)
    pts, t = [], 3.2  # a stream whose clock does not start at 0
    for _ in range(2000):
        pts.append(t)
        t += rng.uniform(0.005, 0.2)
    indices = kept(pts, 1.0)
    assert indices == reference(pts, 1.0)
    assert pts[indices[1]] >= 4.2


def test_rounding_error_just_below_an_instant_counts_as_the_instant() -> None:
    assert kept([0.0, 0.5, 1.0 - 1e-12, 1.5, 2.0], 1.0) == [0, 2, 4]


def test_gap_resumes_at_the_next_instant_without_a_burst() -> None:
    pts = [i / 25 for i in range(100)] + [60.0 + i / 25 for i in range(100)]
    indices = kept(pts, 1.0)
    assert [pts[i] for i in indices] == pytest.approx([0, 1, 2, 3, 60, 61, 62, 63])


def test_backwards_pts_restarts_sampling() -> None:
    sampler = FrameSampler(1.0)
    verdicts = [sampler.offer(t) for t in (10.0, 10.5, 11.0, 11.5, 2.0, 2.5, 3.0)]
    assert verdicts == [
        Verdict.KEEP,
        Verdict.SKIP,
        Verdict.KEEP,
        Verdict.SKIP,
        Verdict.RESTART,
        Verdict.SKIP,
        Verdict.KEEP,
    ]


def test_repeated_pts_is_not_a_restart() -> None:
    sampler = FrameSampler(1.0)
    assert [sampler.offer(t) for t in (0.0, 0.0, 1.0, 1.0)] == [Verdict.KEEP, Verdict.SKIP, Verdict.KEEP, Verdict.SKIP]


def test_fps_above_source_rate_keeps_every_frame() -> None:
    assert kept([i / 10 for i in range(50)], 30.0) == list(range(50))


@pytest.mark.parametrize("fps", [0.0, -1.0, math.nan, math.inf])
def test_bad_fps_is_rejected(fps: float) -> None:
    with pytest.raises(ValueError, match="fps"):
        FrameSampler(fps)


def test_non_finite_pts_is_rejected() -> None:
    with pytest.raises(ValueError, match="pts"):
        FrameSampler(1.0).offer(math.nan)
