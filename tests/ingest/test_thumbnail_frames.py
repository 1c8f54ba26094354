"""A clip's thumbnail: made at ingest from its middle frame as decoded, and carried on the wire to the encoder."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from ingest.clips import ClipGrouper
from ingest.thumbnails import THUMBNAIL_FRAME, make_thumbnail
from protos.clip import clip_from_request, clip_request
from vcflash.serve.errors import Invalid

COLOUR = (200, 40, 90)


def decode(jpeg: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))


@pytest.mark.parametrize(("h", "w", "height"), [(720, 1280, 180), (480, 640, 240), (64, 96, 213), (10, 1000, 3)])
def test_a_thumbnail_is_320_wide_with_the_frame_s_aspect_and_colour(h: int, w: int, height: int) -> None:
    frame = np.empty((h, w, 3), dtype=np.uint8)
    frame[:] = COLOUR
    image = decode(make_thumbnail(frame))
    assert image.shape == (height, 320, 3)
    assert np.abs(image.reshape(-1, 3).mean(0) - COLOUR).max() < 4


def test_make_thumbnail_refuses_what_is_not_an_rgb_frame() -> None:
    with pytest.raises(ValueError, match="uint8 \\[H, W, 3\\]"):
        make_thumbnail(np.zeros((4, 4), dtype=np.uint8))


def test_the_grouper_gives_each_clip_the_thumbnail_given_with_one_of_its_frames() -> None:
    grouper = ClipGrouper("cam", fps=1.0)
    frame = np.zeros((8, 8, 3), dtype=np.uint8)
    clips = []
    for i in range(8):
        thumbnail = f"\xff\xd8\xff{i}".encode("latin-1") if i % 4 == THUMBNAIL_FRAME else b""
        clips.append(grouper.add(frame, float(i), 100.0 + i, thumbnail))
    assert [c.thumbnail for c in clips if c is not None] == [b"\xff\xd8\xff2", b"\xff\xd8\xff6"]
    grouper.add(frame, 8.0, 108.0, b"\xff\xd8\xffX")
    grouper.discard()  # a restart drops the partial clip and its thumbnail
    assert all(grouper.add(frame, 9.0 + i, 109.0 + i) is None for i in range(3))
    assert grouper.add(frame, 12.0, 112.0).thumbnail == b""  # type: ignore[union-attr]


def test_the_thumbnail_travels_on_the_wire_within_its_limit() -> None:
    grouper = ClipGrouper("cam", fps=1.0)
    frame = np.zeros((8, 8, 3), dtype=np.uint8)
    jpeg = make_thumbnail(np.full((90, 160, 3), 128, dtype=np.uint8))
    clip = [grouper.add(frame, float(i), float(i), jpeg if i == 2 else b"") for i in range(4)][-1]
    assert clip is not None
    request = clip_request(clip)
    assert clip_from_request(request, 4096).thumbnail == jpeg
    with pytest.raises(Invalid, match=f"thumbnail is {len(jpeg)} bytes, more than 1024"):
        clip_from_request(request, 4096, max_thumbnail_bytes=1024)
