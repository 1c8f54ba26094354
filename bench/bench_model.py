"""Model benchmark: encoder clips/s, LLM prefill time, peak GPU memory of a whole question.

Weights are random (speed does not depend on values), so real sizes need no download:

    python bench/bench_model.py --size tiny                       # CPU, seconds
    python bench/bench_model.py --size tiny --kernels fast        # Conv2d + SDPA vision tower (not bit-exact)
    python bench/bench_model.py --size 2b --device cuda --dtype bfloat16 --batches 1,2,4,8,16,32 \
        --frames 512,2048 --compress uniform0_attention:4,18:1,0.75,0.25

Prints one JSON record per measurement and a Markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable

import torch

from hico import VideoChatFlash
from hico.checkpoint import as_dtype, has_flash_attn
from hico.config import DropConfig, preset
from hico.generation import GenerationSettings
from hico.kernels import choose_kernels, default_dtype, log_kernels

PROMPT_TEXT_TOKENS = (14, 40)  # roughly the chat template around the video, before and after


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, repeat: int, warmup: int = 1) -> float:
    """Median seconds of `fn` over `repeat` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def random_model(size: str, res: int, dtype: torch.dtype, device: torch.device, kernels: str) -> VideoChatFlash:
    with torch.device("meta"):
        model = VideoChatFlash(preset(size, image_size=res)).to(dtype)
    model.to_empty(device=device)
    model.llm.tie_weights()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight") and p.ndim == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    model.init_buffers()
    choice = choose_kernels(device, dtype, has_flash_attn(), kernels)
    model.set_kernels(choice)
    log_kernels(choice, kernels, device, dtype)
    return model.eval()


def bench_encoder(model: VideoChatFlash, batches: list[int], repeat: int) -> list[dict]:
    s, device = model.config.vision.image_size, model.device
    out = []
    for b in batches:
        pixels = torch.randn(4 * b, 3, s, s, device=device)
        sec = timed(lambda pixels=pixels, b=b: model.encode_clips(pixels, batch_size=b), device, repeat)
        out.append({"what": "encoder", "batch_clips": b, "s": sec, "clips_per_s": b / sec, "frames_per_s": 4 * b / sec})
    return out


@torch.inference_mode()
def bench_prefill(model: VideoChatFlash, frames: list[int], drop: DropConfig | None, repeat: int) -> list[dict]:
    device, d = model.device, model.config.text.hidden_size
    out = []
    for f in frames:
        visual = torch.randn(f // 4, model.config.tokens_per_clip, d, device=device, dtype=model.dtype)
        before, after = (list(range(1, n + 1)) for n in PROMPT_TEXT_TOKENS)
        embeds, positions = model.embed([before, visual, after])
        sec = timed(lambda embeds=embeds, pos=positions: model.llm(embeds, None, pos, drop), device, repeat)
        tokens = embeds.shape[1]
        out.append(
            {
                "what": "prefill",
                "frames": f,
                "tokens": tokens,
                "dropout": None if drop is None else f"{drop.type}:{drop.layers}:{drop.ratios}",
                "s": sec,
                "tokens_per_s": tokens / sec,
            }
        )
    return out


@torch.inference_mode()
def bench_question_memory(model: VideoChatFlash, frames: int, drop: DropConfig | None, batch: int) -> dict:
    """Peak GPU memory of one whole question: encode `frames`, prefill, 16 decoded tokens."""
    device, s = model.device, model.config.vision.image_size
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    pixels = torch.randn(frames, 3, s, s, dtype=torch.float32)  # stays on the host, as decoded frames do
    visual = model.encode_clips(pixels, batch_size=batch)
    embeds, positions = model.embed([list(range(1, 15)), visual, list(range(1, 41))])
    settings = GenerationSettings(max_new_tokens=16, eos_token_ids=(-1,))
    t0 = time.perf_counter()
    n = sum(1 for _ in model.generate(embeds, positions, settings, drop))
    sync(device)
    return {
        "what": "question",
        "frames": frames,
        "encode_batch": batch,
        "dropout": None if drop is None else drop.type,
        "new_tokens": n,
        "s": time.perf_counter() - t0,
        "weights_gb": base / 1e9,
        "peak_gb": torch.cuda.max_memory_allocated(device) / 1e9,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="tiny", choices=["tiny", "2b", "7b"])
    ap.add_argument("--res", type=int, default=448, choices=[224, 448])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--kernels", default="exact", choices=["exact", "fast"], help="see hico.kernels")
    ap.add_argument("--batches", default="1,4,8", help="encoder batch sizes in clips")
    ap.add_argument("--frames", default="64,512", help="prefill lengths in frames (16 tokens each)")
    ap.add_argument("--compress", default=None, help="also time prefill with this dropout spec TYPE:LAYERS:RATIOS")
    ap.add_argument("--question-batches", default="8,32", help="encoder batches of a whole question (8: the service)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = default_dtype(device) if args.dtype is None else as_dtype(args.dtype)
    model = random_model(args.size, args.res, dtype, device, args.kernels)
    drop = DropConfig.from_spec(args.compress) if args.compress else None
    frames = [int(x) for x in args.frames.split(",")]
    records = bench_encoder(model, [int(x) for x in args.batches.split(",")], args.repeat)
    records += bench_prefill(model, frames, None, args.repeat)
    if drop:
        records += bench_prefill(model, frames, drop, args.repeat)
    if device.type == "cuda":
        batches = [int(x) for x in args.question_batches.split(",")]
        records += [bench_question_memory(model, 512, d, b) for b in batches for d in dict.fromkeys((None, drop))]
    machine = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    )
    header = {
        "size": args.size,
        "res": args.res,
        "dtype": str(dtype).removeprefix("torch."),
        "kernels": args.kernels,
        "vision_attention": model.kernels.vision_attention,
        "device": machine,
        "threads": torch.get_num_threads(),
    }
    for r in records:
        print(json.dumps(header | r))
    print(
        f"\n{args.size} @ {args.res}px, {header['dtype']}, {args.kernels} kernels ({model.kernels}), {machine}, "
        f"{torch.get_num_threads()} threads\n"
    )
    for r in records:
        if r["what"] == "encoder":
            print(
                f"| encoder, batch {r['batch_clips']} clips | {r['clips_per_s']:.2f} clips/s "
                f"({r['frames_per_s']:.1f} frames/s) |"
            )
        elif r["what"] == "prefill":
            print(
                f"| prefill {r['frames']} frames ({r['tokens']} tokens), dropout {r['dropout']} | "
                f"{r['s'] * 1e3:.1f} ms ({r['tokens_per_s']:.0f} tokens/s) |"
            )
        else:
            print(
                f"| 512-frame question, encoder batch {r['encode_batch']}, dropout {r['dropout']} | "
                f"peak {r['peak_gb']:.2f} GB "
                f"(weights {r['weights_gb']:.2f} GB) |"
            )


if __name__ == "__main__":
    main()
