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

from encoder_svc.worker import EncoderMetrics, EncoderWorker
from hico import VideoChatFlash
from memory.retention import sweep_forever
from memory.server import MemoryService
from protos.clip import Clip, clip_from_request
from protos.vcflash.v1 import vcflash_pb2 as pb
from protos.vcflash.v1 import vcflash_pb2_grpc as pb_grpc
from vcflash.serve.errors import Invalid, excerpt
from vcflash.serve.lifecycle import ServiceEntry
from vcflash.serve.rpc import handle_errors

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Encoder"].full_name


class EncoderServicer(pb_grpc.EncoderServicer):
    def __init__(
        self,
        clips: asyncio.Queue[Clip],
        max_side: int,
        metrics: EncoderMetrics | None = None,
        max_thumbnail_bytes: int = 262_144,
    ) -> None:
        self.clips, self.max_side, self.metrics = clips, max_side, metrics
        self.max_thumbnail_bytes = max_thumbnail_bytes
        self.routes: dict[tuple[str, int], asyncio.Queue[pb.EncodeClipAck]] = {}  # who waits for which ack

    def on_stored(self, stream_id: str, seq: int) -> None:
        """EncoderWorker's callback: acknowledge on the connection that sent the clip last."""
        acks = self.routes.pop((stream_id, seq), None)
        if acks is not None:
            acks.put_nowait(pb.EncodeClipAck(stream_id=stream_id, seq=seq, stored=True))

    def on_failed(self, stream_id: str, seq: int, error: str) -> None:
        """EncoderWorker's callback: the clip was rejected for good; the error ack releases ingest's window."""
        acks = self.routes.pop((stream_id, seq), None)
        if acks is not None:
            acks.put_nowait(pb.EncodeClipAck(stream_id=stream_id, seq=seq, stored=False, error=error))

    @handle_errors
    async def EncodeClips(
        self, request_iterator: AsyncIterator[pb.EncodeClipRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.EncodeClipAck]:
        acks: asyncio.Queue[pb.EncodeClipAck] = asyncio.Queue()

        async def read() -> None:
            async for request in request_iterator:
                try:
                    clip = clip_from_request(request, self.max_side, self.max_thumbnail_bytes)
                except Invalid as e:
                    name = excerpt(request.stream_id)  # not checked yet: may be long or hold CR/LF
                    log.warning("event=clip_rejected stream=%s seq=%d error=%s", name, request.seq, e)
                    if self.metrics is not None:
                        self.metrics.failed.labels("invalid").inc()
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


class EncoderService(MemoryService):
    """`vcflash encoder`: the GPU side of the split deployment; writes tokens to the shared memory."""

    name = "encoder"
    model: VideoChatFlash | None = None  # loaded in `setup` unless given

    async def setup(self) -> tuple[list[ServiceEntry], list[Any]]:
        s = self.settings
        load = VideoChatFlash.from_pretrained
        self.model = self.model or await asyncio.to_thread(load, *s.model.load_args())
        clips: asyncio.Queue[Clip] = asyncio.Queue(maxsize=4 * s.encoder.max_batch)
        metrics = EncoderMetrics(self.registry)
        servicer = EncoderServicer(clips, s.encoder.max_frame_side, metrics, s.memory.max_thumbnail_bytes)
        worker = EncoderWorker(
            self.model,
            self.store,
            clips,
            settings=s.encoder,
            metrics=metrics,
            on_stored=servicer.on_stored,
            on_failed=servicer.on_failed,
            on_health=self.set_healthy,
        )
        entry = (pb_grpc.add_EncoderServicer_to_server, servicer, SERVICE_NAME)
        return [entry], [worker.run(), sweep_forever(self.store, None)]
