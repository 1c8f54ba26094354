"""Yes/no questions scored from one prefill, no text generated: P(yes) at the first answer position.

The score of a question over a video is the model's own answer distribution at the first position it would
generate (after `<|im_start|>assistant\\n` of the official prompt), restricted to its "yes" and "no" tokens:
P(yes) = softmax over (logsumexp of the yes tokens' logits, logsumexp of the no tokens' logits). Every casing
that the tokenizer keeps as one token counts (`answer_tokens`): Qwen2's tokenizer has "Yes", "yes", "No" and "no"
as single tokens, the tiny model's only the lower-case ones it was trained to answer with.

Many questions about the same video share the prompt up to the question: the system prompt, the user turn's
opening, the visual tokens and the time message. That prefix is prefilled once (`prefill`, its per-layer keys
and values kept) and every question's remaining tokens run batched against it (`continue_prefix`), so K questions
cost one pass over the video plus K short suffixes, not K full prefills.

No visual-token dropout: text-guided dropout ranks visual tokens by the attention of the prompt's last token, so
it differs per question and a dropped prefix could not be shared; a short alert window (16 frames: 256 visual
tokens) gains little from it anyway. The scores therefore equal a full prefill with dropout off
(`VideoChatFlashModel.logits(..., compress=False)`), which a checkpoint without dropout (the tiny one) also runs
by default.

Pure functions of the model and the tokens (`reasoner.alerts` reads the tokens from memory).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hico.model import VideoChatFlashModel
from hico.prompt import PromptVideo, build_prompt
from hico.qwen2 import decoder_layer  # over a shared prefix's keys and values, as training runs it

YES, NO = ("Yes", "yes"), ("No", "no")  # answer spellings: at the start of the answer, no space before them


@dataclass(frozen=True)
class AnswerTokens:
    """The token ids that start a "yes" and a "no" answer."""

    yes: tuple[int, ...]
    no: tuple[int, ...]


def answer_tokens(model: VideoChatFlashModel) -> AnswerTokens:
    """The single-token spellings of YES and NO in the model's tokenizer; ValueError when either has none (a
    spelling split into pieces is left out: its first piece also starts other words)."""

    def single(words: Sequence[str]) -> tuple[int, ...]:
        return tuple(sorted({ids[0] for ids in map(model.tokenize, words) if len(ids) == 1}))

    yes, no = single(YES), single(NO)
    if not yes or not no or set(yes) & set(no):
        raise ValueError(f"the tokenizer has no single-token yes/no answer (yes: {yes}, no: {no} of {YES + NO})")
    return AnswerTokens(yes, no)


def yes_probability(logits: torch.Tensor, tokens: AnswerTokens) -> torch.Tensor:
    """Logits [..., V] -> P(yes) [...] (float32): the softmax over the yes and no tokens' logsumexp."""
    logits = logits.float()
    yes = logits[..., list(tokens.yes)].logsumexp(-1)
    no = logits[..., list(tokens.no)].logsumexp(-1)
    return torch.sigmoid(yes - no)


# -- one prefix, many suffixes ----------------------------------------------------------------------------------


@dataclass
class Prefix:
    """A prefilled prefix: its length and every layer's keys and values ([1, Hkv, P, hd] each)."""

    length: int
    past: list[tuple[torch.Tensor, torch.Tensor]]


@torch.inference_mode()
def prefill(model: VideoChatFlashModel, embeds: torch.Tensor) -> Prefix:
    """Run the LLM over prompt embeddings [1, P, D] (no dropout) and keep each layer's keys and values."""
    llm = model.llm.model
    cos, sin = llm.rotary_emb(torch.arange(embeds.shape[1], device=embeds.device), embeds.dtype)
    h, past = embeds, []
    for layer in llm.layers:
        h, k, v = decoder_layer(layer, h, cos, sin, None)
        past.append((k, v))
    return Prefix(embeds.shape[1], past)


@torch.inference_mode()
def continue_prefix(model: VideoChatFlashModel, prefix: Prefix, suffix: torch.Tensor) -> torch.Tensor:
    """Final hidden states [K, S, D] of K sequences that go on after `prefix` with suffix embeddings [K, S, D]
    (right-padded: no real position sees a pad), at positions P..P+S-1 as in one prompt."""
    llm = model.llm.model
    p, s = prefix.length, suffix.shape[1]
    cos, sin = llm.rotary_emb(torch.arange(p, p + s, device=suffix.device), suffix.dtype)
    h = suffix
    for layer, past in zip(llm.layers, prefix.past, strict=True):
        h, _, _ = decoder_layer(layer, h, cos, sin, past)
    return llm.norm(h)


def common_prefix(rows: Sequence[Sequence[int]]) -> int:
    """The length of the longest common prefix of id lists, short of the shortest list's last id (every row keeps
    at least one id of its own, the one whose logits are read)."""
    n = min(len(r) for r in rows) - 1
    for i in range(max(n, 0)):
        if any(r[i] != rows[0][i] for r in rows):
            return i
    return max(n, 0)


@torch.inference_mode()
def score_questions(
    model: VideoChatFlashModel,
    visual: torch.Tensor,
    questions: Sequence[str],
    video: PromptVideo,
    tokens: AnswerTokens | None = None,
) -> torch.Tensor:
    """P(yes) float32 [K] of K yes/no questions over visual tokens [C, 64, D], each in the official single-video
    prompt (`build_prompt(question, [video])`, tokenized piece by piece as `embed_prompt` does).

    The text before the video and the ids every question's text after it shares (the time message) join the
    visual tokens in one prefix, prefilled once; the K rest-of-prompts run as one batch against its cache. Raises
    ValueError for an empty question, a reserved marker, or a prompt over the model's context length.
    """
    if not questions:
        return torch.empty(0)
    tokens = tokens or answer_tokens(model)
    pieces = [build_prompt(q, [video]) for q in questions]
    before = pieces[0][0]
    assert isinstance(before, str) and all(p[0] == before and p[1] == 0 and len(p) == 3 for p in pieces)
    afters = [model.tokenize(p[2]) for p in pieces]  # type: ignore[arg-type]
    shared = common_prefix(afters)
    embeds, _ = model.embed([model.tokenize(before), visual, afters[0][:shared]])  # [1, P, D]
    longest = embeds.shape[1] + max(len(a) for a in afters) - shared
    if longest > model.config.max_length:
        raise ValueError(f"a prompt of {longest} tokens exceeds the model's {model.config.max_length}")
    rests = [a[shared:] for a in afters]
    width = max(len(r) for r in rests)
    suffix = torch.stack([F.pad(model.embed_text(r), (0, 0, 0, width - len(r))) for r in rests])  # [K, S, D]
    h = continue_prefix(model, prefill(model, embeds), suffix)  # [K, S, D]
    last = h[torch.arange(len(rests)), torch.tensor([len(r) - 1 for r in rests])]  # [K, D]: the answer position
    return yes_probability(model.llm.lm_head(last), tokens).cpu()
