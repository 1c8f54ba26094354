"""End-to-end ingest -> encoder -> memory on this machine: how many 1 fps streams it sustains, and how
long after its 4th frame a clip is stored.

    python bench/bench_pipeline.py --streams 8,16,24 --seconds 60          # tiny model, CPU

Each stream plays the same synthetic file in real time (a live camera at 25 fps, 320x240), sampled at
1 fps, inside the all-in-one service with the embedded memory. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from prometheus_client import CollectorRegistry

from hico import VideoChatFlash
from hico.checkpoint import make_tiny_checkpoint
from ingest.spec import StreamSpec
from memory.records import ClipRecord
from vcflash.app import App
from vcflash.media import write_test_video
from vcflash.serve.settings import Settings


async def run(n: int, seconds: float, model: VideoChatFlash, video: Path, tmp: Path) -> dict[str, float]:
    settings = Settings.from_env(
        {},
        data_dir=tmp / f"data{n}",
        address="127.0.0.1:0",
        api_token="bench-token-0123456789",
        metrics_port=0,
        http_port=0,
        media_root=video.parent,
    )
    app = App(settings, model, registry=CollectorRegistry())
    await app.start()
    latencies: list[float] = []
    put = app.store.put

    def timed_put(record: ClipRecord) -> bool:
        stored = put(record)
        fourth_frame = record.meta.wall_end - 1.0  # 1 fps: the clip ends one interval after its 4th frame
        latencies.append(time.time() - fourth_frame)
        return stored

    app.store.put = timed_put  # type: ignore[method-assign]
    for i in range(n):
        await app.streams.add(f"cam{i}", StreamSpec(str(video), fps=1.0, realtime=True))
    t0 = time.process_time()
    w0 = time.perf_counter()
    while any(s.state.value in ("starting", "running") for s in app.streams.manager.status().values()):
        await asyncio.sleep(0.5)
    await asyncio.sleep(2.0)  # the last clips reach memory
    cpu = (time.process_time() - t0) / (time.perf_counter() - w0)
    statuses = app.streams.manager.status().values()
    emitted = sum(s.clips_emitted for s in statuses)
    stored = sum(app.streams.stored.values())
    dropped = sum(sum(s.frames_dropped.values()) for s in statuses)
    sampled = sum(s.frames_sampled for s in statuses)
    await app.stop()
    return {
        "streams": n,
        "sampled": sampled,
        "emitted": emitted,
        "stored": stored,
        "dropped_frames": dropped,
        "latency_p50": statistics.median(latencies),
        "latency_p95": sorted(latencies)[int(0.95 * (len(latencies) - 1))],
        "cpu_cores": cpu,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", default="8,16,24")
    ap.add_argument("--seconds", type=float, default=60.0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        model = VideoChatFlash.from_pretrained(make_tiny_checkpoint(tmp / "tiny"))
        video = write_test_video(tmp / "cam.mp4", seconds=args.seconds, fps=25, size=(320, 240))
        rows = [asyncio.run(run(int(n), args.seconds, model, video, tmp)) for n in args.streams.split(",")]
    print(
        "\n| 1 fps streams | frames sampled | clips emitted / stored | frames dropped | "
        "stored after 4th frame p50 / p95 | process CPU (cores) |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['streams']} | {r['sampled']} | {r['emitted']} / {r['stored']} | {r['dropped_frames']} | "
            f"{r['latency_p50']:.2f} / {r['latency_p95']:.2f} s | {r['cpu_cores']:.2f} |"
        )


if __name__ == "__main__":
    main()
