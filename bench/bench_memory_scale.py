"""Memory at scale: Ask clip selection, clip writes and index catch-up on one stream of 1k to 1M clips, both backends.

    python bench/bench_memory_scale.py                       # 1k, 10k, 100k clips; embedded and Redis
    python bench/bench_memory_scale.py --sizes 1000,1000000  # 1M clips: ~8.4 GB of tiny tokens per backend

Each size gets its own store (a file, a Redis key prefix) holding one stream of tiny clips (64 tokens x D=64, fp16,
4 s each at 1 fps) written through `MemoryStore.put`; all stay open to the end. At each size it measures:

- select: `Reasoner.select` of a 512-frame Ask (128 of the stream's clips, uniform) without a range and over the
  middle tenth, tokens fetched; the selection an Ask makes before the LLM (no model is loaded: uniform selection
  does not use it). Timed once every size is written, in --repeat rounds that each select once from every size
  (after one warm-up round), so a change in other processes' load weighs on all sizes alike: median wall ms, the
  fastest round's, and the median of the thread's CPU ms (which leaves out the time other processes held the
  cores, though not their use of the shared caches).
  (The middle tenth of 1,000 clips is 100 clips, all picked; from 10,000 clips on it picks 128.)
- Redis commands per select (INFO commandstats before and after) and the slowest Redis call (SLOWLOG, threshold
  1 ms), separately while the stream was written up to this size and while it was asked, with how many calls
  took over 1 ms out of how many. SLOWLOG times are wall time inside Redis: on a loaded machine they include
  the time Redis was not scheduled, so the count and the command say more than the worst figure.
- write: `MemoryStore.put` plus the `ClipIndex.add` the encoder makes, median ms over the last --writes clips
  before the size is reached.
- catch-up: a reasoner's index (split deployment), in step with the store, after one more clip is written by
  another process: `ClipIndex.sync_stream`, median of --rounds rounds (FAISS's flat index grows by doubling, so a
  single round may include one amortised copy of it).

Wall times on a shared machine: the 1-minute load average when each size was asked is printed with its row. FAISS
threads as set by `memory.index` (VCFLASH_FAISS_THREADS). Redis without persistence, started by the benchmark on
loopback.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_ask import cpu_name  # noqa: E402 - the CPU's model name, as the sibling benchmark prints it
from bench_memory import redis_server  # noqa: E402 - the sibling benchmark's private redis-server

from memory import ClipIndex, ClipMeta, ClipRecord, EmbeddedStore, MemoryStore, RedisStore, clip_vector  # noqa: E402
from reasoner.engine import AskParams, Reasoner  # noqa: E402
from vcflash.serve.settings import ReasonerSettings  # noqa: E402

log = logging.getLogger("bench_memory_scale")

WALL0 = 1_700_000_000.0
DIM = 64  # the tiny model's token width
STREAM = "cam"


class Clips:
    """Tiny clips from a few random token sets, so generating them costs nothing inside the timings."""

    def __init__(self, variety: int = 16) -> None:
        rng = np.random.default_rng(0)
        self.tokens = [rng.standard_normal((64, DIM)).astype(np.float16) for _ in range(variety)]
        self.vectors = [clip_vector(t) for t in self.tokens]

    def __call__(self, seq: int) -> ClipRecord:
        media, wall = 4.0 * seq, WALL0 + 4.0 * seq
        meta = ClipMeta(STREAM, seq, wall, wall + 4, media, media + 4, (media, media + 1, media + 2, media + 3))
        i = seq % len(self.tokens)
        return ClipRecord(meta, self.tokens[i], self.vectors[i])


class RedisProbe:
    """Commands issued and the slowest call, read from the server itself."""

    def __init__(self, url: str | None) -> None:
        self.client = None if url is None else redis.Redis.from_url(url)
        if self.client is not None:
            self.client.config_set("slowlog-log-slower-than", 1000)  # microseconds
            self.client.config_set("slowlog-max-len", 1024)

    def calls(self) -> int:
        if self.client is None:
            return 0
        stats = self.client.info("commandstats")
        return sum(v["calls"] for k, v in stats.items() if k not in ("cmdstat_info", "cmdstat_slowlog"))

    def reset_slowlog(self) -> None:
        if self.client is not None:
            self.client.slowlog_reset()

    def slowest(self) -> tuple[float, str, int] | None:
        """(ms, command, calls over 1 ms) of the slowest call since the last reset, None when none took 1 ms."""
        if self.client is None:
            return None
        entries = self.client.slowlog_get(1024)
        if not entries:
            return None
        worst = max(entries, key=lambda e: e["duration"])
        command = worst["command"]
        command = command.decode(errors="replace") if isinstance(command, bytes) else str(command)
        return worst["duration"] / 1e3, command.split()[0], len(entries)


def bench_backend(
    name: str, open_store: Callable[[int], MemoryStore], url: str | None, args: argparse.Namespace
) -> list:
    """One store per size (`open_store(size)` opens it), each filled and measured in turn; then the selects of every
    size timed in alternation, so the load of other processes weighs on every size alike."""
    rows, selects = [], []
    with ExitStack() as stack:
        for size in args.sizes:
            store, reader = (stack.enter_context(open_store(size)) for _ in range(2))
            row, select = bench_size(name, size, store, reader, RedisProbe(url), args)
            rows.append(row)
            selects.append((row, select))
        for label in ("select", "select tenth"):
            timed = [(row, select[label]) for row, select in selects if label in select]
            for (row, _), (wall, cpu) in zip(timed, interleaved_ms([fn for _, fn in timed], args.repeat), strict=True):
                row[label], row[f"{label} fastest"], row[f"{label} cpu"] = (
                    statistics.median(wall),
                    min(wall),
                    statistics.median(cpu),
                )
        for row in rows:
            log.info("%s", row)
    return rows


def interleaved_ms(fns: list[Callable[[], object]], repeat: int) -> list[tuple[list[float], list[float]]]:
    """(wall ms, this thread's CPU ms) of each of `fns` in `repeat` rounds that call each once, after one warm-up
    round. CPU time leaves out the time other processes held the cores; wall time does not."""
    times: list[tuple[list[float], list[float]]] = [([], []) for _ in fns]
    for round_ in range(repeat + 1):
        for fn, (wall, cpu) in zip(fns, times, strict=True):
            t0, c0 = time.perf_counter(), time.thread_time()
            fn()
            if round_:
                wall.append((time.perf_counter() - t0) * 1e3)
                cpu.append((time.thread_time() - c0) * 1e3)
    return times


def bench_size(
    name: str, size: int, store: MemoryStore, reader: MemoryStore, probe: RedisProbe, args: argparse.Namespace
) -> tuple[dict, dict[str, Callable[[], object]]]:
    """Fill `store` to `size` clips and measure its writes, one select of each kind (checked, Redis commands
    counted) and the index catch-up; returns the row and the selects to time."""
    clips = Clips()
    index = ClipIndex()  # the encoder's, fed on every write
    reasoner = Reasoner(None, store, index, ReasonerSettings())  # type: ignore[arg-type]  # uniform: no model
    probe.reset_slowlog()
    write_ms = []
    t_fill = time.perf_counter()
    calls_before = probe.calls()
    untimed: list[int] = []  # indexed in one batch before the timed writes (keeps the fill short)
    for written in range(size):
        record = clips(written)
        if written < size - args.writes:
            store.put(record)
            untimed.append(written)
            continue
        if untimed:
            index.add(STREAM, np.array(untimed), np.stack([clips(s).vector for s in untimed]))
            untimed = []
        t0 = time.perf_counter()
        store.put(record)
        index.add(STREAM, np.array([written]), record.vector[None])
        write_ms.append((time.perf_counter() - t0) * 1e3)
    log.info("%s: %d clips written in %.0f s", name, size, time.perf_counter() - t_fill)
    slowest_writing = probe.slowest(), probe.calls() - calls_before
    probe.reset_slowlog()
    calls_before = probe.calls()
    span = 4.0 * size
    asks = {
        "select": AskParams([STREAM], "q", max_frames=512),
        "select tenth": AskParams([STREAM], "q", start=0.45 * span, end=0.55 * span, max_frames=512),
    }
    row: dict = {"backend": name, "clips": size, "write": statistics.median(write_ms)}
    selects = {}
    for label, params in asks.items():
        try:
            before = probe.calls()
            segments = reasoner.select(params)
            row[f"{label} commands"] = probe.calls() - before
            assert len(segments[0].evidence) == min(128, size if label == "select" else size // 10)
            selects[label] = lambda p=params: reasoner.select(p)
        except Exception as e:  # noqa: BLE001 - reported in the table (a Redis timeout, say)
            row[label] = f"fails: {type(e).__name__}"
    # The split deployment's reasoner: its own index, caught up with the store, then one more clip written.
    theirs = ClipIndex()
    theirs.sync_stream(reader, STREAM)
    catch_up = []
    for written in range(size, size + args.rounds):
        store.put(clips(written))
        index.add(STREAM, np.array([written]), clips(written).vector[None])
        t0 = time.perf_counter()
        theirs.sync_stream(reader, STREAM)
        catch_up.append((time.perf_counter() - t0) * 1e3)
    assert len(theirs) == size + args.rounds
    row["catch-up"] = statistics.median(catch_up)
    row["slowest redis"] = (slowest_writing, (probe.slowest(), probe.calls() - calls_before))
    row["load"] = os.getloadavg()[0]  # other processes' load while this size was measured
    return row, selects


def report(rows: list, args: argparse.Namespace) -> None:
    def ms(r: dict, label: str) -> str:
        v = r[label]
        return v if isinstance(v, str) else f"{v:.2f} ({r[f'{label} fastest']:.2f}); {r[f'{label} cpu']:.2f}"

    print(
        f"\n{platform.node()}, {cpu_name()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average {os.getloadavg()[0]:.2f}"
    )
    print(
        "\n| backend | clips | select 512 frames, whole stream: wall median (fastest); CPU median (ms) "
        "| select, middle tenth (ms) "
        "| Redis commands per select (whole / tenth) | write + index add (ms) | index catch-up, 1 new clip (ms) "
        "| slowest Redis call: writing / asking | load average |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---|---:|")
    for r in rows:
        redis_cols = (
            f"{r.get('select commands', '-')} / {r.get('select tenth commands', '-')}"
            if r["backend"].startswith("Redis")
            else "—"
        )
        slowest = (
            " / ".join(
                f"none ≥ 1 ms of {calls:,}" if s is None else f"{s[0]:.1f} ms {s[1]} ({s[2]} ≥ 1 ms of {calls:,})"
                for s, calls in r["slowest redis"]
            )
            if r["backend"].startswith("Redis")
            else "—"
        )
        print(
            f"| {r['backend']} | {r['clips']:,} | {ms(r, 'select')} | {ms(r, 'select tenth')} | {redis_cols} "
            f"| {r['write']:.3f} | {r['catch-up']:.2f} | {slowest} | {r['load']:.1f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,10000,100000", help="stream sizes in clips, ascending")
    parser.add_argument("--repeat", type=int, default=21, help="timed selects per size")
    parser.add_argument("--rounds", type=int, default=5, help="index catch-ups timed per size")
    parser.add_argument("--writes", type=int, default=500, help="last writes timed before each size")
    parser.add_argument("--backends", default="embedded,redis")
    parser.add_argument("--timeout-s", type=float, default=0.5, help="Redis client timeout (the service's default)")
    args = parser.parse_args()
    args.sizes = [int(s) for s in args.sizes.split(",")]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("memory").setLevel(logging.WARNING)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if "embedded" in args.backends:
            rows += bench_backend("embedded", lambda n: EmbeddedStore(root / f"memory-{n}.sqlite3"), None, args)
        if "redis" in args.backends:
            (root / "redis").mkdir()
            with redis_server(root / "redis", appendonly=False) as url:

                def open_redis(size: int) -> MemoryStore:
                    return RedisStore(url, prefix=f"bench{size}", socket_timeout_s=args.timeout_s)

                rows += bench_backend("Redis", open_redis, url, args)
    report(rows, args)


if __name__ == "__main__":
    main()
