"""The lifecycle every vcflash server shares: open memory, serve gRPC with health, run background
tasks, stop gracefully. Each service (ingest, encoder, reasoner, all-in-one) fills in `setup`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Coroutine
from typing import Any

import grpc
from prometheus_client import REGISTRY, CollectorRegistry, start_http_server

from hico.model import VideoChatFlash
from memory import MemoryStore, open_store
from vcflash.rpc import create_server, set_serving
from vcflash.settings import Settings, token_path

log = logging.getLogger(__name__)

ServiceEntry = tuple[Any, Any, str]  # (add_XServicer_to_server, servicer, full service name)


def load_model(settings: Settings) -> VideoChatFlash:
    return VideoChatFlash.from_pretrained(settings.model, dtype=settings.dtype, device=settings.device)


class Service:
    """Subclasses implement `setup` (servicers and background coroutines) and may extend `ready`/`stop`."""

    name = "service"

    def __init__(
        self, settings: Settings, model: VideoChatFlash | None = None, registry: CollectorRegistry = REGISTRY
    ) -> None:
        self.settings = settings.with_token()
        self.model = model  # given (tests share one) or loaded from settings.model by `load_model`
        self.registry = registry
        self.port = 0
        self.tasks: list[asyncio.Task[Any]] = []
        self.names: list[str] = []

    async def setup(self) -> tuple[list[ServiceEntry], list[Coroutine[Any, Any, None]]]:
        raise NotImplementedError

    async def load_model(self) -> VideoChatFlash:
        if self.model is None:
            self.model = await asyncio.to_thread(load_model, self.settings)
        return self.model

    async def ready(self) -> None:
        """After the server is listening and before it reports SERVING."""

    async def start(self) -> int:
        s = self.settings
        self.store: MemoryStore = await asyncio.to_thread(open_store, s.redis_url, s.data_dir, s.token_format)  # type: ignore[arg-type]
        services, coroutines = await self.setup()
        self.names = [name for _, _, name in services]
        self.server: grpc.aio.Server
        self.server, self.port, self.health = create_server(s.address, services, s.api_token or "", s.max_message_bytes)
        await self.server.start()
        self.tasks = [asyncio.create_task(c) for c in coroutines]
        await self.ready()
        await set_serving(self.health, self.names, True)
        log.info(
            "event=serving service=%s port=%d memory=%s", self.name, self.port, "redis" if s.redis_url else "embedded"
        )
        return self.port

    async def stop(self, grace_s: float = 5.0) -> None:
        await set_serving(self.health, self.names, False)
        await self.server.stop(grace_s)
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.store.close()


async def run(service: Service) -> None:
    """Serve until SIGINT or SIGTERM, with Prometheus metrics on the configured port."""
    if service.settings.metrics_port:
        start_http_server(service.settings.metrics_port, registry=service.registry)
    await service.start()
    s = service.settings
    where = "VCFLASH_API_TOKEN" if os.environ.get("VCFLASH_API_TOKEN") else token_path(s.data_dir)
    print(f"vcflash {service.name}: serving gRPC on port {service.port}; API token in {where}", file=sys.stderr)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await service.stop()
