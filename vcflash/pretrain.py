"""Stage 0 of the tiny model's recipe: teach a vision tower what shapes scenes show, from dense labels.

The released VideoChat-Flash starts from a UMT tower pretrained on millions of videos; the tiny model's tower starts
from nothing, and trained only through the answers' loss it learns colours in a few hundred steps but shapes not in
thousands (README, Fine-tuning). So before `vcflash train`, the tower learns for every patch of every frame which
shape and which colour covers it (and, with `labels` direction, which way it moves, seen across a clip's 4 frames):
the area fractions of background and each kind (`Scene.patch_labels`) as soft targets of linear heads
(cross-entropy), which are thrown away afterwards. Scenes are drawn and rendered on the
fly (no video files), 4-frame clips of 4 s at 1 fps, as the encoder sees them. The output is the base checkpoint
with the trained tower, in the official layout, for `vcflash train --train projector,llm`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from hico.pixels import normalize, squash_resize
from vcflash.shapes import LABELS, Scene, random_scene

log = logging.getLogger(__name__)
CLIP_SECONDS = 4.0  # one clip of 4 frames at 1 fps


@dataclass(frozen=True)
class PretrainConfig:
    model: str  # the base (`make-tiny-checkpoint --preset shapes`)
    out: Path
    steps: int = 1000
    labels: tuple[str, ...] = ("shape", "colour")  # of LABELS
    clips: int = 16  # scenes a step
    mirror: bool = False  # train every drawn batch twice, as drawn then mirrored left-right (half the rendering)
    lr: float = 1e-3
    min_lr_ratio: float = 1.0  # cosine decay to lr * this over the steps (1: constant)
    seed: int = 0
    eval_every: int = 250
    eval_clips: int = 64
    threads: int | None = None


@dataclass(frozen=True)
class Batch:
    pixels: torch.Tensor  # [B, 4, 3, S, S] normalised
    labels: dict[str, torch.Tensor]  # per LABELS key: [B, 4·G·G, 1 + K] area fractions, tokens in (t, h, w) order


def clip_batch(
    scenes: list[Scene], frames: int, image_size: int, grid: int, keys: tuple[str, ...] = tuple(LABELS)
) -> Batch:
    """Render each scene's first `frames` seconds at 1 fps, squashed as the encoder squashes, with its labels."""
    pixels: list[np.ndarray] = []
    labels: dict[str, list[np.ndarray]] = {key: [] for key in keys}
    for scene in scenes:
        background = scene.background.render(*scene.size)
        for t in range(frames):
            pixels.append(squash_resize(scene.frame(float(t), background), image_size))
            for key in labels:
                labels[key].append(scene.patch_labels(float(t), grid, key))

    def tokens(maps: list[np.ndarray]) -> torch.Tensor:  # [B·T, K, G, G] -> [B, T·G·G, K]
        x = torch.from_numpy(np.stack(maps)).float()
        return x.flatten(2).transpose(1, 2).reshape(len(scenes), frames * grid * grid, -1)

    video = torch.from_numpy(normalize(np.stack(pixels)))
    return Batch(video.reshape(len(scenes), frames, *video.shape[1:]), {k: tokens(v) for k, v in labels.items()})


def mirrored(batch: Batch, grid: int) -> Batch:
    """The batch mirrored left-right: the pixels, each label map, and left and right swapped as directions.

    Upright triangles, squares and circles keep their kind in a mirror, so this is a new scene with true labels,
    for a flip of the drawn pixels instead of rendering more (rendering costs about as much CPU as the step)."""
    labels = {}
    for key, value in batch.labels.items():  # [B, T·G·G, 1 + K] -> [B, T, G(h), G(w), 1 + K], flip w
        b, tokens, k = value.shape
        flipped = value.reshape(b, tokens // (grid * grid), grid, grid, k).flip(3).reshape(b, tokens, k)
        if key == "direction":  # channel 0 is the background, then the LABELS order
            order = list(range(k))
            left, right = (1 + LABELS[key].index(d) for d in ("left", "right"))
            order[left], order[right] = right, left
            flipped = flipped[..., order]
        labels[key] = flipped
    return Batch(batch.pixels.flip(-1), labels)


def covered_accuracy(logits: torch.Tensor, target: torch.Tensor) -> float:
    """Accuracy over the patches more than half covered by a shape: is the kind covering most of it the guess?"""
    covered = target[..., 1:].max(-1).values > 0.5
    return float((logits.argmax(-1) == target.argmax(-1))[covered].float().mean())


def pretrain_tower(cfg: PretrainConfig, report: Callable[[str], None] = log.info, progress: bool = False) -> dict:
    from tqdm.auto import tqdm

    from hico.chat import VideoChatFlash
    from hico.checkpoint import load_model, resolve_checkpoint, save_checkpoint
    from hico.train import copy_side_files, schedule

    if not 0.0 < cfg.min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio is a share of lr in (0, 1], got {cfg.min_lr_ratio}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    base = resolve_checkpoint(cfg.model)
    model = load_model(base, "float32", torch.device("cpu"), kernels="fast", cls=VideoChatFlash)
    vision = model.config.vision
    frames, grid = vision.num_frames, vision.image_size // vision.patch_size
    tower = model.vision_tower.requires_grad_(True)
    if unknown := set(cfg.labels) - set(LABELS):
        raise ValueError(f"unknown labels {sorted(unknown)}; choose from {', '.join(LABELS)}")
    heads = torch.nn.ModuleDict({k: torch.nn.Linear(vision.hidden_size, 1 + len(LABELS[k])) for k in cfg.labels})
    optimizer = torch.optim.AdamW([*tower.parameters(), *heads.parameters()], lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule(cfg.steps, 0.0, cfg.min_lr_ratio))
    train_seq, test_seq = np.random.SeedSequence(cfg.seed).spawn(2)  # independent streams: no test scene trained on
    rng, test_rng = np.random.default_rng(train_seq), np.random.default_rng(test_seq)

    def draw(r: np.random.Generator, n: int) -> Batch:
        scenes = [random_scene(r, CLIP_SECONDS, 1) for _ in range(n)]
        return clip_batch(scenes, frames, vision.image_size, grid, cfg.labels)

    def loss_of(b: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        features = tower(b.pixels)  # [B, 4·G·G, C]
        logits = {k: head(features) for k, head in heads.items()}
        loss = sum(F.cross_entropy(logits[k].flatten(0, 1), b.labels[k].flatten(0, 1)) for k in heads)
        return loss, logits

    held_out = draw(test_rng, cfg.eval_clips)
    evals: list[dict] = []
    t0 = time.perf_counter()
    bar = tqdm(range(1, cfg.steps + 1), desc="tower", disable=not progress, unit="step")
    # rendering is about a third of a step: one thread draws the next batch while torch trains on this one (PIL and
    # torch release the GIL); only that thread draws from `rng`, so the batches are those drawn in line
    with ThreadPoolExecutor(1, thread_name_prefix="draw") as drawer:
        upcoming = drawer.submit(draw, rng, cfg.clips)
        drawn: Batch | None = None  # with `mirror`: the batch the step before drew, for this step to mirror
        for step in bar:
            if drawn is not None:
                batch, drawn = mirrored(drawn, grid), None
            else:
                batch = upcoming.result()
                drawn = batch if cfg.mirror else None
                if step + cfg.mirror < cfg.steps:
                    upcoming = drawer.submit(draw, rng, cfg.clips)
            loss, _ = loss_of(batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if step % cfg.eval_every == 0 or step == cfg.steps:
                with torch.no_grad():
                    _, logits = loss_of(held_out)
                row = {"step": step, "seconds": round(time.perf_counter() - t0, 1)}
                row |= {k: round(covered_accuracy(logits[k], held_out.labels[k]), 4) for k in heads}
                evals.append(row)
                report(f"step {step}: held-out patch accuracy " + ", ".join(f"{k} {row[k]:.1%}" for k in heads))
    out = save_checkpoint(model, cfg.out)
    copy_side_files(base, out)
    summary = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()}, "evals": evals}
    (out / "pretrain_tower.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
