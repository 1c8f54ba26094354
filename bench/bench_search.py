"""Search latency with the key index: the shipped tiny model, an embedded memory, CPU, one torch thread.

    nice -n 15 .venv/bin/python bench/bench_search.py [--frames 512,2000,10000,30000] [--queries 20]

For each memory size one stream of random float16 tokens (one clip per 4 frames at 1 fps) is written straight into
an embedded store, its keys are built ahead as the service builds them (`reasoner.keys.KeyIndexer`, batches under
the model lock), then `Reasoner.search` (selection `index`, the whole stream) runs once per question, each question
different (nothing cached), and its wall time is reported as median / max, with a breakdown of the median Search:
the store's pick of the range, the question's query (`question_query`), the keys' view and the product
(`block_scores`). Also: the keys' build time per clip, the bytes per clip, and how long another thread waited for
the model lock while the indexer built a backlog (what an Ask arriving meanwhile waits), and what a restart costs: a
fresh reasoner on the same memory loading the keys stored beside the tokens (`VCFLASH_KEYS_STORED`), none built.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hico import VideoChatFlash  # noqa: E402
from hico.relevance import block_scores, default_layer, question_query  # noqa: E402
from memory import ClipMeta, ClipRecord, EmbeddedStore  # noqa: E402
from memory.records import clip_vector  # noqa: E402
from reasoner.engine import AskParams, Reasoner  # noqa: E402

COLOURS = ["red", "green", "blue", "yellow", "white"]
SHAPES = ["square", "triangle", "circle", "star"]


def questions(n: int) -> list[str]:
    """n different questions (the query is computed per question: none is served from a cache)."""
    out = [f"When does the {c} {s} appear?" for c in COLOURS for s in SHAPES]
    out += [f"When does the {c} {s} leave the picture?" for c in COLOURS for s in SHAPES]
    return out[:n]


def write(store: EmbeddedStore, stream: str, clips: int, width: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for seq in range(clips):
        tokens = (rng.standard_normal((64, width)) * 0.05).astype(np.float16)
        t = 4.0 * seq
        meta = ClipMeta(stream, seq, 1e9 + t, 1e9 + t + 4, t, t + 4, (t, t + 1, t + 2, t + 3))
        store.put(ClipRecord(meta, tokens, clip_vector(tokens)))


def lock_waits(reasoner: Reasoner, stop: threading.Event, waits: list[float]) -> None:
    """Seconds another thread waits for the model lock, every ~20 ms until `stop` (an Ask's wait for the model)."""
    while not stop.is_set():
        t0 = time.perf_counter()
        with reasoner.model_lock:
            waits.append(time.perf_counter() - t0)
        time.sleep(0.02)


def breakdown(reasoner: Reasoner, stream: str, question: str) -> dict[str, float]:
    """One Search's parts, timed alone."""
    t0 = time.perf_counter()
    picked = reasoner.store.pick(stream, None, None, lambda n: [], with_seqs=True)
    t1 = time.perf_counter()
    query = question_query(reasoner.model, question, default_layer(reasoner.model.config.text))
    t2 = time.perf_counter()
    seqs = picked.seqs.tolist()
    keys = reasoner.keys.get(
        stream, seqs, lambda s: reasoner.clip_keys(torch.from_numpy(reasoner.store.tokens(stream, s)))
    )
    t3 = time.perf_counter()
    block_scores(query, keys, keys.shape[2] // len(seqs))
    t4 = time.perf_counter()
    return {"pick": t1 - t0, "query": t2 - t1, "keys": t3 - t2, "product": t4 - t3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", default="512,2000,10000,30000")
    parser.add_argument("--queries", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the server's default: 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = VideoChatFlash.from_pretrained("tiny")
    width = model.config.text.hidden_size
    asked = questions(args.queries)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-search-") as tmp, EmbeddedStore(Path(tmp) / "m.sqlite3") as store:
        reasoner = Reasoner(model, store)
        indexer = reasoner.key_indexer()
        for frames in [int(f) for f in args.frames.split(",")]:
            clips, stream = frames // 4, f"cam{frames}"
            t0 = time.perf_counter()
            write(store, stream, clips, width, seed=frames)
            write_s = time.perf_counter() - t0
            stop = threading.Event()
            waits: list[float] = []
            watcher = threading.Thread(target=lock_waits, args=(reasoner, stop, waits))
            watcher.start()
            t0 = time.perf_counter()
            while indexer.step():  # the backlog, as the background loop builds it
                pass
            build_s = time.perf_counter() - t0
            stop.set()
            watcher.join()
            before = reasoner.keys.built
            reasoner.search(AskParams([stream], "warm-up question", selection="index"))
            times = []
            for q in asked:
                t0 = time.perf_counter()
                found = reasoner.search(AskParams([stream], q, selection="index"))
                times.append(time.perf_counter() - t0)
                assert found.clips_scored == clips
            assert reasoner.keys.built == before, "a Search built keys lazily"
            restarted = Reasoner(model, store)  # a restart: the keys come from memory, none is built
            loader = restarted.key_indexer()
            t0 = time.perf_counter()
            while loader.step():
                pass
            load_s = time.perf_counter() - t0
            assert restarted.keys.built_ahead == restarted.keys.built == 0 and restarted.keys.loaded >= clips
            load_ms = load_s / restarted.keys.loaded * 1000
            parts = [breakdown(reasoner, stream, q) for q in asked[:5]]
            part = {k: statistics.median(p[k] for p in parts) for k in parts[0]}
            rows.append(
                {
                    "frames": frames,
                    "clips": clips,
                    "write_s": write_s,
                    "build_ms_per_clip": build_s / clips * 1000,
                    "bytes_per_clip": reasoner.keys.bytes() // len(reasoner.keys),
                    "median_ms": statistics.median(times) * 1000,
                    "max_ms": max(times) * 1000,
                    "wait_max_ms": max(waits, default=0.0) * 1000,
                    "wait_median_ms": statistics.median(waits) * 1000 if waits else 0.0,
                    "load_ms_per_clip": load_ms,
                    **{f"{k}_ms": v * 1000 for k, v in part.items()},
                }
            )
            r = rows[-1]
            print(
                f"{frames} frames ({clips} clips): written in {write_s:.1f} s, "
                f"keys {r['build_ms_per_clip']:.2f} ms/clip (restart: loaded {load_ms:.3f} ms/clip), "
                f"Search {r['median_ms']:.1f} / {r['max_ms']:.1f} ms",
                flush=True,
            )
    print(
        f"\n{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} thread(s), "
        f"{args.queries} questions per size\n"
    )
    print(
        "| frames | clips | Search ms, median / max | pick / query / keys / product ms (median) "
        "| keys built ahead (and stored), ms per clip | restart: keys loaded, ms per clip | key bytes per clip "
        "| model-lock wait while building, median / max ms |"
    )
    print("|---:|---:|---:|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['frames']:,} | {r['clips']:,} | {r['median_ms']:.1f} / {r['max_ms']:.1f} "
            f"| {r['pick_ms']:.1f} / {r['query_ms']:.1f} / {r['keys_ms']:.2f} / {r['product_ms']:.1f} "
            f"| {r['build_ms_per_clip']:.2f} | {r['load_ms_per_clip']:.3f} | {r['bytes_per_clip']:,} "
            f"| {r['wait_median_ms']:.1f} / {r['wait_max_ms']:.1f} |"
        )


if __name__ == "__main__":
    main()
