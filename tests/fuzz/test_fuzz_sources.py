"""Hostile source URLs through AddStream: FFmpeg meta-protocols (concat, subfile, data, file, pipe, fd, unix, async),
schemes outside the allow-list, CR/LF request smuggling, paths out of the media root, and character-level mutations
of all of them. Refused ones are INVALID_ARGUMENT and nothing connects to the loopback listener they name (a
stand-in for a Redis on this host); credentials in odd shapes never come back in any answer or log."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator

import grpc
import pytest

from protos.vcflash.v1 import vcflash_pb2 as pb

from . import gen
from .harness import (
    ODD_PASSWORD,
    TALLY,
    FuzzServer,
    Listener,
    check_invariants,
    leaks,
    loopback_only,
    wait_for,
)

C = grpc.StatusCode
SEED = 8_3
MUTATIONS = 160


@pytest.fixture(scope="module")
def target() -> Iterator[Listener]:
    """The service hostile URLs name: it must hear nothing from them."""
    listener = Listener()
    yield listener
    listener.close()


def add(
    server: FuzzServer, name: str, source: str, **kw: object
) -> tuple[grpc.StatusCode, str, pb.StreamStatus | None]:
    try:
        return C.OK, "", server.add(name, source, **kw)
    except grpc.RpcError as e:
        return e.code(), e.details() or "", None  # type: ignore[attr-defined]


def test_hostile_urls_are_refused_before_anything_connects(fuzz_server: FuzzServer, target: Listener) -> None:
    failures = []
    for i, url in enumerate(gen.hostile_sources(target.port)):
        for options in ({}, {"live": True}, {"listen": True}, {"loop": True, "transport": "udp"}):
            code, details, _ = add(fuzz_server, f"src-{i}", url, **options)  # type: ignore[arg-type]
            TALLY.add("sources/hostile", code)
            if code != C.INVALID_ARGUMENT or leaks(details) or len(details) > 600 or "\n" in details:
                failures.append(f"{url[:80]!r} {options}: {code.name} {details[:160]!r}")
    time.sleep(0.5)  # anything that slipped through has had time to dial
    assert not failures, "\n".join(failures)
    assert (target.connections, bytes(target.received)) == (0, b"")


def test_mutated_urls(fuzz_server: FuzzServer, target: Listener) -> None:
    """Character-level mutations of hostile and accepted URLs: refused or accepted, never anything else; an accepted
    one reaches loopback only (mutations that would leave it are not sent: the suite talks to 127.0.0.1 alone)."""
    rng = random.Random(SEED)
    sink = fuzz_server.sink.port
    seeds = gen.hostile_sources(sink) + [f"rtsp://u:p@127.0.0.1:{sink}/a", f"http://127.0.0.1:{sink}/v.ts", "keep.mp4"]
    failures, accepted, sent = [], 0, 0
    for i in range(MUTATIONS):
        url = gen.mutate_text(rng.choice(seeds), rng)
        if not loopback_only(url, fuzz_server.media):
            TALLY.skip("sources/mutated")
            continue
        sent += 1
        code, details, status = add(fuzz_server, f"mut-{i}", url)
        TALLY.add("sources/mutated", code)
        if code not in (C.OK, C.INVALID_ARGUMENT) or leaks(details) or len(details) > 600:
            failures.append(f"{url[:80]!r}: {code.name} {details[:160]!r}")
        if code == C.OK:
            accepted += 1
            fuzz_server.remove(f"mut-{i}")
    assert not failures, "\n".join(failures)
    assert sent > MUTATIONS // 2 and accepted > 0, (sent, accepted)
    assert target.connections == 0  # mutations of URLs naming the target were all refused


def test_credentials_in_odd_shapes_never_come_back(fuzz_server: FuzzServer) -> None:
    names = []
    for i, url in enumerate(gen.credential_sources(fuzz_server.sink.port, ODD_PASSWORD)):
        code, details, status = add(fuzz_server, f"cred-{i}", url, live=True)
        TALLY.add("sources/credentials", code)
        assert code in (C.OK, C.INVALID_ARGUMENT), (url, code, details)
        assert not leaks(details, str(status)), (url, details, status)
        if code == C.OK:
            names.append(f"cred-{i}")
    for url in [f"gopher://admin:{ODD_PASSWORD}@127.0.0.1:1/_x", f"rtsp://a:{ODD_PASSWORD}@127.0.0.1/x\r\nX"]:
        code, details, _ = add(fuzz_server, "cred-refused", url)
        TALLY.add("sources/credentials", code)
        assert code == C.INVALID_ARGUMENT and not leaks(details), (code, details)
    assert len(names) >= 8, names

    def all_tried() -> bool:  # each has failed once, so its error went through the status and the log
        return all(s.reconnects or s.error for s in map(fuzz_server.status, names))

    wait_for(all_tried, "every camera to fail once", 20)
    statuses = fuzz_server.streams()
    assert not leaks(str(statuses)), [s.source for s in statuses]
    assert all("***" in s.source or "=" not in s.source for s in statuses if s.stream_id in names)


def test_the_target_does_hear_an_allowed_url(fuzz_server: FuzzServer, target: Listener) -> None:
    """The control for the refusals above: the same listener sees an accepted URL's connection."""
    assert add(fuzz_server, "src-control", f"rtsp://127.0.0.1:{target.port}/cam")[0] == C.OK
    wait_for(lambda: target.connections > 0, "the allowed URL to connect", 10)
    TALLY.add("sources/control", C.OK)


def test_server_intact_after_this_module(fuzz_server: FuzzServer) -> None:
    check_invariants(fuzz_server)
