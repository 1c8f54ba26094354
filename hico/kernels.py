"""Which kernel runs the patch embedding and each attention: chosen once, at load, by device, dtype and request.

"exact" (the default) runs what the official model runs, so bfloat16 results round as the official ones do:
the UMT tower's Conv3d patch embedding and its attention (flash-attn's packed kernel on CUDA in half
precision when flash-attn is installed, else the official formulation: q·scale @ kᵀ, softmax, @ v, all in
the model dtype), and the LLM attention the official code gets (flash_attention_2 under the same
conditions, else sdpa). "fast" swaps the tower for a Conv2d over frames and SDPA; the LLM is unchanged.
ToMe's argmax amplifies the last-ulp differences of "fast" in bfloat16 (README: "Fidelity").
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

KERNEL_SETS = ("exact", "fast")
HALF = (torch.bfloat16, torch.float16)  # the dtypes flash-attn runs
LLM_ATTENTION = ("sdpa", "eager", "flash_attention_2")


@dataclass(frozen=True)
class Kernels:
    """Kernel names, looked up in the `hico.vision` (or `hico.internvideo2`) and `hico.qwen2` registries."""

    patch_embed: str  # "conv3d" (official) or "conv2d"
    vision_attention: str  # "flash_v2", "origin" (both official) or "sdpa"
    llm_attention: str  # "flash_attention_2", "sdpa" or "eager"


def default_dtype(device: torch.device | str) -> torch.dtype:
    """bfloat16 on CUDA, as the official model runs; float32 elsewhere (CPU bfloat16 is slow and rarely wanted)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def choose_kernels(
    device: torch.device | str,
    dtype: torch.dtype,
    flash_available: bool,
    requested: str = "exact",
    llm_attention: str | None = None,
) -> Kernels:
    """The kernels for a model on `device` in `dtype`; `llm_attention` overrides the LLM's choice.

    flash-attn is chosen only where it can run: CUDA, a half dtype, and installed. An explicit
    "flash_attention_2" anywhere else is a ValueError naming the device, dtype and availability.
    """
    if requested not in KERNEL_SETS:
        raise ValueError(f"unknown kernels {requested!r}; choose from {KERNEL_SETS}")
    flash = torch.device(device).type == "cuda" and dtype in HALF and flash_available
    if llm_attention is None:
        llm_attention = "flash_attention_2" if flash else "sdpa"
    elif llm_attention not in LLM_ATTENTION:
        raise ValueError(f"unknown attention implementation {llm_attention!r}; choose from {LLM_ATTENTION}")
    elif llm_attention == "flash_attention_2" and not flash:
        raise ValueError(
            f"flash_attention_2 needs CUDA, bfloat16 or float16 and flash-attn installed; got device {device}, "
            f"{dtype}, flash-attn {'installed' if flash_available else 'not installed'}"
        )
    if requested == "fast":
        return Kernels("conv2d", "sdpa", llm_attention)
    return Kernels("conv3d", "flash_v2" if flash else "origin", llm_attention)


def log_kernels(kernels: Kernels, requested: str, device: torch.device | str, dtype: torch.dtype) -> None:
    """One line per kernel choice, at load."""
    where = f"{requested} kernels, {torch.device(device)}, {str(dtype).removeprefix('torch.')}"
    log.info("patch embedding: %s (%s)", kernels.patch_embed, where)
    log.info("vision attention: %s (%s)", kernels.vision_attention, where)
    log.info("LLM attention: %s (%s)", kernels.llm_attention, where)
