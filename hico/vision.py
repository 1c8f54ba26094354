"""UMT video encoder and the ToMe + MLP projector: 4-frame clips -> 64 tokens in LLM space.

Parameter names match the released checkpoints under `model.vision_tower.vision_tower.encoder.`
and `model.mm_projector.` (see `hico.checkpoint`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hico.config import VideoChatFlashConfig, VisionConfig
from hico.merge import merge_clip_tokens


def sinusoid_table(num_positions: int, dim: int) -> torch.Tensor:
    """The fixed 1-D sin/cos table [num_positions, dim], built in float64 as the original."""
    pos = np.arange(num_positions, dtype=np.float64)[:, None]
    angle = pos / np.power(10000, 2 * (np.arange(dim) // 2) / dim)
    angle[:, 0::2] = np.sin(angle[:, 0::2])
    angle[:, 1::2] = np.cos(angle[:, 1::2])
    return torch.tensor(angle, dtype=torch.float32)


def clip_position_table(cfg: VisionConfig) -> torch.Tensor:
    """Position table [num_frames·grid², C] over (t, h, w) order.

    UMT was pretrained at 224 px (a 14x14 grid); at other sizes the per-frame 14x14 block of the
    1-D table is resized bicubically in float32 to the new grid (448 px: 28x28). Time is untouched.
    """
    t, c, p, g = cfg.num_frames, cfg.hidden_size, cfg.pretrain_image_size // cfg.patch_size, cfg.grid
    table = sinusoid_table(t * p * p, c)
    if g != p:
        table = table.reshape(t, p, p, c).permute(0, 3, 1, 2)  # [T, C, p, p]
        table = F.interpolate(table, size=(g, g), mode="bicubic", align_corners=False)
        table = table.permute(0, 2, 3, 1).reshape(t * g * g, c)
    return table


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        p = cfg.patch_size
        # A tubelet of one frame: the checkpoint stores a Conv3d kernel (1, p, p).
        self.proj = nn.Conv3d(3, cfg.hidden_size, kernel_size=(1, p, p), stride=(1, p, p))

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        b, t = frames.shape[:2]  # frames: [B, T, 3, S, S]
        # Frames are independent, so a 2-D convolution over B·T frames is the same and faster.
        x = F.conv2d(frames.flatten(0, 1), self.proj.weight.squeeze(2), self.proj.bias, self.proj.stride[1:])
        return x.reshape(b, t, x.shape[1], -1).permute(0, 1, 3, 2).flatten(1, 2)  # [B, T·L, C]


class Attention(nn.Module):
    """Joint attention over all tokens of a clip; q and v have biases, k has none."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        c = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.qkv = nn.Linear(c, 3 * c, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(c))
        self.v_bias = nn.Parameter(torch.zeros(c))
        self.proj = nn.Linear(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
        qkv = F.linear(x, self.qkv.weight, bias).reshape(b, n, 3, self.num_heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, N, hd]
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = Mlp(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class UMTEncoder(nn.Module):
    """UMT ViT over 4-frame clips: patch embed, fixed sin/cos positions, blocks, final LayerNorm."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.vision_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.final_layer_norm_eps)
        self.register_buffer("pos_embed", clip_position_table(cfg), persistent=False)

    def init_buffers(self) -> None:
        """Recompute the position table (after building on the meta device)."""
        self.pos_embed = clip_position_table(self.cfg).to(self.pos_embed.device)

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        """clips: [B, T, 3, S, S] normalized pixels -> [B, T·L, C] features."""
        x = self.patch_embed(clips)
        x = x + self.pos_embed.to(x.dtype)
        for block in self.blocks:
            x = block(x)
        return self.vision_layernorm(x)


class Projector(nn.Module):
    """ToMe merge of a clip's tokens to 16 per frame, then Linear-GELU-Linear into the LLM width."""

    def __init__(self, cfg: VideoChatFlashConfig) -> None:
        super().__init__()
        self.target = cfg.tokens_per_clip
        self.num_heads = cfg.vision.num_attention_heads  # the merge metric is a mean over these heads
        self.mlp = nn.Sequential(
            nn.Linear(cfg.mm_hidden_size, cfg.text.hidden_size),
            nn.GELU(),
            nn.Linear(cfg.text.hidden_size, cfg.text.hidden_size),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features: [B, T·L, C] -> [B, 64, D]."""
        merged, _ = merge_clip_tokens(features, self.target, self.num_heads)
        return self.mlp(merged)
