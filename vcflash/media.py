"""A synthetic test video: something to try the pipeline on without a camera or a download."""

from __future__ import annotations

import os
from pathlib import Path

import av
import numpy as np


def write_test_video(
    path: str | os.PathLike[str], seconds: float = 80.0, fps: int = 25, size: tuple[int, int] = (320, 240)
) -> Path:
    """An H.264 MP4 of a red square crossing a gradient, with a clock bar that grows each second."""
    path = Path(path)
    width, height = size
    y, x = np.mgrid[0:height, 0:width]
    background = np.stack([x * 255 // width, y * 255 // height, np.full_like(x, 96)], axis=-1).astype(np.uint8)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps, options={"preset": "ultrafast", "g": str(fps)})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(int(seconds * fps)):
            frame = background.copy()
            t = i / fps
            cx = int((t / seconds) * (width - 40))
            frame[height // 2 - 20 : height // 2 + 20, cx : cx + 40] = (220, 30, 30)
            frame[height - 8 :, : int(width * (t % 60) / 60)] = 255
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path
