"""A released checkpoint against the official model run on it: what only the real weights (and a GPU) can show.

Skipped unless both are set (README, "Fidelity", has the commands):
  VCFLASH_REAL_CHECKPOINT  the checkpoint dir (e.g. the HF snapshot of VideoChat-Flash-Qwen2_5-2B_res448)
  VCFLASH_REAL_GOLDEN      what the parity harness's `make_goldens.py real` wrote for it (official code, same
                           device, dtype and kernels: flash-attn on CUDA when installed)
Our model loads with the golden's dtype and device and the default "exact" kernels; its visual tokens, prefill
logits (dropout off, `attention`, `uniform0_attention`) and greedy ids must equal the official ones bit for bit.
"""

import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from hico import VideoChatFlash
from hico.config import DropConfig

CHECKPOINT = os.environ.get("VCFLASH_REAL_CHECKPOINT")
GOLDEN = os.environ.get("VCFLASH_REAL_GOLDEN")
MODES = ["nodrop", "attention", "uniform0_attention"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (CHECKPOINT and GOLDEN), reason="set VCFLASH_REAL_CHECKPOINT and VCFLASH_REAL_GOLDEN"),
]


@pytest.fixture(scope="module")
def run() -> tuple[VideoChatFlash, dict[str, torch.Tensor], dict[str, str]]:
    assert GOLDEN and CHECKPOINT
    with safe_open(GOLDEN, "pt") as f:
        meta = f.metadata()
    if meta["device"].startswith("cuda") and not torch.cuda.is_available():
        pytest.skip(f"the golden was made on {meta['device']} ({meta['gpu']}); this machine has no CUDA")
    model = VideoChatFlash.from_pretrained(Path(CHECKPOINT), dtype=meta["dtype"], device=meta["device"])
    print(f"official: {meta['attn_implementation']}, flash-attn {meta['flash_attn'] or 'no'}; ours: {model.kernels}")
    return model, load_file(GOLDEN), meta


def tokens_of(model: VideoChatFlash, g: dict[str, torch.Tensor]) -> torch.Tensor:
    return model.encode_clips(model.preprocess(g["frames_scene"].numpy()))


def test_visual_tokens_are_bitwise_official(
    run: tuple[VideoChatFlash, dict[str, torch.Tensor], dict[str, str]],
) -> None:
    model, g, _ = run
    tokens = tokens_of(model, g).cpu()
    diff = (tokens.float() - g["tokens_scene"].float()).abs().max().item()
    assert torch.equal(tokens, g["tokens_scene"]), f"max |diff| {diff:.3g}"


@pytest.mark.parametrize("mode", MODES)
def test_prefill_and_greedy_text_are_official(
    mode: str, run: tuple[VideoChatFlash, dict[str, torch.Tensor], dict[str, str]]
) -> None:
    model, g, meta = run
    layers = tuple(int(x) for x in meta["drop_layers"].split(","))
    ratios = tuple(float(x) for x in meta["drop_ratios"].split(","))
    drop = None if mode == "nodrop" else DropConfig(mode, layers, ratios)
    ids = g["input_ids"].tolist()
    cut = ids.index(-200)
    embeds, span = model.embed([ids[:cut], g["tokens_scene"], ids[cut + 1 :]])  # the official visual tokens
    with torch.no_grad():
        last = (
            model.llm(embeds, None, span, drop, last_only=False)[0, -1].float().cpu()
        )  # the whole prefill, as the official
    settings = model.generation.override(max_new_tokens=len(g[f"generated_scene_{mode}"]))
    generated = list(model.generate(embeds, span, settings, drop))
    expected = g[f"generated_scene_{mode}"].tolist()
    text = f"ours {model.tokenizer.decode(generated)!r}, official {model.tokenizer.decode(expected)!r}"
    assert generated == expected, text  # both end at the eos token, or at max_new_tokens
    diff = (last - g[f"logits_last_scene_{mode}"]).abs().max().item()
    assert torch.equal(last, g[f"logits_last_scene_{mode}"]), f"max |diff| {diff:.3g}"
