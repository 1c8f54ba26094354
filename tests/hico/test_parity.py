"""Parity with the official VideoChat-Flash code, on golden values it produced (tests/data/parity/README.md).

The official model ran on CPU in float32 on a tiny random checkpoint in the released layout; here we load
that same checkpoint with our loader and compare every stage: preprocessing, position table, UMT output,
ToMe merge, projector, prefill logits with each dropout type, the tokens each drop keeps, and greedy
decoding with the repetition penalty.
"""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import hico.qwen2
from hico import VideoChatFlash
from hico.config import DropConfig
from hico.generation import GenerationSettings
from hico.merge import merge_clip_tokens
from hico.tokenizer import train_tiny_tokenizer
from hico.vision import clip_position_table

DATA = Path(__file__).parent.parent / "data" / "parity"
DROP_TYPES = ["attention", "uniform", "uniform0_attention", "uniform1_attention"]
TOL = {"rtol": 1e-4, "atol": 1e-5}


def load(tmp_path_factory: pytest.TempPathFactory, res: int) -> tuple[VideoChatFlash, dict[str, torch.Tensor]]:
    directory = tmp_path_factory.mktemp(f"parity{res}") / "ckpt"
    shutil.copytree(DATA / f"model_{res}", directory)
    train_tiny_tokenizer(directory, vocab_size=512)  # the official run needed none: ids were given
    return VideoChatFlash.from_pretrained(directory), load_file(DATA / f"golden_{res}.safetensors")


@pytest.fixture(scope="module")
def p224(tmp_path_factory: pytest.TempPathFactory) -> tuple[VideoChatFlash, dict[str, torch.Tensor]]:
    return load(tmp_path_factory, 224)


@pytest.fixture(scope="module")
def p448(tmp_path_factory: pytest.TempPathFactory) -> tuple[VideoChatFlash, dict[str, torch.Tensor]]:
    return load(tmp_path_factory, 448)


@pytest.mark.parametrize("res", [224, 448])
def test_preprocessing_and_position_table(res: int, request: pytest.FixtureRequest) -> None:
    model, g = request.getfixturevalue(f"p{res}")
    pixels = model.preprocess(g["frames"].numpy())
    x = (g["resized_u8"].numpy().astype(np.float64) * (1 / 255)).astype(np.float32)
    mean = np.float32([0.485, 0.456, 0.406])[:, None, None]
    std = np.float32([0.229, 0.224, 0.225])[:, None, None]
    official = torch.from_numpy((x - mean) / std)
    assert torch.equal(pixels[: len(official)], official)  # bit-exact, PIL bicubic in uint8
    if "pixel_values_f0" in g:
        assert torch.equal(pixels[0], g["pixel_values_f0"])
    assert torch.equal(clip_position_table(model.config.vision), g["pos_embed"])


@pytest.mark.parametrize("res", [224, 448])
def test_vision_merge_and_projector(res: int, request: pytest.FixtureRequest) -> None:
    model, g = request.getfixturevalue(f"p{res}")
    s = model.config.vision.image_size
    with torch.no_grad():
        features = model.vision_tower(model.preprocess(g["frames"].numpy()).reshape(2, 4, 3, s, s))
    torch.testing.assert_close(features, g["vision_out"], **TOL)
    # Merge from the official features: the ToMe argsort margins (1.6e-5) are below float32 noise
    # of a whole ViT, so each stage starts from the official input.
    merged, size = merge_clip_tokens(g["vision_out"], 64, num_heads=4)
    torch.testing.assert_close(merged, g["merged"], **TOL)
    assert torch.equal(size, g["merged_size"])
    with torch.no_grad():
        torch.testing.assert_close(model.mm_projector.mlp(g["merged"]), g["projected"], **TOL)
        torch.testing.assert_close(model.encode_clips(model.preprocess(g["frames"].numpy())), g["projected"], **TOL)


def prompt_embeds(model: VideoChatFlash, g: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    ids = g["input_ids"].tolist()
    cut = ids.index(-200)
    return model.embed([ids[:cut], g["projected"], ids[cut + 1 :]])


def test_prefill_logits_without_dropout(p224: tuple[VideoChatFlash, dict[str, torch.Tensor]]) -> None:
    model, g = p224
    embeds, span = prompt_embeds(model, g)
    with torch.no_grad():
        logits = model.llm(embeds, None, span, None, last_only=False)[0]
    torch.testing.assert_close(logits, g["logits_nodrop"], **TOL)


@pytest.mark.parametrize("kind", DROP_TYPES)
def test_dropout_keeps_the_same_tokens_and_gives_the_same_logits(
    kind: str, p224: tuple[VideoChatFlash, dict[str, torch.Tensor]], monkeypatch: pytest.MonkeyPatch
) -> None:
    model, g = p224
    embeds, span = prompt_embeds(model, g)
    kept: list[torch.Tensor] = []
    keep_visual = hico.qwen2.keep_visual
    monkeypatch.setattr(hico.qwen2, "keep_visual", lambda h, v, idx: (kept.append(idx), keep_visual(h, v, idx))[1])
    drop = DropConfig(kind, (1, 2, 3), (1.0, 0.75, 0.5, 0.25))
    with torch.no_grad():
        logits = model.llm(embeds, None, span, drop, last_only=False)[0]
    assert logits.shape[0] == 51
    torch.testing.assert_close(logits[-1], g[f"logits_last_{kind}"], **TOL)
    original = torch.arange(128)
    for stage, idx in enumerate(kept):
        original = original[idx]  # stage-local survivors -> original visual indices
        assert torch.equal(original, g[f"kept_{kind}_s{stage}"]), f"stage {stage}"


@pytest.mark.parametrize("kind", [None, *DROP_TYPES])
def test_greedy_generation_with_repetition_penalty(
    kind: str | None, p224: tuple[VideoChatFlash, dict[str, torch.Tensor]]
) -> None:
    model, g = p224
    embeds, span = prompt_embeds(model, g)
    drop = DropConfig(kind, (1, 2, 3), (1.0, 0.75, 0.5, 0.25)) if kind else None
    assert model.generation.repetition_penalty == 1.1  # read from the checkpoint's generation_config.json
    settings = model.generation.override(max_new_tokens=8)
    assert isinstance(settings, GenerationSettings) and not settings.do_sample
    ids = list(model.generate(embeds, span, settings, drop))
    assert ids == g[f"generated_{kind or 'nodrop'}"].tolist()
