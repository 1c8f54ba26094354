"""The `vcflash` command."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

TINY = "tiny"


def tiny_checkpoint_dir(res: int = 224) -> Path:
    """The generated tiny checkpoint that `--model tiny` uses, made on first use."""
    from hico.checkpoint import make_tiny_checkpoint

    root = Path(os.environ.get("VCFLASH_CACHE", Path.home() / ".cache" / "vcflash"))
    directory = root / f"tiny-{res}"
    if not (directory / "generation_config.json").is_file():  # written last
        make_tiny_checkpoint(directory, res=res)
    return directory


def resolve_model(name: str) -> str | Path:
    return tiny_checkpoint_dir() if name == TINY else name


def cmd_ask(args: argparse.Namespace) -> int:
    from hico.checkpoint import DEFAULT_MODEL
    from hico.model import VideoChatFlash

    model = VideoChatFlash.from_pretrained(
        resolve_model(args.model or DEFAULT_MODEL), dtype=args.dtype, device=args.device
    )
    answer = model.answer(
        args.video,
        args.question,
        max_new_tokens=args.max_new_tokens,
        do_sample=args.sample,
        compress=args.compress,
        max_num_frames=args.max_frames,
        start_s=args.start,
        end_s=args.end,
        seed=args.seed,
        progress=not args.json and sys.stderr.isatty(),
        temperature=args.temperature,
    )
    if args.json:
        drop = model.resolve_drop(args.compress)
        record = {
            "answer": answer.text,
            "frames": answer.num_frames,
            "duration_s": round(answer.duration_s, 3),
            "visual_tokens": answer.visual_tokens,
            "prompt_tokens": answer.prompt_tokens,
            "new_tokens": len(answer.token_ids),
            "dropout": None if drop is None else {"type": drop.type, "layers": drop.layers, "ratios": drop.ratios},
            "timings_s": {k: round(v, 4) for k, v in answer.timings.items()},
        }
        print(json.dumps(record, indent=2))
    else:
        print(answer.text)
    return 0


def cmd_make_tiny(args: argparse.Namespace) -> int:
    from hico.checkpoint import make_tiny_checkpoint

    print(make_tiny_checkpoint(args.dir, res=args.res, seed=args.seed))
    return 0


def cmd_make_test_video(args: argparse.Namespace) -> int:
    from vcflash.media import write_test_video

    print(write_test_video(args.path, seconds=args.seconds, fps=args.fps))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vcflash", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    ask = sub.add_parser("ask", help="answer a question about a video file, offline")
    ask.add_argument("video", help="video file (anything PyAV opens)")
    ask.add_argument("question")
    ask.add_argument(
        "--model",
        help="hub id or local checkpoint dir (default: OpenGVLab/VideoChat-Flash-Qwen2_5-2B_res448); "
        "'tiny' makes and uses a random tiny checkpoint",
    )
    ask.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16 (default float32)")
    ask.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    ask.add_argument("--max-frames", type=int, default=512, help="frame budget, about 1 fps up to this (512)")
    ask.add_argument("--start", type=float, help="only look at the video from this second")
    ask.add_argument("--end", type=float, help="only look at the video up to this second")
    ask.add_argument(
        "--compress",
        help="visual dropout: off, recommended (uniform0_attention:4,18:1,0.75,0.25) or TYPE:LAYERS:RATIOS; "
        "default: the checkpoint's config",
    )
    ask.add_argument("--max-new-tokens", type=int, default=1024)
    ask.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    ask.add_argument("--temperature", type=float, help="sampling temperature (default from generation_config.json)")
    ask.add_argument("--seed", type=int, help="random seed for --sample")
    ask.add_argument("--json", action="store_true", help="print answer, frames, duration, tokens and timings as JSON")
    ask.set_defaults(func=cmd_ask)

    tiny = sub.add_parser("make-tiny-checkpoint", help="write a random tiny checkpoint in the official layout")
    tiny.add_argument("dir")
    tiny.add_argument("--res", type=int, choices=(224, 448), default=224)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=cmd_make_tiny)

    video = sub.add_parser("make-test-video", help="write a synthetic H.264 test video")
    video.add_argument("path")
    video.add_argument("--seconds", type=float, default=80.0)
    video.add_argument("--fps", type=int, default=25)
    video.set_defaults(func=cmd_make_test_video)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    from hico.checkpoint import CheckpointError
    from hico.tokenizer import TokenizerLoadError

    try:
        return args.func(args)
    except (CheckpointError, TokenizerLoadError, FileNotFoundError, ValueError, TypeError) as e:
        print(f"vcflash: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
