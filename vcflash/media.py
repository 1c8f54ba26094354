"""Synthetic videos to try the pipeline on without a camera or a download: the H.264 writer they share, and the
plain test pattern the service tests stream (the shapes scenes the tiny model knows are `vcflash.shapes`)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import av
import numpy as np


def write_video(path: str | os.PathLike[str], frames: Iterable[np.ndarray], fps: int) -> Path:
    """Encode uint8 RGB frames [H, W, 3] (all one size, even sides) as an H.264 MP4 at `fps`, one keyframe a second."""
    path = Path(path)
    with av.open(str(path), mode="w") as container:
        stream = None
        for frame in frames:
            if stream is None:
                stream = container.add_stream("libx264", rate=fps, options={"preset": "ultrafast", "g": str(fps)})
                stream.height, stream.width = frame.shape[:2]
                stream.pix_fmt = "yuv420p"
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        if stream is None:
            raise ValueError(f"{path}: no frames to write")
        container.mux(stream.encode())
    return path


def write_test_video(
    path: str | os.PathLike[str], seconds: float = 80.0, fps: int = 25, size: tuple[int, int] = (320, 240)
) -> Path:
    """An H.264 MP4 of a red square crossing a gradient, with a clock bar that grows each second."""
    width, height = size
    y, x = np.mgrid[0:height, 0:width]
    background = np.stack([x * 255 // width, y * 255 // height, np.full_like(x, 96)], axis=-1).astype(np.uint8)

    def frames() -> Iterable[np.ndarray]:
        for i in range(int(seconds * fps)):
            frame = background.copy()
            t = i / fps
            cx = int((t / seconds) * (width - 40))
            frame[height // 2 - 20 : height // 2 + 20, cx : cx + 40] = (220, 30, 30)
            frame[height - 8 :, : int(width * (t % 60) / 60)] = 255
            yield frame

    return write_video(path, frames(), fps)
