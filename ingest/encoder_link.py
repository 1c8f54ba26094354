"""Ingest's side of the split deployment: send clips to the encoder service(s), resend until acknowledged.

`VCFLASH_ENCODER_ADDRESS` names one encoder (`host:port`), every address a DNS name resolves to
(`dns:///vcflash-encoder:50052`: a headless Service's ready pods, resolved again every `VCFLASH_ENCODER_RESOLVE_S`),
or a comma-separated list of either (`127.0.0.1:50052,127.0.0.1:50062`). Each address is a *lane*: its own channel
and one `EncodeClips` stream. This is client-side load balancing done here rather than by a gRPC LB policy, since
gRPC's (pick_first, round_robin) place whole calls, and we need each *stream's* clips on one encoder:

- sticky: a stream's clips go to the encoder it was given while that encoder's lane is up;
- spread: a stream not yet placed goes to the up lane with the fewest streams, ties taken round-robin;
- failover: when a lane fails (the encoder died, restarts, or left DNS; or hangs: its connection stays open but
  no acknowledgement comes for `VCFLASH_ENCODER_ACK_TIMEOUT_S` while it holds clips), every clip it had not
  acknowledged, and its streams, go to the other up lanes, in order; with none up they wait until one is.

HTTP/2 keepalive pings find a peer whose host vanished (no FIN, no RST) within about `KEEPALIVE_MS` + its timeout.

A clip stays in the unacknowledged window until an encoder says it is stored. Memory writes are idempotent by
(stream, seq) (the store's put is a no-op for a clip it holds), so a clip a dead encoder stored just before it
died, then sent again elsewhere, is stored once. While the window is full the link stops taking clips, so the
ingest queue fills and its drops are counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections import Counter
from collections.abc import Callable

import grpc

from protos.clip import Clip, clip_request
from protos.vcflash.v1 import vcflash_pb2 as pb
from protos.vcflash.v1 import vcflash_pb2_grpc as pb_grpc
from vcflash.serve.settings import LinkSettings
from vcflash.serve.tls import aio_channel

log = logging.getLogger(__name__)
DNS = "dns:///"
# Pings on an idle or busy connection find a vanished peer; servers allow them this often (vcflash.serve.rpc).
KEEPALIVE_MS, KEEPALIVE_TIMEOUT_MS = 20_000, 10_000


def split_host_port(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"encoder address {address!r} needs a port (dns:///name:port)")
    return host.strip("[]"), int(port)


async def resolve(address: str) -> dict[str, str | None] | None:
    """The lanes `address` names: target -> the host name to verify TLS against (None: the target's own).

    None when a DNS name does not resolve right now (the caller keeps the lanes it has)."""
    targets: dict[str, str | None] = {}
    loop = asyncio.get_running_loop()
    for part in (p.strip() for p in address.split(",")):
        if not part:
            continue
        if not part.startswith(DNS):
            targets[part] = None  # gRPC resolves it itself, one connection
            continue
        host, port = split_host_port(part[len(DNS) :])
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as e:
            log.warning("event=encoder_resolve_failed name=%s error=%s", host, e)
            return None
        for *_, sockaddr in infos:
            ip = str(sockaddr[0])
            targets[f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"] = host
    return targets


class Lane:
    """One encoder: a channel, an `EncodeClips` stream, the clips waiting to go to it and those it holds."""

    def __init__(self, link: EncoderLink, target: str, tls_name: str | None) -> None:
        self.link, self.target, self.tls_name = link, target, tls_name
        self.up = False
        self.outbox: asyncio.Queue[Clip] = asyncio.Queue()  # bounded by the link's window
        self.inflight: dict[tuple[str, int], Clip] = {}  # written, not acknowledged; insertion order = send order
        self.progress_at = 0.0  # loop time of the last sign of work: connected, an ack, a clip sent to an idle lane
        self.attempt = 0  # failures since this encoder last acknowledged a clip
        self.task: asyncio.Task[None] | None = None

    def take_all(self) -> list[Clip]:
        """Every clip this lane holds, in send order: those it sent first, then those waiting to go."""
        clips = list(self.inflight.values())
        self.inflight.clear()
        while not self.outbox.empty():
            clips.append(self.outbox.get_nowait())
        return clips

    async def run(self) -> None:
        s = self.link.settings
        options: list[tuple[str, object]] = [
            ("grpc.max_send_message_length", self.link.max_message_bytes),
            ("grpc.initial_reconnect_backoff_ms", int(s.link_backoff.initial_s * 1000)),
            ("grpc.max_reconnect_backoff_ms", int(s.link_backoff.max_s * 1000)),
            ("grpc.keepalive_time_ms", KEEPALIVE_MS),
            ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
        ]
        if s.tls_ca is not None and self.tls_name:  # dialled by address: verify the certificate for the name
            options.append(("grpc.ssl_target_name_override", self.tls_name))
        while True:
            try:
                async with aio_channel(self.target, s.tls_ca, options) as channel:
                    await channel.channel_ready()  # gRPC retries the connection (backoff above) until it is up
                    call = pb_grpc.EncoderStub(channel).EncodeClips(
                        metadata=(("authorization", f"Bearer {self.link.token}"),)
                    )
                    self.progress_at = asyncio.get_running_loop().time()
                    self.link.lane_up(self)
                    tasks = [asyncio.create_task(t) for t in (self._send(call), self._receive(call), self._watch())]
                    try:
                        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                        for task in done:
                            task.result()  # the failure: AioRpcError or ConnectionError
                    finally:
                        for task in tasks:
                            task.cancel()
                        call.cancel()
            except (grpc.aio.AioRpcError, ConnectionError) as e:
                detail = e.code().name if isinstance(e, grpc.aio.AioRpcError) else str(e)
                delay = s.link_backoff.delay(self.attempt)
                self.attempt += 1
                self.link.lane_down(self, detail, delay)
                await asyncio.sleep(delay)

    async def _send(self, call: grpc.aio.StreamStreamCall) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):  # the reader sees the failure
            while True:
                clip = await self.outbox.get()
                if not self.inflight:  # the encoder owes nothing yet: its time to answer starts now
                    self.progress_at = asyncio.get_running_loop().time()
                self.inflight[(clip.stream_id, clip.seq)] = clip  # before the write: a failure mid-write resends it
                await call.write(clip_request(clip))
        await asyncio.Future()  # a failed write ends nothing by itself: the reader reports the failure

    async def _receive(self, call: grpc.aio.StreamStreamCall) -> None:
        async for ack in call:
            self.attempt = 0  # healthy again
            self.progress_at = asyncio.get_running_loop().time()
            self.link.ack(self, ack)
        raise ConnectionError("the encoder closed the stream")

    async def _watch(self) -> None:
        """Fails the lane when the encoder holds clips and has acknowledged none for the ack timeout: a hung
        encoder (a stuck GPU, a deadlock) keeps its connection open, so nothing else would move its clips."""
        timeout = self.link.settings.encoder_ack_timeout_s
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(min(1.0, timeout / 4))
            if self.inflight and loop.time() - self.progress_at > timeout:
                raise ConnectionError(f"no acknowledgement in {timeout:g} s for {len(self.inflight)} clips: hung")


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
        self.unacked: dict[tuple[str, int], Clip] = {}  # every clip taken and not yet acknowledged, on any lane
        self.window = asyncio.Semaphore(settings.max_unacked_clips)
        self.lanes: dict[str, Lane] = {}  # by target
        self.placed: dict[str, Lane] = {}  # stream -> the lane its clips go to
        self.pending: list[Clip] = []  # clips waiting for a lane to be up
        self.reconnects = 0
        self._turn = 0  # round-robin among lanes with equally many streams

    async def run(self) -> None:
        """Forever: keep the lanes (resolving the address), take clips from the queue and place them."""
        resolver = asyncio.create_task(self._resolve_forever())
        try:
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
                self._place(clip)
        finally:
            resolver.cancel()
            for lane in self.lanes.values():
                if lane.task is not None:
                    lane.task.cancel()

    async def _resolve_forever(self) -> None:
        attempt = 0
        while True:
            targets = await resolve(self.settings.encoder_address)
            if targets is not None:
                self.set_lanes(targets)
            if DNS not in self.settings.encoder_address:
                return  # fixed addresses: the lanes never change
            if targets:
                attempt = 0
                await asyncio.sleep(self.settings.encoder_resolve_s)
            else:  # nothing to send to: look again soon
                await asyncio.sleep(self.settings.link_backoff.delay(attempt))
                attempt += 1

    def set_lanes(self, targets: dict[str, str | None]) -> None:
        """Open a lane for each new target; close those of targets gone (their clips and streams move on)."""
        for target in [t for t in self.lanes if t not in targets]:
            lane = self.lanes.pop(target)
            if lane.task is not None:
                lane.task.cancel()
            log.info("event=encoder_removed address=%s", target)
            self.lane_down(lane, "no longer resolved", None)
        for target, tls_name in targets.items():
            if target not in self.lanes:
                lane = self.lanes[target] = Lane(self, target, tls_name)
                lane.task = asyncio.create_task(lane.run())
                if len(targets) > 1 or len(self.lanes) > 1:
                    log.info("event=encoder_added address=%s", target)

    def lane_up(self, lane: Lane) -> None:
        lane.up = True
        waiting, self.pending = self.pending, []
        for clip in waiting:
            self._place(clip)

    def lane_down(self, lane: Lane, error: str, retry_s: float | None) -> None:
        """The lane's encoder is gone: its streams are placed again and its clips follow them (in order)."""
        self.reconnects += 1
        lane.up = False
        for stream in [s for s, held in self.placed.items() if held is lane]:
            del self.placed[stream]
        clips = lane.take_all()
        log.warning(
            "event=encoder_unreachable address=%s moved=%d unacked=%d retry_s=%s error=%s",
            lane.target,
            len(clips),
            len(self.unacked),
            "-" if retry_s is None else f"{retry_s:.1f}",
            error,
        )
        for clip in clips:
            self._place(clip)

    def _place(self, clip: Clip) -> None:
        """Hand `clip` to its stream's lane, placing the stream first if it has none up; or keep it pending."""
        key = (clip.stream_id, clip.seq)
        if self.accepts is not None and not self.accepts(clip.stream_id):  # removed while it waited
            if self.unacked.pop(key, None) is not None:
                self.window.release()
            return
        lane = self.placed.get(clip.stream_id)
        if lane is None or not lane.up:
            lane = self._choose(clip.stream_id)
        if lane is None:
            self.pending.append(clip)
        else:
            lane.outbox.put_nowait(clip)

    def _choose(self, stream_id: str) -> Lane | None:
        up = [lane for lane in self.lanes.values() if lane.up]
        if not up:
            return None
        if self.accepts is not None:  # streams removed since no longer weigh on their lane
            for stream in [s for s in self.placed if not self.accepts(s)]:
                del self.placed[stream]
        load = Counter(lane.target for lane in self.placed.values())
        start = self._turn % len(up)
        self._turn += 1
        lane = min(up[start:] + up[:start], key=lambda candidate: load[candidate.target])
        self.placed[stream_id] = lane
        if len(self.lanes) > 1:
            log.info("event=stream_placed stream=%s encoder=%s", stream_id, lane.target)
        return lane

    async def drain(self, stream_id: str, timeout_s: float = 10.0) -> None:
        """Wait until no clip of `stream_id` is at an encoder unacknowledged (so deleting its memory
        afterwards leaves nothing behind); gives up after `timeout_s` (an encoder that is down)."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while any(key[0] == stream_id for key in self.unacked) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)

    def ack(self, lane: Lane, ack: pb.EncodeClipAck) -> None:
        key = (ack.stream_id, ack.seq)
        lane.inflight.pop(key, None)
        if self.unacked.pop(key, None) is None:
            return  # a duplicate ack after a resend
        self.window.release()
        if ack.stored:
            if self.on_stored is not None:
                self.on_stored(ack.stream_id, ack.seq)
        else:
            log.warning("event=clip_rejected stream=%s seq=%d error=%s", ack.stream_id, ack.seq, ack.error)
            if self.on_rejected is not None:
                self.on_rejected(ack.stream_id, ack.seq, ack.error)
