"""A clip's viewable evidence: a small JPEG of its middle sampled frame, made at ingest from the frame as decoded
(before it is squashed to the encoder's square input), so it keeps the camera's aspect."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from protos.clip import CLIP_FRAMES

THUMBNAIL_WIDTH = 320  # pixels; the height keeps the frame's aspect
THUMBNAIL_QUALITY = 80  # JPEG quality: 320 x 180 is about 5-15 KB
THUMBNAIL_FRAME = CLIP_FRAMES // 2  # which of a clip's sampled frames (0-based) is its thumbnail


def make_thumbnail(frame: np.ndarray, width: int = THUMBNAIL_WIDTH, quality: int = THUMBNAIL_QUALITY) -> bytes:
    """uint8 RGB [H, W, 3] -> JPEG bytes `width` pixels wide, aspect kept (height at least 1)."""
    if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"a thumbnail needs a uint8 [H, W, 3] frame, got {frame.dtype} {list(frame.shape)}")
    h, w = frame.shape[:2]
    height = max(1, round(h * width / w))
    image = Image.fromarray(np.ascontiguousarray(frame))
    if (w, h) != (width, height):
        image = image.resize((width, height), Image.Resampling.BILINEAR, reducing_gap=2.0)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    return out.getvalue()
