"""Token merging (ToMe) as pure tensor functions: a clip's 4·L patch tokens become 64.

HiCo's clip-level compression: bipartite soft matching repeatedly merges the most similar token
pairs, keeping a size per token so merged tokens are size-weighted averages. The schedule, the
similarity metric (head-mean of the current features) and the output order follow the official
model exactly, because the LLM was trained on tokens in that order.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Merge = Callable[[torch.Tensor], torch.Tensor]


def merge_schedule(num_tokens: int, target: int) -> list[int]:
    """Tokens removed per step: halve while more than half must go, then remove the rest.

    3136 -> 64 (448 px): [1568, 784, 392, 196, 98, 34]; 784 -> 64 (224 px): [392, 196, 98, 34].
    """
    if not 0 < target < num_tokens:
        raise ValueError(f"merge target {target} must be in (0, {num_tokens})")
    schedule = []
    while num_tokens != target:
        if num_tokens - target <= num_tokens // 2:
            schedule.append(num_tokens - target)
            break
        schedule.append(num_tokens // 2)
        num_tokens -= num_tokens // 2
    return schedule


@torch.no_grad()
def bipartite_soft_matching(metric: torch.Tensor, r: int) -> Merge:
    """Match even tokens (sources) to odd tokens (destinations) and plan to merge the r best sources.

    metric: [B, N, C] similarity features. Returns `merge(x: [B, N, C']) -> [B, N - r, C']` which
    sums each merged source into its destination. Output order: unmerged sources by descending
    similarity, then every destination in its original order. r is capped at N // 2.
    """
    r = min(r, metric.shape[1] // 2)
    if r <= 0:
        return lambda x: x
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[..., ::2, :], metric[..., 1::2, :]
    scores = a @ b.transpose(-1, -2)  # [B, ceil(N/2), N//2] cosine similarity
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]  # [B, ceil(N/2), 1]
    unm_idx, src_idx = edge_idx[..., r:, :], edge_idx[..., :r, :]
    dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)

    def merge(x: torch.Tensor) -> torch.Tensor:
        src, dst = x[..., ::2, :], x[..., 1::2, :]
        n, t1, c = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
        src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
        dst = dst.scatter_add(-2, dst_idx.expand(n, r, c), src)
        return torch.cat([unm, dst], dim=1)

    return merge


def merge_wavg(merge: Merge, x: torch.Tensor, size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply `merge` as a size-weighted average; returns the merged tokens and their new sizes."""
    x = merge(x * size)
    size = merge(size)
    return x / size, size


def merge_clip_tokens(x: torch.Tensor, target: int, num_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge each clip's tokens down to `target`.

    x: [B, P, C] clip tokens (P = frames·L). The metric of every step is the mean over `num_heads`
    head-chunks of the current features, [B, P', C // num_heads]. Returns tokens [B, target, C]
    and sizes [B, target, 1] (how many patches each token averages; they sum to P).
    """
    b, p, c = x.shape
    size = torch.ones_like(x[..., :1])
    for r in merge_schedule(p, target):
        metric = x.reshape(b, x.shape[1], num_heads, c // num_heads).mean(2)
        x, size = merge_wavg(bipartite_soft_matching(metric, r), x, size)
    return x, size
