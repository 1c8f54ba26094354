"""`vcflash up`: ingest, encoder, memory and reasoner in one process behind one gRPC server."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from aiohttp import web
from prometheus_client import REGISTRY, CollectorRegistry

from encoder_svc.worker import EncoderMetrics, EncoderWorker
from hico import VideoChatFlash
from ingest.server import ServesStreams, ingest_entry
from ingest.shards import Shard, resolve_shard
from memory import ClipIndex
from memory.retention import sweep_forever
from reasoner.engine import Reasoner
from reasoner.server import reasoner_entries
from vcflash.console import add_console
from vcflash.console.answers import LocalAnswers
from vcflash.openai_api import add_openai_api
from vcflash.serve.lifecycle import ServiceEntry
from vcflash.serve.settings import Settings


def alert_shard(settings: Settings) -> Shard:
    """The streams whose alerts this process evaluates: shard VCFLASH_REASONER_SHARD of VCFLASH_REASONER_SHARDS,
    by the partition of sharded ingest (ingest.shards: a hash of the stream name), so replicated reasoners share
    the alerts' work; one shard (the default) owns every stream."""
    return resolve_shard(settings.reasoner.reasoner_shard, settings.reasoner.reasoner_shards, role="reasoner")


class App(ServesStreams):
    """One model shared by the encoder and the reasoner, taking turns under one lock."""

    name = "all-in-one"

    def __init__(
        self, settings: Settings, model: VideoChatFlash | None = None, registry: CollectorRegistry = REGISTRY
    ) -> None:
        super().__init__(settings, registry)
        self.model = model  # given (tests share one) or loaded in `setup`

    async def setup(self) -> tuple[list[ServiceEntry], list[Any]]:
        s = self.settings
        load = VideoChatFlash.from_pretrained
        self.model = model = self.model or await asyncio.to_thread(load, *s.model.load_args())
        self.index = ClipIndex()
        await asyncio.to_thread(self.index.rebuild, self.store)
        lock = threading.Lock()
        entry, self.streams = ingest_entry(s, self.store, self.registry, model.config.vision.image_size, self.index)
        encoder = EncoderWorker(
            model,
            self.store,
            self.streams.manager.clips,
            self.index,
            s.encoder,
            lock,
            EncoderMetrics(self.registry),
            on_stored=self.streams.on_stored,
            accepts=self.streams.accepts,
            on_health=self.set_healthy,
        )
        self.reasoner = Reasoner(model, self.store, self.index, s.reasoner, model_lock=lock)
        await asyncio.to_thread(self.reasoner.warm_up)  # first-call costs before the first question, not in it
        entries, alerts = reasoner_entries(self.reasoner, self, alert_shard(s).owns)
        sweeps = [sweep_forever(self.store, self.index), self.streams.sweep_recordings_forever()]
        return [entry, *entries], [encoder.run(), *sweeps, alerts]

    def extend_http(self, app: web.Application) -> None:
        # the web console and the OpenAI-compatible chat API, on the WHIP port, asking this process's reasoner
        answers = LocalAnswers(self.reasoner)
        add_console(app, self.streams, answers, self.settings.server)
        add_openai_api(app, answers, self.settings, self.store)
