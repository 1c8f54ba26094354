"""Raw and mutated protobuf for every method of every service the server offers (found from the generated
descriptors, so a new method is fuzzed without a change here): random bytes, truncations, bit flips, wrong wire
types, unknown fields, bad lengths, deep groups, oversized messages, and valid messages with hostile field values.

A request that does not parse is INVALID_ARGUMENT, one over the message limit RESOURCE_EXHAUSTED, and one that
parses gets an answer or a status from the method's own set; never UNKNOWN or INTERNAL, never a hang, never a secret.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable

import grpc
import pytest
from google.protobuf import message_factory
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from protos.vcflash.v1 import vcflash_pb2 as pb

from . import gen
from .harness import (
    AUTH,
    MAX_MESSAGE_BYTES,
    OPEN_SERVICES,
    SERVICES,
    TALLY,
    TOKEN,
    FuzzServer,
    Method,
    Outcome,
    call,
    check_invariants,
    leaks,
    methods,
    parse,
    sendable,
)

SEED = 8_2026
MAX_DETAILS_CHARS = 600  # a status message quotes at most a short excerpt of the input (serve.rpc cuts at 512)
CASES_PER_METHOD = 120
C = grpc.StatusCode
REFUSALS = {C.INVALID_ARGUMENT, C.NOT_FOUND, C.ALREADY_EXISTS, C.RESOURCE_EXHAUSTED, C.FAILED_PRECONDITION}
# What a request that parses may get, by method; a method not named here (a new one) gets DEFAULT.
ALLOWED = {
    "/vcflash.v1.Ingest/AddStream": {C.OK, C.INVALID_ARGUMENT, C.ALREADY_EXISTS, C.RESOURCE_EXHAUSTED},
    "/vcflash.v1.Ingest/RemoveStream": {C.OK, C.NOT_FOUND, C.INVALID_ARGUMENT},
    "/vcflash.v1.Ingest/ListStreams": {C.OK},
    "/vcflash.v1.Ingest/GetStream": {C.OK, C.NOT_FOUND, C.INVALID_ARGUMENT},
    "/vcflash.v1.Ingest/RestartStream": {C.OK, C.NOT_FOUND, C.INVALID_ARGUMENT, C.FAILED_PRECONDITION},
    "/vcflash.v1.Memory/ListClips": {C.OK, C.NOT_FOUND, C.INVALID_ARGUMENT},
    "/vcflash.v1.Memory/GetStats": {C.OK, C.NOT_FOUND, C.INVALID_ARGUMENT},
    "/vcflash.v1.Memory/DeleteStream": {C.OK, C.NOT_FOUND, C.INVALID_ARGUMENT, C.FAILED_PRECONDITION},
    "/vcflash.v1.Reasoner/Ask": {C.OK, C.INVALID_ARGUMENT, C.NOT_FOUND, C.RESOURCE_EXHAUSTED},
    "/vcflash.v1.Encoder/EncodeClips": {C.OK},  # a bad clip is acknowledged with an error, not refused
    "/grpc.health.v1.Health/Check": {C.OK, C.NOT_FOUND},
    "/grpc.health.v1.Health/Watch": {C.OK},
    "/grpc.health.v1.Health/List": {C.OK},
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": {C.OK},
}
DEFAULT = {C.OK} | REFUSALS
FOLLOW_TIMEOUT_S = 1.0  # WatchEvents with follow: refusals come at once; an accepted one is cut off here
FUZZ_NAMES = ["fz-a", "fz-b", "fz_c.1", "cam", "x", "-", "A" * 64]
SERVICE_NAMES = ["", "vcflash.v1.Ingest", "vcflash.v1.Encoder", "grpc.health.v1.Health", "nope", "vcflash.v1"]


def pools(sink_port: int) -> dict[str, list[str]]:
    """Field values by field name. Stream names never name a protected stream; sources are refused, or files in the
    media root, or cameras on the test's own loopback listener."""
    here = f"127.0.0.1:{sink_port}"
    sources = [
        *gen.hostile_sources(sink_port),
        "keep.mp4",
        "./keep.mp4",
        "missing.mp4",
        "../keep.mp4",
        f"rtsp://{here}/a",
        f"rtsp://u:p@{here}/a",
        f"rtsps://{here}/a",
        f"rtmp://{here}/app/k",
        f"http://{here}/v.ts",
        f"udp://127.0.0.1:{sink_port}",
        f"rtsp://[::1]:{sink_port}/a",
    ]
    names = FUZZ_NAMES + gen.HOSTILE_NAMES
    return {
        "stream_id": names,
        "source": sources,
        "question": gen.HOSTILE_QUESTIONS,
        "answer": gen.HOSTILE_QUESTIONS,
        "dropout": gen.DROPOUTS,
        "transport": gen.TRANSPORTS,
        "service": SERVICE_NAMES,
        "host": ["", "localhost", "x" * 300],
        "file_by_filename": ["vcflash/v1/vcflash.proto", "../../etc/passwd", "", "x" * 2000],
        "file_containing_symbol": ["vcflash.v1.Ingest", "vcflash.v1.AskRequest", "grpc.health.v1", "nope", ""],
        "list_services": ["", "*"],
        "containing_type": ["vcflash.v1.AskRequest", "nope"],
        "all_extension_numbers_of_type": ["vcflash.v1.AskRequest", "nope", ""],
    }


# ---------------------------------------------------------------- one case


def expectation(
    method: Method, batch: list[bytes]
) -> tuple[set[grpc.StatusCode], Callable[[list[bytes]], bool] | None]:
    """The codes `batch` may get, and when to stop reading a response stream that does not end by itself."""
    if any(len(raw) > MAX_MESSAGE_BYTES for raw in batch):
        return {C.RESOURCE_EXHAUSTED}, None
    parsed = [parse(method, raw) for raw in batch]
    if any(p is None for p in parsed):
        return {C.INVALID_ARGUMENT}, None
    allowed = ALLOWED.get(method.path, DEFAULT)
    if method.path == "/grpc.health.v1.Health/Watch":
        return allowed, lambda responses: len(responses) >= 1
    if method.path == "/vcflash.v1.Reasoner/WatchEvents" and parsed[0].follow:  # type: ignore[union-attr]
        return allowed | {C.DEADLINE_EXCEEDED}, None  # a follow never ends by itself: it runs to FOLLOW_TIMEOUT_S
    if method.path == "/vcflash.v1.Encoder/EncodeClips":
        keys = {(p.stream_id, p.seq) for p in parsed}  # type: ignore[union-attr]

        def acked(responses: list[bytes]) -> bool:
            acks = [pb.EncodeClipAck.FromString(r) for r in responses]
            return keys <= {(a.stream_id, a.seq) for a in acks}

        return allowed, acked
    return allowed, None


def check_outcome(method: Method, outcome: Outcome, allowed: set[grpc.StatusCode]) -> str | None:
    """What is wrong with `outcome`, or None."""
    if outcome.code not in allowed:
        return f"got {outcome.code.name} ({outcome.details[:200]!r}), expected one of {sorted(c.name for c in allowed)}"
    if found := leaks(*outcome.texts()):
        return f"secrets in the answer: {found}"
    if len(outcome.details) > MAX_DETAILS_CHARS:
        return f"a {len(outcome.details)}-character error message (client input echoed?)"
    response_type = message_factory.GetMessageClass(method.desc.output_type)
    for raw in outcome.responses:
        response_type.FromString(raw)  # raises if the server sent garbage
    return None


def run_case(server: FuzzServer, method: Method, kind: str, batch: list[bytes], failures: list[str]) -> None:
    allowed, until = expectation(method, batch)
    timeout = FOLLOW_TIMEOUT_S if C.DEADLINE_EXCEEDED in allowed else 20
    outcome = call(server.channel_for(method.path), method, batch, AUTH, timeout=timeout, until=until)
    TALLY.add(f"protobuf/{kind}", outcome.code)
    if (problem := check_outcome(method, outcome, allowed)) is not None:
        failures.append(f"{method.path} {kind} {[raw[:80] for raw in batch]!r}: {problem}")


# ---------------------------------------------------------------- tests

ALL = methods(SERVICES)


def test_every_method_of_every_service_is_fuzzed(fuzz_server: FuzzServer) -> None:
    """The services the server lists (reflection) are all among the ones fuzzed here."""
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    for channel in (fuzz_server.channel, fuzz_server.encoder_channel):
        stream = channel.stream_stream("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
        (raw,) = list(stream(iter([request.SerializeToString()]), timeout=10))
        listed = {
            s.name for s in reflection_pb2.ServerReflectionResponse.FromString(raw).list_services_response.service
        }
        assert listed <= {m.service for m in ALL}, listed
    assert {m.path for m in ALL} >= set(ALLOWED)


def test_health_list_names_every_service(fuzz_server: FuzzServer) -> None:
    """grpc.health.v1 List, which the stock asyncio servicer answered UNKNOWN (with a traceback in the log)."""
    raw = fuzz_server.channel.unary_unary("/grpc.health.v1.Health/List")(b"", timeout=10)
    statuses = health_pb2.HealthListResponse.FromString(raw).statuses
    served = {f"vcflash.v1.{name}" for name in ("Ingest", "Memory", "Reasoner")}
    assert {name: s.status for name, s in statuses.items()} == dict.fromkeys({"", *served}, 1)  # SERVING


@pytest.mark.parametrize("method", ALL, ids=[m.path for m in ALL])
def test_mutated_protobuf(fuzz_server: FuzzServer, method: Method) -> None:
    rng = random.Random(SEED ^ zlib.crc32(method.path.encode()))
    cases = gen.protobuf_cases(
        method.desc.input_type,
        rng,
        pools(fuzz_server.sink.port),
        CASES_PER_METHOD,
        streaming=method.request_streaming,
        oversize_bytes=MAX_MESSAGE_BYTES + 1024,
    )
    failures: list[str] = []
    sent = 0
    for kind, batch in cases:
        if not sendable(method, batch, fuzz_server.media):
            TALLY.skip("protobuf")
            continue
        run_case(fuzz_server, method, kind, batch, failures)
        sent += 1
    assert sent >= CASES_PER_METHOD * 0.8, f"only {sent} of {len(cases)} cases were sendable"
    assert not failures, f"{len(failures)} of {sent} cases failed:\n" + "\n".join(failures[:15])
    assert fuzz_server.health() == 1  # SERVING


@pytest.mark.parametrize("method", [m for m in ALL if m.service not in OPEN_SERVICES], ids=lambda m: m.path)
def test_every_vcflash_method_needs_the_token_whatever_the_body(fuzz_server: FuzzServer, method: Method) -> None:
    rng = random.Random(SEED + 1)
    bodies = [b"", b"\xff\xff\xff", gen.random_bytes(rng)]
    headers: list[tuple[tuple[str, str], ...] | None] = [
        None,
        (("authorization", "Bearer wrong-token-0123456789"),),
        (("authorization", f"Bearer {TOKEN[:-1]}"),),
        (("authorization", f"bearer {TOKEN}"),),
        (("authorization", TOKEN),),
        (("authorization", f"Bearer {TOKEN} "),),
        (("authorization", f"Bearer  {TOKEN}"),),
        (("authorization", "Bearer "),),
        (("x-authorization", f"Bearer {TOKEN}"),),
    ]
    failures = []
    for i, metadata in enumerate(headers):
        body = bodies[i % len(bodies)]
        outcome = call(fuzz_server.channel_for(method.path), method, [body], metadata, timeout=10)
        TALLY.add("auth/bad_token", outcome.code)
        if outcome.code != C.UNAUTHENTICATED or leaks(*outcome.texts()):
            failures.append(f"{metadata}: {outcome}")
    assert not failures, failures


def test_unknown_paths_are_unimplemented(fuzz_server: FuzzServer) -> None:
    paths = [
        "/vcflash.v1.Encoder/EncodeClips",  # the all-in-one server runs its encoder inside, not as a service
        "/vcflash.v1.Ingest/Nope",
        "/vcflash.v1.Nope/AddStream",
        "/vcflash.v2.Ingest/AddStream",
        "/vcflash.v1.Ingest/addstream",
        "/vcflash.v1.Ingest/AddStream/x",
        "/grpc.health.v1.Health/Nope",
        "/" + "x" * 2000,
        "/../vcflash.v1.Ingest/AddStream",
    ]
    for path in paths:
        for metadata in (AUTH, None):
            try:
                fuzz_server.channel.unary_unary(path)(b"", metadata=metadata, timeout=10)
                code = C.OK
            except grpc.RpcError as e:
                code = e.code()  # type: ignore[attr-defined]
            TALLY.add("protobuf/unknown_path", code)
            # Unknown methods are UNIMPLEMENTED; auth may be checked first (the handler does not exist either way).
            assert code in {C.UNIMPLEMENTED, C.UNAUTHENTICATED} and (metadata is None or code == C.UNIMPLEMENTED), (
                path,
                code,
            )


def test_server_intact_after_this_module(fuzz_server: FuzzServer) -> None:
    check_invariants(fuzz_server)
