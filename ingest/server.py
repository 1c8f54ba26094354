"""The Ingest gRPC service (add, remove, list and inspect streams), WHIP beside it, and `vcflash ingest`.

The servicer only translates: streams come and go through the registry (`ingest.streams.Streams`), which
keeps their specs in memory so a restarted server resumes every active stream.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import grpc
from aiohttp import web
from prometheus_client import CollectorRegistry

from ingest.encoder_link import EncoderLink
from ingest.http import create_whip_app, start_http
from ingest.pipeline import IngestManager, StreamStatus
from ingest.recording import Recordings
from ingest.shards import resolve_shard
from ingest.spec import StreamSpec
from ingest.streams import Streams
from memory.index import ClipIndex
from memory.records import Retention
from memory.server import MemoryService
from memory.store import MemoryStore
from protos.vcflash.v1 import vcflash_pb2 as pb
from protos.vcflash.v1 import vcflash_pb2_grpc as pb_grpc
from vcflash.serve.errors import Invalid
from vcflash.serve.lifecycle import ServiceEntry
from vcflash.serve.rpc import handle_errors
from vcflash.serve.settings import Settings
from vcflash.serve.tls import server_ssl_context

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Ingest"].full_name
DEFAULT_FRAME_SIZE = 448  # the encoder's S for the released 2B/7B res448 models


def spec_from_request(r: pb.AddStreamRequest) -> StreamSpec:
    return StreamSpec(
        r.source,
        fps=r.fps or None,
        realtime=r.realtime,
        loop=r.loop,
        transport=r.transport or "tcp",  # type: ignore[arg-type]  # checked by the spec
        listen=r.listen,
        keyframes_only=r.keyframes_only,
        camera_clock=r.camera_clock,
        live=r.live if r.HasField("live") else None,
        record=r.record,
    )


def retention_from_request(r: pb.AddStreamRequest, default: Retention) -> Retention | None:
    """The request's retention, each limit it leaves out taken from `default`; None if it sets neither."""
    if not (r.HasField("retention_max_age_s") or r.HasField("retention_max_bytes")):
        return None
    if r.HasField("retention_max_age_s") and not math.isfinite(r.retention_max_age_s):  # NaN would never evict
        raise Invalid(f"retention_max_age_s must be a finite number of seconds, got {r.retention_max_age_s}")
    return Retention(
        r.retention_max_age_s if r.HasField("retention_max_age_s") else default.max_age_s,
        r.retention_max_bytes if r.HasField("retention_max_bytes") else default.max_bytes,
    )


def stream_status(
    s: StreamStatus, clips_stored: int, memory_error: str = "", recording_bytes: int = 0
) -> pb.StreamStatus:
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
        clips_stored=clips_stored,
        last_media_time=s.last_media_time or 0.0,
        last_wall_time=s.last_wall_time or 0.0,
        reconnects=s.reconnects,
        memory_error=memory_error,
        clock=s.clock,
        decode=s.decode,
        recording_bytes=recording_bytes,
    )


class IngestServicer(pb_grpc.IngestServicer):
    def __init__(self, streams: Streams) -> None:
        self.streams = streams

    def _proto(self, s: StreamStatus, memory_error: str = "") -> pb.StreamStatus:
        recordings = self.streams.recordings
        # the sizes its index keeps, and one stat: cheap enough for the event loop
        recorded = recordings.nbytes(s.name) if recordings is not None else 0
        return stream_status(s, self.streams.stored[s.name], memory_error, recorded)

    @handle_errors
    async def AddStream(self, request: pb.AddStreamRequest, context: grpc.aio.ServicerContext) -> pb.StreamStatus:
        retention = retention_from_request(request, self.streams.default_retention)
        return self._proto(await self.streams.add(request.stream_id, spec_from_request(request), retention))

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
        memory_error = await self.streams.memory_error()  # shown beside the streams: listing never needs memory
        streams = self.streams.manager.status().values()
        return pb.ListStreamsResponse(streams=[self._proto(s, memory_error) for s in streams])

    @handle_errors
    async def GetStream(self, request: pb.GetStreamRequest, context: grpc.aio.ServicerContext) -> pb.StreamStatus:
        status = self.streams.status(request.stream_id)
        return self._proto(status, await self.streams.memory_error())

    @handle_errors
    async def RestartStream(
        self, request: pb.RestartStreamRequest, context: grpc.aio.ServicerContext
    ) -> pb.StreamStatus:
        return self._proto(await self.streams.restart(request.stream_id))


def ingest_entry(
    settings: Settings, store: MemoryStore, registry: CollectorRegistry, frame_size: int, index: ClipIndex | None = None
) -> tuple[ServiceEntry, Streams]:
    """The Ingest service over a new stream registry whose clips are squashed to the encoder's input size."""
    manager = IngestManager(replace(settings.ingest, frame_size=frame_size), registry=registry)
    m, i = settings.memory, settings.ingest
    recordings = Recordings(
        settings.server.data_dir / "recordings", i.record_segment_s, i.record_max_bytes, i.max_recording_range_s
    )
    shard = resolve_shard(i.ingest_shard, i.ingest_shards)
    if shard.count > 1:
        log.info("event=ingest_shard shard=%d shards=%d", shard.index, shard.count)
    retention = Retention(m.retention_max_age_s, m.retention_max_bytes)
    streams = Streams(manager, store, retention, index, recordings, shard)
    return (pb_grpc.add_IngestServicer_to_server, IngestServicer(streams), SERVICE_NAME), streams


async def start_whip(
    settings: Settings, streams: Streams, extend: Callable[[web.Application], None] | None = None
) -> web.AppRunner | None:
    """The WHIP endpoint (POST/DELETE /whip/{stream}) next to the gRPC server, when VCFLASH_HTTP_PORT is set;
    `extend(app)` adds routes to it before it starts (the web console)."""
    s = settings.server
    if not s.http_port:
        return None
    app = create_whip_app(streams, token=s.api_token, max_sdp_bytes=settings.ingest.max_sdp_bytes)
    if extend is not None:
        extend(app)
    tls = server_ssl_context(s.tls_cert, s.tls_key)
    limits = {"timeout_s": s.http_timeout_s, "max_connections": s.http_max_connections}
    runner, _ = await start_http(app, s.host, s.http_port, ssl_context=tls, **limits)
    return runner


class ServesStreams(MemoryService):
    """A service that runs streams (ingest, or all-in-one): resumes them, serves WHIP, stops them.

    Subclasses set `self.streams` in `setup`."""

    streams: Streams
    http: web.AppRunner | None = None

    async def ready(self) -> None:
        await self.streams.resume()
        self.http = await start_whip(self.settings, self.streams, self.extend_http)

    def extend_http(self, app: web.Application) -> None:
        """More routes on the HTTP port, added before it starts: the all-in-one server and `vcflash ingest`
        (`vcflash.console.split`) add the web console."""

    async def delete_stream(self, stream_id: str) -> None:
        """Memory.DeleteStream: refused while the stream runs here; see `Streams.delete_memory`."""
        await self.streams.delete_memory(stream_id)

    def recording_bytes(self, stream_id: str) -> int:
        recordings = self.streams.recordings
        return 0 if recordings is None else recordings.nbytes(stream_id)

    async def stop(self, grace_s: float = 5.0) -> None:
        if self.http is not None:
            await self.http.cleanup()
        await self.streams.manager.close()
        await super().stop(grace_s)


class IngestService(ServesStreams):
    """`vcflash ingest`: streams in, clips out to the encoder service (split deployment); it also answers
    memory inspection so `vcflash streams ls` shows what is stored."""

    name = "ingest"

    async def setup(self) -> tuple[list[ServiceEntry], list[Any]]:
        s = self.settings
        frame_size = s.ingest.frame_size or DEFAULT_FRAME_SIZE
        entry, self.streams = ingest_entry(s, self.store, self.registry, frame_size)
        self.link = EncoderLink(
            self.streams.manager.clips,
            s.link,
            token=s.server.api_token or "",
            max_message_bytes=s.server.max_message_bytes,
            on_stored=self.streams.on_stored,
            accepts=self.streams.accepts,
        )
        self.streams.drain = self.link.drain
        return [entry, self.memory_entry()], [self.link.run(), self.streams.sweep_recordings_forever()]
