"""EncoderLink over several encoders: streams placed sticky and spread, an encoder's unacknowledged clips moved to
another when it dies, clips waiting while none is up. The encoders are in-process gRPC servers that record what
they were sent (a real encoder's writes are idempotent by (stream, seq): see tests/test_scale_out.py)."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator

import grpc
import numpy as np
import pytest

from ingest.encoder_link import EncoderLink, resolve
from protos.clip import Clip
from protos.vcflash.v1 import vcflash_pb2 as pb
from protos.vcflash.v1 import vcflash_pb2_grpc as pb_grpc
from vcflash.serve.settings import Backoff, LinkSettings

TOKEN = "link-secret-5d0c2a17e9"


class FakeEncoder(pb_grpc.EncoderServicer):
    def __init__(self) -> None:
        self.received: list[tuple[str, int]] = []
        self.holding = False  # take clips without acknowledging them (an encoder about to die)

    async def EncodeClips(
        self, request_iterator: AsyncIterator[pb.EncodeClipRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.EncodeClipAck]:
        async for r in request_iterator:
            self.received.append((r.stream_id, r.seq))
            if not self.holding:
                yield pb.EncodeClipAck(stream_id=r.stream_id, seq=r.seq, stored=True)


async def start_encoder(encoder: FakeEncoder, port: int = 0) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()
    pb_grpc.add_EncoderServicer_to_server(encoder, server)
    port = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server, port


def clip(stream: str, seq: int) -> Clip:
    frames = np.zeros((4, 16, 16, 3), np.uint8)
    media = tuple(seq * 4.0 + i for i in range(4))
    return Clip(stream, seq, frames, media, tuple(1e9 + t for t in media), 1.0)


def link_to(ports: list[int], stored: Counter[tuple[str, int]], **kwargs: object) -> EncoderLink:
    settings = LinkSettings(
        encoder_address=",".join(f"127.0.0.1:{p}" for p in ports),
        link_backoff=Backoff(initial_s=0.05, max_s=0.2),
        **kwargs,  # type: ignore[arg-type]
    )
    queue: asyncio.Queue[Clip] = asyncio.Queue()
    return EncoderLink(
        queue,
        settings,
        token=TOKEN,
        max_message_bytes=1 << 22,
        on_stored=lambda s, q: stored.update([(s, q)]),
    )


async def until(condition, timeout_s: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)


@pytest.mark.asyncio
async def test_streams_are_sticky_and_spread_and_survive_an_encoder_dying() -> None:
    encoders = [FakeEncoder() for _ in range(3)]
    servers = [await start_encoder(e) for e in encoders]
    stored: Counter[tuple[str, int]] = Counter()
    link = link_to([port for _, port in servers], stored)
    task = asyncio.create_task(link.run())
    try:
        await until(lambda: all(lane.up for lane in link.lanes.values()) and len(link.lanes) == 3)
        streams = [f"cam{i}" for i in range(6)]
        for seq in range(5):
            for s in streams:
                link.clips.put_nowait(clip(s, seq))
        await until(lambda: len(stored) == 30)
        by_stream = {s: {i for i, e in enumerate(encoders) for r in e.received if r[0] == s} for s in streams}
        assert all(len(held) == 1 for held in by_stream.values()), by_stream  # sticky
        assert sorted(Counter(next(iter(h)) for h in by_stream.values()).values()) == [2, 2, 2]  # spread

        # the encoder of cam0 takes clips without acknowledging them, then dies
        victim = next(iter(by_stream["cam0"]))
        encoders[victim].holding = True
        for seq in range(5, 10):
            for s in streams:
                link.clips.put_nowait(clip(s, seq))
        victims = [s for s in streams if by_stream[s] == {victim}]
        await until(lambda: sum(r[1] >= 5 for r in encoders[victim].received) == 5 * len(victims))
        assert len(stored) < 60
        await servers[victim][0].stop(0)
        await until(lambda: len(stored) == 60)
        assert set(stored.values()) == {1}  # each acknowledged once
        assert set(stored) == {(s, q) for s in streams for q in range(10)}
        survivors = [i for i in range(3) if i != victim]
        for s in victims:  # its streams moved, whole and in order, to one other encoder
            now = [i for i in survivors if (s, 5) in encoders[i].received]
            assert len(now) == 1
            assert [q for x, q in encoders[now[0]].received if x == s] == list(range(5, 10))
        assert link.unacked == {} and not link.pending
        assert link.window._value == link.settings.max_unacked_clips - 1  # one slot held for the next clip
    finally:
        task.cancel()
        for server, _ in servers:
            await server.stop(0)


@pytest.mark.asyncio
async def test_clips_wait_while_no_encoder_is_up() -> None:
    encoder = FakeEncoder()
    server, port = await start_encoder(encoder)
    await server.stop(0)  # the port is known, nothing listens
    stored: Counter[tuple[str, int]] = Counter()
    link = link_to([port], stored, max_unacked_clips=4)
    task = asyncio.create_task(link.run())
    try:
        for seq in range(6):
            link.clips.put_nowait(clip("cam", seq))
        await asyncio.sleep(0.3)
        assert len(link.pending) == 4 and link.clips.qsize() == 2  # the window is full
        server, _ = await start_encoder(encoder, port)
        await until(lambda: len(stored) == 6)
        assert [q for _, q in encoder.received] == list(range(6))  # in order
    finally:
        task.cancel()
        await server.stop(0)


@pytest.mark.asyncio
async def test_addresses_name_lanes() -> None:
    assert await resolve("127.0.0.1:1, 127.0.0.1:2") == {"127.0.0.1:1": None, "127.0.0.1:2": None}
    assert await resolve("dns:///localhost:50052") in (
        {"127.0.0.1:50052": "localhost"},
        {"127.0.0.1:50052": "localhost", "[::1]:50052": "localhost"},
    )
    assert await resolve("dns:///no-such-host.invalid:1") is None
    with pytest.raises(ValueError, match="needs a port"):
        await resolve("dns:///vcflash-encoder")
    for bad in ("dns:///vcflash-encoder", "127.0.0.1:1,", ""):  # refused at start, with the variable's name
        with pytest.raises(ValueError, match="VCFLASH_ENCODER_ADDRESS"):
            LinkSettings(encoder_address=bad)


@pytest.mark.asyncio
async def test_a_hung_encoder_loses_its_streams_after_the_ack_timeout() -> None:
    """An encoder that keeps its connection open but never acknowledges (a stuck GPU) is failed over like a dead
    one once it has owed an acknowledgement for `encoder_ack_timeout_s`; a slow but working one is not."""
    encoders = [FakeEncoder() for _ in range(2)]
    servers = [await start_encoder(e) for e in encoders]
    stored: Counter[tuple[str, int]] = Counter()
    link = link_to([port for _, port in servers], stored, encoder_ack_timeout_s=0.6)
    task = asyncio.create_task(link.run())
    try:
        await until(lambda: len(link.lanes) == 2 and all(lane.up for lane in link.lanes.values()))
        for s in ("cam0", "cam1"):
            link.clips.put_nowait(clip(s, 0))
        await until(lambda: len(stored) == 2)
        hung = next(i for i, e in enumerate(encoders) if ("cam0", 0) in e.received)
        encoders[hung].holding = True  # stays connected, never answers again
        await asyncio.sleep(1.5)  # idle past the timeout: owing nothing is not hanging
        assert all(lane.up for lane in link.lanes.values()) and link.reconnects == 0
        for seq in range(1, 4):
            link.clips.put_nowait(clip("cam0", seq))
        await until(lambda: len(stored) == 5, timeout_s=15)
        other = encoders[1 - hung]
        assert [q for s, q in other.received if s == "cam0"] == [1, 2, 3]  # moved whole and in order
        assert set(stored.values()) == {1} and link.unacked == {}
        assert link.reconnects >= 1
    finally:
        task.cancel()
        for server, _ in servers:
            await server.stop(0)
