"""What the Redis Cluster backend costs against a single Redis: per clip write and per Ask clip selection.

    python bench/bench_cluster.py                 # a redis-server and a 3-master cluster it starts on loopback

Both without persistence, on this machine's loopback, started by the benchmark (the cluster with the tests'
helper, tests/memory/cluster_server.py). Measured through `open_redis` (a RedisStore, a RedisClusterStore):

- write: `MemoryStore.put` of one clip (64 tokens, fp16) at D=64 (tiny) and D=1536 (2B), median and p90 ms of
  --writes; the cluster adds one SADD to the stream listing per put.
- select: `Reasoner.select` of a 512-frame Ask (uniform, tokens fetched, no model), over one stream and over 4
  streams that sit on different masters (128 / 32 clips each) of --clips tiny clips each, median ms of --repeat
  after a warm-up; it lists the streams first, which on the cluster is one pipelined batch per master.

Wall times on a shared machine: the load average is printed with the results. Redis memory stays under 200 MB.
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
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "bench"), str(ROOT)]
from bench_memory import redis_server  # noqa: E402 - the sibling benchmark's private redis-server

from memory import ClipMeta, ClipRecord, MemoryStore, clip_vector, open_redis  # noqa: E402
from reasoner.engine import AskParams, Reasoner  # noqa: E402
from tests.memory.cluster_server import RedisClusterServer  # noqa: E402
from vcflash.serve.settings import ReasonerSettings  # noqa: E402

log = logging.getLogger("bench_cluster")

WALL0 = 1_700_000_000.0
DIMS = {"tiny": 64, "2B": 1536}
STREAMS = ["cam0", "cam1", "cam2", "cam3"]


def clip(seq: int, stream_id: str, tokens: np.ndarray) -> ClipRecord:
    media, wall = 4.0 * seq, WALL0 + 4.0 * seq
    meta = ClipMeta(stream_id, seq, wall, wall + 4, media, media + 4, (media, media + 1, media + 2, media + 3))
    return ClipRecord(meta, tokens, clip_vector(tokens))


def timed_ms(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def bench(store: MemoryStore, args: argparse.Namespace) -> dict[str, float]:
    rng = np.random.default_rng(0)
    row: dict[str, float] = {}
    for name, dim in DIMS.items():
        tokens = rng.standard_normal((64, dim)).astype(np.float16)
        records = [clip(seq, f"writes-{name}", tokens) for seq in range(args.writes)]  # built outside the timing
        ms = [timed_ms(lambda r=r: store.put(r)) for r in records]
        row[f"write {name}"], row[f"write {name} p90"] = statistics.median(ms), float(np.percentile(ms, 90))
        store.delete_stream(f"writes-{name}")
    tokens = rng.standard_normal((64, DIMS["tiny"])).astype(np.float16)
    for stream_id in STREAMS:
        for seq in range(args.clips):
            store.put(clip(seq, stream_id, tokens))
    reasoner = Reasoner(None, store, None, ReasonerSettings())  # type: ignore[arg-type]  # uniform: no model
    for label, streams in (("select 1 stream", STREAMS[:1]), ("select 4 streams", STREAMS)):
        params = AskParams(streams, "q", max_frames=512)
        reasoner.select(params)  # warm-up
        row[label] = statistics.median(timed_ms(lambda p=params: reasoner.select(p)) for _ in range(args.repeat))
    for stream_id in STREAMS:
        store.delete_stream(stream_id)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--writes", type=int, default=300, help="timed writes per token width")
    parser.add_argument("--clips", type=int, default=1000, help="tiny clips in each stream asked")
    parser.add_argument("--repeat", type=int, default=21, help="timed selects")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("memory").setLevel(logging.WARNING)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "redis").mkdir()
        with redis_server(root / "redis", appendonly=False) as url, open_redis(url, prefix="bench") as store:
            rows["Redis"] = bench(store, args)
        cluster = RedisClusterServer(root / "cluster", masters=3, appendonly=False)
        try:
            cluster.start()
            with open_redis(cluster.url, prefix="bench") as store:
                nodes = {cluster.node_of(store._keys(s).info).port for s in STREAMS}
                log.info("the 4 asked streams sit on %d of 3 masters", len(nodes))
                rows["Redis Cluster, 3 masters"] = bench(store, args)
        finally:
            cluster.stop()
    print(f"\n{platform.node()}, {os.cpu_count()} CPUs, load average {os.getloadavg()}, ms\n")
    labels = list(next(iter(rows.values())))
    print("| | " + " | ".join(rows) + " | cluster / single |")
    print("|---|" + "---:|" * (len(rows) + 1))
    single, clustered = rows.values()
    for label in labels:
        print(f"| {label} | {single[label]:.3f} | {clustered[label]:.3f} | {clustered[label] / single[label]:.2f}x |")


if __name__ == "__main__":
    main()
