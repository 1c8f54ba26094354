"""Memory benchmark: clip writes, token fetches, time-range scans and bytes per camera-hour, per backend.

    python bench/bench_memory.py              # embedded SQLite, and a redis-server it starts on a free loopback port

Backends: the embedded store (a SQLite file in a temporary directory), Redis without persistence, and Redis with
its append-only file (fsync every second, the durable setting). Prints Markdown tables for BENCHMARKS.md with the
issue's targets; MB is 10^6 bytes.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import platform
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import numpy as np
import redis

from memory import ClipMeta, ClipRecord, EmbeddedStore, MemoryStore, RedisStore, TokenFormat, clip_vector
from memory.codec import dequantize_int8, quantize_int8

log = logging.getLogger("bench_memory")

WALL0 = 1_700_000_000.0
CLIPS_PER_CAMERA_HOUR = 900  # 1 fps, 4 frames per clip
FETCH_CLIPS = 128  # 512 frames
DIMS = {"tiny": 64, "2B": 1536, "7B": 3584}
MB = 1e6
EMBEDDED = "embedded (SQLite WAL)"
TARGET_WRITE_MS, TARGET_FETCH_MS = 2.0, 50.0
TARGET_HOUR_MB: dict[TokenFormat, float] = {"fp16": 180.0, "int8": 90.0}


class Clips:
    """Records with a few distinct random token sets, generated once so timing excludes the generation."""

    def __init__(self, dim: int, variety: int = 8, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.tokens = [rng.standard_normal((64, dim)).astype(np.float16) for _ in range(variety)]
        self.vectors = [clip_vector(t) for t in self.tokens]

    def __call__(self, seq: int, stream_id: str) -> ClipRecord:
        media, wall = 4.0 * seq, WALL0 + 4.0 * seq
        meta = ClipMeta(stream_id, seq, wall, wall + 4, media, media + 4, (media, media + 1, media + 2, media + 3))
        i = seq % len(self.tokens)
        return ClipRecord(meta, self.tokens[i], self.vectors[i])


@contextmanager
def redis_server(directory: Path, appendonly: bool) -> Iterator[str]:
    """A private redis-server on a free loopback port; yields its URL."""
    port = free_port()
    args = ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(directory)]
    args += ["--appendonly", "yes", "--appendfsync", "everysec"] if appendonly else ["--appendonly", "no"]
    proc = subprocess.Popen(["redis-server", *args], stdout=subprocess.DEVNULL)
    try:
        with redis.Redis(port=port) as client:
            for _ in range(500):
                try:
                    client.ping()
                    break
                except redis.ConnectionError:
                    time.sleep(0.01)
            else:
                raise RuntimeError(f"redis-server on port {port} did not answer PING within 5 s")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed_ms(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def bench_writes(store: MemoryStore, clips: Clips, n: int) -> list[float]:
    return [timed_ms(lambda seq=seq: store.put(clips(seq, "writes"))) for seq in range(n)]


def bench_fetch(store: MemoryStore, stream_id: str, n_clips: int, repeat: int) -> list[float]:
    starts = np.random.default_rng(1).integers(0, n_clips - FETCH_CLIPS, size=repeat + 2)
    times = [timed_ms(lambda s=s: store.tokens(stream_id, range(s, s + FETCH_CLIPS))) for s in starts]
    return times[2:]  # two warm-ups


def bench_scan(store: MemoryStore, clips: Clips, frames: int, repeat: int) -> tuple[float, float]:
    """Median ms of scanning all of a `frames`-frame memory, and of a window of a tenth of it, on the media clock."""
    stream_id, n = f"scan{frames}", frames // 4
    for seq in range(n):
        store.put(clips(seq, stream_id))
    assert len(store.clips(stream_id)) == n
    window = (0.45 * 4 * n, 0.55 * 4 * n)
    full = statistics.median(timed_ms(lambda: store.clips(stream_id)) for _ in range(repeat))
    part = statistics.median(timed_ms(lambda: store.clips(stream_id, *window)) for _ in range(repeat))
    store.delete_stream(stream_id)
    return full, part


def camera_hour_bytes(store: MemoryStore, clips: Clips, footprint: Callable[[], int]) -> tuple[int, int]:
    """(stats().bytes, growth of the backend's own footprint) after an hour of one camera."""
    before = footprint()
    for seq in range(CLIPS_PER_CAMERA_HOUR):
        store.put(clips(seq, "hour"))
    nbytes, grown = store.stats("hour").bytes, footprint() - before
    store.delete_stream("hour")
    return nbytes, grown


def computed_hour_bytes(dim: int, token_format: TokenFormat) -> int:
    """Payload per clip: tokens and vector in the format (int8 adds one float16 scale per token and per vector)."""
    per_clip = 64 * dim * 2 + dim * 2 if token_format == "fp16" else 64 * dim + 64 * 2 + dim + 2
    return CLIPS_PER_CAMERA_HOUR * per_clip


def int8_error(tokens: np.ndarray) -> tuple[float, float]:
    """(relative RMS error, worst error in quantization steps) of the int8 round trip of float16 tokens [n, 64, D]."""
    x = tokens.astype(np.float32)
    y = dequantize_int8(*quantize_int8(tokens)).astype(np.float16)  # what the stores write and read back
    err = np.abs(y.astype(np.float32) - x)
    steps = err.max(axis=-1) / (np.abs(x).max(axis=-1) / 127)
    return float(np.sqrt((err**2).mean() / (x**2).mean())), float(steps.max())


class Backend(NamedTuple):
    name: str
    open_store: Callable[[TokenFormat, str], MemoryStore]  # (token format, a name for separate data)
    footprint: Callable[[str], int]  # bytes the backend uses for the data of that name (file sizes, used_memory)


def embedded(root: Path) -> Backend:
    def footprint(name: str) -> int:
        return sum(f.stat().st_size for f in root.glob(f"{name}.sqlite3*"))

    return Backend(
        EMBEDDED,
        lambda fmt, name: EmbeddedStore(root / f"{name}.sqlite3", token_format=fmt),
        footprint,
    )


def redis_backend(label: str, url: str) -> Backend:
    client = redis.Redis.from_url(url)
    return Backend(
        label,
        lambda fmt, name: RedisStore(url, prefix=name, token_format=fmt),
        lambda name: int(client.info("memory")["used_memory"]),
    )


def bench_backend(backend: Backend, args: argparse.Namespace) -> dict:
    name, open_store = backend.name, backend.open_store
    log.info("%s: writes, fetches", name)
    out: dict = {}
    clips_2b = Clips(DIMS["2B"])
    for fmt in ("fp16", "int8"):
        with open_store(fmt, f"writes-{fmt}") as store:
            out[f"write {fmt}"] = statistics.median(bench_writes(store, clips_2b, args.writes))
            out[f"fetch {fmt}"] = statistics.median(bench_fetch(store, "writes", args.writes, args.repeat))
    log.info("%s: scans", name)
    with open_store("fp16", "scans") as store:
        for frames in (1_000, 10_000):
            out[f"scan {frames}"] = bench_scan(store, clips_2b, frames, args.repeat)
    log.info("%s: camera-hours", name)
    for size, dim in DIMS.items():
        clips = Clips(dim)
        for fmt in ("fp16", "int8"):
            with open_store(fmt, f"hour-{size}-{fmt}") as store:
                footprint = functools.partial(backend.footprint, f"hour-{size}-{fmt}")
                out[f"hour {size} {fmt}"] = camera_hour_bytes(store, clips, footprint)
    return out


def report(results: dict[str, dict], args: argparse.Namespace) -> None:
    """One row per measurement, one column per backend; camera-hours also show the backend's own growth in ()."""
    names = list(results)

    def row(label: str, cell: Callable[[dict], str], target: str = "", met: bool | None = None) -> None:
        verdict = "" if met is None else ("yes" if met else "NO")
        print(f"| {label} | {' | '.join(cell(results[n]) for n in names)} | {target} | {verdict} |")

    print(f"\n| measurement | {' | '.join(names)} | target | met |")
    print("|---" * (len(names) + 3) + "|")
    for fmt in ("fp16", "int8"):
        met = all(r[f"write {fmt}"] <= TARGET_WRITE_MS for r in results.values())
        label = f"clip write, 2B (D=1536) {fmt}, median of {args.writes}"
        row(label, lambda r, f=fmt: f"{r[f'write {f}']:.2f} ms", f"≤ {TARGET_WRITE_MS:g} ms", met)
    for fmt in ("fp16", "int8"):
        met = all(r[f"fetch {fmt}"] <= TARGET_FETCH_MS for n, r in results.items() if n.startswith("Redis"))
        mb = FETCH_CLIPS * computed_hour_bytes(DIMS["2B"], fmt) / CLIPS_PER_CAMERA_HOUR / MB
        label = f"fetch 512 frames (128 clips, {mb:.1f} MB stored), 2B {fmt}, median of {args.repeat}"
        row(label, lambda r, f=fmt: f"{r[f'fetch {f}']:.1f} ms", f"≤ {TARGET_FETCH_MS:g} ms from Redis", met)
    for frames in (1_000, 10_000):
        label = f"scan a {frames:,}-frame memory ({frames // 4:,} clips): all / a tenth, median of {args.repeat}"
        row(label, lambda r, k=f"scan {frames}": f"{r[k][0]:.2f} / {r[k][1]:.2f} ms")
    for size, dim in DIMS.items():
        for fmt in ("fp16", "int8"):
            key, computed = f"hour {size} {fmt}", computed_hour_bytes(dim, fmt)
            label = f"camera-hour at 1 fps, {size} (D={dim}) {fmt}; computed {computed / MB:.2f} MB"
            target = TARGET_HOUR_MB[fmt] if size == "2B" else None
            met = None if target is None else all(r[key][0] <= target * MB for r in results.values())
            cell = lambda r, k=key: f"{r[k][0] / MB:.2f} MB ({r[k][1] / MB:.1f})"  # noqa: E731
            row(label, cell, "" if target is None else f"≤ {target:g} MB", met)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--writes", type=int, default=1000, help="puts per write measurement")
    parser.add_argument("--repeat", type=int, default=20, help="repetitions of each fetch and scan")
    args = parser.parse_args()
    if args.writes <= FETCH_CLIPS:
        parser.error(f"--writes must exceed the {FETCH_CLIPS} clips of a fetch, got {args.writes}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("memory").setLevel(logging.WARNING)

    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        results[EMBEDDED] = bench_backend(embedded(root), args)
        for label, aof in (("Redis, no persistence", False), ("Redis, AOF everysec", True)):
            directory = root / ("aof" if aof else "volatile")
            directory.mkdir()
            with redis_server(directory, aof) as url:
                results[label] = bench_backend(redis_backend(label, url), args)
    print(f"\n{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    report(results, args)

    tokens = np.random.default_rng(2).standard_normal((32, 64, DIMS["2B"])).astype(np.float16)
    heavy = np.random.default_rng(3).standard_t(3, (32, 64, DIMS["2B"])).astype(np.float16)
    print("\n| int8 round trip, 2B (D=1536), 32 clips | relative RMS error | worst error, in quantization steps |")
    print("|---|---|---|")
    for label, x in (("Gaussian tokens", tokens), ("Student-t (ν=3) tokens, with outliers", heavy)):
        rms, steps = int8_error(x)
        print(f"| {label} | {rms:.3%} | {steps:.3f} |")


if __name__ == "__main__":
    main()
