"""Malformed protobuf requests are INVALID_ARGUMENT (not UNKNOWN/INTERNAL), for unary and streaming requests, with
no traceback in the log; the refusal names no part of the input."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc
import pytest
import pytest_asyncio

from protos.vcflash.v1 import vcflash_pb2 as pb
from protos.vcflash.v1 import vcflash_pb2_grpc as pb_grpc
from vcflash.serve.errors import Invalid, excerpt
from vcflash.serve.rpc import MALFORMED_MESSAGE, create_server, handle_errors, set_serving

TOKEN = "malformed-tests-token-0123456789"
pytestmark = pytest.mark.asyncio
AUTH = (("authorization", f"Bearer {TOKEN}"),)
GARBAGE = [b"\xff\xff\xff\xff", b"\x0a\xff\x01", b"\x08", b"\x12\x05ab"]  # bad tag, bad length, truncations


class Encoder(pb_grpc.EncoderServicer):
    """Reads its requests in another task, as the real EncodeClips does."""

    def __init__(self) -> None:
        self.seen: list[int] = []

    @handle_errors
    async def EncodeClips(self, request_iterator, context):  # type: ignore[no-untyped-def]
        acks: asyncio.Queue[pb.EncodeClipAck] = asyncio.Queue()

        async def read() -> None:
            async for request in request_iterator:
                self.seen.append(request.seq)
                acks.put_nowait(pb.EncodeClipAck(stream_id=request.stream_id, seq=request.seq))

        reader = asyncio.create_task(read())
        try:
            while True:
                yield await acks.get()
        finally:
            reader.cancel()


class Memory(pb_grpc.MemoryServicer):
    @handle_errors
    async def GetStats(self, request, context):  # type: ignore[no-untyped-def]
        raise Invalid(f"no stream named {excerpt(request.stream_id)}")


@pytest_asyncio.fixture
async def served() -> AsyncIterator[tuple[str, Encoder]]:
    encoder = Encoder()
    services = [
        (pb_grpc.add_EncoderServicer_to_server, encoder, "vcflash.v1.Encoder"),
        (pb_grpc.add_MemoryServicer_to_server, Memory(), "vcflash.v1.Memory"),
    ]
    server, port, health = create_server("127.0.0.1:0", services, TOKEN, 1 << 20)
    await server.start()
    await set_serving(health, ["vcflash.v1.Encoder", "vcflash.v1.Memory"], True)
    yield f"127.0.0.1:{port}", encoder
    await server.stop(0)


@pytest.mark.parametrize("method", ["/vcflash.v1.Memory/GetStats", "/grpc.health.v1.Health/Check"])
async def test_malformed_unary_request_is_invalid_argument_without_traceback(
    served: tuple[str, Encoder], method: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with grpc.aio.insecure_channel(served[0]) as channel:
        call = channel.unary_unary(method)  # no serializers: raw bytes
        for raw in GARBAGE:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await call(raw, metadata=AUTH, timeout=5)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (raw, e.value)
            assert e.value.details() == MALFORMED_MESSAGE
        health = await channel.unary_unary("/grpc.health.v1.Health/Check")(b"", timeout=5)
        assert health == b"\x08\x01"  # SERVING: a well-formed request still works
    assert not [r for r in caplog.records if r.exc_info], "a malformed request logged a traceback"


async def test_malformed_unary_request_to_a_streaming_response(served: tuple[str, Encoder]) -> None:
    async with grpc.aio.insecure_channel(served[0]) as channel:
        call = channel.unary_stream("/grpc.health.v1.Health/Watch")(b"\xff\xff", timeout=5)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            async for _ in call:
                pass
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_malformed_message_in_a_request_stream_ends_the_call(served: tuple[str, Encoder]) -> None:
    address, encoder = served
    good = pb.EncodeClipRequest(stream_id="cam", seq=1).SerializeToString()
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.stream_stream("/vcflash.v1.Encoder/EncodeClips")(metadata=AUTH, timeout=5)
        await call.write(good)
        assert pb.EncodeClipAck.FromString(await call.read()).seq == 1
        await call.write(b"\xff\xff\xff")
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await call.read()
            await call.read()
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert encoder.seen == [1]


async def test_well_formed_requests_still_reach_the_methods(served: tuple[str, Encoder]) -> None:
    async with grpc.aio.insecure_channel(served[0]) as channel:
        stub = pb_grpc.MemoryStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.GetStats(pb.GetStatsRequest(stream_id="x" * 5000), metadata=AUTH, timeout=5)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert len(e.value.details()) < 120  # the 5000-character name is not echoed
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.GetStats(pb.GetStatsRequest(), timeout=5)  # no token: auth still applies
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_excerpt_keeps_short_text_and_cuts_long_text() -> None:
    assert excerpt("cam") == "'cam'"
    long = excerpt("a\nb" * 1000, 10)
    assert long.startswith("'a\\nba\\nba\\nb") and "3000 characters" in long and len(long) < 40
