"""Long-memory scoring on real-size random weights (issue 12): the key index against the windowed scan.
    python bench/bench_scan.py --size 2b --device cuda --frames 2000,10000,28800     # a GPU, bf16
    python bench/bench_scan.py --size tiny --device cpu --frames 512,2000            # the shipped tiny model
The model work of both ways of scoring every clip of a long memory for a question (`hico.relevance`), without
the store around it (`bench_search.py` times that path on the CPU): for N frames (N / 4 clips of random tokens,
kept on the host as memory hands them over)
- key index: building the keys of every clip (`clip_keys`, batches of `--key-batch` clips: the cost a clip pays
  once, when written) and a Search: one question's query (`question_query`) and its product with the N clips'
  keys held on the device as `reasoner.keys.KeyIndex` holds them (`key_block`, `block_scores`), median over
  `--queries` different questions;
- windowed scan: `scan_clips` over the N clips (windows of `--window` clips, `--batch` windows prefilled together,
  each up to the scoring layer), one question.
Real sizes have random weights (timing does not depend on their values) and borrow the tiny model's tokenizer
(prompts of a few dozen tokens either way). Prints one JSON record per measurement and a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "bench"), str(ROOT)]
from bench_model import random_model, sync  # noqa: E402

from hico import VideoChatFlash  # noqa: E402
from hico.checkpoint import as_dtype  # noqa: E402
from hico.kernels import default_dtype  # noqa: E402
from hico.relevance import block_scores, clip_keys, default_layer, key_block, question_query, scan_clips  # noqa: E402
from hico.tokenizer import load_tokenizer  # noqa: E402
from hico.warmup import warm_up_model  # noqa: E402

QUESTIONS = [f"When did the {c} {s} leave?" for c in ("red", "white", "blue", "green") for s in ("van", "car", "dog")]


def seconds(fn, device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def key_index(model, tokens: torch.Tensor, layer: int, args: argparse.Namespace) -> dict:
    """Build every clip's keys, then time Searches over them (the block on the device, as KeyIndex holds it)."""
    device, clips, t = model.device, len(tokens), model.config.tokens_per_clip
    keys: list[torch.Tensor] = []
    build_s = seconds(
        lambda: keys.extend(
            clip_keys(model, tokens[i : i + args.key_batch], layer, args.key_batch)
            for i in range(0, clips, args.key_batch)
        ),
        device,
    )
    block = key_block(torch.cat(keys), model.dtype)  # [Hkv, hd, clips * T]
    questions = (QUESTIONS * (1 + args.queries // len(QUESTIONS)))[: args.queries]
    warm_up_model(model)  # what the reasoner runs before serving: the first Search below is a user's first
    search = [seconds(lambda q=q: block_scores(question_query(model, q, layer), block, t), device) for q in questions]
    query = statistics.median(seconds(lambda q=q: question_query(model, q, layer), device) for q in questions)
    return {
        "keys_build_s": build_s,
        "keys_ms_per_clip": 1e3 * build_s / clips,
        "key_bytes_per_clip": block.nbytes // clips,
        "search_ms_median": 1e3 * statistics.median(search),
        "search_ms_max": 1e3 * max(search),
        "search_ms_first": 1e3 * search[0],
        "query_ms_median": 1e3 * query,
    }


@torch.inference_mode()
def measure(model, frames: int, args: argparse.Namespace) -> dict:
    device, layer = model.device, default_layer(model.config.text)
    clips, t, d = frames // 4, model.config.tokens_per_clip, model.config.text.hidden_size
    tokens = (torch.randn(clips, t, d, generator=torch.Generator().manual_seed(frames)) * 0.05).to(torch.float16)
    indexed = key_index(model, tokens, layer, args)

    def load(a: int, b: int) -> torch.Tensor:
        return tokens[a:b]

    scan_clips(model, min(clips, args.window * args.batch), load, "warm-up", window=args.window, batch_size=args.batch)
    scan_s = seconds(
        lambda: scan_clips(model, clips, load, QUESTIONS[0], window=args.window, batch_size=args.batch), device
    )
    return {
        "frames": frames,
        "clips": clips,
        "layer": layer,
        "token_bytes_per_clip": t * d * model.dtype.itemsize,
        **indexed,
        "scan_s": scan_s,
        "scan_ms_per_clip": 1e3 * scan_s / clips,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="2b", choices=["tiny", "2b", "7b"])
    ap.add_argument("--res", type=int, default=448, choices=[224, 448])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--frames", default="2000,10000,28800")
    ap.add_argument("--queries", type=int, default=10)
    ap.add_argument("--key-batch", type=int, default=64)
    ap.add_argument("--window", type=int, default=16, help="clips per scan window (the reasoner's default)")
    ap.add_argument("--batch", type=int, default=8, help="windows prefilled together")
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = default_dtype(device) if args.dtype is None else as_dtype(args.dtype)
    header = {"python": platform.python_version(), "torch": torch.__version__, "size": args.size, "dtype": str(dtype)}
    if device.type == "cuda":
        header["device"] = torch.cuda.get_device_name(device)
    print(json.dumps(header), flush=True)
    if args.size == "tiny":  # the shipped tiny model (its own tokenizer and vocabulary)
        model = VideoChatFlash.from_pretrained("tiny").to(device, dtype)
    else:
        model = random_model(args.size, args.res, dtype, device, "exact")
        model.tokenizer = load_tokenizer(ROOT / "hico" / "weights" / "tiny")
    rows = []
    for frames in (int(f) for f in args.frames.split(",")):
        rows.append(measure(model, frames, args))
        print(json.dumps(rows[-1]), flush=True)
    print(
        "\n| frames | clips | keys: build ms/clip | key bytes / token bytes | Search ms (median / max / first) "
        "| query ms | windowed scan s | scan ms/clip |\n|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    for r in rows:
        print(
            f"| {r['frames']:,} | {r['clips']:,} | {r['keys_ms_per_clip']:.2f} | {r['key_bytes_per_clip']:,} / "
            f"{r['token_bytes_per_clip']:,} | {r['search_ms_median']:.1f} / {r['search_ms_max']:.1f} / "
            f"{r['search_ms_first']:.1f} "
            f"| {r['query_ms_median']:.1f} | {r['scan_s']:.2f} | {r['scan_ms_per_clip']:.2f} |"
        )


if __name__ == "__main__":
    main()
