"""Progressive visual dropout: which visual tokens survive a stage. Pure tensor functions."""

from __future__ import annotations

import torch


def uniform_keep(current: int, keep: int) -> torch.Tensor:
    """Evenly spaced survivors among `current` visual tokens, exactly as the official integer linspace."""
    return torch.linspace(0, current - 1, keep, dtype=torch.long)


def attention_keep(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """The `keep` most attended visual tokens, in their original order. scores: [current]."""
    return scores.topk(keep).indices.sort().values


def keep_visual(h: torch.Tensor, start: int, current: int, keep_idx: torch.Tensor) -> torch.Tensor:
    """h: [B, S, D] with visual tokens at [start, start + current) -> [B, S - current + len(keep_idx), D]."""
    kept = h[:, start + keep_idx.to(h.device)]
    return torch.cat([h[:, :start], kept, h[:, start + current :]], dim=1)
