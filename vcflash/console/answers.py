"""Where the console's chat gets its answers: one interface, two implementations.

`Answers` is all the console knows of a reasoner. `vcflash up` gives it `LocalAnswers` (the in-process `Reasoner`,
run in a worker thread); the split deployment's ingest gives it `vcflash.console.remote.RemoteAnswers` (the
reasoner service over gRPC). Either yields the answer's text pieces as they are generated, then one `Answer`, and
raises the neutral errors (`vcflash.serve.errors`) the console turns into HTTP statuses: `Unavailable` (503) when
the reasoner cannot be reached.

Nothing here imports the model (torch): the ingest image has none.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from memory.records import ClipMeta

if TYPE_CHECKING:
    from reasoner.engine import AskResult, Reasoner

_DONE = object()


@dataclass(frozen=True)
class Question:
    """A chat question: streams, the question, and an optional range on the wall clock (Unix seconds)."""

    streams: Sequence[str]
    question: str
    start: float | None = None
    end: float | None = None


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

    def state(self) -> ReasonerState: ...


class LocalAnswers:
    """The all-in-one server's reasoner, in this process: `Reasoner.ask` in a worker thread, as Reasoner.Ask runs
    it (512 frames, uniform selection, wall-clock anchors)."""

    def __init__(self, reasoner: Reasoner) -> None:
        self.reasoner = reasoner
        self.max_question_chars = reasoner.limits.max_question_chars

    def state(self) -> ReasonerState:
        return ReasonerState(True)

    async def ask(self, question: Question) -> AsyncIterator[str | Answer]:
        from reasoner.engine import AskParams  # the model's side: only `vcflash up` gets here

        params = AskParams(
            stream_ids=list(question.streams),
            question=question.question,
            start=question.start,
            end=question.end,
            clock="wall",
        )
        loop = asyncio.get_running_loop()
        items: asyncio.Queue[Any] = asyncio.Queue()
        cancelled = threading.Event()

        def run() -> None:
            try:
                for item in self.reasoner.ask(params):
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


def _answer(r: AskResult) -> Answer:
    evidence = [Evidence(e.clip, e.retrieved, e.score) for e in r.evidence]
    return Answer(r.answer, evidence, r.frames, r.duration_s, r.note)
