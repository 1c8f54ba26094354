"""Loading benchmark: peak host memory and wall time of `hico.checkpoint.load_model` at a real size.

Makes (once, cached under --workdir) a random checkpoint of the preset in the official layout, stored in
bfloat16, then loads it in a fresh process per dtype and reports the process's peak RSS above its RSS after
`import torch, hico, transformers`, against the model's size (sum of parameter bytes):

    python bench/bench_load.py --size 2b --dtypes bfloat16,float32
    python bench/bench_load.py --size 2b --clean      # and delete the multi-GB checkpoint afterwards

Prints one JSON record per load and a Markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def make_checkpoint(size: str, res: int, directory: Path) -> Path:
    """A random `size` checkpoint stored in bfloat16, with the tiny model's tokenizer files."""
    if (directory / "generation_config.json").is_file():  # written last
        return directory
    import torch

    from hico.checkpoint import random_tiny_checkpoint_dir, save_checkpoint
    from hico.config import preset
    from hico.model import VideoChatFlashModel

    t0 = time.perf_counter()
    with torch.device("meta"):
        model = VideoChatFlashModel(preset(size, image_size=res)).to(torch.bfloat16)
    model.to_empty(device="cpu")
    model.llm.tie_weights()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight") and p.ndim == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    save_checkpoint(model, directory)
    del model
    tiny = random_tiny_checkpoint_dir(224)
    for f in tiny.iterdir():
        if f.name not in ("config.json", "model.safetensors", "generation_config.json"):
            shutil.copy(f, directory / f.name)
    shutil.copy(tiny / "generation_config.json", directory / "generation_config.json")
    print(f"made {directory} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return directory


def child(directory: str, dtype_name: str) -> dict:
    """Runs in a fresh process: load once, measure."""
    import torch
    import transformers  # noqa: F401 - load_model imports it for the tokenizer; keep it out of the delta

    import hico  # noqa: F401
    from hico.checkpoint import load_model

    baseline_kib = status_kib("VmRSS")
    maxrss_before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    dtype = getattr(torch, dtype_name)
    t0 = time.perf_counter()
    model = load_model(directory, dtype=dtype, device="cpu")
    seconds = time.perf_counter() - t0
    peak_kib = status_kib("VmHWM")
    maxrss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # a tied tensor counted once
    peak_extra = (peak_kib - baseline_kib) * 1024
    return {
        "dtype": dtype_name,
        "model_bytes": model_bytes,
        "file_bytes": sum(f.stat().st_size for f in Path(directory).glob("*.safetensors")),
        "baseline_rss_bytes": baseline_kib * 1024,
        "peak_rss_bytes": peak_kib * 1024,
        "ru_maxrss_bytes": maxrss_kib * 1024,
        "ru_maxrss_before_bytes": maxrss_before_kib * 1024,
        "peak_minus_baseline_bytes": peak_extra,
        "ratio": peak_extra / model_bytes,
        "rss_after_anon_bytes": status_kib("RssAnon") * 1024,
        "rss_after_file_bytes": status_kib("RssFile") * 1024,
        "load_s": seconds,
    }


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="2b", help="preset: 2b, 7b or tiny")
    ap.add_argument("--res", type=int, default=448)
    ap.add_argument("--dtypes", default="bfloat16,float32", help="dtypes to load the bfloat16 checkpoint as")
    ap.add_argument("--workdir", default="/tmp/vcflash-bench-2b", help="where the checkpoint is made and kept")
    ap.add_argument("--clean", action="store_true", help="delete the checkpoint at the end")
    ap.add_argument("--child", nargs=2, metavar=("DIR", "DTYPE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return

    directory = make_checkpoint(args.size, args.res, Path(args.workdir) / f"{args.size}-{args.res}")
    records = []
    for dtype in args.dtypes.split(","):
        out = subprocess.run(
            [sys.executable, __file__, "--child", str(directory), dtype], check=True, capture_output=True, text=True
        )
        rec = json.loads(out.stdout.strip().splitlines()[-1]) | {"size": args.size, "res": args.res}
        print(json.dumps(rec), flush=True)
        records.append(rec)
    if args.clean:
        shutil.rmtree(directory)

    print(f"\n{platform.processor() or platform.machine()}, {sys.platform}\n")
    print("| model | load dtype | model size | peak RSS − baseline | ratio | load time |")
    print("|---|---|---|---|---|---|")
    for r in records:
        print(
            f"| {r['size']} ({r['res']} px), bf16 file | {r['dtype']} | {gib(r['model_bytes'])} | "
            f"{gib(r['peak_minus_baseline_bytes'])} | {r['ratio']:.2f}× | {r['load_s']:.1f} s |"
        )


if __name__ == "__main__":
    main()
