"""Training benchmark: the tiny recipe on CPU end to end, and LoRA on real-size 2B random weights on a GPU.

    python bench/bench_train.py recipe --root /tmp/tiny-recipe            # CPU: data set, base, train, eval
    python bench/bench_train.py lora --size 2b --res 448 --frames 64,256  # CUDA, bf16, gradient checkpointing

`recipe` runs the commands that reproduce a model of the shipped `tiny`'s issue-10 accuracy from scratch (below,
the same as README's "Fine-tuning" section), timing each stage, and prints the held-out accuracy table with
chance.
`lora` times LoRA steps (rank 16 on every LLM linear layer, the projector trained in full, the vision tower
frozen) on one video of F frames with `--questions` conversations per video, through the training code's own
forward (`hico.train`): samples (conversations) per second and peak GPU memory. Weights are random: speed and
memory do not depend on their values, so no download is needed.

Prints one JSON record per measurement and a Markdown table for BENCHMARKS.md.
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

# The reproduction of issue 10 (README, Fine-tuning, "Reproducing a model of its accuracy from scratch"): a shapes data
# set and an order set, a base (the LLM's layers at N(0, 0.08), the default), stage 0 (`pretrain-tower`: the tower
# learns what the scenes show from per-patch labels) and stage 1 (`train`: projector and LLM on both sets' questions,
# the tower frozen, Muon for the hidden matrices). The shipped `tiny` began from a 0.02 start with AdamW in two
# stage-1 runs of 2,000 + 500 steps and went on with stages 2-4 (issue 12); hico/weights/tiny/training.json and
# provenance.json say how its weights were made.
DATASET = ["--videos", "1500", "--test-videos", "200", "--seed", "0"]
ORDER = ["--videos", "600", "--test-videos", "100", "--seed", "12"]
TOWER = ["--steps", "1000", "--labels", "shape,colour", "--clips", "16", "--lr", "1e-3", "--seed", "0"]
STEP = ["--train", "projector,llm", "--videos-per-step", "8", "--questions-per-video", "8", "--eval-samples", "200"]
STEP += ["--compile"]  # ~1.3x cheaper steps after a compile of ~1 min
STAGE_1 = ["--optimizer", "muon", "--lr", "2e-3", "--max-steps", "1000", "--eval-every", "1000", "--seed", "0"]


def recipe(root: Path, threads: int | None) -> dict:
    from hico.dataset import read_samples
    from vcflash.cli import main
    from vcflash.evaluate import answer_offline, grade, table

    data, order, base, tower = root / "shapes", root / "order", root / "base", root / "tower"
    threading = ["--threads", str(threads)] if threads else []
    seconds = {}
    t0 = time.perf_counter()
    if not (data / "test.jsonl").is_file():
        main(["make-dataset", "shapes", str(data), *DATASET])
    if not (order / "test.jsonl").is_file():
        main(["make-dataset", "order", str(order), *ORDER])
    seconds["datasets"] = time.perf_counter() - t0
    if not (base / "generation_config.json").is_file():
        main(["make-tiny-checkpoint", str(base), "--preset", "shapes", "--seed", "0"])
    t0 = time.perf_counter()
    assert main(["pretrain-tower", "--model", str(base), "--out", str(tower), *TOWER, *threading]) == 0
    seconds["pretrain_tower"] = time.perf_counter() - t0
    out = root / "stage1"
    t0 = time.perf_counter()
    fit = ["train", str(data / "train.jsonl"), str(order / "train.jsonl"), "--model", str(tower), "--out", str(out)]
    fit += ["--eval", str(data / "test.jsonl"), "--frame-cache", str(root / "frames")]
    assert main([*fit, *STEP, *STAGE_1, *threading]) == 0
    seconds["train"] = time.perf_counter() - t0
    evals = json.loads((out / "training.json").read_text())["evals"]
    from hico import VideoChatFlash

    samples = read_samples(data / "test.jsonl")
    t0 = time.perf_counter()
    rows = table(grade(samples, answer_offline(VideoChatFlash.from_pretrained(out), samples, 512, False)))
    seconds["eval"] = time.perf_counter() - t0
    return {"what": "recipe", "seconds": seconds, "evals": evals, "accuracy": rows}


def lora(size: str, res: int, frames: int, questions: int, rank: int, steps: int, device: torch.device) -> dict:
    from hico.chat import VideoChatFlash
    from hico.checkpoint import has_flash_attn
    from hico.config import preset
    from hico.kernels import choose_kernels
    from hico.lora import add_lora
    from hico.train import VideoBatch, answer_loss, enable_gradient_checkpointing, visual_tokens

    dtype = torch.bfloat16
    with torch.device("meta"):
        model = VideoChatFlash(preset(size, image_size=res)).to(dtype)
    model.to_empty(device=device)
    model.llm.tie_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0) if p.ndim == 1 else p.normal_(0.0, 0.02)
    model.init_buffers()
    model.set_kernels(choose_kernels(device, dtype, has_flash_attn(), "exact"))
    model.requires_grad_(False)
    model.mm_projector.requires_grad_(True)
    model.llm.requires_grad_(True)
    add_lora(model, rank, full_parts=("projector",))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    enable_gradient_checkpointing(model.vision_tower.blocks)
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-4)
    d, vocab = model.config.text.hidden_size, model.config.text.vocab_size
    gen = torch.Generator(device).manual_seed(0)

    def step() -> None:
        pixels = torch.randn(frames, 3, res, res, device=device, generator=gen)
        with torch.autocast(device.type, dtype=dtype):
            tokens = visual_tokens(model, pixels, ("projector", "llm"))  # vision frozen: no graph through it
            prefix = torch.cat([model.embed_text(list(range(1, 15)))[None], tokens.reshape(1, -1, d).to(dtype)], 1)
            ids = torch.randint(1, vocab - 3, (questions, 60), device=device, generator=gen)
            suffix = model.embed_text(ids)
            rows = torch.tensor([(k, t) for k in range(questions) for t in range(44, 59)], device=device)
            batch = VideoBatch(prefix, suffix, rows, ids[rows[:, 0], rows[:, 1] + 1], tokens)
            loss = answer_loss(model, [batch], checkpoint=True)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    cuda = device.type == "cuda"
    step()  # warm-up (allocator, kernels)
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    sec = statistics.median(times)
    return {
        "what": "lora",
        "size": size,
        "res": res,
        "frames": frames,
        "questions": questions,
        "rank": rank,
        "step_s": sec,
        "samples_per_s": questions / sec,
        "videos_per_s": 1 / sec,
        "peak_gb": torch.cuda.max_memory_allocated(device) / 1e9 if cuda else peak_rss_gb(),
        "trained_m": sum(p.numel() for p in trained) / 1e6,
    }


def peak_rss_gb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="mode", required=True)
    r = sub.add_parser("recipe")
    r.add_argument("--root", default="/tmp/vcflash-tiny-recipe")
    r.add_argument("--threads", type=int)
    g = sub.add_parser("lora")
    g.add_argument("--size", default="2b", choices=["tiny", "2b", "7b"])
    g.add_argument("--res", type=int, default=448, choices=[224, 448])
    g.add_argument("--frames", default="64,256")
    g.add_argument("--questions", type=int, default=4, help="conversations per video (one encoding)")
    g.add_argument("--rank", type=int, default=16)
    g.add_argument("--steps", type=int, default=5)
    g.add_argument("--device", default="cuda", help="cuda; cpu only to smoke-test the script with --size tiny")
    args = ap.parse_args()
    header = {"python": platform.python_version(), "torch": torch.__version__, "machine": platform.processor()}
    print(json.dumps(header), file=sys.stderr)
    if args.mode == "recipe":
        rec = recipe(Path(args.root), args.threads)
        print(json.dumps(rec))
        last = rec["evals"][-1] if rec["evals"] else {}
        took = ", ".join(f"{k} {v / 60:.1f} min" for k, v in rec["seconds"].items())
        print(f"\n{took}; last in-training eval: {json.dumps(last)}\n")
        print("| category | questions | accuracy | chance |\n|---|---|---|---|")
        for row in rec["accuracy"]:
            chance = "-" if row["chance"] is None else f"{row['chance']:.0%}"
            print(f"| {row['category']} | {row['questions']} | {row['accuracy']:.1%} | {chance} |")
        return
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("lora needs a CUDA device (--device cpu smoke-tests it with --size tiny)")
    rows = []
    for f in (int(x) for x in args.frames.split(",")):
        if device.type == "cuda":
            torch.cuda.empty_cache()
        rec = lora(args.size, args.res, f, args.questions, args.rank, args.steps, device)
        print(json.dumps(rec), flush=True)
        rows.append(rec)
    print("\n| model | res | frames | questions/video | step s | samples/s | peak GB |\n|---|---|---|---|---|---|---|")
    for rec in rows:
        print(
            f"| {rec['size']} LoRA r{rec['rank']} | {rec['res']} | {rec['frames']} | {rec['questions']} | "
            f"{rec['step_s']:.2f} | {rec['samples_per_s']:.2f} | {rec['peak_gb']:.1f} |"
        )


if __name__ == "__main__":
    main()
