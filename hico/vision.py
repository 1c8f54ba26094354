"""UMT video encoder and the ToMe + MLP projector: 4-frame clips -> 64 tokens in LLM space.

Parameter names match the released checkpoints under `model.vision_tower.vision_tower.encoder.`
and `model.mm_projector.` (see `hico.checkpoint`).
"""

from __future__ import annotations

from collections.abc import Callable

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


# -- kernels, picked by name (`hico.kernels.choose_kernels`) ------------------------------------


def conv3d_patch_embed(proj: nn.Conv3d, frames: torch.Tensor) -> torch.Tensor:
    """The official call: the Conv3d over [B, 3, T, S, S]. frames: [B, T, 3, S, S] -> [B, T·L, C]."""
    return proj(frames.permute(0, 2, 1, 3, 4)).flatten(2).transpose(1, 2)


def conv2d_patch_embed(proj: nn.Conv3d, frames: torch.Tensor) -> torch.Tensor:
    """Tubelets are one frame, so a 2-D convolution over the B·T frames is the same sum (faster on CPU in float32;
    it may round differently from the Conv3d on other backends)."""
    b, t = frames.shape[:2]
    x = F.conv2d(frames.flatten(0, 1), proj.weight.squeeze(2), proj.bias, proj.stride[1:])  # [B·T, C, g, g]
    return x.reshape(b, t, x.shape[1], -1).permute(0, 1, 3, 2).flatten(1, 2)  # [B, T·L, C]


def origin_attention(qkv: torch.Tensor, scale: float) -> torch.Tensor:
    """The official non-flash formulation, op for op: q·scale @ kᵀ, softmax in the input dtype, @ v.

    qkv: [B, N, 3, H, hd] -> [B, N, H·hd].
    """
    b, n = qkv.shape[:2]
    q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [B, H, N, hd]
    attn = ((q * scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # [B, H, N, N]
    return (attn @ v).transpose(1, 2).reshape(b, n, -1)


def flash_attention(qkv: torch.Tensor, scale: float) -> torch.Tensor:
    """flash-attn's packed kernel, as the official tower calls it (CUDA, bfloat16/float16)."""
    from flash_attn import flash_attn_qkvpacked_func  # optional, CUDA only

    return flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=scale, causal=False).flatten(2)


def sdpa_attention(qkv: torch.Tensor, scale: float) -> torch.Tensor:
    b, n = qkv.shape[:2]
    q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [B, H, N, hd]
    return F.scaled_dot_product_attention(q, k, v, scale=scale).transpose(1, 2).reshape(b, n, -1)


PatchEmbedFn = Callable[[nn.Conv3d, torch.Tensor], torch.Tensor]
AttentionFn = Callable[[torch.Tensor, float], torch.Tensor]
PATCH_EMBED_FUNCTIONS: dict[str, PatchEmbedFn] = {"conv3d": conv3d_patch_embed, "conv2d": conv2d_patch_embed}
ATTENTION_FUNCTIONS: dict[str, AttentionFn] = {
    "origin": origin_attention,
    "flash_v2": flash_attention,
    "sdpa": sdpa_attention,
}


def assign_kernels(tower: nn.Module, patch_embed: str, attention: str, attentions: dict[str, AttentionFn]) -> None:
    """Set a tower's patch-embedding kernel and every block's attention kernel by name, from `attentions` (each
    tower has its own registry); ValueError naming the choices for an unknown name."""
    if patch_embed not in PATCH_EMBED_FUNCTIONS or attention not in attentions:
        raise ValueError(
            f"unknown vision kernels: patch embedding {patch_embed!r} (choose from {list(PATCH_EMBED_FUNCTIONS)}), "
            f"attention {attention!r} (choose from {list(attentions)})"
        )
    tower.patch_embed.patch_embed_fn = PATCH_EMBED_FUNCTIONS[patch_embed]
    for block in tower.blocks:
        block.attn.attention_fn = attentions[attention]


# -- modules ------------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        p = cfg.patch_size
        # A tubelet of one frame: the checkpoint stores a Conv3d kernel (1, p, p).
        self.proj = nn.Conv3d(3, cfg.hidden_size, kernel_size=(1, p, p), stride=(1, p, p))
        self.patch_embed_fn: PatchEmbedFn = conv3d_patch_embed

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """frames: [B, T, 3, S, S] -> [B, T·L, C], tokens in (t, h, w) order."""
        return self.patch_embed_fn(self.proj, frames)


class Attention(nn.Module):
    """Joint attention over all tokens of a clip; q and v have biases, k has none."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        c = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.scale = (c // self.num_heads) ** -0.5
        self.qkv = nn.Linear(c, 3 * c, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(c))
        self.v_bias = nn.Parameter(torch.zeros(c))
        self.proj = nn.Linear(c, c)
        self.attention_fn: AttentionFn = origin_attention

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
        qkv = F.linear(x, self.qkv.weight, bias).reshape(b, n, 3, self.num_heads, -1)  # [B, N, 3, H, hd]
        return self.proj(self.attention_fn(qkv, self.scale))


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

    def set_kernels(self, patch_embed: str, attention: str) -> None:
        """Pick the patch-embedding and attention kernels by name (`hico.kernels`)."""
        assign_kernels(self, patch_embed, attention, ATTENTION_FUNCTIONS)

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
