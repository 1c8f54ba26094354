"""Decoded frames over VCFLASH_MAX_FRAME_PIXELS are scaled down at decode, before any RGB conversion: a small PNG of
huge dimensions cannot make a stream hold gigabytes."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ingest.source import DEFAULT_MAX_FRAME_PIXELS, open_frames
from vcflash.serve.settings import IngestSettings, Settings


def png(path: Path, width: int, height: int) -> Path:
    image = Image.new("RGB", (width, height), (200, 30, 30))
    image.paste((20, 20, 220), (0, 0, width // 2, height))  # left half blue: the content survives the scaling
    image.save(path, optimize=False, compress_level=1)
    return path


def frames(path: Path, **kwargs: int | None) -> list:  # type: ignore[type-arg]
    return list(open_frames(str(path), realtime=False, stop=threading.Event(), media_root=path.parent, **kwargs))


@pytest.fixture(scope="module")
def huge_png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = png(tmp_path_factory.mktemp("png") / "huge.png", 8000, 8000)
    assert path.stat().st_size < 2_000_000  # small on disk, 192 MB as RGB
    return path


def test_an_8000x8000_png_is_scaled_to_the_default_cap_before_rgb(huge_png: Path) -> None:
    (frame,) = frames(huge_png)
    image = frame.image
    assert image.width * image.height <= DEFAULT_MAX_FRAME_PIXELS and image.width == image.height == 4096
    rgb = frame.to_rgb()
    assert rgb.shape == (4096, 4096, 3)
    assert tuple(rgb[10, 10]) == pytest.approx((20, 20, 220), abs=6)
    assert tuple(rgb[10, -10]) == pytest.approx((200, 30, 30), abs=6)
    assert frame.pts == 0.0


def test_a_smaller_cap_keeps_the_aspect(tmp_path: Path, huge_png: Path) -> None:
    (frame,) = frames(huge_png, max_frame_pixels=1_000_000)
    assert (frame.image.width, frame.image.height) == (1000, 1000)
    (wide,) = frames(png(tmp_path / "wide.png", 400, 100), max_frame_pixels=10_000)
    assert (wide.image.width, wide.image.height) == (200, 50)
    rgb = wide.to_rgb((64, 64))
    assert rgb.shape == (64, 64, 3) and rgb.dtype == np.uint8


def test_frames_under_the_cap_are_untouched(tmp_path: Path) -> None:
    (frame,) = frames(png(tmp_path / "small.png", 320, 240))
    assert (frame.image.width, frame.image.height) == (320, 240)
    (frame,) = frames(png(tmp_path / "any.png", 320, 240), max_frame_pixels=None)
    assert (frame.image.width, frame.image.height) == (320, 240)


def test_the_cap_is_a_setting() -> None:
    assert IngestSettings().max_frame_pixels == DEFAULT_MAX_FRAME_PIXELS
    assert Settings.from_env({"VCFLASH_MAX_FRAME_PIXELS": "1000000"}).ingest.max_frame_pixels == 1_000_000
    with pytest.raises(ValueError, match="VCFLASH_MAX_FRAME_PIXELS"):
        Settings.from_env({"VCFLASH_MAX_FRAME_PIXELS": "10"})
