"""Ask over memory: pick clips, build the timestamped prompt, run the LLM on stored tokens; Search: rank moments.

No frame is decoded or encoded here: the visual tokens come straight from memory. With one stream
and no wall-clock anchors, the prompt is exactly the official one for the same sampled frames, so
the answer equals the offline model's.

Selection, when a range holds more clips than the frame budget: "uniform" (the official sampler over clips),
"retrieval" (a uniform backbone plus the FAISS heuristic's hits), "scan" (coarse-to-fine: every clip in range
scored by the model's own attention, `hico.relevance`, then the best packed with their neighbours, a uniform
backbone and the latest clips) or "index" (the same packing, scores from the key index, `reasoner.keys`). All but
"uniform" also rank moments (`Moment`), which Ask returns beside the answer and Search returns alone.
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
from hico.relevance import block_scores, clip_keys, default_layer, question_query, scan_clips
from hico.warmup import warm_up_model
from memory.index import ClipIndex
from memory.records import ClipMeta, Clock
from memory.store import MemoryStore, Picked
from reasoner.keys import KeyIndex, KeyIndexer, StoredKeys
from vcflash.serve.errors import Invalid, NotFound, excerpt
from vcflash.serve.settings import ReasonerSettings

log = logging.getLogger(__name__)

Selection = Literal["uniform", "retrieval", "scan", "index"]
SELECTIONS: tuple[Selection, ...] = ("uniform", "retrieval", "scan", "index")
SCORED: tuple[Selection, ...] = ("scan", "index")  # the model's own relevance: coarse-to-fine
# The needle evaluation's winner (`vcflash eval niah`, README "How an Ask is answered"): the needle among the clips
# looked at far more often than uniform sampling, at uniform's cost once a clip's keys exist.
DEFAULT_SELECTION: Selection = "index"
MOMENTS = 10  # moments an Ask returns
MAX_MOMENTS = 100  # the most a Search may ask for
SCAN_WINDOW = 16  # clips per window of the relevance scan (64 frames, the official sampler's minimum)
SCAN_BATCH = 8  # windows prefilled together


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
    selection: Selection = DEFAULT_SELECTION
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
        if self.selection not in SELECTIONS:
            raise AskError(f"unknown selection {excerpt(self.selection)}")


@dataclass(frozen=True)
class Evidence:
    clip: ClipMeta
    retrieved: bool = False  # chosen for its score (a hit or a hit's neighbour), not for coverage
    score: float = 0.0  # the clip's relevance, when the selection scored it


@dataclass(frozen=True)
class Moment:
    """A run of consecutive clips of one stream that ranked for a question; `score` is its best clip's."""

    first: ClipMeta
    last: ClipMeta
    score: float

    @property
    def stream_id(self) -> str:
        return self.first.stream_id


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
    moments: list[Moment] = field(default_factory=list)  # ranked, best first ("retrieval" and "scan")


@dataclass
class SearchResult:
    moments: list[Moment]  # best first
    clips_scored: int  # clips the ranking looked at (the scan: every clip in range)
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


def pack(n: int, budget: int, scores: np.ndarray, *, neighbours: int = 1) -> dict[int, str]:
    """Coarse-to-fine: which of n scored clips (positions in time order) fill a budget of clips, and why.

    All n when they fit ("all"). Otherwise the newest budget // 8 ("recent": what is happening now), a uniform
    backbone of budget // 4 ("backbone": coverage of the whole range), then the best-scoring clips ("hit"), each
    followed by its temporal neighbours up to `neighbours` clips away ("neighbour": context before and after),
    until the budget is full. Returns {position: why}, ascending by position (time order). NaN scores rank last.
    """
    if n <= budget:
        return dict.fromkeys(range(n), "all")
    chosen: dict[int, str] = dict.fromkeys(range(n - budget // 8, n), "recent")
    for i in uniform_pick(n, budget // 4):
        chosen.setdefault(i, "backbone")
    ranked = np.argsort(-np.nan_to_num(np.asarray(scores, dtype=np.float64), nan=-np.inf), kind="stable")
    around = [0] + [d * s for d in range(1, neighbours + 1) for s in (-1, 1)]
    for hit in ranked.tolist():
        if len(chosen) >= budget:
            break
        for d in around:
            j = hit + d
            if len(chosen) < budget and 0 <= j < n and j not in chosen:
                chosen[j] = "hit" if d == 0 else "neighbour"
    return dict(sorted(chosen.items()))


def rank_moments(scored: Sequence[tuple[ClipMeta, float]], limit: int) -> list[Moment]:
    """The best `limit` clips as moments, best first: top clips that follow each other (consecutive seqs of one
    stream) join into one moment scored by its best clip, so a moment may span several clips."""
    finite = [(m, s) for m, s in scored if np.isfinite(s)]
    top = sorted(finite, key=lambda ms: -ms[1])[:limit]
    top.sort(key=lambda ms: (ms[0].stream_id, ms[0].seq))
    moments: list[Moment] = []
    for meta, score in top:
        last = moments[-1] if moments else None
        if last is not None and last.stream_id == meta.stream_id and last.last.seq + 1 == meta.seq:
            moments[-1] = Moment(last.first, meta, max(last.score, score))
        else:
            moments.append(Moment(meta, meta, score))
    return sorted(moments, key=lambda m: -m.score)


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
        # where the model builds them: float32 on a CPU, the model's dtype on an accelerator; loaded from memory first
        self.keys = KeyIndex(stored=StoredKeys.of(store, model) if self.limits.keys_stored else None)
        self.scans_capped = 0  # scans over `limits.max_scan_clips` clips, scored by the key index instead

    def warm_up(self) -> float:
        """`warm_up_model` under the model lock, before the service takes questions; the seconds it took."""
        with self.model_lock:
            seconds = warm_up_model(self.model)
        log.info("model warmed up in %.2f s", seconds)
        return seconds

    def ask(self, p: AskParams) -> Iterator[str | AskResult]:
        """Yield answer text pieces, then the AskResult. Raises AskError, NotFound (unknown stream)
        or memory.store.MemoryUnavailable before the first piece."""
        t0 = time.perf_counter()
        p.validate(self.limits)  # every size first: nothing below sees an oversized input
        drop = self._resolve_drop(p.dropout)
        moments: list[Moment] = []
        segments = self.select(p, moments)
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
            moments=moments,
        )

    def _resolve_drop(self, dropout: str | None) -> DropConfig | None:
        try:
            return self.model.resolve_drop(dropout or None)
        except ValueError as e:
            raise AskError(str(e)) from e

    def select(self, p: AskParams, moments: list[Moment] | None = None) -> list[Segment]:
        """Validate the question and pick each stream's clips, with their tokens from memory; `moments`, when
        given, receives the moments the selection ranked (best first, all streams together).

        Uniform and retrieval read only what they use: the store finds how many clips overlap the range and which
        sit at the uniform positions from its time index, then reads those clips' metadata and tokens
        (MemoryStore.pick), so the cost follows the budget, not the memory's size. Retrieval adds one FAISS search
        (over the range's seqs, when a range is given) and the hits' metadata. The scan reads every clip in range
        (metadata, and tokens a batch of windows at a time) and prefills them up to the scoring layer.
        """
        self._check_streams(p)
        budget = max(1, p.max_frames // 4 // len(p.stream_ids))  # clips per stream
        segments = []
        scored: list[tuple[ClipMeta, float]] = []
        for stream_id in p.stream_ids:
            if p.selection in SCORED:
                segment = self._select_scan(p, stream_id, budget, scored)
            else:
                segment = self._select_uniform(p, stream_id, budget, scored)
            if segment is not None:
                segments.append(segment)
        if moments is not None:
            moments.extend(rank_moments(scored, MOMENTS))
        return segments

    def _check_streams(self, p: AskParams) -> None:
        p.validate(self.limits)
        known = set(self.store.streams())
        unknown = [s for s in p.stream_ids if s not in known]
        if unknown:
            raise NotFound(f"unknown stream(s): {', '.join(excerpt(s) for s in unknown[:4])}")

    def _segment(self, stream_id: str, picked: Picked, evidence: list[Evidence]) -> Segment:
        tokens = torch.from_numpy(self.store.tokens(stream_id, [e.clip.seq for e in evidence]))
        first, last = picked.first or picked.clips[0], picked.last or picked.clips[-1]
        return Segment(stream_id, evidence, last.media_end - first.media_start, tokens)

    def _select_uniform(
        self, p: AskParams, stream_id: str, budget: int, scored: list[tuple[ClipMeta, float]]
    ) -> Segment | None:
        """Uniform, or the heuristic retrieval: a uniform backbone plus the FAISS hits."""
        retrieval = p.selection == "retrieval" and self.index is not None
        ranged = p.start is not None or p.end is not None
        picked = self.store.pick(
            stream_id,
            p.start,
            p.end,
            lambda n: uniform_pick(n, backbone_size(n, budget, retrieval)),
            clock=p.clock,
            with_seqs=retrieval and ranged,  # the range's seqs restrict the search
        )
        if not picked.clips:
            return None
        hits: list[tuple[ClipMeta, float]] = []
        if retrieval and picked.count > budget:
            hits = self._heuristic_hits(p, stream_id, picked, budget)
            scored.extend(hits)
            if not hits:  # nothing indexed yet: the whole budget uniform, as without retrieval
                picked = self.store.pick(stream_id, p.start, p.end, lambda n: uniform_pick(n, budget), clock=p.clock)
        return self._segment(stream_id, picked, select_clips(picked.clips, budget, hits))

    def _heuristic_hits(self, p: AskParams, stream_id: str, picked: Picked, k: int) -> list[tuple[ClipMeta, float]]:
        """The FAISS heuristic's best k clips of the range (`picked.seqs`, or the whole stream), best first."""
        assert self.index is not None
        stale = self.index.sync_stream(self.store, stream_id)
        query = self._question_vector(p.question)
        found = self.index.search(stream_id, query, k=k + stale, among=picked.seqs)
        metas = self.store.metas(stream_id, [seq for seq, _ in found])
        return [(metas[seq], score) for seq, score in found if seq in metas][:k]  # evicted since: left out

    def _score_range(self, p: AskParams, stream_id: str) -> tuple[Picked, np.ndarray, np.ndarray]:
        """Every clip that overlaps the range: (the pick, their seqs int64 [n] and relevance float32 [n], in time
        order). The scan reads every clip's metadata (`picked.clips`); the key index only their seqs (`picked.clips`
        empty), so a caller reads the metadata of the clips it keeps (`_metas`). A scan over more than
        `limits.max_scan_clips` clips is scored by the key index instead (counted in `scans_capped`), so an Ask's
        cost stops growing with the range."""
        cap = self.limits.max_scan_clips  # a scan over more clips than this is scored by the key index instead
        every = p.selection == "scan"
        picked = self.store.pick(
            stream_id, p.start, p.end, lambda n: range(n) if every and n <= cap else [], clock=p.clock, with_seqs=True
        )
        if every and picked.count <= cap:
            seqs = np.array([m.seq for m in picked.clips], dtype=np.int64)
            return picked, seqs, self.score_clips(stream_id, picked.clips, p.question)
        seqs = picked.seqs if picked.seqs is not None else np.empty(0, np.int64)
        if every:
            self.scans_capped += 1
            log.info("scan of %d clips of %s over the cap (%d): key index scores", len(seqs), stream_id, cap)
        return picked, seqs, self.index_scores(stream_id, seqs.tolist(), p.question)

    def _metas(self, stream_id: str, picked: Picked, seqs: np.ndarray, positions: Sequence[int]) -> list[ClipMeta]:
        """The metadata of the clips at `positions` (evicted since the pick: left out)."""
        if len(picked.clips) == len(seqs):
            return [picked.clips[i] for i in positions]
        held = self.store.metas(stream_id, [int(seqs[i]) for i in positions])
        return [held[int(seqs[i])] for i in positions if int(seqs[i]) in held]

    def _top(
        self, stream_id: str, picked: Picked, seqs: np.ndarray, scores: np.ndarray, k: int
    ) -> list[tuple[ClipMeta, float]]:
        """The k best-scoring clips with their scores, for `rank_moments` (the best k of several streams are among
        each stream's best k)."""
        order = np.argsort(-np.nan_to_num(scores.astype(np.float64), nan=-np.inf), kind="stable")[:k]
        by_seq = {m.seq: m for m in self._metas(stream_id, picked, seqs, sorted(order.tolist()))}
        return [(by_seq[int(seqs[i])], float(scores[i])) for i in order if int(seqs[i]) in by_seq]

    def index_scores(self, stream_id: str, seqs: Sequence[int], question: str) -> np.ndarray:
        """The key index's relevance of clips (float32 [n]): one query for the question against their keys, the keys
        of clips not indexed yet built from memory's tokens first (`KeyIndex.built` counts them)."""
        if not len(seqs):
            return np.empty(0, np.float32)

        def build(missing: list[int]) -> torch.Tensor:
            return self.clip_keys(torch.from_numpy(self.store.tokens(stream_id, missing)))

        generation = self.store.stats(stream_id).generation  # a stream deleted and made again restarts its seqs
        with self.model_lock:
            keys = self.keys.get(stream_id, seqs, build, generation)  # [Hkv, hd, n * T], a view when a run
            query = question_query(self.model, question, default_layer(self.model.config.text))
        return block_scores(query, keys, keys.shape[2] // len(seqs)).numpy()

    def clip_keys(self, tokens: torch.Tensor) -> torch.Tensor:
        """The key index's keys [C, Hkv, T, hd] of clips' tokens [C, T, D] (the caller holds the model lock)."""
        return clip_keys(self.model, tokens, default_layer(self.model.config.text))

    def key_indexer(self, poll_s: float = 0.5) -> KeyIndexer:
        """The background work that builds the key index's keys as clips are written (`reasoner.keys.KeyIndexer`),
        under this reasoner's model lock."""
        return KeyIndexer(self.keys, self.store, self.clip_keys, self.model_lock, poll_s)

    def score_clips(self, stream_id: str, metas: Sequence[ClipMeta], question: str) -> np.ndarray:
        """The model's relevance of consecutive clips (`hico.relevance.scan_clips`), their tokens read from memory
        a batch of windows at a time; a clip evicted meanwhile scores NaN."""
        seqs = [m.seq for m in metas]
        lost: set[int] = set()

        def load(a: int, b: int) -> torch.Tensor:
            try:
                return torch.from_numpy(self.store.tokens(stream_id, seqs[a:b]))
            except KeyError:  # evicted while scanning: zeros in its place, scored NaN below
                held = self.store.metas(stream_id, seqs[a:b])
                rows = [self.store.tokens(stream_id, [s])[0] if s in held else None for s in seqs[a:b]]
                shape = next(r for r in rows if r is not None).shape if any(r is not None for r in rows) else None
                if shape is None:
                    raise
                lost.update(a + i for i, r in enumerate(rows) if r is None)
                return torch.from_numpy(np.stack([np.zeros(shape, np.float16) if r is None else r for r in rows]))

        if not metas:
            return np.empty(0, np.float32)
        size = min(SCAN_WINDOW, len(metas))
        clip_s = float(np.median([m.media_end - m.media_start for m in metas]))
        scores = scan_clips(
            self.model,
            len(metas),
            load,
            question,
            window=SCAN_WINDOW,
            batch_size=SCAN_BATCH,
            duration_s=round(clip_s * size, 2),
            hold=lambda: self.model_lock,  # released between batches: the encoder may share the model
        ).numpy()
        scores[list(lost)] = np.nan
        return scores

    def _select_scan(
        self, p: AskParams, stream_id: str, budget: int, scored: list[tuple[ClipMeta, float]]
    ) -> Segment | None:
        """Coarse-to-fine: score every clip in range, then `pack` the budget (all of them when they fit)."""
        picked, seqs, scores = self._score_range(p, stream_id)
        if not len(seqs):
            return None
        scored.extend(self._top(stream_id, picked, seqs, scores, MOMENTS))
        packed = pack(len(seqs), budget, scores)
        metas = {m.seq: m for m in self._metas(stream_id, picked, seqs, list(packed))}
        evidence = [
            Evidence(metas[int(seqs[i])], retrieved=why in ("hit", "neighbour"), score=float(np.nan_to_num(scores[i])))
            for i, why in packed.items()
            if int(seqs[i]) in metas
        ]
        if not evidence:
            return None
        return self._segment(stream_id, picked, evidence)

    def search(self, p: AskParams, limit: int = MOMENTS) -> SearchResult:
        """The moments of the streams' range that best answer the question, best first, without generating.

        "retrieval" ranks with the FAISS heuristic, "index" with the key index, any other selection with the
        model's scan (every clip in range). Raises AskError, NotFound (unknown stream) or MemoryUnavailable, as
        Ask."""
        t0 = time.perf_counter()
        if not 1 <= limit <= MAX_MOMENTS:
            raise AskError(f"limit must be in [1, {MAX_MOMENTS}], got {limit}")
        self._check_streams(p)
        scored: list[tuple[ClipMeta, float]] = []
        count = 0
        for stream_id in p.stream_ids:
            if p.selection == "retrieval" and self.index is not None:
                ranged = p.start is not None or p.end is not None
                picked = self.store.pick(stream_id, p.start, p.end, lambda n: [], clock=p.clock, with_seqs=ranged)
                if picked.count:
                    scored.extend(self._heuristic_hits(p, stream_id, picked, limit))
            else:
                picked, seqs, scores = self._score_range(p, stream_id)
                scored.extend(self._top(stream_id, picked, seqs, scores, limit))
            count += picked.count
        note = "" if count else f"no clips from {', '.join(p.stream_ids)} in the requested range"
        return SearchResult(rank_moments(scored, limit), count, {"total": time.perf_counter() - t0}, note)

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
