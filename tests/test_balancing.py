"""Clients balance over replicated reasoners (issue 16): one address holding several replicas spreads calls
round-robin over them and keeps going when one dies. Real gRPC servers on loopback; each answers Search with its
own name so the test sees who served each call."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest

from protos.vcflash.v1 import vcflash_pb2 as pb
from protos.vcflash.v1 import vcflash_pb2_grpc as pb_grpc
from vcflash.client import Client
from vcflash.serve.tls import grpc_target


class Named(pb_grpc.ReasonerServicer):
    def __init__(self, name: str) -> None:
        self.name = name

    def Search(self, request: pb.SearchRequest, context: grpc.ServicerContext) -> pb.SearchResponse:
        return pb.SearchResponse(moments=[pb.Moment(stream_id=self.name)])


@pytest.fixture
def replicas() -> Iterator[tuple[list[grpc.Server], str]]:
    servers, addresses = [], []
    for i in range(3):
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        pb_grpc.add_ReasonerServicer_to_server(Named(f"r{i}"), server)
        addresses.append(f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}")
        server.start()
        servers.append(server)
    yield servers, ",".join(addresses)
    for server in servers:
        server.stop(None)


def served_by(client: Client, calls: int) -> Counter[str]:
    return Counter(client.search(["cam"], "who?", timeout_s=5).moments[0].stream_id for _ in range(calls))


def test_calls_spread_over_every_replica_and_skip_a_dead_one(replicas: tuple[list[grpc.Server], str]) -> None:
    servers, address = replicas
    with Client(address, token="t") as client:
        seen: Counter[str] = Counter()
        for _ in range(200):  # until every replica's connection is up (round-robin skips one still connecting)
            seen += served_by(client, 1)
            if len(seen) == 3:
                break
        counts = served_by(client, 30)
        assert set(counts) == {"r0", "r1", "r2"} and min(counts.values()) >= 5, counts
        servers[1].stop(None)
        counts = served_by(client, 20)  # no call fails: the dead replica is skipped
        assert set(counts) == {"r0", "r2"}, counts


@pytest.mark.parametrize(
    ("address", "target"),
    [
        ("10.0.0.1:50053", "10.0.0.1:50053"),
        ("dns:///vcflash-reasoner:50053", "dns:///vcflash-reasoner:50053"),
        ("127.0.0.1:1, 127.0.0.2:2", "ipv4:127.0.0.1:1,127.0.0.2:2"),
        ("[::1]:1,[::1]:2", "ipv6:[::1]:1,[::1]:2"),
    ],
)
def test_targets(address: str, target: str) -> None:
    assert grpc_target(address) == target


@pytest.mark.parametrize(
    ("address", "error"),
    [
        ("reasoner-0:1,reasoner-1:1", "dns:///name:port"),
        ("127.0.0.1:1,[::1]:2", "one IP family"),
        ("127.0.0.1:1,127.0.0.1:x", "needs a port"),
    ],
)
def test_bad_lists_are_refused(address: str, error: str) -> None:
    with pytest.raises(ValueError, match=error.replace("/", ".")):
        grpc_target(address)
