"""The lifecycle every vcflash server shares: serve gRPC with health, run background tasks, stop gracefully.

A service fills in `setup` (its servicers and background coroutines); what it needs (memory, a model) it opens
there itself, and closes in `stop`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import sys
from collections.abc import Coroutine
from typing import Any

import grpc
from prometheus_client import REGISTRY, CollectorRegistry, start_http_server

from vcflash.serve.rpc import create_server, set_serving
from vcflash.serve.settings import Settings, token_path
from vcflash.serve.tls import server_credentials

log = logging.getLogger(__name__)

ServiceEntry = tuple[Any, Any, str]  # (add_XServicer_to_server, servicer, full service name)


class Service:
    """Subclasses implement `setup` and may extend `ready`/`stop`."""

    name = "service"
    unhealthy: str | None = None  # why a background task reported the service unable to serve (set_healthy)
    _stopping = False

    def __init__(self, settings: Settings, registry: CollectorRegistry = REGISTRY) -> None:
        self.settings = settings.with_token()
        self.registry = registry
        self.port = 0
        self.tasks: list[asyncio.Task[Any]] = []
        self.names: list[str] = []

    async def setup(self) -> tuple[list[ServiceEntry], list[Coroutine[Any, Any, None]]]:
        raise NotImplementedError

    async def ready(self) -> None:
        """After the server is listening and before it reports SERVING."""

    async def start(self) -> int:
        s = self.settings.server
        services, coroutines = await self.setup()
        self.names = [name for _, _, name in services]
        self.server: grpc.aio.Server
        tls = server_credentials(s.tls_cert, s.tls_key) if s.tls_cert and s.tls_key else None
        try:
            self.server, self.port, self.health = create_server(
                s.address, services, s.api_token or "", s.max_message_bytes, tls
            )
        except OSError:
            for c in coroutines:  # never started
                c.close()
            raise
        await self.server.start()
        self.tasks = [asyncio.create_task(c) for c in coroutines]
        await self.ready()
        await set_serving(self.health, self.names, self.unhealthy is None)
        log.info("event=serving service=%s port=%d", self.name, self.port)
        return self.port

    async def set_healthy(self, ok: bool, reason: str) -> None:
        """A background task's verdict (the encoder's memory refusing writes, then accepting them again): gRPC
        health says NOT_SERVING until it recovers. Logged; before `start` only remembered, after `stop` ignored."""
        self.unhealthy = None if ok else reason
        log.warning("event=health service=%s serving=%s reason=%s", self.name, ok, reason)
        if hasattr(self, "health") and not self._stopping:
            await set_serving(self.health, self.names, ok)

    async def stop(self, grace_s: float = 5.0) -> None:
        self._stopping = True
        await set_serving(self.health, self.names, False)
        await self.server.stop(grace_s)
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


class PortInUse(OSError):
    """A port a service needs cannot be bound; the message names the port and the setting that chooses it."""


BIND_ERRORS = (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL)


async def run(service: Service) -> None:
    """Serve until SIGINT or SIGTERM, with Prometheus metrics on the configured port. A port that cannot be
    bound raises `PortInUse`; once serving, prints a line with "ready" on stderr."""
    s = service.settings.server
    if s.metrics_port:
        try:
            start_http_server(s.metrics_port, addr=s.host, registry=service.registry)  # the gRPC host, not all
        except OSError as e:
            raise PortInUse(
                f"metrics port {s.metrics_port} is in use or not allowed ({e.strerror}): "
                "set VCFLASH_METRICS_PORT (--metrics-port) to a free port, or 0 to turn metrics off"
            ) from e
    try:
        await service.start()
    except OSError as e:
        if hasattr(service, "server"):  # listening already (WHIP failed after gRPC): close what started
            with contextlib.suppress(Exception):
                await service.stop(0)
        if "cannot listen on" in str(e):
            raise PortInUse(f"{e.strerror}: set VCFLASH_ADDRESS (--host/--port) to a free host:port") from e
        if s.http_port and e.errno in BIND_ERRORS:
            raise PortInUse(
                f"HTTP (WHIP) port {s.http_port} is in use or not allowed ({e.strerror}): "
                "set VCFLASH_HTTP_PORT to a free port, or 0 to turn WHIP off"
            ) from e
        raise
    where = "VCFLASH_API_TOKEN" if os.environ.get("VCFLASH_API_TOKEN") else token_path(s.data_dir)
    tls = "TLS" if s.tls_cert else "plaintext"
    print(
        f"vcflash {service.name}: ready, serving gRPC ({tls}) on port {service.port}; API token in {where}",
        file=sys.stderr,
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await service.stop()
