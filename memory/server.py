"""The Memory gRPC service (clips by time range, per-stream statistics, deleting a stream), and the base of every
service that holds the memory open."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from memory import ClipIndex, MemoryStore, UnknownStream, open_store
from memory.index import set_threads
from memory.records import ClipMeta, Clock, StreamStats
from protos.clip import check_stream_name
from protos.vcflash.v1 import vcflash_pb2 as pb
from protos.vcflash.v1 import vcflash_pb2_grpc as pb_grpc
from vcflash.serve.errors import FailedPrecondition, Invalid
from vcflash.serve.lifecycle import Service, ServiceEntry
from vcflash.serve.rpc import handle_errors
from vcflash.serve.settings import MemorySettings

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Memory"].full_name


def clip_info(m: ClipMeta) -> pb.ClipInfo:
    return pb.ClipInfo(
        stream_id=m.stream_id,
        seq=m.seq,
        wall_start=m.wall_start,
        wall_end=m.wall_end,
        media_start=m.media_start,
        media_end=m.media_end,
        frame_media_times=m.frame_media_times,
    )


def time_range(r: pb.TimeRange) -> tuple[float | None, float | None, Clock]:
    """A request's (start, end, clock); a NaN bound, or a clock this version does not know, is `Invalid` (proto3
    enums are open: an unknown number would otherwise read as the media clock)."""
    start = r.start if r.HasField("start") else None
    end = r.end if r.HasField("end") else None
    if (start is not None and math.isnan(start)) or (end is not None and math.isnan(end)):
        raise Invalid(f"a time range's start and end must be numbers, got {start} and {end}")
    if r.clock not in (pb.CLOCK_MEDIA, pb.CLOCK_WALL):
        raise Invalid(f"unknown clock {r.clock} (CLOCK_MEDIA is 0, CLOCK_WALL 1)")
    return start, end, "wall" if r.clock == pb.CLOCK_WALL else "media"


def memory_stats(s: StreamStats, config: dict[str, Any] | None, recording_bytes: int = 0) -> pb.StreamMemoryStats:
    return pb.StreamMemoryStats(
        stream_id=s.stream_id,
        clips=s.clips,
        bytes=s.bytes,
        first=clip_info(s.first) if s.first else None,
        last=clip_info(s.last) if s.last else None,
        retention_max_age_s=s.retention.max_age_s,
        retention_max_bytes=s.retention.max_bytes,
        evicted_clips=s.evicted_clips,
        configured=config is not None,
        active=bool(config and config.get("active")),
        recording_bytes=recording_bytes,
    )


MAX_THUMBNAILS = 32  # clips in one GetThumbnails answer
MAX_THUMBNAIL_ANSWER_BYTES = 4 << 20  # JPEG bytes in one answer, well under the gRPC message limit


def thumbnails_in_range(
    store: MemoryStore, stream_id: str, start: float | None, end: float | None, clock: Clock, limit: int
) -> tuple[list[tuple[ClipMeta, bytes]], float | None]:
    """The thumbnails of the first `limit` clips overlapping [start, end) (clips without one left out), and where
    to go on from when more clips follow (the end of the last clip looked at; None: no more). An answer also stops
    before MAX_THUMBNAIL_ANSWER_BYTES. Blocking."""
    clips = store.clips(stream_id, start, end, clock=clock, limit=limit + 1)
    jpegs = store.thumbnails(stream_id, [c.seq for c in clips[:limit]])
    out: list[tuple[ClipMeta, bytes]] = []
    total = 0
    for i, c in enumerate(clips[:limit]):
        jpeg = jpegs.get(c.seq)
        if jpeg is not None and out and total + len(jpeg) > MAX_THUMBNAIL_ANSWER_BYTES:
            return out, clips[i - 1].span(clock)[1]
        if jpeg is not None:
            out.append((c, jpeg))
            total += len(jpeg)
    return out, clips[limit - 1].span(clock)[1] if len(clips) > limit else None


async def delete_unless_active(store: MemoryStore, index: ClipIndex | None, stream_id: str) -> None:
    """Memory.DeleteStream on a server that runs no streams (the split deployment's reasoner): it cannot see
    which streams ingest runs, so a stream whose stored config is active (ingest resumes it) is refused; a
    WHIP stream is never active, so nothing stops this deleting one that is live (ingest's own Memory service
    refuses that)."""
    config = (await asyncio.to_thread(store.stream_configs)).get(stream_id)
    if config is not None and config.get("active"):
        raise FailedPrecondition(
            f"stream {stream_id!r} is active (an ingest server runs or resumes it); stop it and delete its memory "
            f"there with `vcflash streams rm --delete-memory {stream_id}`"
        )
    await asyncio.to_thread(store.delete_stream, stream_id)
    if index is not None:
        index.drop_stream(stream_id)


class MemoryServicer(pb_grpc.MemoryServicer):
    def __init__(
        self,
        store: MemoryStore,
        settings: MemorySettings,
        delete: Callable[[str], Awaitable[None]],
        recording_bytes: Callable[[str], int] = lambda stream_id: 0,
    ) -> None:
        """`delete(stream_id)` serves DeleteStream: the service decides whether a stream may go now.
        `recording_bytes(stream_id)`: its recording on this server's disk (GetStats)."""
        self.store, self.max_clips, self.delete = store, settings.max_list_clips, delete
        self.recording_bytes = recording_bytes

    @handle_errors
    async def ListClips(self, request: pb.ListClipsRequest, context: grpc.aio.ServicerContext) -> pb.ListClipsResponse:
        start, end, clock = time_range(request.range)
        if start is not None and end is not None and start >= end:
            raise Invalid(f"inverted time range: start {start} >= end {end}")
        if request.limit < 0:
            raise Invalid(f"limit must be >= 0 (0: the server's maximum), got {request.limit}")
        limit = min(request.limit or self.max_clips, self.max_clips)
        # one more than the limit says whether there are more, without reading them
        clips = await asyncio.to_thread(self.store.clips, request.stream_id, start, end, clock=clock, limit=limit + 1)
        return pb.ListClipsResponse(clips=[clip_info(c) for c in clips[:limit]], truncated=len(clips) > limit)

    @handle_errors
    async def GetStats(self, request: pb.GetStatsRequest, context: grpc.aio.ServicerContext) -> pb.GetStatsResponse:
        ids = [request.stream_id] if request.stream_id else await asyncio.to_thread(self.store.streams)
        configs = await asyncio.to_thread(self.store.stream_configs)
        out = []
        for stream_id in ids:
            try:
                s = await asyncio.to_thread(self.store.stats, stream_id)
            except UnknownStream:
                if request.stream_id:
                    raise
                continue  # deleted since it was listed
            recorded = await asyncio.to_thread(self.recording_bytes, stream_id)
            out.append(memory_stats(s, configs.get(stream_id), recorded))
        return pb.GetStatsResponse(streams=out)

    @handle_errors
    async def GetThumbnails(
        self, request: pb.GetThumbnailsRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetThumbnailsResponse:
        check_stream_name(request.stream_id)
        start, end, clock = time_range(request.range)
        if start is not None and end is not None and start >= end:
            raise Invalid(f"inverted time range: start {start} >= end {end}")
        if request.limit < 0:
            raise Invalid(f"limit must be >= 0 (0: the server's maximum), got {request.limit}")
        limit = min(request.limit or MAX_THUMBNAILS, MAX_THUMBNAILS)
        found, next_start = await asyncio.to_thread(
            thumbnails_in_range, self.store, request.stream_id, start, end, clock, limit
        )
        return pb.GetThumbnailsResponse(
            thumbnails=[pb.Thumbnail(clip=clip_info(c), jpeg=jpeg) for c, jpeg in found],
            truncated=next_start is not None,
            next_start=next_start,
        )

    @handle_errors
    async def DeleteStream(
        self, request: pb.DeleteStreamRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteStreamResponse:
        await self.delete(request.stream_id)
        return pb.DeleteStreamResponse()


class MemoryService(Service):
    """A service over the shared memory: opens it before `setup`, closes it after `stop`."""

    store: MemoryStore
    index: ClipIndex | None = None  # a FAISS index over the memory, for services that search it

    async def start(self) -> int:
        s = self.settings
        m = s.memory
        self.store = await asyncio.to_thread(
            open_store,
            m.redis_url,
            s.server.data_dir,
            m.token_format,
            m.secret_key,
            m.redis_timeout_s,
            m.max_thumbnail_bytes,
            m.max_events,
        )
        set_threads(m.faiss_threads)
        return await super().start()

    async def stop(self, grace_s: float = 5.0) -> None:
        await super().stop(grace_s)
        self.store.close()

    def memory_entry(self) -> ServiceEntry:
        servicer = MemoryServicer(self.store, self.settings.memory, self.delete_stream, self.recording_bytes)
        return (pb_grpc.add_MemoryServicer_to_server, servicer, SERVICE_NAME)

    async def delete_stream(self, stream_id: str) -> None:
        """Memory.DeleteStream here; a service that runs streams knows better which may go (`ServesStreams`)."""
        await delete_unless_active(self.store, self.index, stream_id)

    def recording_bytes(self, stream_id: str) -> int:
        """A stream's recording on this server's disk: none here; a service that records streams knows them."""
        return 0
