"""InternVideo2-1B video encoder: 4-frame clips -> 1024 tokens (VideoChat-Flash-Qwen2_5-7B_InternVideo2-1B).

The second tower of the released checkpoints, chosen by `mm_vision_tower` "internvideo2". Against UMT
(`hico.vision`) it differs in: patch 14 (16x16 per frame at 224 px), a learned `cls_token` and learned
position embeddings, RMSNorm instead of LayerNorm, q/k RMS-normalised over the full width before the head
split, no qkv bias, LayerScale (computed in float32) on both residual branches, and no final norm. The cls
token is dropped from the output, so a clip gives 4·256 = 1024 tokens, merged by the same ToMe projector
(`hico.vision.Projector`) to 64.

Parameter names match the released checkpoint under `model.vision_tower.vision_tower.` (no `.encoder.`
level, unlike UMT; see `hico.checkpoint`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from hico.config import VisionConfig
from hico.qwen2 import RMSNorm
from hico.vision import Mlp, PatchEmbed, assign_kernels, origin_attention, sdpa_attention

# -- kernels, picked by name (`hico.kernels.choose_kernels`) ------------------------------------


def flash_varlen_attention(qkv: torch.Tensor, scale: float) -> torch.Tensor:
    """flash-attn's variable-length packed kernel, as the official InternVideo2 tower calls it (CUDA, half
    precision): every clip one sequence of the same length. qkv: [B, N, 3, H, hd] -> [B, N, H·hd]."""
    from flash_attn import flash_attn_varlen_qkvpacked_func  # optional, CUDA only

    b, n = qkv.shape[:2]
    starts = torch.arange(0, (b + 1) * n, n, dtype=torch.int32, device=qkv.device)  # [B + 1] sequence offsets
    out = flash_attn_varlen_qkvpacked_func(qkv.flatten(0, 1), starts, n, 0.0, softmax_scale=scale, causal=False)
    return out.reshape(b, n, -1)  # [B·N, H, hd] -> [B, N, H·hd]


AttentionFn = Callable[[torch.Tensor, float], torch.Tensor]
ATTENTION_FUNCTIONS: dict[str, AttentionFn] = {
    "origin": origin_attention,  # the official non-flash branch, op for op
    "flash_v2": flash_varlen_attention,
    "sdpa": sdpa_attention,
}


# -- modules ------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Joint attention over a clip's tokens (and its cls token). qkv has no bias; q and k are RMS-normalised
    over all heads together, before the head split."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        c = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.scale = (c // self.num_heads) ** -0.5
        self.qkv = nn.Linear(c, 3 * c, bias=False)
        self.q_norm = RMSNorm(c, cfg.layer_norm_eps)
        self.k_norm = RMSNorm(c, cfg.layer_norm_eps)
        self.proj = nn.Linear(c, c)
        self.attention_fn: AttentionFn = origin_attention

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, c).unbind(2)  # each [B, N, C]
        qkv = torch.stack([self.q_norm(q), self.k_norm(k), v], dim=2)  # [B, N, 3, C]
        return self.proj(self.attention_fn(qkv.reshape(b, n, 3, self.num_heads, -1), self.scale))


class LayerScale(nn.Module):
    """A learned per-channel gain, applied in float32 and rounded back (the official `force_fp32`)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() * self.weight.float()).to(x.dtype)


class Block(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.norm1 = RMSNorm(cfg.hidden_size, cfg.layer_norm_eps)
        self.attn = Attention(cfg)
        self.ls1 = LayerScale(cfg.hidden_size)
        self.norm2 = RMSNorm(cfg.hidden_size, cfg.layer_norm_eps)
        self.mlp = Mlp(cfg)  # fc1, exact GELU, fc2
        self.ls2 = LayerScale(cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class InternVideo2Encoder(nn.Module):
    """InternVideo2 ViT over 4-frame clips: patch embed, cls token, learned positions, blocks; cls dropped."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        c = cfg.hidden_size
        self.patch_embed = PatchEmbed(cfg)  # Conv3d (1, 14, 14), as UMT's
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.tokens_per_clip, c))  # cls + (t, h, w)
        # The single-image table (cls + one frame). Stored in the checkpoint; clips of 4 frames never use it.
        self.img_pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.tokens_per_frame, c))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))

    def init_buffers(self) -> None:
        """Nothing derived: the positions are parameters, loaded with the rest."""

    def set_kernels(self, patch_embed: str, attention: str) -> None:
        """Pick the patch-embedding and attention kernels by name (`hico.kernels`)."""
        assign_kernels(self, patch_embed, attention, ATTENTION_FUNCTIONS)

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        """clips: [B, T, 3, S, S] normalized pixels -> [B, T·L, C] features (cls token dropped)."""
        if clips.shape[1] != self.cfg.num_frames:
            raise ValueError(f"expected clips of {self.cfg.num_frames} frames, got {list(clips.shape)}")
        x = self.patch_embed(clips.to(self.patch_embed.proj.weight.dtype))  # [B, T·L, C]
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1)  # [B, 1 + T·L, C]
        x = x + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return x[:, 1:]
