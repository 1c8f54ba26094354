"""The model's own relevance of each clip to a question: the windowed attention scan.

The score is the one text-guided dropout ranks visual tokens by (`Qwen2Model.rank`): the head-mean attention of
the prompt's last token (the `\\n` after `<|im_start|>assistant`) to each visual token at a chosen LLM layer,
computed with that layer's input norm and q/k projections on the hidden state entering it. Here it is computed
for clips that do not fit one prompt: the clips go in windows of consecutive clips, each window is spliced
into the official prompt for the question (the same text for every window, so windows batch), and each batch
of windows is prefilled only up to the scoring layer. A clip's score is the attention mass on its tokens.

Pure functions of the model and the tokens; nothing here knows where the tokens come from (`reasoner.engine`
reads them from memory).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

from hico.config import TextConfig
from hico.model import VideoChatFlashModel
from hico.prompt import PromptVideo, build_prompt

# The model card's recommended dropout ranks by attention at layer 18 of 28 (`DROP_PRESETS["recommended"]`):
# a layer deep enough for the question to have read the video, shallow enough to prefill cheaply.
REFERENCE_LAYER, REFERENCE_DEPTH = 18, 28


def default_layer(text: TextConfig) -> int:
    """The scoring layer for an LLM: the model card's attention-ranking layer (18 of 28), scaled to its depth and
    rounded down (18 for the released 28-layer LLMs; 2 for the 4-layer tiny model, where the needle recall of layer
    2 measured 50% in the top 8 clips against 15% for layer 3: BENCHMARKS.md, needle in a haystack)."""
    n = text.num_hidden_layers
    return min(max(1, n * REFERENCE_LAYER // REFERENCE_DEPTH), n - 1) if n > 1 else 0


@dataclass(frozen=True)
class WindowPrompt:
    """The text around every window's visual tokens: token ids before and after them."""

    before: list[int]
    after: list[int]

    @classmethod
    def build(cls, model: VideoChatFlashModel, question: str, frames: int, duration_s: float) -> WindowPrompt:
        """The official single-video prompt for `question` over a window of `frames` frames lasting `duration_s`,
        tokenized piece by piece as `VideoChatFlashModel.embed_prompt` does."""
        before, video, after = build_prompt(question, [PromptVideo(frames, duration_s)])
        assert video == 0 and isinstance(before, str) and isinstance(after, str)
        return cls(model.tokenize(before), model.tokenize(after))


@torch.inference_mode()
def scan(
    model: VideoChatFlashModel, windows: torch.Tensor, prompt: WindowPrompt, layer: int, batch_size: int = 8
) -> torch.Tensor:
    """Per-token relevance of windows of visual tokens [W, N, D] (each window spliced into `prompt`): the
    attention of the prompt's last token to each of the window's N visual tokens at `layer`, head-mean, as
    text-guided dropout computes it on that prompt. Returns float32 [W, N]; batches of `batch_size` windows are
    prefilled together, each only up to `layer`."""
    if windows.ndim != 3:
        raise ValueError(f"expected windows [W, N, D], got {list(windows.shape)}")
    llm = model.llm.model
    before, after = model.embed_text(prompt.before), model.embed_text(prompt.after)
    start, n = len(prompt.before), windows.shape[1]
    out = []
    for i in range(0, len(windows), batch_size):
        chunk = windows[i : i + batch_size].to(model.device, model.dtype)
        b = len(chunk)
        x = torch.cat([before.expand(b, -1, -1), chunk, after.expand(b, -1, -1)], dim=1)
        out.append(llm.attention_at(x, layer)[:, start : start + n].float())
    return torch.cat(out) if out else torch.empty(0, n)


def clip_scores(token_scores: torch.Tensor, tokens_per_clip: int) -> torch.Tensor:
    """Per-token scores [W, C * T] -> per-clip scores [W, C]: the attention mass on each clip's T tokens."""
    w, n = token_scores.shape
    if n % tokens_per_clip:
        raise ValueError(f"{n} tokens per window is not a whole number of {tokens_per_clip}-token clips")
    return token_scores.reshape(w, n // tokens_per_clip, tokens_per_clip).sum(-1)


def window_starts(n: int, size: int) -> list[int]:
    """Where windows of `size` clips start so that they cover n clips with every window full: back to back,
    the last one ending at the last clip (overlapping the one before when size does not divide n)."""
    if n <= size:
        return [0]
    starts = list(range(0, n - size + 1, size))
    return starts if starts[-1] + size == n else [*starts, n - size]


@torch.inference_mode()
def scan_clips(
    model: VideoChatFlashModel,
    n: int,
    load: Callable[[int, int], torch.Tensor],
    question: str,
    *,
    window: int = 16,
    layer: int | None = None,
    batch_size: int = 8,
    duration_s: float | None = None,
    hold: Callable[[], AbstractContextManager[object]] = nullcontext,
) -> torch.Tensor:
    """Relevance float32 [n] of n consecutive clips, `load(a, b)` giving clips a..b-1's tokens [b - a, T, D].

    Windows of `window` clips (fewer when n is smaller) cover the clips back to back, the last one ending at the
    newest clip; a clip two windows overlap keeps its score from the earlier one. Every window states the same
    time message: `duration_s` (default: 1 s per frame) over the window's frames. Tokens are loaded a batch of
    windows at a time, so memory follows `batch_size * window`, not n. `layer` defaults to `default_layer`.
    `hold()` is entered around each batch's model work (a lock the model is shared under is then released between
    batches).
    """
    if n <= 0:
        return torch.empty(0)
    size = min(window, n)
    frames = size * model.config.vision.num_frames
    prompt = WindowPrompt.build(model, question, frames, float(frames) if duration_s is None else duration_s)
    layer = default_layer(model.config.text) if layer is None else layer
    scores = torch.full((n,), float("nan"))
    starts = window_starts(n, size)
    for i in range(0, len(starts), batch_size):
        batch: Sequence[int] = starts[i : i + batch_size]
        tokens = torch.stack([load(s, s + size) for s in batch])  # [b, size, T, D]
        with hold():
            per_clip = clip_scores(scan(model, tokens.flatten(1, 2), prompt, layer, batch_size), tokens.shape[2]).cpu()
        for s, row in zip(batch, per_clip, strict=True):
            fresh = scores[s : s + size].isnan()
            scores[s : s + size][fresh] = row[fresh]
    return scores


# -- the key index (option (b)): keys computed once per clip, one query per question ---------------------------


def context_prefix(model: VideoChatFlashModel) -> list[int]:
    """The fixed context a clip's keys are computed in: the official prompt's text before the video (the system
    prompt and the user turn's opening), the same for every question."""
    before = build_prompt("?", [PromptVideo(4, 4.0)])[0]
    assert isinstance(before, str)
    return model.tokenize(before)


def clip_keys(
    model: VideoChatFlashModel, clips: torch.Tensor, layer: int, batch_size: int = 32, grad: bool = False
) -> torch.Tensor:
    """Keys at `layer` of clips [C, T, D], each spliced alone after `context_prefix` (the official prompt for that
    one clip, which its tokens cannot see past: attention is causal): [C, Hkv, T, hd] in the model's dtype, after
    RoPE at the clip's positions in that prompt. A clip's keys depend on nothing else, so they are computed once
    when it is first needed (or written) and kept. `grad`: differentiable (the relevance loss of `hico.train`);
    otherwise computed in inference mode."""
    with torch.inference_mode(not grad):
        llm = model.llm.model
        prefix = model.embed_text(context_prefix(model))
        block, p = llm.layers[layer], len(prefix)
        out = []
        for i in range(0, len(clips), batch_size):
            chunk = clips[i : i + batch_size].to(model.device, model.dtype)
            h, cos, sin = llm.hidden_at(torch.cat([prefix.expand(len(chunk), -1, -1), chunk], dim=1), layer)
            out.append(block.self_attn.keys(block.input_layernorm(h[:, p:]), cos[p:], sin[p:]))
        return torch.cat(out) if out else torch.empty(0)


def question_query(model: VideoChatFlashModel, question: str, layer: int, grad: bool = False) -> torch.Tensor:
    """The query [H, hd] at `layer` of the last token of the official prompt for `question` over one clip (4
    frames), the clip's tokens left out: the text is prefilled alone, at the positions it has in that prompt, so
    the query meets every clip's keys (`clip_keys`) at the relative positions of a one-clip prompt. `grad`: as
    `clip_keys`."""
    tokens = model.config.vision.num_frames * 16  # one clip's visual tokens
    before, _, after = build_prompt(question, [PromptVideo(model.config.vision.num_frames, 4.0)])
    assert isinstance(before, str) and isinstance(after, str)
    b, a = model.tokenize(before), model.tokenize(after)
    with torch.inference_mode(not grad):
        llm = model.llm.model
        positions = torch.cat([torch.arange(len(b)), torch.arange(len(b) + tokens, len(b) + tokens + len(a))])
        h, cos, sin = llm.hidden_at(model.embed_text(b + a)[None], layer, positions.to(model.device))
        block = llm.layers[layer]
        return block.self_attn.queries(block.input_layernorm(h[:, -1:]), cos[-1:], sin[-1:])[0, :, 0]


def key_block(keys: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """N clips' keys [N, Hkv, T, hd] laid out as the product with a query wants them: [Hkv, hd, N * T], each kv
    head's keys one [hd, tokens] matrix, clip-major columns (clip i's tokens are columns i*T .. i*T + T - 1)."""
    n, hkv, t, hd = keys.shape
    return keys.permute(1, 3, 0, 2).to(dtype).reshape(hkv, hd, n * t)  # [Hkv, hd, N * T]


def block_scores(query: torch.Tensor, block: torch.Tensor, tokens_per_clip: int, grad: bool = False) -> torch.Tensor:
    """Per-clip relevance float32 [N] from a question's query [H, hd] and N clips' keys laid out by `key_block`
    ([Hkv, hd, N * T], a view is fine): the head-mean attention of the query over every token of the N clips
    together (one softmax per head, as if they shared one context without text), summed per clip. One batched
    GEMM in the block's dtype, the softmax in float32. On the CPU, or with `grad` differentiable on the block's
    device."""
    hkv, hd, nt = block.shape
    if not nt:
        return torch.empty(0)
    if nt % tokens_per_clip:
        raise ValueError(f"{nt} key columns is not a whole number of {tokens_per_clip}-token clips")
    with torch.inference_mode(not grad):
        q = query.to(block.device, block.dtype).reshape(hkv, -1, hd)  # head h uses kv head h // (H / Hkv), as repeat_kv
        logits = torch.bmm(q, block).float()  # [Hkv, H / Hkv, N * T]
        w = (logits / hd**0.5).reshape(-1, nt).softmax(dim=-1)  # [H, N * T]
        scores = w.mean(0).reshape(nt // tokens_per_clip, tokens_per_clip).sum(-1)
        return scores if grad else scores.cpu()


@torch.inference_mode()
def key_scores(query: torch.Tensor, keys: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """`block_scores` of N clips' keys [N, Hkv, T, hd] (float32 [N]), laid out `chunk` clips at a time into one
    float32 block first. `reasoner.keys.KeyIndex` keeps its keys in that layout already and calls `block_scores`."""
    if not len(keys):
        return torch.empty(0)
    n, hkv, t, hd = keys.shape
    block = torch.empty(hkv, hd, n * t, device=keys.device)
    for i in range(0, n, chunk):
        block[:, :, i * t : (i + chunk) * t] = key_block(keys[i : i + chunk])
    return block_scores(query, block, t)
