"""The Encoder gRPC service: ingest streams clips in, each is acknowledged once its tokens are stored.

Clips from every connection share one bounded queue, so the worker batches across streams; a full
queue stops reading from the connections, and gRPC flow control pushes back to ingest.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
import numpy as np

from encoder_svc.worker import EncoderMetrics, EncoderSettings, EncoderWorker
from ingest.clips import CLIP_FRAMES, Clip
from ingest.pipeline import check_stream_name
from memory.retention import sweep_forever
from protos.vcflash.v1 import vcflash_pb2 as pb
from protos.vcflash.v1 import vcflash_pb2_grpc as pb_grpc
from vcflash.rpc import handle_errors
from vcflash.service import Service, ServiceEntry

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Encoder"].full_name
MAX_SIDE = 4096


def clip_from_request(r: pb.EncodeClipRequest) -> Clip:
    """Validate and unpack one clip; ValueError names what is wrong."""
    check_stream_name(r.stream_id)
    if r.seq < 0 or not (0 < r.height <= MAX_SIDE and 0 < r.width <= MAX_SIDE):
        raise ValueError(f"bad clip {r.stream_id}#{r.seq}: seq {r.seq}, size {r.width}x{r.height}")
    expected = CLIP_FRAMES * r.height * r.width * 3
    if len(r.frames) != expected:
        raise ValueError(f"clip {r.stream_id}#{r.seq} has {len(r.frames)} frame bytes, expected {expected}")
    frames = np.frombuffer(r.frames, dtype=np.uint8).reshape(CLIP_FRAMES, r.height, r.width, 3)
    return Clip(r.stream_id, r.seq, frames, tuple(r.media_times), tuple(r.wall_times), r.fps)


def clip_request(clip: Clip) -> pb.EncodeClipRequest:
    frames = np.ascontiguousarray(clip.frames)
    return pb.EncodeClipRequest(
        stream_id=clip.stream_id,
        seq=clip.seq,
        media_times=clip.media_times,
        wall_times=clip.wall_times,
        height=frames.shape[1],
        width=frames.shape[2],
        frames=frames.tobytes(),
        fps=clip.fps,
    )


class EncoderServicer(pb_grpc.EncoderServicer):
    def __init__(self, clips: asyncio.Queue[Clip]) -> None:
        self.clips = clips
        self.routes: dict[tuple[str, int], asyncio.Queue[pb.EncodeClipAck]] = {}  # who waits for which ack

    def on_stored(self, stream_id: str, seq: int) -> None:
        """EncoderWorker's callback: acknowledge on the connection that sent the clip last."""
        acks = self.routes.pop((stream_id, seq), None)
        if acks is not None:
            acks.put_nowait(pb.EncodeClipAck(stream_id=stream_id, seq=seq, stored=True))

    @handle_errors
    async def EncodeClips(
        self, request_iterator: AsyncIterator[pb.EncodeClipRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.EncodeClipAck]:
        acks: asyncio.Queue[pb.EncodeClipAck] = asyncio.Queue()

        async def read() -> None:
            async for request in request_iterator:
                try:
                    clip = clip_from_request(request)
                except ValueError as e:
                    log.warning("event=clip_rejected stream=%s seq=%d error=%s", request.stream_id, request.seq, e)
                    acks.put_nowait(pb.EncodeClipAck(stream_id=request.stream_id, seq=request.seq, error=str(e)))
                    continue
                self.routes[(clip.stream_id, clip.seq)] = acks
                await self.clips.put(clip)  # waits while the encoder is behind

        reader = asyncio.create_task(read())
        try:
            while True:
                yield await acks.get()
        finally:
            reader.cancel()
            for key in [k for k, q in self.routes.items() if q is acks]:
                del self.routes[key]


class EncoderService(Service):
    """`vcflash encoder`: the GPU side of the split deployment; writes tokens to the shared memory."""

    name = "encoder"

    async def setup(self) -> tuple[list[ServiceEntry], list[Any]]:
        s = self.settings
        model = await self.load_model()
        clips: asyncio.Queue[Clip] = asyncio.Queue(maxsize=4 * s.max_batch)
        servicer = EncoderServicer(clips)
        worker = EncoderWorker(
            model,
            self.store,
            clips,
            settings=EncoderSettings(max_batch=s.max_batch, max_wait_s=s.max_wait_ms / 1000),
            metrics=EncoderMetrics(self.registry),
            on_stored=servicer.on_stored,
        )
        entry = (pb_grpc.add_EncoderServicer_to_server, servicer, SERVICE_NAME)
        return [entry], [worker.run(), sweep_forever(self.store, None)]
