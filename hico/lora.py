"""LoRA on the LLM through `peft`: add adapters for training, save them, load them, merge them.

The adapters sit on the Qwen2 decoder's linear layers (q/k/v/o and the gated MLP). Parts trained in full
alongside them (the projector, the vision tower) travel in the same adapter as peft `modules_to_save`, so an
adapter directory is the whole difference from its base checkpoint: `--model BASE --adapter DIR`. peft is the
`train` extra; nothing else in hico imports it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from hico.model import VideoChatFlashModel

if TYPE_CHECKING:
    from peft import PeftModel

# Every decoder linear layer, by its (transformers Qwen2) name under our model.
LLM_TARGETS = r".*llm\.model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
FULL_PARTS = {"projector": "mm_projector", "vision": "vision_tower"}  # parts trained in full next to LoRA


class AdapterError(ValueError):
    """An adapter directory that cannot be applied; the message names it."""


def _peft():
    try:
        import peft
    except ImportError as e:  # pragma: no cover - the `train` extra is missing
        raise ImportError("LoRA needs peft: pip install 'vcflash[train]'") from e
    return peft


def add_lora(
    model: VideoChatFlashModel,
    rank: int,
    alpha: float | None = None,
    dropout: float = 0.0,
    full_parts: tuple[str, ...] = (),
    base: str | None = None,
) -> PeftModel:
    """Wrap `model` in place with LoRA (rank `rank`, scale alpha / rank; alpha defaults to 2 * rank) on every LLM
    linear layer; `full_parts` ('projector', 'vision') are trained in full and saved with the adapter. Only the
    adapters and those parts require grad afterwards."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    unknown = set(full_parts) - set(FULL_PARTS)
    if unknown:
        raise ValueError(f"unknown parts {sorted(unknown)}; choose from {sorted(FULL_PARTS)}")
    peft = _peft()
    config = peft.LoraConfig(
        r=rank,
        lora_alpha=2 * rank if alpha is None else alpha,
        lora_dropout=dropout,
        target_modules=LLM_TARGETS,
        modules_to_save=[FULL_PARTS[p] for p in full_parts] or None,
        base_model_name_or_path=base,
    )
    model.name_or_path = base  # peft records the base it finds on the model in adapter_config.json
    return peft.get_peft_model(model, config)


def save_adapter(peft_model: PeftModel, directory: str | os.PathLike[str]) -> Path:
    """adapter_config.json + adapter_model.safetensors (peft's layout)."""
    directory = Path(directory)
    peft_model.save_pretrained(str(directory))
    return directory


def load_adapter(model: VideoChatFlashModel, directory: str | os.PathLike[str], merge: bool = True):
    """Apply a saved adapter to a loaded base model. merge=True folds it into the weights and returns the plain
    model (inference runs at base speed); merge=False returns the PeftModel (base + adapter, unmerged)."""
    directory = Path(directory)
    if not (directory / "adapter_config.json").is_file():
        raise AdapterError(f"{directory}: no adapter_config.json (not a LoRA adapter directory)")
    peft = _peft()
    try:
        wrapped = peft.PeftModel.from_pretrained(model, str(directory), is_trainable=False)
    except (ValueError, KeyError, RuntimeError, OSError) as e:
        raise AdapterError(f"{directory}: cannot apply this adapter to the model ({type(e).__name__}: {e})") from e
    if not merge:
        return wrapped
    return merge_lora(wrapped)


def merge_lora(peft_model: PeftModel) -> VideoChatFlashModel:
    """Fold the adapters (and any fully trained parts) into the base model; returns the plain model."""
    return peft_model.merge_and_unload()
