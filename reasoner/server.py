"""The Reasoner gRPC service: Ask streams the answer, then the evidence; Search ranks moments."""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import replace
from typing import Any

import grpc
from prometheus_client import REGISTRY, CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from hico import VideoChatFlash
from memory import ClipIndex, MemoryStore, UnknownStream
from memory.records import Clock
from memory.retention import follow_forever
from memory.server import MemoryService, clip_info, time_range
from protos.clip import check_stream_name
from protos.vcflash.v1 import vcflash_pb2 as pb
from protos.vcflash.v1 import vcflash_pb2_grpc as pb_grpc
from reasoner.alerts import AlertRunner, AlertSpec, check_name
from reasoner.delivery import Delivery, check_webhook_url
from reasoner.engine import DEFAULT_SELECTION, MOMENTS, AskParams, AskResult, Moment, Reasoner, SearchResult
from vcflash.serve.errors import AlreadyExists, Exhausted, FailedPrecondition, Invalid, NotFound, excerpt
from vcflash.serve.lifecycle import ServiceEntry
from vcflash.serve.rpc import handle_errors
from vcflash.serve.settings import Settings

log = logging.getLogger(__name__)

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
    pb.SELECTION_DEFAULT: DEFAULT_SELECTION,
    pb.SELECTION_UNIFORM: "uniform",
    pb.SELECTION_RETRIEVAL: "retrieval",
    pb.SELECTION_SCAN: "scan",
    pb.SELECTION_INDEX: "index",
}


def selection(value: int) -> str:
    if value not in SELECTIONS:
        raise Invalid(f"unknown selection {value} (DEFAULT is 0, RETRIEVAL 1, SCAN 2, INDEX 3, UNIFORM 4)")
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
    chosen = selection(r.selection) if r.selection != pb.SELECTION_DEFAULT else "scan"
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


# ---- alerts (issue 14): the API's side; evaluation is reasoner.alerts, delivery reasoner.delivery ----

WATCH_POLL_S = 0.2  # how often WatchEvents looks for new records while following
WATCH_PAGE = 256  # records read from the store at a time


def alert_spec(r: pb.AddAlertRequest) -> AlertSpec:
    """The alert a request asks for, with the defaults of unset fields; not yet validated."""
    return AlertSpec(
        name=r.name,
        streams=tuple(r.stream_ids),
        question=r.question,
        window_frames=r.window_frames or 16,
        every_clips=r.every_clips or 1,
        threshold=r.threshold if r.HasField("threshold") else 0.5,
        min_duration_s=r.min_duration_s,
        cooldown_s=r.cooldown_s,
        webhook_url=r.webhook_url or None,
        mqtt_topic=r.mqtt_topic or None,
    )


def alert_message(spec: AlertSpec, with_secret: bool = False) -> pb.Alert:
    return pb.Alert(
        name=spec.name,
        stream_ids=list(spec.streams),
        question=spec.question,
        window_frames=spec.window_frames,
        every_clips=spec.every_clips,
        threshold=spec.threshold,
        min_duration_s=spec.min_duration_s,
        cooldown_s=spec.cooldown_s,
        webhook_url=spec.webhook_url or "",
        mqtt_topic=spec.mqtt_topic or "",
        created_wall=spec.created_wall,
        webhook_secret=(spec.webhook_secret or "") if with_secret else "",
    )


def event_message(r: dict[str, Any]) -> pb.AlertEvent:
    return pb.AlertEvent(
        id=r["id"],
        key=r["key"],
        kind=r["kind"],
        alert=r["alert"],
        stream_id=r["stream"],
        event=r["event"],
        start_media_s=r["start_media_s"],
        end_media_s=r.get("end_media_s"),
        start_wall=r.get("start_wall"),
        end_wall=r.get("end_wall"),
        peak=r["peak"],
        score=r["score"],
        clips=r["clips"],
        emitted_wall=r["emitted_wall"],
    )


def in_range(r: dict[str, Any], start: float | None, end: float | None, clock: Clock) -> bool:
    """Whether the record's span overlaps [start, end) on the clock: [start, end] of its event so far (a start
    record, or one without wall times: the point it names). A record without a time on that clock is left out."""
    first, last = (
        (r.get("start_media_s"), r.get("end_media_s")) if clock == "media" else (r.get("start_wall"), r.get("end_wall"))
    )
    if first is None:
        return False
    last = first if last is None else last
    return (end is None or first < end) and (start is None or last >= start)


class Alerts:
    """The alert API over the memory, with no gRPC in it: add (validated, limited, a webhook secret made), list,
    remove, and the event log read as a stream. `runner` (reasoner.alerts.AlertRunner) is told of every change.

    Adds and removes are serialised in this process, so two adds of one name cannot both pass the name check."""

    def __init__(self, store: MemoryStore, settings: Settings, runner: AlertRunner | None = None) -> None:
        self.store, self.settings, self.runner = store, settings, runner
        self._lock = asyncio.Lock()

    async def add(self, spec: AlertSpec) -> AlertSpec:
        """The alert as stored, with its webhook secret; Invalid, NotFound (a stream), AlreadyExists, Exhausted."""
        secret = secrets.token_urlsafe(32) if spec.webhook_url else None
        spec = replace(spec, webhook_secret=secret, created_wall=time.time())
        spec.validate(self.settings.reasoner)
        for stream_id in spec.streams:
            check_stream_name(stream_id)
        allow_private = self.settings.delivery.webhook_allow_private
        if spec.webhook_url is not None:  # may resolve a name: off the event loop
            await asyncio.to_thread(check_webhook_url, spec.webhook_url, allow_private=allow_private)
        known = set(await asyncio.to_thread(self.store.streams))
        for stream_id in spec.streams:
            if stream_id not in known:
                raise UnknownStream(stream_id)
        async with self._lock:
            held = await asyncio.to_thread(self.store.alert_configs)
            if spec.name in held:
                raise AlreadyExists(f"alert {spec.name!r} exists; remove it first (vcflash alerts rm {spec.name})")
            if len(held) >= self.settings.reasoner.max_alerts:
                raise Exhausted(f"{len(held)} alerts held, the most allowed (VCFLASH_MAX_ALERTS); remove one first")
            await asyncio.to_thread(self.store.put_alert, spec.name, spec.to_config())
        self._changed()
        log.info("event=alert_added alert=%s streams=%s", spec.name, ",".join(spec.streams))
        return spec

    async def list(self) -> list[AlertSpec]:
        held = await asyncio.to_thread(self.store.alert_configs)
        specs = []
        for name in sorted(held):
            try:
                specs.append(AlertSpec.from_config(held[name]))
            except (Invalid, TypeError) as e:  # written by another version: the runner skips it too
                log.error("event=alert_config_invalid alert=%s error=%s", excerpt(name), e)
        return specs

    async def remove(self, name: str) -> None:
        check_name(name)
        async with self._lock:
            if not await asyncio.to_thread(self.store.delete_alert, name):
                raise NotFound(f"no alert {excerpt(name)}")
        self._changed()
        log.info("event=alert_removed alert=%s", name)

    def _changed(self) -> None:
        if self.runner is not None:
            self.runner.reload()

    async def watch(
        self, after: int, alert: str | None, follow: bool, start: float | None, end: float | None, clock: Clock
    ) -> AsyncIterator[dict[str, Any]]:
        """The records after id `after` (of `alert`, in the range), then with `follow` new ones as they are stored
        (looked for every WATCH_POLL_S): ids only grow, so resuming from the last id seen loses and repeats none."""
        if after < 0:
            raise Invalid(f"after_id must be >= 0, got {after}")
        if alert is not None:
            check_name(alert)
        if start is not None and end is not None and start >= end:
            raise Invalid(f"inverted time range: start {start} >= end {end}")
        while True:
            page = await asyncio.to_thread(self.store.events, after, WATCH_PAGE, alert)
            for record in page:
                after = record["id"]
                if in_range(record, start, end, clock):
                    yield record
            if page:
                continue
            if not follow:
                return
            await asyncio.sleep(WATCH_POLL_S)


class ReasonerCollector(Collector):
    """The reasoner's own counters, read when scraped: the key index's clips built lazily (by a question) and
    ahead (as written), what it holds, and the scans the cap handed to the key index."""

    def __init__(self, reasoner: Reasoner) -> None:
        self.reasoner = reasoner

    def collect(self) -> Any:
        keys = self.reasoner.keys  # read now: a test or the evaluation may have swapped it
        built = CounterMetricFamily(
            "vcflash_key_index_built_clips", "Clips whose keys the key index built, by when", labels=["when"]
        )
        built.add_metric(["lazily"], keys.built)
        built.add_metric(["ahead"], keys.built_ahead)
        built.add_metric(["loaded"], keys.loaded)  # from memory, where an earlier run stored them
        yield built
        yield GaugeMetricFamily("vcflash_key_index_clips", "Clips whose keys the key index holds", len(keys))
        yield GaugeMetricFamily("vcflash_key_index_bytes", "Bytes of the keys the key index holds", keys.bytes())
        yield CounterMetricFamily(
            "vcflash_scans_capped",
            "Scans over VCFLASH_MAX_SCAN_CLIPS clips, scored by the key index instead",
            self.reasoner.scans_capped,
        )


class ReasonerServicer(pb_grpc.ReasonerServicer):
    def __init__(
        self, reasoner: Reasoner, registry: CollectorRegistry = REGISTRY, alerts: Alerts | None = None
    ) -> None:
        self.reasoner = reasoner
        self.alerts = alerts
        registry.register(ReasonerCollector(reasoner))
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

    def _alerts(self) -> Alerts:
        if self.alerts is None:
            raise FailedPrecondition("this server keeps no alerts")
        return self.alerts

    @handle_errors
    async def AddAlert(self, request: pb.AddAlertRequest, context: grpc.aio.ServicerContext) -> pb.Alert:
        return alert_message(await self._alerts().add(alert_spec(request)), with_secret=True)

    @handle_errors
    async def ListAlerts(
        self, request: pb.ListAlertsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListAlertsResponse:
        return pb.ListAlertsResponse(alerts=[alert_message(spec) for spec in await self._alerts().list()])

    @handle_errors
    async def RemoveAlert(
        self, request: pb.RemoveAlertRequest, context: grpc.aio.ServicerContext
    ) -> pb.RemoveAlertResponse:
        await self._alerts().remove(request.name)
        return pb.RemoveAlertResponse()

    @handle_errors
    async def WatchEvents(
        self, request: pb.WatchEventsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.AlertEvent]:
        start, end, clock = time_range(request.range)
        records = self._alerts().watch(request.after_id, request.alert or None, request.follow, start, end, clock)
        async for record in records:
            yield event_message(record)


class ReasonerService(MemoryService):
    """`vcflash reasoner`: Ask and memory inspection over the shared memory (split deployment), and the alerts."""

    name = "reasoner"
    model: VideoChatFlash | None = None  # loaded in `setup` unless given
    # which streams' alerts this process evaluates: the application sets its part when reasoners are sharded
    # (vcflash.app.alert_shard: VCFLASH_REASONER_SHARD of _SHARDS); by default all
    alert_owns: Callable[[str], bool] = staticmethod(lambda stream_id: True)

    async def setup(self) -> tuple[list[ServiceEntry], list[Any]]:
        load = VideoChatFlash.from_pretrained
        self.model = self.model or await asyncio.to_thread(load, *self.settings.model.load_args())
        self.index = ClipIndex()
        await asyncio.to_thread(self.index.rebuild, self.store)
        self.reasoner = Reasoner(self.model, self.store, self.index, self.settings.reasoner)
        await asyncio.to_thread(self.reasoner.warm_up)  # first-call costs before the first question, not in it
        entries, alerts = reasoner_entries(self.reasoner, self, self.alert_owns)
        # the encoder writes in another process: new clips join the index incrementally, evicted ones in batches
        return entries, [follow_forever(self.store, self.index), alerts]


def reasoner_entries(
    reasoner: Reasoner, service: MemoryService, owns: Callable[[str], bool] = lambda stream_id: True
) -> tuple[list[ServiceEntry], Coroutine[Any, Any, None]]:
    """The Reasoner and Memory services over the service's store, and the background work to run beside them:
    an AlertRunner evaluating the alerts on the streams `owns` accepts, the delivery of their events and, unless
    `VCFLASH_KEYS_AHEAD` is off, the key index following every stream's new clips (each replica keeps its own)."""
    delivery = Delivery(service.settings.delivery, service.registry)
    runner = AlertRunner(reasoner, service.store, delivery, service.settings.reasoner, service.registry, owns=owns)
    servicer = ReasonerServicer(reasoner, service.registry, Alerts(service.store, service.settings, runner))
    entries = [(pb_grpc.add_ReasonerServicer_to_server, servicer, SERVICE_NAME), service.memory_entry()]
    background = [run_alerts(runner, delivery)]
    if service.settings.reasoner.keys_ahead:
        background.append(reasoner.key_indexer().run())
    return entries, _together(background)


async def _together(coroutines: list[Coroutine[Any, Any, None]]) -> None:
    """Run the coroutines until cancelled, then let every one of them finish its own cleanup."""
    tasks = [asyncio.create_task(c) for c in coroutines]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def run_alerts(runner: AlertRunner, delivery: Delivery) -> None:
    """Deliver and evaluate until cancelled (the service stopping), then close both: evaluation first, so the
    last events it emits are still handed to delivery."""
    await delivery.start()
    try:
        await runner.start()
        try:
            await asyncio.Event().wait()
        finally:
            await runner.close()
    finally:
        await delivery.close()
