"""Ingest's side of the split deployment: send clips to the encoder service, resend until acknowledged.

A clip stays in the unacknowledged window until the encoder says it is stored. When the encoder goes
away (a crash, a restart), the link reconnects with backoff and resends the whole window, in order;
memory writes are idempotent, so a clip stored just before a crash is not duplicated. While the
window is full the link stops taking clips, so the ingest queue fills and its drops are counted.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import grpc

from protos.clip import Clip, clip_request
from protos.vcflash.v1 import vcflash_pb2 as pb
from protos.vcflash.v1 import vcflash_pb2_grpc as pb_grpc
from vcflash.serve.settings import LinkSettings
from vcflash.serve.tls import aio_channel

log = logging.getLogger(__name__)


class EncoderLink:
    """`token` and `max_message_bytes` are the server's (VCFLASH_API_TOKEN, VCFLASH_MAX_MESSAGE_BYTES): the
    encoder service shares them."""

    def __init__(
        self,
        clips: asyncio.Queue[Clip],
        settings: LinkSettings,
        *,
        token: str,
        max_message_bytes: int,
        on_stored: Callable[[str, int], None] | None = None,
        on_rejected: Callable[[str, int, str], None] | None = None,
        accepts: Callable[[str], bool] | None = None,
    ) -> None:
        self.clips, self.settings = clips, settings
        self.token, self.max_message_bytes = token, max_message_bytes
        self.accepts = accepts  # clips of streams removed meanwhile are not sent (or resent)
        self.on_stored, self.on_rejected = on_stored, on_rejected
        self.unacked: dict[tuple[str, int], Clip] = {}  # insertion order = send order
        self.window = asyncio.Semaphore(settings.max_unacked_clips)
        self.reconnects = 0

    async def run(self) -> None:
        """Forever: connect, resend the window, stream new clips, read acks; back off on failure."""
        attempt = 0  # failures since the encoder last acknowledged a clip
        address = self.settings.encoder_address
        options = [("grpc.max_send_message_length", self.max_message_bytes)]
        while True:
            try:
                async with aio_channel(address, self.settings.tls_ca, options) as channel:
                    call = pb_grpc.EncoderStub(channel).EncodeClips(
                        metadata=(("authorization", f"Bearer {self.token}"),)
                    )
                    sender = asyncio.create_task(self._send(call))
                    try:
                        async for ack in call:
                            attempt = 0  # healthy again
                            self._ack(ack)
                        raise ConnectionError("the encoder closed the stream")
                    finally:
                        sender.cancel()
            except (grpc.aio.AioRpcError, ConnectionError) as e:
                self.reconnects += 1
                delay = self.settings.link_backoff.delay(attempt)
                attempt += 1
                detail = e.code().name if isinstance(e, grpc.aio.AioRpcError) else str(e)
                log.warning(
                    "event=encoder_unreachable address=%s unacked=%d retry_s=%.1f error=%s",
                    address,
                    len(self.unacked),
                    delay,
                    detail,
                )
                await asyncio.sleep(delay)

    async def _send(self, call: grpc.aio.StreamStreamCall) -> None:
        for key, clip in list(self.unacked.items()):  # what the last connection left unacknowledged
            if self.accepts is not None and not self.accepts(clip.stream_id):
                del self.unacked[key]
                self.window.release()
                continue
            await call.write(clip_request(clip))
        while True:
            await self.window.acquire()
            try:
                clip = await self.clips.get()
            except asyncio.CancelledError:
                self.window.release()
                raise
            if self.accepts is not None and not self.accepts(clip.stream_id):
                self.window.release()
                continue
            self.unacked[(clip.stream_id, clip.seq)] = clip
            await call.write(clip_request(clip))

    async def drain(self, stream_id: str, timeout_s: float = 10.0) -> None:
        """Wait until no clip of `stream_id` is at the encoder unacknowledged (so deleting its memory
        afterwards leaves nothing behind); gives up after `timeout_s` (an encoder that is down)."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while any(key[0] == stream_id for key in self.unacked) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)

    def _ack(self, ack: pb.EncodeClipAck) -> None:
        if self.unacked.pop((ack.stream_id, ack.seq), None) is None:
            return  # a duplicate ack after a resend
        self.window.release()
        if ack.stored:
            if self.on_stored is not None:
                self.on_stored(ack.stream_id, ack.seq)
        else:
            log.warning("event=clip_rejected stream=%s seq=%d error=%s", ack.stream_id, ack.seq, ack.error)
            if self.on_rejected is not None:
                self.on_rejected(ack.stream_id, ack.seq, ack.error)
