"""`vcflash up`: ingest, encoder, memory and reasoner in one process behind one gRPC server."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from encoder_svc.worker import EncoderMetrics, EncoderSettings, EncoderWorker
from ingest.server import ServesStreams, ingest_entry
from memory import ClipIndex
from memory.retention import sweep_forever
from reasoner.engine import Reasoner
from reasoner.server import reasoner_entries
from vcflash.service import ServiceEntry


class App(ServesStreams):
    """One model shared by the encoder and the reasoner, taking turns under one lock."""

    name = "all-in-one"

    async def setup(self) -> tuple[list[ServiceEntry], list[Any]]:
        s = self.settings
        model = await self.load_model()
        self.index = ClipIndex()
        await asyncio.to_thread(self.index.rebuild, self.store)
        lock = threading.Lock()
        entry, self.streams = ingest_entry(s, self.store, self.registry, model.config.vision.image_size, self.index)
        encoder = EncoderWorker(
            model,
            self.store,
            self.streams.manager.clips,
            self.index,
            EncoderSettings(max_batch=s.max_batch, max_wait_s=s.max_wait_ms / 1000),
            lock,
            EncoderMetrics(self.registry),
            on_stored=self.streams.on_stored,
            accepts=self.streams.accepts,
        )
        self.reasoner = Reasoner(model, self.store, self.index, model_lock=lock)
        services = [entry, *reasoner_entries(self.reasoner, self.store, self.registry)]
        return services, [encoder.run(), sweep_forever(self.store, self.index)]
