"""Encoder throughput with 1, 2, 3 `vcflash encoder` processes side by side (issue 16: replicated encoders).

    python bench/bench_encoders.py --encoders 1,2,3 --streams 8 --clips 48 --model tiny

Each run starts a private redis-server and N encoder processes (the model given, float32 on the CPU) on loopback,
then ingest's own link (`ingest.encoder_link.EncoderLink`, the code `vcflash ingest` runs) places `--streams`
streams over them (sticky per stream, spread) and sends `--clips` clips of random 224x224 frames per stream as fast
as the encoders acknowledge them (a window of 64 unacknowledged clips). Measured: stored clips per second from the
first clip sent to the last acknowledgement, after a warm-up of one clip per stream. On a 2-core machine the cores,
not the encoders, cap the total: the load average is printed beside each row.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "bench"), str(ROOT)]
from bench_memory import free_port, redis_server  # noqa: E402

from ingest.encoder_link import EncoderLink  # noqa: E402
from protos.clip import Clip  # noqa: E402
from tests.test_split import VCFLASH, serving, wait_for  # noqa: E402
from vcflash.serve.settings import LinkSettings  # noqa: E402

TOKEN = "bench-encoders-7c1d"


def clip(stream: str, seq: int, rng: np.random.Generator) -> Clip:
    frames = rng.integers(0, 256, (4, 224, 224, 3), np.uint8)
    media = tuple(seq * 4.0 + i for i in range(4))
    return Clip(stream, seq, frames, media, tuple(1.7e9 + t for t in media), 1.0)


async def send(address: str, streams: int, clips: int, first_seq: int) -> float:
    """Seconds to have `clips` clips of each stream stored through ingest's link to `address`."""
    stored: set[tuple[str, int]] = set()
    queue: asyncio.Queue[Clip] = asyncio.Queue()
    link = EncoderLink(
        queue,
        LinkSettings(encoder_address=address, max_unacked_clips=64),
        token=TOKEN,
        max_message_bytes=64 << 20,
        on_stored=lambda s, q: stored.add((s, q)),
    )
    task = asyncio.create_task(link.run())
    rng = np.random.default_rng(0)
    try:
        while not link.lanes or not all(lane.up for lane in link.lanes.values()):
            await asyncio.sleep(0.05)
        batch = [clip(f"cam{s}", first_seq + q, rng) for q in range(clips) for s in range(streams)]
        t0 = time.perf_counter()
        for c in batch:
            queue.put_nowait(c)
        while len(stored) < len(batch):
            await asyncio.sleep(0.01)
        return time.perf_counter() - t0
    finally:
        task.cancel()


def run(n: int, args: argparse.Namespace, tmp: Path) -> dict[str, float]:
    with redis_server(tmp, appendonly=False) as url:
        env = os.environ | {
            "VCFLASH_API_TOKEN": TOKEN,
            "VCFLASH_REDIS_URL": url,
            "VCFLASH_DATA_DIR": str(tmp / "data"),
            "VCFLASH_METRICS_PORT": "0",
            "VCFLASH_MAX_WAIT_MS": "10",
            "VCFLASH_MAX_MESSAGE_BYTES": str(64 << 20),
        }
        ports = [free_port() for _ in range(n)]
        procs = [
            subprocess.Popen(
                [VCFLASH, "encoder", "--port", str(p), "--model", args.model],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for p in ports
        ]
        try:
            for p in ports:
                wait_for(lambda p=p: serving(p), 120, f"encoder on {p}")
            address = ",".join(f"127.0.0.1:{p}" for p in ports)
            asyncio.run(send(address, args.streams, 1, 0))  # warm-up: every encoder has run its model
            load0 = os.getloadavg()[0]
            seconds = asyncio.run(send(address, args.streams, args.clips, 1))
            return {
                "encoders": n,
                "clips_s": args.streams * args.clips / seconds,
                "load": (load0 + os.getloadavg()[0]) / 2,
            }
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoders", default="1,2,3")
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--clips", type=int, default=48, help="per stream, timed")
    parser.add_argument("--model", default="tiny")
    args = parser.parse_args()
    rows = []
    for n in (int(x) for x in args.encoders.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            rows.append(run(n, args, Path(tmp)))
        print(rows[-1], flush=True)
    print(
        f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores, model {args.model}, "
        f"{args.streams} streams x {args.clips} clips, {time.strftime('%Y-%m-%d')}\n"
    )
    print("| encoders | clips/s | vs 1 encoder | load average |\n|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['encoders']} | {r['clips_s']:.1f} | {r['clips_s'] / rows[0]['clips_s']:.2f}x | {r['load']:.1f} |")


if __name__ == "__main__":
    main()
