"""The Ingest gRPC service: add, remove, list and inspect streams.

Stream definitions are kept in memory's durable stream configs, so a restarted server resumes
every active stream, continuing its clip numbering after the last stored clip.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from aiohttp import web
from prometheus_client import REGISTRY, CollectorRegistry

from ingest.encoder_link import EncoderLink, LinkSettings
from ingest.http import create_whip_app, start_http
from ingest.pipeline import IngestManager, IngestSettings, StreamStatus
from memory.index import ClipIndex
from memory.records import ClipMeta, Retention
from memory.server import SERVICE_NAME as MEMORY_SERVICE
from memory.server import MemoryServicer
from memory.store import MemoryStore
from protos.vcflash.v1 import vcflash_pb2 as pb
from protos.vcflash.v1 import vcflash_pb2_grpc as pb_grpc
from vcflash.rpc import AlreadyExists, Exhausted, handle_errors
from vcflash.service import Service, ServiceEntry
from vcflash.settings import Settings

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Ingest"].full_name
MAX_STREAMS = 64


class Streams:
    """Ingest plus its durable side: stream configs, retention, and clips stored per stream."""

    def __init__(
        self,
        manager: IngestManager,
        store: MemoryStore,
        default_retention: Retention,
        max_streams: int,
        index: ClipIndex | None = None,
    ) -> None:
        self.manager, self.store, self.index = manager, store, index
        self.default_retention = default_retention
        self.max_streams = max_streams
        self.stored: Counter[str] = Counter()
        self.drain: Callable[[str], Awaitable[None]] | None = None  # waits out clips still at a remote encoder
        self._watchers: dict[str, asyncio.Task[None]] = {}

    def on_stored(self, stream_id: str, seq: int) -> None:
        self.stored[stream_id] += 1

    async def add(self, stream_id: str, config: dict[str, Any], retention: Retention | None = None) -> StreamStatus:
        """Start a stream; `config` holds source, fps, realtime, loop and optionally transport,
        keyframes_only, listen, live. It is kept in memory so a restarted server resumes the stream."""
        if stream_id in self.manager.names():
            raise AlreadyExists(f"stream {stream_id!r} already exists")
        if len(self.manager.names()) >= self.max_streams:
            raise Exhausted(f"this server takes at most {self.max_streams} streams")
        status = await self._start(stream_id, config)
        await asyncio.to_thread(self.store.set_retention, stream_id, retention or self.default_retention)
        return status

    async def last_clip(self, stream_id: str) -> ClipMeta | None:
        try:
            return (await asyncio.to_thread(self.store.stats, stream_id)).last
        except KeyError:  # a new stream
            return None

    async def next_seq(self, stream_id: str) -> int:
        """The number after the stream's last stored clip (0 for a new stream)."""
        last = await self.last_clip(stream_id)
        return last.seq + 1 if last else 0

    def accepts(self, stream_id: str) -> bool:
        """Whether clips of this stream are still wanted (not removed while they waited for the encoder)."""
        return stream_id in self.manager.names()

    async def whip_added(self, stream_id: str, status: StreamStatus) -> None:
        """A browser or OBS published over WHIP: same limits and retention as AddStream; never resumed
        by the server (the sender reconnects by itself)."""
        if len(self.manager.names()) > self.max_streams:
            raise web.HTTPServiceUnavailable(text=f"this server takes at most {self.max_streams} streams")
        await asyncio.to_thread(self.store.set_retention, stream_id, self.default_retention)
        config = {"source": status.url, "fps": status.fps, "realtime": False, "loop": False, "active": False}
        await asyncio.to_thread(self.store.put_stream_config, stream_id, config)

    async def _start(self, stream_id: str, config: dict) -> StreamStatus:
        last = await self.last_clip(stream_id)
        status = self.manager.add(
            stream_id,
            config["source"],
            fps=config["fps"],
            realtime=config["realtime"],
            loop_file=config["loop"],
            first_seq=last.seq + 1 if last else 0,
            resume_from=(last.media_end, last.wall_end) if last else None,
            transport=config.get("transport", "tcp"),
            keyframes_only=config.get("keyframes_only", False),
            listen=config.get("listen", False),
            live=config.get("live"),
        )
        await asyncio.to_thread(self.store.put_stream_config, stream_id, config | {"active": True})
        self._watchers[stream_id] = asyncio.create_task(self._retire_when_done(stream_id, config))
        return status

    async def _retire_when_done(self, stream_id: str, config: dict) -> None:
        """A source that ended by itself (a file played out) is not restarted with the server."""
        status = await self.manager.wait(stream_id)
        if status.state.value == "finished":
            await asyncio.to_thread(self.store.put_stream_config, stream_id, config | {"active": False})

    async def remove(self, stream_id: str, delete_memory: bool) -> None:
        await self.manager.remove(stream_id)  # from here on `accepts` refuses its queued clips
        self._watchers.pop(stream_id).cancel()
        self.stored.pop(stream_id, None)
        if delete_memory:
            if self.drain is not None:
                await self.drain(stream_id)
            await asyncio.to_thread(self.store.delete_stream, stream_id)
            if self.index is not None:
                self.index.drop_stream(stream_id)
        else:
            configs = await asyncio.to_thread(self.store.stream_configs)
            await asyncio.to_thread(self.store.put_stream_config, stream_id, configs[stream_id] | {"active": False})

    async def resume(self) -> list[str]:
        """Restart the streams that were active when the server last stopped."""
        configs = await asyncio.to_thread(self.store.stream_configs)
        started = []
        for stream_id, config in sorted(configs.items()):
            if config.get("active") and stream_id not in self.manager.names():
                await self._start(stream_id, config)
                started.append(stream_id)
        return started

    def status(self, stream_id: str) -> StreamStatus:
        statuses = self.manager.status()
        if stream_id not in statuses:
            raise KeyError(f"no stream named {stream_id!r}")
        return statuses[stream_id]

    def to_proto(self, s: StreamStatus) -> pb.StreamStatus:
        return pb.StreamStatus(
            stream_id=s.name,
            source=s.url,
            fps=s.fps,
            state=s.state.value,
            error=s.error or "",
            frames_in=s.frames_in,
            frames_sampled=s.frames_sampled,
            frames_dropped=s.frames_dropped,
            clips_emitted=s.clips_emitted,
            clips_stored=self.stored[s.name],
            last_media_time=s.last_media_time or 0.0,
            last_wall_time=s.last_wall_time or 0.0,
            reconnects=s.reconnects,
        )


class IngestServicer(pb_grpc.IngestServicer):
    def __init__(self, streams: Streams) -> None:
        self.streams = streams

    @handle_errors
    async def AddStream(self, request: pb.AddStreamRequest, context: grpc.aio.ServicerContext) -> pb.StreamStatus:
        if not request.source:
            raise ValueError("source is empty")
        if len(request.source) > 4096:
            raise ValueError("source is longer than 4096 characters")
        retention = None
        if request.HasField("retention_max_age_s") or request.HasField("retention_max_bytes"):
            d = self.streams.default_retention
            retention = Retention(
                request.retention_max_age_s if request.HasField("retention_max_age_s") else d.max_age_s,
                request.retention_max_bytes if request.HasField("retention_max_bytes") else d.max_bytes,
            )
        config = {
            "source": request.source,
            "fps": request.fps or 1.0,
            "realtime": request.realtime,
            "loop": request.loop,
            "transport": request.transport or "tcp",
            "keyframes_only": request.keyframes_only,
            "listen": request.listen,
            "live": request.live if request.HasField("live") else None,
        }
        status = await self.streams.add(request.stream_id, config, retention)
        return self.streams.to_proto(status)

    @handle_errors
    async def RemoveStream(
        self, request: pb.RemoveStreamRequest, context: grpc.aio.ServicerContext
    ) -> pb.RemoveStreamResponse:
        await self.streams.remove(request.stream_id, request.delete_memory)
        return pb.RemoveStreamResponse()

    @handle_errors
    async def ListStreams(
        self, request: pb.ListStreamsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListStreamsResponse:
        return pb.ListStreamsResponse(
            streams=[self.streams.to_proto(s) for s in self.streams.manager.status().values()]
        )

    @handle_errors
    async def GetStream(self, request: pb.GetStreamRequest, context: grpc.aio.ServicerContext) -> pb.StreamStatus:
        return self.streams.to_proto(self.streams.status(request.stream_id))


def ingest_entry(
    settings: Settings, store: MemoryStore, registry: CollectorRegistry, frame_size: int, index: ClipIndex | None = None
) -> tuple[ServiceEntry, Streams]:
    """The Ingest service over a new IngestManager whose clips are squashed to the encoder's input size."""
    manager = IngestManager(IngestSettings(queue_size=settings.queue_clips, frame_size=frame_size), registry=registry)
    retention = Retention(settings.retention_max_age_s, settings.retention_max_bytes)
    streams = Streams(manager, store, retention, MAX_STREAMS, index)
    return (pb_grpc.add_IngestServicer_to_server, IngestServicer(streams), SERVICE_NAME), streams


async def start_whip(settings: Settings, streams: Streams) -> web.AppRunner | None:
    """The WHIP endpoint (POST/DELETE /whip/{stream}) next to the gRPC server, when VCFLASH_HTTP_PORT is set."""
    if not settings.http_port:
        return None
    app = create_whip_app(
        streams.manager, token=settings.api_token, on_add=streams.whip_added, next_seq=streams.next_seq
    )
    host = settings.address.rpartition(":")[0].strip("[]") or "0.0.0.0"
    runner, _ = await start_http(app, host, settings.http_port)
    return runner


class ServesStreams(Service):
    """A service that runs streams (ingest, or all-in-one): resumes them, serves WHIP, stops them.

    Subclasses set `self.streams` in `setup`."""

    streams: Streams
    http: web.AppRunner | None = None

    async def ready(self) -> None:
        await self.streams.resume()
        self.http = await start_whip(self.settings, self.streams)

    async def stop(self, grace_s: float = 5.0) -> None:
        if self.http is not None:
            await self.http.cleanup()
        await self.streams.manager.close()
        await super().stop(grace_s)


class IngestService(ServesStreams):
    """`vcflash ingest`: streams in, clips out to the encoder service (split deployment); it also answers
    memory inspection so `vcflash streams ls` shows what is stored."""

    name = "ingest"

    def __init__(self, settings: Settings, frame_size: int = 448, registry: CollectorRegistry = REGISTRY) -> None:
        super().__init__(settings, registry=registry)
        self.frame_size = frame_size  # the encoder's S: 448 for the released 2B/7B res448 models

    async def setup(self) -> tuple[list[ServiceEntry], list[Any]]:
        s = self.settings
        entry, self.streams = ingest_entry(s, self.store, self.registry, self.frame_size)
        self.link = EncoderLink(
            self.streams.manager.clips,
            LinkSettings(
                s.encoder_address, s.api_token or "", s.max_unacked_clips, max_message_bytes=s.max_message_bytes
            ),
            on_stored=self.streams.on_stored,
            accepts=self.streams.accepts,
        )
        self.streams.drain = self.link.drain
        memory = (pb_grpc.add_MemoryServicer_to_server, MemoryServicer(self.store), MEMORY_SERVICE)
        return [entry, memory], [self.link.run()]
