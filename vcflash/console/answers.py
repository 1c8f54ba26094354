"""Where the console's chat gets its answers: one interface, two implementations.

`Answers` is all the console knows of a reasoner. `vcflash up` gives it `LocalAnswers` (the in-process `Reasoner`,
run in a worker thread); the split deployment's ingest gives it `vcflash.console.remote.RemoteAnswers` (the
reasoner service over gRPC). The OpenAI-compatible chat API (`vcflash.openai_api`) asks the same `Answers`. Both turn
a `Question` into the one `AskRequest` (`ask_request`) that gRPC's Reasoner.Ask takes: the remote one sends it, the
local one maps it with the same function Reasoner.Ask uses (`reasoner.server.ask_params`), so every front door gets
the same checks, limits and defaults. Either yields the answer's text pieces as they are generated, then one
`Answer`, and raises the neutral errors (`vcflash.serve.errors`) the console turns into HTTP statuses:
`Unavailable` (503) when the reasoner cannot be reached. A `Search` goes the same way, as the one `SearchRequest`
Reasoner.Search takes (`search_request`), and comes back as its ranked moments (`Found`).

Nothing here imports the model (torch): the ingest image has none.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from memory.records import ClipMeta
from protos.vcflash.v1 import vcflash_pb2 as pb
from vcflash.serve.errors import Invalid, excerpt

if TYPE_CHECKING:
    from reasoner.engine import AskResult, Reasoner

_DONE = object()


@dataclass(frozen=True)
class Question:
    """A chat question: streams, the question, and an optional range on the wall clock (Unix seconds; the media
    clock's seconds with `clock="media"`). The rest are Reasoner.Ask's own options, with its defaults (512 frames,
    uniform selection, greedy decoding, the reasoner's answer length): what `vcflash ask-live` sends."""

    streams: Sequence[str]
    question: str
    start: float | None = None
    end: float | None = None
    clock: str = "wall"  # "wall" or "media"
    history: Sequence[tuple[str, str]] = ()  # earlier (question, answer) turns
    max_frames: int = 512
    retrieval: bool = False
    max_new_tokens: int | None = None  # None: the reasoner's default
    do_sample: bool = False
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    # a local video file (checked to be under the media root) instead of the streams: answered offline by the
    # in-process model, as `vcflash ask` (LocalAnswers only; the reasoner service answers from memory only)
    video: str | None = None


@dataclass(frozen=True)
class Evidence:
    clip: ClipMeta
    retrieved: bool = False
    score: float = 0.0


@dataclass(frozen=True)
class Answer:
    """The final item of an answer: its text, the clips it drew on, and what it cost."""

    answer: str
    evidence: list[Evidence]
    frames: int
    duration_s: float
    note: str = ""
    prompt_tokens: int = 0
    new_tokens: int = 0


def ask_request(q: Question) -> pb.AskRequest:
    """The Reasoner.Ask request for a question: what the reasoner service is sent, and what the in-process reasoner
    maps with Reasoner.Ask's own `ask_params`."""
    clock = pb.CLOCK_MEDIA if q.clock == "media" else pb.CLOCK_WALL
    return pb.AskRequest(
        stream_ids=list(q.streams),
        question=q.question,
        range=pb.TimeRange(start=q.start, end=q.end, clock=clock),
        max_frames=q.max_frames,
        selection=pb.SELECTION_RETRIEVAL if q.retrieval else pb.SELECTION_DEFAULT,
        generation=pb.Generation(
            max_new_tokens=q.max_new_tokens or 0,
            do_sample=q.do_sample,
            temperature=q.temperature,
            top_p=q.top_p,
            seed=q.seed,
        ),
        history=[pb.Turn(question=question, answer=answer) for question, answer in q.history],
        wall_clock_anchors=True,
    )


@dataclass(frozen=True)
class Search:
    """A search: the moments of the streams' wall-clock range (Unix seconds) that best answer the question, best
    first, without generating an answer; ranked by the reasoner's scan, as `vcflash search` does by default."""

    streams: Sequence[str]
    question: str
    start: float | None = None
    end: float | None = None
    limit: int = 10


@dataclass(frozen=True)
class Moment:
    """A run of consecutive clips (`first_seq` to `last_seq`) of one stream that ranked; `score` is its best clip's."""

    stream_id: str
    first_seq: int
    last_seq: int
    wall_start: float
    wall_end: float
    media_start: float
    media_end: float
    score: float


@dataclass(frozen=True)
class Found:
    moments: list[Moment]  # best first
    clips_scored: int  # clips in range that the ranking looked at
    note: str = ""  # e.g. why there was nothing to search


def search_request(s: Search) -> pb.SearchRequest:
    """The Reasoner.Search request for a search: sent to the reasoner service, or mapped with Reasoner.Search's own
    `search_params` in process."""
    return pb.SearchRequest(
        stream_ids=list(s.streams),
        question=s.question,
        range=pb.TimeRange(start=s.start, end=s.end, clock=pb.CLOCK_WALL),
        limit=s.limit,
        selection=pb.SELECTION_SCAN,
    )


def found(r: pb.SearchResponse) -> Found:
    moments = [
        Moment(m.stream_id, m.first_seq, m.last_seq, m.wall_start, m.wall_end, m.media_start, m.media_end, m.score)
        for m in r.moments
    ]
    return Found(moments, r.clips_scored, r.note)


@dataclass(frozen=True)
class ReasonerState:
    """Whether the reasoner answers: True, False (`error` says why) or None (not known yet)."""

    available: bool | None
    error: str = ""
    address: str = ""  # "" in process


class Answers(Protocol):
    """What the console asks questions of."""

    max_question_chars: int  # longer questions are refused (400) before they are sent

    def ask(self, question: Question) -> AsyncIterator[str | Answer]:
        """Text pieces as they are generated, then one `Answer`. Closing the iterator stops the generation."""
        ...

    async def search(self, search: Search) -> Found:
        """The ranked moments, as Reasoner.Search answers them."""
        ...

    def state(self) -> ReasonerState: ...


class LocalAnswers:
    """The all-in-one server's reasoner, in this process: `Reasoner.ask` in a worker thread, on the parameters
    Reasoner.Ask would make of the same request (`ask_request`, then `reasoner.server.ask_params`)."""

    def __init__(self, reasoner: Reasoner) -> None:
        self.reasoner = reasoner
        self.max_question_chars = reasoner.limits.max_question_chars

    def state(self) -> ReasonerState:
        return ReasonerState(True)

    async def ask(self, question: Question) -> AsyncIterator[str | Answer]:
        from reasoner.server import ask_params  # the model's side: only `vcflash up` gets here

        request = ask_request(question)
        loop = asyncio.get_running_loop()
        items: asyncio.Queue[Any] = asyncio.Queue()
        cancelled = threading.Event()

        def run() -> None:
            try:
                if question.video is not None:
                    items_of: Iterator[Any] = self._file(question, request)
                else:  # Reasoner.Ask's own checks and defaults
                    items_of = self.reasoner.ask(ask_params(request))
                for item in items_of:
                    loop.call_soon_threadsafe(items.put_nowait, item)
                    if cancelled.is_set():
                        break
            except Exception as exc:  # noqa: BLE001 - raised in the consumer
                loop.call_soon_threadsafe(items.put_nowait, exc)
            finally:
                loop.call_soon_threadsafe(items.put_nowait, _DONE)

        worker = loop.run_in_executor(None, run)
        try:
            while (item := await items.get()) is not _DONE:
                if isinstance(item, Exception):
                    raise item
                yield item if isinstance(item, str) else _answer(item)
        finally:
            cancelled.set()
            await worker

    async def search(self, search: Search) -> Found:
        """Reasoner.Search in a worker thread: its own mapping in (`search_params`: checks, defaults) and out."""
        from reasoner.server import search_params, search_response

        params, limit = search_params(search_request(search))
        return found(search_response(await asyncio.to_thread(self.reasoner.search, params, limit)))

    def _file(self, q: Question, request: pb.AskRequest) -> Iterator[str | Answer]:
        """A video file answered offline, as `vcflash ask` does (decode, encode, the official prompt), under the
        model lock the encoder and Reasoner.Ask share, with Reasoner.Ask's limits on the question, the history, the
        frames and the sampling settings. The whole text comes at once: the offline path does not stream."""
        import av

        from reasoner.engine import AskParams
        from reasoner.server import check_generation

        check_generation(request.generation)
        limits = self.reasoner.limits
        AskParams(
            stream_ids=["file"],
            question=q.question,
            max_frames=q.max_frames,
            max_new_tokens=q.max_new_tokens,
            history=list(q.history),
        ).validate(limits)
        extra = {k: v for k, v in (("temperature", q.temperature), ("top_p", q.top_p)) if v is not None}
        assert q.video is not None
        try:
            with self.reasoner.model_lock:
                a = self.reasoner.model.answer(
                    q.video,
                    q.question,
                    list(q.history),
                    max_new_tokens=q.max_new_tokens or min(512, limits.max_new_tokens),
                    do_sample=q.do_sample,
                    max_num_frames=q.max_frames,
                    seed=q.seed,
                    **extra,
                )
        except (av.FFmpegError, OSError, ValueError) as e:
            raise Invalid(f"the video file cannot be answered: {excerpt(e, 200)}") from None
        yield a.text
        yield Answer(a.text, [], a.num_frames, a.duration_s, "", a.prompt_tokens, len(a.token_ids))


def _answer(r: AskResult) -> Answer:
    evidence = [Evidence(e.clip, e.retrieved, e.score) for e in r.evidence]
    return Answer(r.answer, evidence, r.frames, r.duration_s, r.note, r.prompt_tokens, r.new_tokens)
