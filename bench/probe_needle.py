"""How well could any reading of a model's visual tokens find a needle? The ceiling beside the key index (issue 12).

    PYTHONPATH=. python bench/probe_needle.py --model tiny [--frames 10000] [--needles 20] [--threads 2]

The key index (`hico.relevance`) can only rank what the tower put in the tokens. This trains, for the question "is
there a <shape>?" (`--shape`, the niah needle's by default), small heads on a model's own features to say whether a
clip shows the shape: a linear and a small MLP head per token, a clip's score the log-sum-exp over its tokens,
binary cross-entropy on pool clips (`vcflash.mining.pool`, the shape on screen or not) and brief events of the shape
(`mining.event_clip`). Then it ranks each needle of `vcflash eval niah`'s single-hop cases among its haystack's
clips, with each head and with the key index itself, on three readings: the tower's patches before the ToMe merge,
after it, and the projector's tokens (what memory stores). A head that cannot put the needle in the top 8 is a
bound on the tower, not on retrieval: a model whose index nears its heads has nothing left to gain from ranking.

Scenes and haystacks are niah's and mining's own (pure functions of the seed), so two models are compared on the
same clips. 2026-12-03, shipped stage-3 tower vs a 3,000-step `pretrain-tower` tower: BENCHMARKS.md, needles.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F

from hico import VideoChatFlash
from hico.checkpoint import resolve_checkpoint
from hico.merge import merge_clip_tokens
from hico.relevance import clip_keys, default_layer, key_scores, question_query
from vcflash import mining, niah
from vcflash.shapes import SHAPES

READINGS = ("patches", "merged", "tokens")


def rank(scores: torch.Tensor, needle_score: torch.Tensor, clip: int) -> int:
    """Haystack clips scored above the needle once it replaces clip `clip`."""
    s = scores.clone()
    s[clip] = needle_score
    return int((s > s[clip]).sum())


def summary(ranks: list[int]) -> dict[str, float | list[int]]:
    r = np.array(ranks)
    return {"top1": float(np.mean(r < 1)), "top8": float(np.mean(r < 8)), "top32": float(np.mean(r < 32))} | {
        "ranks": ranks
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--frames", type=int, default=10000, help="haystack length (niah's)")
    parser.add_argument("--needles", type=int, default=20, help="single-hop cases at evenly spread depths")
    parser.add_argument("--shape", default=niah.NEEDLE_SHAPE, choices=SHAPES)
    parser.add_argument("--pool", type=int, default=2000, help="training clips with and without the shape")
    parser.add_argument("--events", type=int, default=500, help="training clips of a brief event of the shape")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="write the ranks here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    model = VideoChatFlash.from_pretrained(resolve_checkpoint(args.model)).float().eval()
    patches: list[torch.Tensor] = []  # the tower's output of every clip encoded, in order
    model.vision_tower.register_forward_hook(lambda m, i, o: patches.append(o.detach().float()))

    def encode(frames: list[np.ndarray], batch: int = 32) -> dict[str, torch.Tensor]:
        patches.clear()
        starts = range(0, len(frames), batch)
        tokens = [torch.from_numpy(niah.encode_frames(model, frames[a : a + batch])) for a in starts]
        p = torch.cat(patches)
        merged = merge_clip_tokens(p, model.config.tokens_per_clip, model.mm_projector.num_heads)[0]
        return {"patches": p, "merged": merged, "tokens": torch.cat(tokens).float()}

    rng = np.random.default_rng([args.seed, 1])
    clips = mining.pool(rng, args.pool)
    events = []
    for _ in range(args.events):
        others = [s for s in SHAPES if s != args.shape][: int(rng.integers(1, 3))]
        events.append(mining.event_clip(rng, args.shape, others)[0])
    train = encode([np.stack(list(c.frames())) for c in [*events, *clips]])
    y = torch.tensor([1.0] * len(events) + [float(args.shape in mining.shapes_on_screen(c)) for c in clips])
    haystack = niah.make_haystack(args.frames, args.seed)
    hay = encode(list(haystack.all_clips()))
    cases = [niah.make_case(haystack.clips, (i + 0.5) / args.needles, 1, i, args.seed) for i in range(args.needles)]
    full = [niah.insert(haystack, case.needles, args.seed) for case in cases]
    needle = encode([f.clip_frames(case.needles[0].clip) for f, case in zip(full, cases, strict=True)])
    print(f"encoded in {time.perf_counter() - t0:.0f} s", flush=True)

    report: dict[str, dict] = {}
    layer = default_layer(model.config.text)
    keys = clip_keys(model, hay["tokens"], layer).float()
    query = question_query(model, niah.question(args.shape), layer)
    ranks = []
    for i, case in enumerate(cases):
        k = keys.clone()
        k[case.needles[0].clip] = clip_keys(model, needle["tokens"][i : i + 1], layer)[0].float()
        s = key_scores(query, k)
        ranks.append(int((s > s[case.needles[0].clip]).sum()))
    report["key index"] = summary(ranks)
    for reading in READINGS:
        x = train[reading]
        width = x.shape[-1]
        for kind in ("linear", "mlp"):
            head = (
                torch.nn.Linear(width, 1)
                if kind == "linear"
                else torch.nn.Sequential(
                    torch.nn.LayerNorm(width), torch.nn.Linear(width, 256), torch.nn.GELU(), torch.nn.Linear(256, 1)
                )
            )
            opt = torch.optim.Adam(head.parameters(), 1e-3)
            for _ in range(args.steps):
                b = torch.randint(len(x), (256,))
                loss = F.binary_cross_entropy_with_logits(head(x[b]).squeeze(-1).logsumexp(-1), y[b])
                opt.zero_grad()
                loss.backward()
                opt.step()
            with torch.no_grad():
                scores = head(hay[reading]).squeeze(-1).logsumexp(-1)
                mine = head(needle[reading]).squeeze(-1).logsumexp(-1)
                ranks = [rank(scores, mine[i], case.needles[0].clip) for i, case in enumerate(cases)]
            report[f"{reading} {kind}"] = summary(ranks)
    print(f"{'reading':<18}{'top1':>6}{'top8':>6}{'top32':>7}  ranks of {args.needles} needles among {haystack.clips}")
    for name, row in report.items():
        print(f"{name:<18}{row['top1']:>6.0%}{row['top8']:>6.0%}{row['top32']:>7.0%}  {row['ranks']}")
    print(f"{time.perf_counter() - t0:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": vars(args), "report": report}, f, indent=2)


if __name__ == "__main__":
    main()
