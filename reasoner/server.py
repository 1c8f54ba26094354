"""The Reasoner gRPC service: Ask streams the answer, then the evidence; Search ranks moments."""

from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import AsyncIterator
from typing import Any

import grpc
from prometheus_client import REGISTRY, CollectorRegistry, Histogram

from hico import VideoChatFlash
from memory import ClipIndex
from memory.retention import follow_forever
from memory.server import MemoryService, clip_info, time_range
from protos.vcflash.v1 import vcflash_pb2 as pb
from protos.vcflash.v1 import vcflash_pb2_grpc as pb_grpc
from reasoner.engine import MOMENTS, AskParams, AskResult, Moment, Reasoner, SearchResult
from vcflash.serve.errors import Invalid
from vcflash.serve.lifecycle import ServiceEntry
from vcflash.serve.rpc import handle_errors

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Reasoner"].full_name
_DONE = object()


MIN_TEMPERATURE = 1e-4  # below it, logits / temperature overflow float32 and sampling fails


def check_generation(g: pb.Generation) -> None:
    """`Invalid` for sampling settings the generator cannot use (it would fail inside the model, INTERNAL)."""

    def bad(name: str, rule: str) -> Invalid:
        return Invalid(f"generation.{name} must be {rule}, got {getattr(g, name)!r}")

    floats = ("temperature", "top_p", "repetition_penalty")
    for name in floats:
        if g.HasField(name) and not math.isfinite(getattr(g, name)):
            raise bad(name, "a finite number")
    if g.do_sample and g.HasField("temperature") and g.temperature < MIN_TEMPERATURE:
        raise bad("temperature", f">= {MIN_TEMPERATURE:g} when sampling")
    if g.HasField("top_p") and not 0.0 <= g.top_p <= 1.0:
        raise bad("top_p", "in [0, 1]")
    if g.HasField("top_k") and g.top_k < 0:
        raise bad("top_k", ">= 0 (0: off)")
    if g.HasField("repetition_penalty") and g.repetition_penalty <= 0:
        raise bad("repetition_penalty", "> 0")


SELECTIONS = {
    pb.SELECTION_UNIFORM: "uniform",
    pb.SELECTION_RETRIEVAL: "retrieval",
    pb.SELECTION_SCAN: "scan",
    pb.SELECTION_INDEX: "index",
}


def selection(value: int) -> str:
    if value not in SELECTIONS:
        raise Invalid(f"unknown selection {value} (UNIFORM is 0, RETRIEVAL 1, SCAN 2, INDEX 3)")
    return SELECTIONS[value]


def ask_params(r: pb.AskRequest) -> AskParams:
    g = r.generation
    check_generation(g)
    start, end, clock = time_range(r.range)
    chosen = selection(r.selection)
    return AskParams(
        stream_ids=list(r.stream_ids),
        question=r.question,
        start=start,
        end=end,
        clock=clock,
        max_frames=r.max_frames or 512,
        selection=chosen,  # type: ignore[arg-type]
        dropout=r.dropout or None,
        max_new_tokens=g.max_new_tokens or None,
        do_sample=g.do_sample,
        temperature=g.temperature if g.HasField("temperature") else None,
        top_p=g.top_p if g.HasField("top_p") else None,
        top_k=g.top_k if g.HasField("top_k") else None,
        repetition_penalty=g.repetition_penalty if g.HasField("repetition_penalty") else None,
        seed=g.seed if g.HasField("seed") else None,
        history=[(t.question, t.answer) for t in r.history],
        anchors=r.wall_clock_anchors,
    )


def search_params(r: pb.SearchRequest) -> tuple[AskParams, int]:
    """The search as the engine takes it (an Ask's params, checked the same way) and the moments wanted."""
    start, end, clock = time_range(r.range)
    chosen = selection(r.selection)
    chosen = chosen if chosen in ("retrieval", "index") else "scan"
    params = AskParams(list(r.stream_ids), r.question, start=start, end=end, clock=clock, selection=chosen)
    return params, r.limit or MOMENTS


def moment(m: Moment) -> pb.Moment:
    return pb.Moment(
        stream_id=m.stream_id,
        media_start=m.first.media_start,
        media_end=m.last.media_end,
        wall_start=m.first.wall_start,
        wall_end=m.last.wall_end,
        score=m.score,
        first_seq=m.first.seq,
        last_seq=m.last.seq,
    )


def search_response(r: SearchResult) -> pb.SearchResponse:
    return pb.SearchResponse(
        moments=[moment(m) for m in r.moments], clips_scored=r.clips_scored, timings_s=r.timings, note=r.note
    )


def ask_result(r: AskResult) -> pb.AskResult:
    return pb.AskResult(
        answer=r.answer,
        evidence=[pb.Evidence(clip=clip_info(e.clip), retrieved=e.retrieved, score=e.score) for e in r.evidence],
        frames=r.frames,
        visual_tokens=r.visual_tokens,
        prompt_tokens=r.prompt_tokens,
        new_tokens=r.new_tokens,
        duration_s=r.duration_s,
        timings_s=r.timings,
        note=r.note,
        moments=[moment(m) for m in r.moments],
    )


class ReasonerServicer(pb_grpc.ReasonerServicer):
    def __init__(self, reasoner: Reasoner, registry: CollectorRegistry = REGISTRY) -> None:
        self.reasoner = reasoner
        self.latency = Histogram(
            "vcflash_ask_seconds",
            "Ask latency, request to final message",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
            registry=registry,
        )
        self.search_latency = Histogram(
            "vcflash_search_seconds",
            "Search latency",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=registry,
        )

    @handle_errors
    async def Ask(self, request: pb.AskRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.AskResponse]:
        params = ask_params(request)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Any] = asyncio.Queue()
        cancelled = threading.Event()

        def run() -> None:
            """The engine in a worker thread; stops generating when the client goes away."""
            try:
                for item in self.reasoner.ask(params):
                    loop.call_soon_threadsafe(events.put_nowait, item)
                    if cancelled.is_set():
                        break
            except Exception as exc:  # noqa: BLE001 - re-raised in the handler
                loop.call_soon_threadsafe(events.put_nowait, exc)
            finally:
                loop.call_soon_threadsafe(events.put_nowait, _DONE)

        with self.latency.time():
            worker = loop.run_in_executor(None, run)
            try:
                while (item := await events.get()) is not _DONE:
                    if isinstance(item, Exception):
                        raise item
                    if isinstance(item, str):
                        yield pb.AskResponse(text=item)
                    else:
                        yield pb.AskResponse(result=ask_result(item))
            finally:
                cancelled.set()
                await worker

    @handle_errors
    async def Search(self, request: pb.SearchRequest, context: grpc.aio.ServicerContext) -> pb.SearchResponse:
        params, limit = search_params(request)
        with self.search_latency.time():
            return search_response(await asyncio.to_thread(self.reasoner.search, params, limit))


class ReasonerService(MemoryService):
    """`vcflash reasoner`: Ask and memory inspection over the shared memory (split deployment)."""

    name = "reasoner"
    model: VideoChatFlash | None = None  # loaded in `setup` unless given

    async def setup(self) -> tuple[list[ServiceEntry], list[Any]]:
        load = VideoChatFlash.from_pretrained
        self.model = self.model or await asyncio.to_thread(load, *self.settings.model.load_args())
        self.index = ClipIndex()
        await asyncio.to_thread(self.index.rebuild, self.store)
        self.reasoner = Reasoner(self.model, self.store, self.index, self.settings.reasoner)
        # the encoder writes in another process: new clips join the index incrementally, evicted ones in batches
        return reasoner_entries(self.reasoner, self), [follow_forever(self.store, self.index)]


def reasoner_entries(reasoner: Reasoner, service: MemoryService) -> list[ServiceEntry]:
    """The Reasoner and Memory services over the service's store."""
    servicer = ReasonerServicer(reasoner, service.registry)
    return [(pb_grpc.add_ReasonerServicer_to_server, servicer, SERVICE_NAME), service.memory_entry()]
