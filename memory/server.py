"""The Memory gRPC service (clips by time range, per-stream statistics), and the base of every service that
holds the memory open."""

from __future__ import annotations

import asyncio

import grpc

from memory import MemoryStore, open_store
from memory.records import ClipMeta
from protos.vcflash.v1 import vcflash_pb2 as pb
from protos.vcflash.v1 import vcflash_pb2_grpc as pb_grpc
from vcflash.serve.errors import Invalid
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


class MemoryServicer(pb_grpc.MemoryServicer):
    def __init__(self, store: MemoryStore, settings: MemorySettings) -> None:
        self.store, self.max_clips = store, settings.max_list_clips

    @handle_errors
    async def ListClips(self, request: pb.ListClipsRequest, context: grpc.aio.ServicerContext) -> pb.ListClipsResponse:
        r = request.range
        start = r.start if r.HasField("start") else None
        end = r.end if r.HasField("end") else None
        if start is not None and end is not None and start >= end:
            raise Invalid(f"inverted time range: start {start} >= end {end}")
        clock = "wall" if r.clock == pb.CLOCK_WALL else "media"
        clips = await asyncio.to_thread(self.store.clips, request.stream_id, start, end, clock=clock)
        limit = min(request.limit or self.max_clips, self.max_clips)
        return pb.ListClipsResponse(clips=[clip_info(c) for c in clips[:limit]], truncated=len(clips) > limit)

    @handle_errors
    async def GetStats(self, request: pb.GetStatsRequest, context: grpc.aio.ServicerContext) -> pb.GetStatsResponse:
        ids = [request.stream_id] if request.stream_id else await asyncio.to_thread(self.store.streams)
        out = []
        for stream_id in ids:
            s = await asyncio.to_thread(self.store.stats, stream_id)
            out.append(
                pb.StreamMemoryStats(
                    stream_id=s.stream_id,
                    clips=s.clips,
                    bytes=s.bytes,
                    first=clip_info(s.first) if s.first else None,
                    last=clip_info(s.last) if s.last else None,
                    retention_max_age_s=s.retention.max_age_s,
                    retention_max_bytes=s.retention.max_bytes,
                    evicted_clips=s.evicted_clips,
                )
            )
        return pb.GetStatsResponse(streams=out)


class MemoryService(Service):
    """A service over the shared memory: opens it before `setup`, closes it after `stop`."""

    store: MemoryStore

    async def start(self) -> int:
        s = self.settings
        m = s.memory
        self.store = await asyncio.to_thread(open_store, m.redis_url, s.server.data_dir, m.token_format, m.secret_key)
        return await super().start()

    async def stop(self, grace_s: float = 5.0) -> None:
        await super().stop(grace_s)
        self.store.close()

    def memory_entry(self) -> ServiceEntry:
        return (pb_grpc.add_MemoryServicer_to_server, MemoryServicer(self.store, self.settings.memory), SERVICE_NAME)
