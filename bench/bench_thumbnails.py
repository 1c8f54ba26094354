"""Thumbnail benchmark: bytes and CPU per camera-hour of the JPEG kept with every clip (issue 13's target: at most
15 MB and 1% of a core at 1 fps).

    PYTHONPATH=. python bench/bench_thumbnails.py              # Markdown on stdout
    PYTHONPATH=. python bench/bench_thumbnails.py --seconds 60

At 1 fps a clip is 4 s, so a camera-hour keeps 900 thumbnails. Each source is decoded at 1 fps and every clip's
middle frame goes through `make_thumbnail` exactly as ingest calls it (the frame as decoded, 320 px wide); the
thread CPU time inside it and the JPEG bytes are scaled to an hour. Sources: bench_ingest's camera-like 1080p25
stream (testsrc2 with sensor-like noise: noise is what makes JPEGs big), the same at 720p, and the synthetic shapes
scene of `make-test-video` (flat colours: the small end).
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import av
import numpy as np

from ingest.thumbnails import THUMBNAIL_FRAME, make_thumbnail
from protos.clip import CLIP_FRAMES
from vcflash.shapes import demo_scene

sys.path[:0] = [str(Path(__file__).resolve().parent)]
from bench_ingest import make_1080p  # noqa: E402 - the sibling benchmark's camera-like stream

CLIPS_PER_HOUR = 3600 // CLIP_FRAMES  # at 1 fps


def sampled_frames(path: Path, fps: float = 1.0) -> list[np.ndarray]:
    """The frames a 1 fps sampler keeps: the first at or after each whole second."""
    out, next_t = [], 0.0
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            if frame.time is not None and frame.time + 1e-6 >= next_t:
                out.append(frame.to_ndarray(format="rgb24"))
                next_t += 1 / fps
    return out


def measure(frames: list[np.ndarray]) -> tuple[float, float, int]:
    """(MB per camera-hour, % of a core at 1 fps, thumbnails measured)."""
    middles = frames[THUMBNAIL_FRAME::CLIP_FRAMES]
    sizes, cpu = [], 0.0
    for frame in middles:
        t0 = time.thread_time()
        sizes.append(len(make_thumbnail(frame)))
        cpu += time.thread_time() - t0
    per = len(middles)
    mb_hour = float(np.mean(sizes)) * CLIPS_PER_HOUR / 1e6
    core_pct = 100 * (cpu / per) * CLIPS_PER_HOUR / 3600
    return mb_hour, core_pct, per


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=120, help="media seconds per source")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cam = make_1080p(root / "cam1080.mp4", args.seconds)
        sources = {"camera-like 1080p25 (noise)": sampled_frames(cam)}
        sources["camera-like 720p (noise)"] = [
            np.asarray(av.VideoFrame.from_ndarray(f, format="rgb24").reformat(1280, 720).to_ndarray(format="rgb24"))
            for f in sources["camera-like 1080p25 (noise)"]
        ]
        shapes = demo_scene(seconds=float(args.seconds), fps=25).write(root / "shapes.mp4")
        sources["shapes scene 320x240 (make-test-video)"] = sampled_frames(shapes)
        print(f"# thumbnails: {datetime.now(UTC):%Y-%m-%d}, {platform.processor() or platform.machine()}")
        print("\n| source | thumbnails | MB per camera-hour (target <= 15) | % of a core at 1 fps (target <= 1) |")
        print("|---|---:|---:|---:|")
        for name, frames in sources.items():
            mb, pct, n = measure(frames)
            print(f"| {name} | {n} | {mb:.1f} | {pct:.3f} |")


if __name__ == "__main__":
    main()
