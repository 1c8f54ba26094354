"""Stage 0 of the tiny recipe: per-patch labels true to the scene, in the tower's token order, and a tower that
learns from them while every other tensor stays as it was."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from hico.checkpoint import make_tiny_checkpoint, shapes_config
from vcflash import pretrain
from vcflash.pretrain import PretrainConfig, clip_batch, covered_accuracy, mirrored
from vcflash.shapes import COLOURS, DIRECTIONS, SHAPES, Background, Scene, Sprite, corpus

PLAIN = Background("plain", (120, 120, 120), 10.0, 20.0, 0.0, 0)


def scene_of(*sprites: Sprite) -> Scene:
    return Scene(4.0, 1, PLAIN, sprites)


def test_patch_labels_are_the_area_each_kind_covers() -> None:
    # 320 x 240 over a 4 x 4 grid: cells of 80 x 60 px. A 60 px square centred in cell (row 1, col 2) covers
    # x 170..230 of 160..240 and y 60..120 of 60..120: three quarters of it, and nothing else.
    square = Sprite("green", "square", 60, 200.0, 90.0, "right", 0.0, 0.0, 4.0)
    labels = scene_of(square).patch_labels(0.0, 4, "shape")
    assert labels.shape == (1 + len(SHAPES), 4, 4)
    np.testing.assert_allclose(labels.sum(0), 1.0, atol=1e-6)
    kind = 1 + SHAPES.index("square")
    assert labels[kind, 1, 2] == pytest.approx(0.75, abs=0.03)
    assert labels[kind].sum() == pytest.approx(60 * 60 / (80 * 60), abs=0.05)  # the square's area, in cells
    outside = np.ones((4, 4), bool)
    outside[1, 2] = False
    assert labels[kind][outside].max() < 0.02  # PIL fills the box's last row and column too
    others = [1 + i for i, s in enumerate(SHAPES) if s != "square"]
    assert labels[others].max() == 0.0
    colours = scene_of(square).patch_labels(0.0, 4, "colour")
    assert colours.shape == (1 + len(COLOURS), 4, 4)
    np.testing.assert_array_equal(colours[1 + list(COLOURS).index("green")], labels[kind])


def test_a_triangle_covers_half_its_box_and_a_gone_sprite_nothing() -> None:
    triangle = Sprite("red", "triangle", 120, 160.0, 120.0, "left", 0.0, 0.0, 2.0)
    scene = scene_of(triangle)
    kind = 1 + SHAPES.index("triangle")
    area = scene.patch_labels(0.0, 8, "shape")[kind].sum() * (320 / 8) * (240 / 8)
    assert area == pytest.approx(120 * 120 / 2, rel=0.05)
    assert scene.patch_labels(3.0, 8, "shape")[kind].max() == 0.0  # it left at 2 s
    assert scene.patch_labels(3.0, 8, "shape")[0].min() == 1.0


def test_clip_batch_orders_labels_as_the_tower_orders_tokens() -> None:
    moving = Sprite("blue", "circle", 70, 60.0, 120.0, "right", 60.0, 0.0, 4.0)
    scene = scene_of(moving)
    batch = clip_batch([scene, scene], frames=4, image_size=112, grid=7)
    assert batch.pixels.shape == (2, 4, 3, 112, 112)
    sizes = {"shape": len(SHAPES), "colour": len(COLOURS), "direction": len(DIRECTIONS)}
    assert {k: v.shape for k, v in batch.labels.items()} == {k: (2, 4 * 49, 1 + n) for k, n in sizes.items()}
    for t in range(4):
        expected = scene.patch_labels(float(t), 7, "shape")
        for row, col in [(0, 0), (3, 1), (3, 2 + t), (6, 6)]:
            token = t * 49 + row * 7 + col  # (t, h, w)
            np.testing.assert_allclose(batch.labels["shape"][1, token].numpy(), expected[:, row, col], atol=1e-6)
    # the circle moves right by 60 px a second, so the frames' labels differ
    assert not torch.equal(batch.labels["shape"][0, :49], batch.labels["shape"][0, 3 * 49 : 4 * 49])
    moves = batch.labels["direction"][0].argmax(-1)
    assert set(moves.tolist()) == {0, 1 + list(DIRECTIONS).index("right")}


def test_covered_accuracy_counts_only_patches_a_shape_mostly_covers() -> None:
    target = torch.tensor([[0.2, 0.8, 0.0, 0.0], [0.6, 0.0, 0.4, 0.0], [0.1, 0.0, 0.0, 0.9]])
    logits = torch.tensor([[0.0, 5.0, 0.0, 0.0], [0.0, 0.0, 0.0, 9.0], [0.0, 9.0, 0.0, 0.0]])
    assert covered_accuracy(logits, target) == pytest.approx(0.5)  # row 1 is mostly background: not counted


def test_pretrain_tower_trains_the_tower_only_and_learns_colours(tmp_path: Path) -> None:
    base = make_tiny_checkpoint(
        tmp_path / "base", config=shapes_config(), corpus=corpus(), greedy=True, for_training=True
    )
    out = tmp_path / "pretrained"
    run = subprocess.run(
        [sys.executable, "-m", "vcflash.cli", "pretrain-tower", "--model", str(base), "--out", str(out)]
        + ["--steps", "30", "--clips", "8", "--eval-every", "15", "--threads", "2"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr
    held_out = json.loads(run.stdout)["held_out"]
    assert held_out["step"] == 30
    assert held_out["colour"] > 0.45, held_out  # over twice chance (a fifth); colours come first (README)
    before, after = load_file(base / "model.safetensors"), load_file(out / "model.safetensors")
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("model.vision_tower.") for k in changed), sorted(changed)[:5]
    assert (out / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()
    evals = json.loads((out / "pretrain_tower.json").read_text())["evals"]
    assert [e["step"] for e in evals] == [15, 30]


def test_a_mirrored_batch_is_the_mirrored_scene_with_true_labels() -> None:
    flat = Background("plain", (120, 120, 120), 0.0, 20.0, 0.0, 0)  # no texture: only the sprites are not symmetric
    sprites = (
        Sprite("red", "triangle", 70, 80.0, 100.0, "right", 30.0, 0.0, 4.0),
        Sprite("blue", "square", 60, 250.0, 170.0, "up", 20.0, 1.0, 4.0),
        Sprite("green", "circle", 50, 170.0, 60.0, "left", 25.0, 0.0, 2.0),
    )

    def mirror(s: Sprite) -> Sprite:
        return dataclasses.replace(
            s, x=320 - s.x, direction={"left": "right", "right": "left"}.get(s.direction, s.direction)
        )

    batch = clip_batch([Scene(4.0, 1, flat, sprites)], frames=4, image_size=112, grid=7)
    expected = clip_batch([Scene(4.0, 1, flat, tuple(map(mirror, sprites)))], frames=4, image_size=112, grid=7)
    got = mirrored(batch, 7)
    for key in batch.labels:
        assert not torch.equal(got.labels[key], batch.labels[key]), key
        np.testing.assert_allclose(got.labels[key].numpy(), expected.labels[key].numpy(), atol=0.03, err_msg=key)
    assert (got.pixels - expected.pixels).abs().mean() < 0.01  # PIL rounds edges: a pixel's shift at most
    twice = mirrored(got, 7)
    assert torch.equal(twice.pixels, batch.pixels)
    assert all(torch.equal(twice.labels[k], batch.labels[k]) for k in batch.labels)


def test_mirroring_renders_half_the_scenes_and_decay_ends_at_its_ratio(tmp_path: Path, monkeypatch) -> None:
    base = make_tiny_checkpoint(
        tmp_path / "base", config=shapes_config(), corpus=corpus(), greedy=True, for_training=True
    )
    rendered, lrs = [], []
    monkeypatch.setattr(
        pretrain, "clip_batch", lambda scenes, *a, **k: rendered.append(len(scenes)) or clip_batch(scenes, *a, **k)
    )
    step = torch.optim.AdamW.step
    monkeypatch.setattr(
        torch.optim.AdamW, "step", lambda self, *a, **k: lrs.append(self.param_groups[0]["lr"]) or step(self, *a, **k)
    )
    for mirror, ratio in ((False, 1.0), (True, 0.1)):
        rendered.clear()
        lrs.clear()
        cfg = PretrainConfig(
            str(base), tmp_path / f"out{mirror}", steps=5, clips=2, mirror=mirror, min_lr_ratio=ratio, eval_clips=4
        )
        pretrain.pretrain_tower(cfg)
        assert rendered == [4] + [2] * (3 if mirror else 5)  # the held-out batch, then one a step or one a pair
        # the cosine from lr to lr x ratio over the steps; the last step is three quarters down it
        last = 1e-3 * (ratio + (1 - ratio) * 0.5 * (1 + math.cos(0.75 * math.pi)))
        assert lrs[0] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(last) and lrs == sorted(lrs, reverse=True)


@pytest.mark.parametrize("ratio", [0.0, -0.5, 1.5])
def test_a_decay_ratio_outside_0_to_1_is_refused(tmp_path: Path, ratio: float) -> None:
    base = make_tiny_checkpoint(tmp_path / "base", config=shapes_config(), corpus=corpus(), for_training=True)
    with pytest.raises(ValueError, match="min_lr_ratio"):
        pretrain.pretrain_tower(PretrainConfig(str(base), tmp_path / "out", steps=2, min_lr_ratio=ratio))
    assert not (tmp_path / "out").exists()
