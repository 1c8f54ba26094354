"""Qwen2 decoder with progressive visual dropout (VideoChat-Flash's "video-level compression").

Module and parameter names mirror transformers' `modeling_qwen2.py`, so the released weights load
as they are. Departures from stock Qwen2 are marked `# VideoChat-Flash:`. Batch size is 1: one
question over one spliced video at a time, as in the official inference path.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from hico.config import DropConfig, TextConfig
from hico.drop import attention_keep, keep_visual, uniform_keep

# -- attention kernels, picked by name ----------------------------------------------------------


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """q: [B, H, S, hd], k/v: [B, Hkv, S', hd] -> [B, H, S, hd]."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        s, t = scores.shape[-2:]
        scores = scores.masked_fill(torch.ones(s, t, dtype=torch.bool, device=q.device).triu(t - s + 1), -math.inf)
    return scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype) @ v


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    from flash_attn import flash_attn_func  # optional, CUDA only

    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal)
    return out.transpose(1, 2)


AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool], torch.Tensor]
ATTENTION_FUNCTIONS: dict[str, AttentionFn] = {
    "sdpa": sdpa_attention,
    "eager": eager_attention,
    "flash_attention_2": flash_attention,
}


# -- KV cache -----------------------------------------------------------------------------------


class KVCache:
    """Per-layer keys and values, preallocated for `reserve` more tokens after the prefill.

    Layers hold different lengths once visual tokens are dropped, so each layer keeps its own.
    """

    def __init__(self, num_layers: int, reserve: int = 0) -> None:
        self.reserve = reserve
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.lengths = [0] * num_layers

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k, v [B, Hkv, S, hd]; return this layer's keys and values so far."""
        n, s = self.lengths[layer], k.shape[2]
        buf_k, buf_v = self.keys[layer], self.values[layer]
        if buf_k is None or buf_v is None or n + s > buf_k.shape[2]:
            shape = (*k.shape[:2], n + s + self.reserve, k.shape[3])
            new_k, new_v = k.new_empty(shape), v.new_empty(shape)
            if buf_k is not None and buf_v is not None:
                new_k[:, :, :n], new_v[:, :, :n] = buf_k[:, :, :n], buf_v[:, :, :n]
            self.keys[layer], self.values[layer] = buf_k, buf_v = new_k, new_v
        buf_k[:, :, n : n + s], buf_v[:, :, n : n + s] = k, v
        self.lengths[layer] = n + s
        return buf_k[:, :, : n + s], buf_v[:, :, : n + s]


# -- modules ------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class RotaryEmbedding(nn.Module):
    # VideoChat-Flash: plain RoPE; config `rope_scaling` is ignored, as in the official code.
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.dim, self.base = cfg.head_dim, cfg.rope_theta
        self.register_buffer("inv_freq", self._inv_freq(), persistent=False)

    def _inv_freq(self) -> torch.Tensor:
        return 1.0 / self.base ** (torch.arange(0, self.dim, 2, dtype=torch.int64).float() / self.dim)

    def init_buffers(self) -> None:
        self.inv_freq = self._inv_freq().to(self.inv_freq.device)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [S] -> cos, sin [S, hd] in `dtype` (computed in float32)."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


class Qwen2Attention(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        )
        self.q_proj = nn.Linear(cfg.hidden_size, self.num_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=False)
        self.attention_fn: AttentionFn = sdpa_attention

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        return x.reshape(*x.shape[:2], n, self.head_dim).transpose(1, 2)  # [B, n, S, hd]

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        q = apply_rope(self._heads(self.q_proj(x), self.num_heads), cos, sin)
        k = apply_rope(self._heads(self.k_proj(x), self.num_kv_heads), cos, sin)
        v = self._heads(self.v_proj(x), self.num_kv_heads)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        # Causal only within a fresh prompt; one decoded token sees the whole cache.
        out = self.attention_fn(q, k, v, x.shape[1] > 1)
        return self.o_proj(out.transpose(1, 2).flatten(2))

    def queries(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Normed hidden states [B, S, D] -> queries [B, H, S, hd] after RoPE."""
        return apply_rope(self._heads(self.q_proj(x), self.num_heads), cos, sin)

    def keys(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Normed hidden states [B, S, D] -> keys [B, Hkv, S, hd] after RoPE (as cached)."""
        return apply_rope(self._heads(self.k_proj(x), self.num_kv_heads), cos, sin)

    def last_token_attention(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Head-mean attention of each sequence's last token over all its tokens, [B, S]: the visual-drop
        ranking (B = 1 in dropout; `hico.relevance` scores a batch of windows with it)."""
        # VideoChat-Flash: the scores of the official rank-and-drop step (softmax in float32).
        q = self.queries(x[:, -1:], cos[-1:], sin[-1:])
        k = self.keys(x, cos, sin).repeat_interleave(self.num_heads // self.num_kv_heads, dim=1)
        w = (q @ k.transpose(-1, -2)) / math.sqrt(self.head_dim)  # [B, H, 1, S]
        w = w.softmax(dim=-1, dtype=torch.float32).to(q.dtype)
        return w[:, :, 0].mean(1)


class Qwen2MLP(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Qwen2DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = Qwen2Attention(cfg, layer_idx)
        self.mlp = Qwen2MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen2Model(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Qwen2DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        cache: KVCache | None = None,
        visual: torch.Tensor | None = None,
        drop: DropConfig | None = None,
    ) -> torch.Tensor:
        """inputs_embeds: [1, S, D] -> hidden states [1, S', D] (S' < S after visual dropout).

        `visual` holds the sorted positions [N] of the visual tokens (one span for a single video).

        A fresh forward (empty or no cache) may drop visual tokens after the layers that `drop`
        names; a decode step (S == 1) continues each layer at its own cached length.
        """
        h = inputs_embeds
        fresh = cache is None or cache.lengths[0] == 0
        if not fresh and h.shape[1] != 1:
            raise ValueError("a cached sequence continues one token at a time")
        counts = drop.counts(len(visual)) if drop and visual is not None else []
        drop_at = {layer - 1: stage for stage, layer in enumerate(drop.layers)} if counts else {}
        pos = 0 if fresh else cache.lengths[0]
        cos, sin = self.rotary_emb(torch.arange(pos, pos + h.shape[1], device=h.device), h.dtype)
        for i, layer in enumerate(self.layers):
            if not fresh and cache.lengths[i] != pos:
                # VideoChat-Flash: after a drop, later layers number positions contiguously.
                pos = cache.lengths[i]
                cos, sin = self.rotary_emb(torch.arange(pos, pos + 1, device=h.device), h.dtype)
            h = layer(h, cos, sin, cache)
            if fresh and i in drop_at:
                assert visual is not None and drop is not None
                h, visual = self.drop_visual(drop, drop_at[i], counts, i + 1, h, cos, sin, visual)
                cos, sin = self.rotary_emb(torch.arange(h.shape[1], device=h.device), h.dtype)
        return self.norm(h)

    def drop_visual(
        self,
        drop: DropConfig,
        stage: int,
        counts: list[int],
        rank_layer: int,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        visual: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One dropout stage: keep counts[stage + 1] of the counts[stage] visual tokens at `visual`."""
        keep = counts[stage + 1]
        if drop.stage_type(stage) == "uniform":
            keep_idx = uniform_keep(counts[stage], keep)
        else:
            # Ranked with the *next* layer's norm and q/k projections, from the last prompt token.
            scores = self.rank(rank_layer, h, cos, sin)[0]
            keep_idx = attention_keep(scores[visual], keep)
        return keep_visual(h, visual, keep_idx)

    def rank(self, layer: int, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Text-guided dropout's score at `layer`: the head-mean attention [B, S] of each sequence's last token,
        from layer `layer`'s input norm and q/k projections applied to `h` [B, S, D], the hidden state entering
        that layer."""
        block = self.layers[layer]
        return block.self_attn.last_token_attention(block.input_layernorm(h), cos, sin)

    def attention_at(self, inputs_embeds: torch.Tensor, layer: int) -> torch.Tensor:
        """`rank` at `layer` on fresh prompts [B, S, D] (no cache, no dropout), running only the layers below it:
        [B, S] float in the model's dtype. The windowed relevance scan (`hico.relevance`) calls this."""
        return self.rank(layer, *self.hidden_at(inputs_embeds, layer))

    def hidden_at(
        self, inputs_embeds: torch.Tensor, layer: int, positions: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The hidden states [B, S, D] entering `layer` of fresh prompts (no cache, no dropout), running only the
        layers below it, with the RoPE cos and sin of `positions` [S] (default 0..S-1) they were computed with."""
        if not 0 <= layer < len(self.layers):
            raise ValueError(f"scoring layer {layer} is out of range for an LLM of {len(self.layers)} layers")
        h = inputs_embeds
        if positions is None:
            positions = torch.arange(h.shape[1], device=h.device)
        cos, sin = self.rotary_emb(positions, h.dtype)
        for block in self.layers[:layer]:
            h = block(h, cos, sin, None)
        return h, cos, sin


class Qwen2ForCausalLM(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = Qwen2Model(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the output projection with the embedding table (Qwen2.5-1.5B); redo after `to_empty`."""
        if self.cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def set_attention(self, name: str) -> None:
        if name not in ATTENTION_FUNCTIONS:
            raise ValueError(f"unknown attention implementation {name!r}; choose from {list(ATTENTION_FUNCTIONS)}")
        for layer in self.model.layers:
            layer.self_attn.attention_fn = ATTENTION_FUNCTIONS[name]

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        cache: KVCache | None = None,
        visual: torch.Tensor | None = None,
        drop: DropConfig | None = None,
        last_only: bool = True,
    ) -> torch.Tensor:
        """Float32 logits [1, S', V], or [1, 1, V] for the last position only (all generation needs)."""
        h = self.model(inputs_embeds, cache, visual, drop)
        if last_only:
            h = h[:, -1:]
        return self.lm_head(h).float()


def decoder_layer(
    layer: nn.Module,
    h: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    past: tuple[torch.Tensor, ...] | None,
    outputs: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`Qwen2DecoderLayer.forward` over h [B, S, D], optionally after a shared prefix's keys and values `past`
    ([1, Hkv, P, hd] each, seen by every row). Returns the new h and this part's keys and values; with `outputs`
    False only the keys and values are computed and h comes back as it was (a shared prefix's last layer: later
    positions read its keys and values, nothing reads its outputs)."""
    attn = layer.self_attn
    x = layer.input_layernorm(h)
    k = attn.keys(x, cos, sin)  # [B, Hkv, S, hd]
    v = attn._heads(attn.v_proj(x), attn.num_kv_heads)
    if not outputs:
        return h, k, v
    q = attn.queries(x, cos, sin)  # [B, H, S, hd]
    if past is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    else:
        pk, pv = (t.expand(h.shape[0], -1, -1, -1) for t in past)
        s, p = h.shape[1], pk.shape[2]
        mask = torch.ones(s, p + s, dtype=torch.bool, device=h.device).tril(p)  # the whole prefix, causal after it
        out = F.scaled_dot_product_attention(
            q, torch.cat([pk, k], 2), torch.cat([pv, v], 2), attn_mask=mask, enable_gqa=True
        )
    h = h + attn.o_proj(out.transpose(1, 2).flatten(2))
    return h + layer.mlp(layer.post_attention_layernorm(h)), k, v
