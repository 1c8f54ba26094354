"""Decoding settings from generation_config.json, the per-step token choice, and the answer as streamed text."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

import torch
from transformers import PreTrainedTokenizerBase
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

if TYPE_CHECKING:
    from hico.config import DropConfig
    from hico.model import VideoChatFlashModel


DEFAULT_MAX_NEW_TOKENS = 512  # when generation_config.json sets none (the released checkpoints' case)


@dataclass(frozen=True)
class GenerationSettings:
    """The knobs of generation_config.json that change the output, with the official defaults.

    `do_sample` defaults to greedy as in the official README and evaluation, whatever the file says;
    the repetition penalty from the file applies either way (the released 2B uses 1.1).
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    eos_token_ids: tuple[int, ...] = ()
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS  # generation_config.json's `max_new_tokens` when it has one
    # Degenerate output stops early (0 turns a rule off); see `generate_text`.
    stop_blank_tokens: int = 32  # this many tokens in a row that decode to whitespace (or nothing)
    stop_repeat_tokens: int = 64  # the same token this many times in a row

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.do_sample and self.temperature <= 0:
            raise ValueError(f"sampling needs temperature > 0, got {self.temperature}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.stop_blank_tokens < 0 or self.stop_repeat_tokens < 0:
            raise ValueError("stop_blank_tokens and stop_repeat_tokens must be >= 0 (0: off)")

    @classmethod
    def from_file(cls, path: Path) -> Self:
        d: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
        eos = d.get("eos_token_id", [])
        return cls(
            temperature=float(d.get("temperature", 1.0)),
            top_k=d.get("top_k"),
            top_p=d.get("top_p"),
            repetition_penalty=float(d.get("repetition_penalty", 1.0)),
            eos_token_ids=tuple(eos if isinstance(eos, list) else [eos]),
            max_new_tokens=int(d.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS),
        )

    def override(self, **kwargs: Any) -> Self:
        """A copy with the non-None keyword arguments applied (unknown names are an error)."""
        names = {f.name for f in fields(self)}
        unknown = set(kwargs) - names
        if unknown:
            raise TypeError(f"unknown generation settings {sorted(unknown)}; known: {sorted(names)}")
        return replace(self, **{k: v for k, v in kwargs.items() if v is not None})

    def processors(self) -> LogitsProcessorList:
        """Repetition penalty, then (when sampling) temperature, top-k and top-p, as HF generate orders them."""
        procs = LogitsProcessorList()
        if self.repetition_penalty != 1.0:
            procs.append(RepetitionPenaltyLogitsProcessor(self.repetition_penalty))
        if self.do_sample:
            if self.temperature != 1.0:
                procs.append(TemperatureLogitsWarper(self.temperature))
            if self.top_k:
                procs.append(TopKLogitsWarper(self.top_k))
            if self.top_p is not None and self.top_p < 1.0:
                procs.append(TopPLogitsWarper(self.top_p))
        return procs


def next_token(
    logits: torch.Tensor,
    generated: torch.Tensor,
    settings: GenerationSettings,
    processors: LogitsProcessorList,
    generator: torch.Generator | None = None,
) -> int:
    """Choose the next token. logits: [1, V] float32; generated: [1, n] ids produced so far.

    As in the official path (HF generate over inputs_embeds), the repetition penalty sees only the
    generated tokens, not the prompt.
    """
    scores = processors(generated, logits)
    if not settings.do_sample:
        return int(scores.argmax(-1))
    probs = scores.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def detokenize(tokenizer: PreTrainedTokenizerBase, ids: Iterable[int]) -> Iterator[str]:
    """Text pieces as tokens arrive, decoding a short window per token rather than the whole answer.

    A piece is held back while it ends inside a UTF-8 character; the window restarts after each piece
    that was emitted whole, so byte-level tokens that merge across a boundary still decode right.
    """
    seen: list[int] = []
    start = 0  # the window's first token; text before it was already emitted
    for token in ids:
        seen.append(token)
        text = tokenizer.decode(seen[start:], skip_special_tokens=True)
        if text and not text.endswith("\ufffd"):
            yield text
            start = len(seen)


@dataclass
class Generated:
    """What `generate_text` produced, filled in as it streams."""

    ids: list[int] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)  # seconds: prefill (to the first token), generate
    stop: str = ""  # why it ended: eos, length, blank or repeat (degenerate output), "" while running
    max_new_tokens: int = 0  # the limit in force, for progress bars


class Degenerate:
    """The generic rule that ends degenerate output early: `blank` tokens in a row that decode to whitespace
    only (or nothing), or one token `repeat` times in a row. A model writing real text never meets either
    (Qwen tokenizes a run of spaces or newlines as one token; the repetition penalty works against repeats),
    while a random or broken one would otherwise fill `max_new_tokens` with newlines."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, blank: int, repeat: int) -> None:
        self.tokenizer, self.blank, self.repeat = tokenizer, blank, repeat
        self._is_blank: dict[int, bool] = {}
        self._blanks = self._repeats = 0
        self._last: int | None = None

    def __call__(self, token: int) -> str:
        """After each token: "blank" or "repeat" when the output has degenerated, else ""."""
        if (is_blank := self._is_blank.get(token)) is None:
            is_blank = self._is_blank[token] = not self.tokenizer.decode([token], skip_special_tokens=True).strip()
        self._blanks = self._blanks + 1 if is_blank else 0
        self._repeats = self._repeats + 1 if token == self._last else 1
        self._last = token
        if self.blank and self._blanks >= self.blank:
            return "blank"
        if self.repeat and self._repeats >= self.repeat:
            return "repeat"
        return ""


def generate_text(
    model: VideoChatFlashModel,
    inputs_embeds: torch.Tensor,
    visual: torch.Tensor | None,
    drop: DropConfig | None,
    out: Generated,
    *,
    seed: int | None = None,
    **settings: Any,
) -> Iterator[str]:
    """Yield the answer's text pieces as tokens arrive, recording ids and timings in `out`.

    `settings` override the checkpoint's generation settings (None keeps a value); `seed` seeds sampling.
    Generation ends at an end-of-sequence token, at `max_new_tokens`, or early on degenerate output
    (`Degenerate`: `stop_blank_tokens` whitespace tokens or `stop_repeat_tokens` equal tokens in a row);
    `out.stop` says which.
    """
    config = model.generation.override(**settings)
    generator = torch.Generator(model.device).manual_seed(seed) if seed is not None else None
    degenerate = Degenerate(model.tokenizer, config.stop_blank_tokens, config.stop_repeat_tokens)
    out.max_new_tokens = config.max_new_tokens
    t0 = time.perf_counter()

    def tokens() -> Iterator[int]:
        steps = model.generate(inputs_embeds, visual, config, drop, generator)
        for token in steps:
            if not out.ids:
                out.timings["prefill"] = time.perf_counter() - t0
            out.ids.append(token)
            yield token
            if token in config.eos_token_ids:
                out.stop = "eos"
            elif reason := degenerate(token):
                out.stop = reason
                steps.close()  # type: ignore[attr-defined]
                return
        out.stop = out.stop or "length"

    yield from detokenize(model.tokenizer, tokens())
    out.timings["generate"] = time.perf_counter() - t0
