"""Ask over memory: pick clips, build the timestamped prompt, run the LLM on stored tokens.

No frame is decoded or encoded here: the visual tokens come straight from memory. With one stream
and no wall-clock anchors, the prompt is exactly the official one for the same sampled frames, so
the answer equals the offline model's.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from hico.config import DropConfig
from hico.generation import Generated, generate_text
from hico.model import VideoChatFlashModel
from hico.prompt import PromptVideo, build_prompt, describe, find_marker
from memory.index import ClipIndex
from memory.records import ClipMeta, Clock
from memory.store import MemoryStore
from vcflash.serve.errors import Invalid, NotFound, excerpt
from vcflash.serve.settings import ReasonerSettings

log = logging.getLogger(__name__)

Selection = Literal["uniform", "retrieval"]


class AskError(Invalid):
    """A question that cannot be asked as posed (maps to INVALID_ARGUMENT)."""


@dataclass(frozen=True)
class AskParams:
    stream_ids: Sequence[str]
    question: str
    start: float | None = None
    end: float | None = None
    clock: Clock = "media"
    max_frames: int = 512
    selection: Selection = "uniform"
    dropout: str | None = None  # None: the checkpoint's config; "off", "recommended" or TYPE:LAYERS:RATIOS
    max_new_tokens: int | None = None  # None: 512, or the server's limit when lower
    do_sample: bool = False
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    history: Sequence[tuple[str, str]] = ()
    anchors: bool = True  # state the wall-clock span in the prompt

    def validate(self, limits: ReasonerSettings) -> None:
        """Every size and marker check, before anything is tokenized or embedded; messages quote no more than a
        short excerpt of what the client sent."""
        if not self.stream_ids:
            raise AskError("name at least one stream")
        if len(set(self.stream_ids)) != len(self.stream_ids) or len(self.stream_ids) > limits.max_ask_streams:
            raise AskError(f"give 1 to {limits.max_ask_streams} distinct streams, got {len(self.stream_ids)} names")
        if len(self.question) > limits.max_question_chars:
            raise AskError(
                f"the question has {len(self.question)} characters; the limit is {limits.max_question_chars}"
            )
        if not self.question.strip():
            raise AskError("the question is empty")
        if len(self.history) > limits.max_history_turns:
            raise AskError(f"history has {len(self.history)} turns; the limit is {limits.max_history_turns}")
        total = 0
        for i, turn in enumerate(self.history):
            for role, text in zip(("question", "answer"), turn, strict=True):
                if len(text) > limits.max_history_turn_chars:
                    raise AskError(
                        f"history turn {i + 1}'s {role} has {len(text)} characters; "
                        f"the limit is {limits.max_history_turn_chars}"
                    )
                total += len(text)
        if total > limits.max_history_chars:
            raise AskError(f"the history has {total} characters; the limit is {limits.max_history_chars}")
        for where, text in [("the question", self.question)] + [
            (f"history turn {i + 1}'s {role}", text)
            for i, turn in enumerate(self.history)
            for role, text in zip(("question", "answer"), turn, strict=True)
        ]:
            if (marker := find_marker(text)) is not None:
                raise AskError(f"{where} contains the reserved prompt marker {marker}; remove it")
        if self.start is not None and self.end is not None and self.start >= self.end:
            raise AskError(f"inverted time range: start {self.start} >= end {self.end}")
        if not 4 <= self.max_frames <= limits.max_ask_frames or self.max_frames % 4:
            raise AskError(f"max_frames must be a multiple of 4 in [4, {limits.max_ask_frames}], got {self.max_frames}")
        if self.max_new_tokens is not None and not 1 <= self.max_new_tokens <= limits.max_new_tokens:
            raise AskError(f"max_new_tokens must be in [1, {limits.max_new_tokens}], got {self.max_new_tokens}")
        if self.dropout is not None and len(self.dropout) > 64:  # its parse error would quote it whole
            raise AskError(f"dropout spec {excerpt(self.dropout)} is too long (expected TYPE:LAYERS:RATIOS)")
        if self.selection not in ("uniform", "retrieval"):
            raise AskError(f"unknown selection {excerpt(self.selection)}")


@dataclass(frozen=True)
class Evidence:
    clip: ClipMeta
    retrieved: bool = False
    score: float = 0.0


@dataclass
class AskResult:
    answer: str
    evidence: list[Evidence]
    frames: int
    visual_tokens: int
    prompt_tokens: int
    new_tokens: int
    duration_s: float
    timings: dict[str, float] = field(default_factory=dict)
    note: str = ""


def uniform_pick(n: int, k: int) -> list[int]:
    """k of n items, the middle of k equal segments: the official frame sampler, applied to clips."""
    if n <= k:
        return list(range(n))
    edges = np.linspace(0, n, k + 1).astype(int)
    return [int((a + b - 1) // 2) for a, b in zip(edges[:-1], edges[1:], strict=True)]


def backbone_size(n: int, budget: int, retrieval: bool) -> int:
    """Clips picked uniformly out of n in range: all that fit the budget, else the budget, or half of it when
    retrieval fills the rest."""
    return budget if n <= budget or not retrieval else max(1, budget // 2)


def select_clips(backbone: list[ClipMeta], budget: int, hits: Sequence[tuple[ClipMeta, float]] = ()) -> list[Evidence]:
    """Up to `budget` clips in time order: the uniform backbone (uniform_pick of the range, in order), then the
    best-scoring retrieval hits (in range, best first) that are not in it."""
    chosen = {m.seq: Evidence(m) for m in backbone}
    for meta, score in hits:
        if len(chosen) >= budget:
            break
        if meta.seq not in chosen:
            chosen[meta.seq] = Evidence(meta, retrieved=True, score=score)
    if len(chosen) == len(backbone):
        return list(chosen.values())
    return sorted(chosen.values(), key=lambda e: e.clip.media_start)


@dataclass
class Segment:
    """One camera's part of the prompt."""

    stream_id: str
    evidence: list[Evidence]
    duration_s: float  # covered by the clips in range, as the official message's video length
    tokens: torch.Tensor  # [C, 64, D]

    @property
    def frames(self) -> int:
        return sum(len(e.clip.frame_media_times) for e in self.evidence)

    def video(self, anchors: bool, label: bool) -> PromptVideo:
        """How the prompt states this part: optionally its camera's name and its wall-clock span."""
        span = (self.evidence[0].clip.wall_start, self.evidence[-1].clip.wall_end) if anchors else None
        return PromptVideo(self.frames, self.duration_s, self.stream_id if label else None, span)

    def describe(self, anchors: bool, label: bool) -> str:
        return describe(self.video(anchors, label))


class Reasoner:
    """Answers questions over the memory with one shared model; one question at a time on the model."""

    def __init__(
        self,
        model: VideoChatFlashModel,
        store: MemoryStore,
        index: ClipIndex | None = None,
        limits: ReasonerSettings | None = None,
        model_lock: threading.Lock | None = None,
    ) -> None:
        self.model, self.store, self.index = model, store, index
        self.limits = limits or ReasonerSettings()
        self.model_lock = model_lock or threading.Lock()

    def ask(self, p: AskParams) -> Iterator[str | AskResult]:
        """Yield answer text pieces, then the AskResult. Raises AskError, NotFound (unknown stream)
        or memory.store.MemoryUnavailable before the first piece."""
        t0 = time.perf_counter()
        p.validate(self.limits)  # every size first: nothing below sees an oversized input
        drop = self._resolve_drop(p.dropout)
        segments = self.select(p)
        timings = {"select": time.perf_counter() - t0}
        if not segments:
            where = ", ".join(p.stream_ids)  # known streams: select refused unknown names
            answer = f"There is no video from {where} in that time range."
            yield answer
            yield AskResult(answer, [], 0, 0, 0, 0, 0.0, timings, f"no clips from {where} in the requested range")
            return

        embeds, visual = self.prompt(p, segments)
        timings["prompt"] = time.perf_counter() - t0 - timings["select"]
        out = Generated()
        pieces = []
        with self.model_lock:
            for piece in generate_text(
                self.model,
                embeds,
                visual,
                drop,
                out,
                seed=p.seed,
                do_sample=p.do_sample,
                max_new_tokens=p.max_new_tokens or min(512, self.limits.max_new_tokens),
                temperature=p.temperature,
                top_p=p.top_p,
                top_k=p.top_k,
                repetition_penalty=p.repetition_penalty,
            ):
                pieces.append(piece)
                yield piece
        timings |= out.timings
        timings["total"] = time.perf_counter() - t0
        evidence = [e for s in segments for e in s.evidence]
        yield AskResult(
            answer="".join(pieces).strip(),
            evidence=evidence,
            frames=sum(s.frames for s in segments),
            visual_tokens=len(visual),
            prompt_tokens=embeds.shape[1],
            new_tokens=len(out.ids),
            duration_s=sum(s.duration_s for s in segments),
            timings=timings,
        )

    def _resolve_drop(self, dropout: str | None) -> DropConfig | None:
        try:
            return self.model.resolve_drop(dropout or None)
        except ValueError as e:
            raise AskError(str(e)) from e

    def select(self, p: AskParams) -> list[Segment]:
        """Validate the question and pick each stream's clips, with their tokens from memory.

        Reads only what it uses: the store finds how many clips overlap the range and which sit at the uniform
        positions from its time index, then reads those clips' metadata and tokens (MemoryStore.pick), so the
        cost follows the budget, not the memory's size. Retrieval adds one FAISS search (over the range's seqs,
        when a range is given) and the hits' metadata.
        """
        p.validate(self.limits)
        known = set(self.store.streams())
        unknown = [s for s in p.stream_ids if s not in known]
        if unknown:
            raise NotFound(f"unknown stream(s): {', '.join(excerpt(s) for s in unknown[:4])}")
        budget = max(1, p.max_frames // 4 // len(p.stream_ids))  # clips per stream
        segments = []
        retrieval = p.selection == "retrieval" and self.index is not None
        ranged = p.start is not None or p.end is not None
        for stream_id in p.stream_ids:
            picked = self.store.pick(
                stream_id,
                p.start,
                p.end,
                lambda n: uniform_pick(n, backbone_size(n, budget, retrieval)),
                clock=p.clock,
                with_seqs=retrieval and ranged,  # the range's seqs restrict the search
            )
            if not picked.clips:
                continue
            hits: list[tuple[ClipMeta, float]] = []
            if retrieval and picked.count > budget:
                assert self.index is not None
                stale = self.index.sync_stream(self.store, stream_id)
                query = self._question_vector(p.question)
                found = self.index.search(stream_id, query, k=budget + stale, among=picked.seqs)
                metas = self.store.metas(stream_id, [seq for seq, _ in found])
                hits = [(metas[seq], score) for seq, score in found if seq in metas]  # evicted since: left out
                if not hits:  # nothing indexed yet: the whole budget uniform, as without retrieval
                    picked = self.store.pick(
                        stream_id, p.start, p.end, lambda n: uniform_pick(n, budget), clock=p.clock
                    )
            evidence = select_clips(picked.clips, budget, hits)
            tokens = torch.from_numpy(self.store.tokens(stream_id, [e.clip.seq for e in evidence]))
            first, last = picked.first or picked.clips[0], picked.last or picked.clips[-1]
            segments.append(Segment(stream_id, evidence, last.media_end - first.media_start, tokens))
        return segments

    def _question_vector(self, question: str) -> np.ndarray:
        """The question in the clips' space: the mean of its token embeddings (the LLM input space)."""
        with torch.no_grad():
            v = self.model.embed_text(self.model.tokenize(question)).float().mean(0).cpu().numpy()
        return v / max(float(np.linalg.norm(v)), 1e-12)

    def prompt(self, p: AskParams, segments: list[Segment]) -> tuple[torch.Tensor, torch.Tensor]:
        """inputs_embeds and visual positions of the official prompt; several cameras each get a
        label before their tokens."""
        many = len(segments) > 1
        try:
            prompt = build_prompt(p.question, [s.video(p.anchors, label=many) for s in segments], p.history)
        except ValueError as e:  # a reserved marker (validate refuses them first)
            raise AskError(str(e)) from e
        # Tokenize and count before any embedding lookup: a prompt over the limit costs no tensor memory.
        parts: list[list[int] | torch.Tensor] = [
            segments[piece].tokens if isinstance(piece, int) else self.model.tokenize(piece) for piece in prompt
        ]
        visual = sum(int(np.prod(part.shape[:-1])) for part in parts if isinstance(part, torch.Tensor))
        total = visual + sum(len(part) for part in parts if not isinstance(part, torch.Tensor))
        limit = min(self.limits.max_prompt_tokens, self.model.config.max_length)
        if total > limit:
            raise AskError(
                f"the prompt has {total} tokens ({visual} visual); the limit is {limit}: "
                "ask over fewer frames or with a shorter history"
            )
        try:
            return self.model.embed(parts)
        except ValueError as e:  # over the context length
            raise AskError(str(e)) from e
