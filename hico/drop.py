"""Progressive visual dropout: which visual tokens survive a stage. Pure tensor functions."""

from __future__ import annotations

import torch


def uniform_keep(current: int, keep: int) -> torch.Tensor:
    """Evenly spaced survivors among `current` visual tokens, exactly as the official integer linspace."""
    return torch.linspace(0, current - 1, keep, dtype=torch.long)


def attention_keep(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """The `keep` most attended visual tokens, in their original order. scores: [current]."""
    return scores.topk(keep).indices.sort().values


def keep_visual(h: torch.Tensor, visual: torch.Tensor, keep_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the visual tokens not in `keep_idx`; every other token stays, all in their original order.

    h: [B, S, D]; visual: [N] sorted positions of the visual tokens in h; keep_idx: [K] indices into
    `visual`. Returns h [B, S - N + K, D] and the kept tokens' new positions [K]. For one contiguous
    span this is the official [text before, kept visual, text after].
    """
    kept = visual[keep_idx.to(visual.device)]
    mask = torch.ones(h.shape[1], dtype=torch.bool, device=h.device)
    mask[visual] = False
    mask[kept] = True
    index = mask.nonzero().squeeze(1)
    return h[:, index], torch.searchsorted(index, kept)
