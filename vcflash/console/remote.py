"""The console's answers from the reasoner service over gRPC: the split deployment's ingest serves the console and
its chat asks `vcflash reasoner` (VCFLASH_REASONER_ADDRESS, with the API token and VCFLASH_TLS_CA every client uses).

The reasoner may be down while the cameras and the timeline (ingest's own, and the memory's) work on: an Ask or a
Search then fails with `Unavailable` (the console answers 503 with a JSON error saying so). A watcher checks the
reasoner's gRPC health every few seconds (and at once after a failed call): each change is logged once
(``event=reasoner_unavailable``, ``event=reasoner_available``), the gauge ``vcflash_console_reasoner_up`` follows
it, and the console's ``GET /v1/console/health`` reports it. Ingest's own gRPC health stays SERVING: a probe must
not restart the cameras because the reasoner is away.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry, Gauge

from memory.records import ClipMeta
from protos.vcflash.v1 import vcflash_pb2 as pb
from protos.vcflash.v1 import vcflash_pb2_grpc as pb_grpc
from vcflash.console.answers import (
    Answer,
    Evidence,
    Found,
    Question,
    ReasonerState,
    Search,
    ask_request,
    found,
    search_request,
)
from vcflash.serve.errors import AlreadyExists, Exhausted, FailedPrecondition, Invalid, NotFound, Unavailable
from vcflash.serve.tls import aio_channel

log = logging.getLogger(__name__)

REASONER_SERVICE = pb.DESCRIPTOR.services_by_name["Reasoner"].full_name
ASK_TIMEOUT_S = 600.0  # a whole answer, as `vcflash ask-live`
SEARCH_TIMEOUT_S = 120.0  # as `vcflash search`
PROBE_EVERY_S = 5.0
PROBE_TIMEOUT_S = 3.0
MAX_DETAILS_CHARS = 300
# A reasoner that comes back is dialled again within about 5 s (gRPC's default backoff grows to 2 minutes).
RECONNECT = [
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.min_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 5000),
]
ERRORS = {  # the reasoner's answers as the neutral errors they were raised as
    grpc.StatusCode.INVALID_ARGUMENT: Invalid,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Exhausted,
}


class RemoteAnswers:
    """`Answers` from the reasoner at `address`. Create it, `watch()` it and `close()` it on one event loop."""

    def __init__(
        self,
        address: str,
        *,
        token: str,
        tls_ca: Path | None,
        max_question_chars: int,
        max_message_bytes: int,
        registry: CollectorRegistry,
        probe_every_s: float = PROBE_EVERY_S,
    ) -> None:
        self.address, self.max_question_chars, self.probe_every_s = address, max_question_chars, probe_every_s
        options = [("grpc.max_receive_message_length", max_message_bytes), *RECONNECT]
        self.channel = aio_channel(address, tls_ca, options)
        self.reasoner = pb_grpc.ReasonerStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.metadata = (("authorization", f"Bearer {token}"),)
        self.available: bool | None = None
        self.error = ""
        self.up = Gauge(
            "vcflash_console_reasoner_up",
            "1 while the reasoner the web console asks answers its health check, else 0",
            registry=registry,
        )
        self._wake = asyncio.Event()

    def state(self) -> ReasonerState:
        return ReasonerState(self.available, self.error, self.address)

    async def ask(self, question: Question) -> AsyncIterator[str | Answer]:
        """Reasoner.Ask with the question's request (`ask_request`: by default as `vcflash ask-live` asks)."""
        if question.video is not None:
            raise Invalid(
                "a video file is answered offline only by `vcflash up`: the reasoner service answers from memory"
            )
        call = self.reasoner.Ask(ask_request(question), metadata=self.metadata, timeout=ASK_TIMEOUT_S)
        try:
            async for event in call:
                if event.WhichOneof("event") == "text":
                    yield event.text
                else:
                    yield _answer(event.result)
            if not self.available:
                self._wake.set()  # it answered: the watcher says so now
        except grpc.aio.AioRpcError as e:
            raise self._error(e) from None
        finally:
            call.cancel()  # the browser went away: the reasoner stops generating

    async def search(self, search: Search) -> Found:
        """Reasoner.Search with the search's request (`search_request`)."""
        try:
            response = await self.reasoner.Search(
                search_request(search), metadata=self.metadata, timeout=SEARCH_TIMEOUT_S
            )
        except grpc.aio.AioRpcError as e:
            raise self._error(e) from None
        if not self.available:
            self._wake.set()
        return found(response)

    async def watch(self) -> None:
        """Forever: check the reasoner's health every `probe_every_s` (at once after a failed Ask)."""
        while True:
            await self.probe()
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.probe_every_s)

    async def probe(self) -> bool:
        request = health_pb2.HealthCheckRequest(service=REASONER_SERVICE)
        try:
            response = await self.health.Check(request, timeout=PROBE_TIMEOUT_S)
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:  # a server, but not a reasoner
                self._set(False, f"the server at {self.address} serves no {REASONER_SERVICE}")
            else:
                self._set(False, f"{e.code().name}: {_details(e)}")
        else:
            serving = response.status == health_pb2.HealthCheckResponse.SERVING
            status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
            self._set(serving, "" if serving else f"its health is {status}")
        return bool(self.available)

    async def close(self) -> None:
        await self.channel.close()

    def _set(self, available: bool, error: str) -> None:
        changed = available != self.available
        self.available, self.error = available, error
        self.up.set(1 if available else 0)
        if changed and available:  # a warning too, as the unavailability it ends (services log warnings and up)
            log.warning("event=reasoner_available address=%s", self.address)
        elif changed:
            log.warning("event=reasoner_unavailable address=%s error=%s", self.address, error)

    def _error(self, e: grpc.aio.AioRpcError) -> Exception:
        code, details = e.code(), _details(e)
        kind = ERRORS.get(code)
        if kind is not None:  # the reasoner answered: the question, not the reasoner, is at fault
            return kind(details)
        self._wake.set()  # the watcher looks again now, and logs a change
        if code == grpc.StatusCode.UNAUTHENTICATED:
            return Unavailable(
                f"the reasoner ({self.address}) refused this server's API token: give both the same VCFLASH_API_TOKEN"
            )
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNIMPLEMENTED):
            return Unavailable(f"the reasoner ({self.address}) is unavailable: {details}")
        return RuntimeError(f"the reasoner ({self.address}) failed: {code.name}: {details}")


def _details(e: grpc.aio.AioRpcError) -> str:
    text = (e.details() or "").strip() or e.code().name
    return text if len(text) <= MAX_DETAILS_CHARS else text[:MAX_DETAILS_CHARS] + "..."


def _answer(r: pb.AskResult) -> Answer:
    evidence = [Evidence(_clip(e.clip), e.retrieved, e.score) for e in r.evidence]
    return Answer(r.answer, evidence, r.frames, r.duration_s, r.note, r.prompt_tokens, r.new_tokens)


def _clip(c: pb.ClipInfo) -> ClipMeta:
    return ClipMeta(
        c.stream_id, c.seq, c.wall_start, c.wall_end, c.media_start, c.media_end, tuple(c.frame_media_times)
    )
