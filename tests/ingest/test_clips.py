"""Clip and ClipGrouper: 4 frames per clip, consecutive seq numbers, both clocks."""

from __future__ import annotations

import numpy as np
import pytest

from ingest.clips import Clip, ClipGrouper


def frame(value: int = 0, shape: tuple[int, int] = (6, 8)) -> np.ndarray:
    return np.full((*shape, 3), value, dtype=np.uint8)


def test_grouper_makes_clips_of_four_with_consecutive_seq_from_first_seq() -> None:
    grouper = ClipGrouper("cam", fps=1.0, first_seq=7)
    clips = [grouper.add(frame(i), float(i), 1000.0 + i) for i in range(10)]
    made = [c for c in clips if c is not None]
    assert [c.seq for c in made] == [7, 8]
    assert [i for i, c in enumerate(clips) if c is not None] == [3, 7]
    assert grouper.pending == 2 and grouper.next_seq == 9
    first = made[0]
    assert first.stream_id == "cam"
    assert first.frames.shape == (4, 6, 8, 3) and first.frames.dtype == np.uint8
    assert [int(f[0, 0, 0]) for f in first.frames] == [0, 1, 2, 3]
    assert first.media_times == (0.0, 1.0, 2.0, 3.0)
    assert (first.media_start, first.media_end) == (0.0, 4.0)
    assert (first.wall_start, first.wall_end) == (1000.0, 1004.0)


def test_clip_end_is_last_frame_plus_one_interval() -> None:
    grouper = ClipGrouper("cam", fps=2.0)
    clip = None
    for i in range(4):
        clip = grouper.add(frame(), i / 2, 50 + i / 2)
    assert clip is not None
    assert clip.media_end == pytest.approx(2.0) and clip.wall_end == pytest.approx(52.0)


def test_clip_frames_are_read_only() -> None:
    grouper = ClipGrouper("cam", fps=1.0)
    clip = [grouper.add(frame(), float(i), float(i)) for i in range(4)][-1]
    assert clip is not None
    with pytest.raises(ValueError):
        clip.frames[0, 0, 0, 0] = 1


def test_discard_drops_the_partial_clip_and_keeps_numbering() -> None:
    grouper = ClipGrouper("cam", fps=1.0, first_seq=3)
    for i in range(3):
        grouper.add(frame(), float(i), float(i))
    assert grouper.discard() == 3 and grouper.pending == 0
    clip = [grouper.add(frame(), float(i), float(i)) for i in range(10, 14)][-1]
    assert clip is not None and clip.seq == 3 and clip.media_times == (10.0, 11.0, 12.0, 13.0)


def test_frame_size_change_inside_a_clip_is_an_error_naming_both_shapes() -> None:
    grouper = ClipGrouper("cam", fps=1.0)
    grouper.add(frame(shape=(6, 8)), 0.0, 0.0)
    with pytest.raises(ValueError, match=r"\[4, 4, 3\].*\[6, 8, 3\]"):
        grouper.add(frame(shape=(4, 4)), 1.0, 1.0)


def test_clip_validates_its_fields() -> None:
    with pytest.raises(ValueError, match="uint8"):
        Clip("cam", 0, np.zeros((3, 2, 2, 3), np.uint8), (0.0,) * 3, (0.0,) * 3, 1.0)
    with pytest.raises(ValueError, match="media and wall times"):
        Clip("cam", 0, np.zeros((4, 2, 2, 3), np.uint8), (0.0,) * 4, (0.0,) * 3, 1.0)
    with pytest.raises(ValueError, match="first_seq"):
        ClipGrouper("cam", 1.0, first_seq=-1)
