"""Ask latency benchmark: the all-in-one service on the tiny model, CPU, over memories of 100 to 10,000 frames.

    python bench/bench_ask.py        # embedded SQLite, and a redis-server it starts on a free loopback port

Memory is written straight into the store (random float16 tokens of the tiny model's D=64, one clip per 4 frames
at 1 fps), so no video is decoded or encoded. For each memory size, backend and max_new_tokens it times:

- Ask via gRPC: `vcflash.client.Client.ask` against a running `vcflash.app.App` on loopback, request to last message;
- engine alone: `reasoner.engine.Reasoner.ask` in this process (selection, token fetch, prompt, generate, detokenize);
- generate alone: `VideoChatFlash.generate` (prefill + decoding) on the same prepared prompt embeddings.

"Overhead" is Ask time minus generate-alone time: everything an Ask costs beyond the LLM's own compute (memory
scan and token fetch, prompt building, detokenizing, gRPC). The three run back to back in each round, and each
cell is the median over --repeat rounds after one warm-up round. The tiny model's weights are random, so
generation may stop early at an end token: the table gives the tokens actually generated.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import numpy as np
import torch
from prometheus_client import CollectorRegistry

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_memory import redis_server  # noqa: E402 - the sibling benchmark's private redis-server

from hico import VideoChatFlash  # noqa: E402
from hico.checkpoint import make_tiny_checkpoint  # noqa: E402
from memory import ClipIndex, ClipMeta, ClipRecord, MemoryStore, clip_vector, open_store  # noqa: E402
from reasoner.engine import AskParams, Reasoner  # noqa: E402
from vcflash.app import App  # noqa: E402
from vcflash.client import Client  # noqa: E402
from vcflash.serve.settings import Settings  # noqa: E402

log = logging.getLogger("bench_ask")

QUESTION = "What moves across the screen, and when?"
TOKEN = "bench-token-0123456789"
WALL0 = 1_700_000_000.0
MAX_FRAMES = 512
TARGET_OVERHEAD_MS = 20.0
OVERHEAD_FRAMES = 1000
T = TypeVar("T")


def fill(store: MemoryStore, stream_id: str, frames: int, dim: int, seed: int = 0) -> None:
    """`frames` frames of memory (frames / 4 clips at 1 fps) with random float16 tokens."""
    rng = np.random.default_rng(seed)
    for seq in range(frames // 4):
        tokens = (rng.standard_normal((64, dim)) * 0.02).astype(np.float16)
        media, wall = 4.0 * seq, WALL0 + 4.0 * seq
        meta = ClipMeta(stream_id, seq, wall, wall + 4, media, media + 4, (media, media + 1, media + 2, media + 3))
        store.put(ClipRecord(meta, tokens, clip_vector(tokens)))


class LoopThread:
    """The App's event loop, in a daemon thread, so this thread can use the synchronous client."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float = 120.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@contextmanager
def running_app(model: VideoChatFlash, data_dir: Path, redis_url: str | None) -> Iterator[Client]:
    settings = Settings.from_env(
        {},
        model="tiny",
        data_dir=data_dir,
        redis_url=redis_url,
        address="127.0.0.1:0",
        api_token=TOKEN,
        metrics_port=0,
        http_port=0,
    )
    loop = LoopThread()

    async def start() -> App:
        app = App(settings, model, registry=CollectorRegistry())
        await app.start()
        return app

    app = loop.run(start())
    client = Client(f"127.0.0.1:{app.port}", TOKEN)
    try:
        yield client
    finally:
        client.close()
        loop.run(app.stop(grace_s=1.0))
        loop.close()


class GenerateClock:
    """Stands in for `model.generate` and adds up the time spent inside it (prefill and each decoding step),
    not the caller's time between tokens: the LLM's own compute within an Ask."""

    def __init__(self, model: VideoChatFlash) -> None:
        self.inner = model.generate
        self.seconds = 0.0

    def __call__(self, *args: Any, **kwargs: Any) -> Iterator[int]:
        tokens = self.inner(*args, **kwargs)
        while True:
            t0 = time.perf_counter()
            try:
                token = next(tokens)
            except StopIteration:
                self.seconds += time.perf_counter() - t0
                return
            self.seconds += time.perf_counter() - t0
            yield token


class Row(NamedTuple):
    backend: str
    frames: int
    max_new_tokens: int
    new_tokens: int
    prompt_tokens: int
    grpc_ms: float  # Ask via gRPC, request to final message
    engine_ms: float  # Reasoner.ask in process
    generate_ms: float  # model.generate alone on the same prompt embeddings
    grpc_overhead_ms: float  # per round: Ask via gRPC minus generate alone (paired, then the median)
    engine_overhead_ms: float  # per round: engine minus generate alone
    grpc_outside_ms: float  # per Ask via gRPC: its time minus the time inside model.generate during it


def bench_backend(
    label: str, model: VideoChatFlash, data_dir: Path, redis_url: str | None, args: argparse.Namespace
) -> list[Row]:
    dim = model.config.text.hidden_size
    with open_store(redis_url, data_dir) as store:
        for frames in args.frames:
            t0 = time.perf_counter()
            fill(store, f"m{frames}", frames, dim)
            log.info("%s: wrote %d frames of memory in %.1f s", label, frames, time.perf_counter() - t0)
    rows = []
    clock = GenerateClock(model)
    model.generate = clock  # type: ignore[method-assign] - the App's reasoner and ours call it through the model
    try:
        with running_app(model, data_dir, redis_url) as client, open_store(redis_url, data_dir) as store:
            reasoner = Reasoner(model, store, ClipIndex())
            for frames in args.frames:
                for n in args.max_new_tokens:
                    row = Row(label, frames, n, *measure(client, reasoner, clock, f"m{frames}", n, args.repeat))
                    log.info("%s", row)
                    rows.append(row)
    finally:
        del model.generate
    return rows


def measure(
    client: Client, reasoner: Reasoner, clock: GenerateClock, stream: str, n: int, repeat: int
) -> tuple[int, int, float, float, float, float, float, float]:
    """One question, timed `repeat` times after a warm-up; the three ways of running it take turns, so a
    slow spell of the machine hits all three alike. Medians in ms."""
    model = reasoner.model
    p = AskParams([stream], QUESTION, max_frames=MAX_FRAMES, max_new_tokens=n)
    # The LLM alone on the very prompt the Ask builds: prefill (dropout as configured), then decoding.
    embeds, visual = reasoner.prompt(p, reasoner.select(p))
    settings = model.generation.override(do_sample=False, max_new_tokens=n)
    drop = model.resolve_drop(None)

    def timed(fn: Callable[[], T]) -> tuple[T, float, float]:
        """fn's result, its ms, and its ms outside model.generate."""
        clock.seconds = 0.0
        t0 = time.perf_counter()
        out = fn()
        total = time.perf_counter() - t0
        return out, total * 1e3, (total - clock.seconds) * 1e3

    keys = ("grpc", "engine", "generate", "grpc_over", "engine_over", "grpc_outside")
    samples: dict[str, list[float]] = {k: [] for k in keys}
    for i in range(repeat + 1):
        events, grpc_ms, grpc_outside = timed(
            lambda: list(client.ask([stream], QUESTION, max_frames=MAX_FRAMES, max_new_tokens=n))
        )
        _, engine_ms, _ = timed(lambda: list(reasoner.ask(p)))
        generated, generate_ms, _ = timed(lambda: list(clock.inner(embeds, visual, settings, drop)))
        result = events[-1]
        if len(generated) != result.new_tokens or result.prompt_tokens != embeds.shape[1]:
            raise RuntimeError(f"generate alone made {len(generated)} tokens, the Ask {result.new_tokens}")
        if i:  # the first round is the warm-up
            values = (grpc_ms, engine_ms, generate_ms, grpc_ms - generate_ms, engine_ms - generate_ms, grpc_outside)
            for key, value in zip(keys, values, strict=True):
                samples[key].append(value)
    medians = [statistics.median(v) for v in samples.values()]
    return (result.new_tokens, result.prompt_tokens, *medians)  # type: ignore[return-value]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def report(rows: list[Row], args: argparse.Namespace, model: VideoChatFlash) -> None:
    drop = model.resolve_drop(None)
    print(
        f"### Ask latency, tiny model (D={model.config.text.hidden_size}, {model.config.text.num_hidden_layers} "
        f"layers), CPU: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads\n"
    )
    print(
        f"`python bench/bench_ask.py` — max_frames {MAX_FRAMES} (at most {MAX_FRAMES // 4} clips, "
        f"{MAX_FRAMES * 16:,} visual tokens), dropout {'off' if drop is None else drop}, greedy; median of "
        f"{args.repeat} runs after a warm-up; ms.\n"
    )
    print(
        "| backend | memory (frames) | max_new_tokens | new tokens | prompt tokens | Ask via gRPC | engine alone "
        "| generate alone | overhead: gRPC − generate | overhead: engine − generate | gRPC Ask outside generate |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r.backend} | {r.frames:,} | {r.max_new_tokens} | {r.new_tokens} | {r.prompt_tokens:,} "
            f"| {r.grpc_ms:.1f} | {r.engine_ms:.1f} | {r.generate_ms:.1f} | {r.grpc_overhead_ms:.1f} "
            f"| {r.engine_overhead_ms:.1f} | {r.grpc_outside_ms:.1f} |"
        )
    print(
        "\nEach round runs the Ask via gRPC, the engine alone and `model.generate` alone on the Ask's prompt "
        "embeddings, back to back; *overhead* is the median over rounds of the paired difference. *gRPC Ask "
        "outside generate* is the Ask's time minus the time spent inside `model.generate` during that Ask "
        "(memory scan and token fetch, prompt, detokenizing, RPC and thread hand-offs, without the slowdown "
        "that streaming the answer causes to decoding on 2 cores)."
    )
    at = [r for r in rows if r.frames == OVERHEAD_FRAMES]
    if at:
        target = f"target: Ask overhead beyond the LLM at {OVERHEAD_FRAMES:,} frames <= {TARGET_OVERHEAD_MS:g} ms"
        print(f"\n| {target} | gRPC − generate | gRPC Ask outside generate | met |")
        print("|---|---:|---:|---|")
        for r in at:
            met = "yes" if r.grpc_overhead_ms <= TARGET_OVERHEAD_MS else "NO"
            print(
                f"| {r.backend}, max_new_tokens {r.max_new_tokens} | {r.grpc_overhead_ms:.1f} ms "
                f"| {r.grpc_outside_ms:.1f} ms | {met} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", default="100,1000,10000", help="memory sizes in frames (comma-separated)")
    parser.add_argument("--max-new-tokens", default="1,16", help="generation lengths (comma-separated)")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per cell, after one warm-up")
    parser.add_argument("--backends", default="embedded,redis", help="embedded and/or redis")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    args.frames = [int(x) for x in args.frames.split(",")]
    args.max_new_tokens = [int(x) for x in args.max_new_tokens.split(",")]
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")

    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        root = Path(tmp)
        model = VideoChatFlash.from_pretrained(make_tiny_checkpoint(root / "tiny"))
        for backend in args.backends.split(","):
            data_dir = root / backend
            data_dir.mkdir()
            if backend == "embedded":
                rows += bench_backend("embedded (SQLite)", model, data_dir, None, args)
            elif backend == "redis":
                url = stack.enter_context(redis_server(data_dir, appendonly=False))
                rows += bench_backend("Redis", model, data_dir, url, args)
            else:
                parser.error(f"unknown backend {backend!r}")
    report(rows, args, model)


if __name__ == "__main__":
    main()
