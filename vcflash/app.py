"""`vcflash up`: ingest, encoder, memory and reasoner in one process behind one gRPC server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from dataclasses import dataclass, field

import grpc
from prometheus_client import REGISTRY, CollectorRegistry, start_http_server

from encoder_svc.worker import EncoderMetrics, EncoderSettings, EncoderWorker
from hico.model import VideoChatFlash
from ingest.pipeline import IngestManager, IngestSettings
from ingest.server import SERVICE_NAME as INGEST
from ingest.server import IngestServicer, Streams
from memory import ClipIndex, MemoryStore, open_store
from memory.records import Retention
from memory.server import SERVICE_NAME as MEMORY
from memory.server import MemoryServicer
from protos.vcflash.v1 import vcflash_pb2_grpc as pb_grpc
from reasoner.engine import Reasoner
from reasoner.server import SERVICE_NAME as REASONER
from reasoner.server import ReasonerServicer
from vcflash.rpc import create_server, set_serving
from vcflash.settings import Settings

log = logging.getLogger(__name__)
RETENTION_EVERY_S = 60.0
MAX_STREAMS = 64


def load_model(settings: Settings) -> VideoChatFlash:
    from vcflash.cli import resolve_model

    return VideoChatFlash.from_pretrained(resolve_model(settings.model), dtype=settings.dtype, device=settings.device)


@dataclass
class App:
    """The running all-in-one service; `start` binds and resumes streams, `stop` shuts down cleanly."""

    settings: Settings
    model: VideoChatFlash
    registry: CollectorRegistry = field(default_factory=lambda: REGISTRY)
    port: int = 0
    store: MemoryStore = field(init=False)
    server: grpc.aio.Server = field(init=False)
    tasks: list[asyncio.Task] = field(default_factory=list, init=False)

    async def start(self) -> int:
        s = self.settings.with_token()
        self.store = await asyncio.to_thread(open_store, s.redis_url, s.data_dir, s.token_format)  # type: ignore[arg-type]
        self.index = ClipIndex()
        await asyncio.to_thread(self.index.rebuild, self.store)
        lock = threading.Lock()  # one model, used by the encoder and the reasoner in turn
        frame_size = self.model.config.vision.image_size
        self.ingest = IngestManager(
            IngestSettings(queue_size=s.queue_clips, frame_size=frame_size), registry=self.registry
        )
        self.streams = Streams(
            self.ingest, self.store, Retention(s.retention_max_age_s, s.retention_max_bytes), MAX_STREAMS
        )
        encoder = EncoderWorker(
            self.model,
            self.store,
            self.ingest.clips,
            self.index,
            EncoderSettings(max_batch=s.max_batch, max_wait_s=s.max_wait_ms / 1000),
            lock,
            EncoderMetrics(self.registry),
            on_stored=self.streams.on_stored,
        )
        reasoner = Reasoner(self.model, self.store, self.index, model_lock=lock)
        services = [
            (pb_grpc.add_IngestServicer_to_server, IngestServicer(self.streams), INGEST),
            (pb_grpc.add_MemoryServicer_to_server, MemoryServicer(self.store), MEMORY),
            (pb_grpc.add_ReasonerServicer_to_server, ReasonerServicer(reasoner, self.registry), REASONER),
        ]
        self.server, self.port, self.health = create_server(s.address, services, s.api_token or "", s.max_message_bytes)
        await self.server.start()
        self.tasks = [asyncio.create_task(encoder.run()), asyncio.create_task(self._retention())]
        resumed = await self.streams.resume()
        await set_serving(self.health, [INGEST, MEMORY, REASONER], True)
        log.info(
            "event=serving port=%d memory=%s resumed=%s", self.port, "redis" if s.redis_url else "embedded", resumed
        )
        return self.port

    async def _retention(self) -> None:
        while True:
            await asyncio.sleep(RETENTION_EVERY_S)
            try:
                evicted = await asyncio.to_thread(self.store.enforce_retention)
            except Exception as e:  # noqa: BLE001 - a failed sweep is retried at the next one
                log.warning("event=retention_failed error=%s", e)
                continue
            for stream_id, seqs in evicted.items():
                self.index.remove(stream_id, seqs)

    async def stop(self, grace_s: float = 5.0) -> None:
        await set_serving(self.health, [INGEST, MEMORY, REASONER], False)
        await self.server.stop(grace_s)
        await self.ingest.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.store.close()


async def serve(settings: Settings) -> None:
    """Run until SIGINT/SIGTERM."""
    model = await asyncio.to_thread(load_model, settings)
    if settings.metrics_port:
        start_http_server(settings.metrics_port)
    app = App(settings, model)
    await app.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await app.stop()
