"""Client channels after a server restart: a new channel connects at once, whatever an older channel to the same
address went through (gRPC shares subchannels, and their reconnect backoff, between channels by default)."""

from __future__ import annotations

import time
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tests.conftest import free_port
from vcflash.serve.tls import channel


def health_server(port: int) -> grpc.Server:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    assert server.add_insecure_port(f"127.0.0.1:{port}") == port
    server.start()
    return server


def check(ch: grpc.Channel) -> grpc.StatusCode:
    try:
        health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
    except grpc.RpcError as e:
        return e.code()  # type: ignore[attr-defined]
    return grpc.StatusCode.OK


def test_a_new_channel_after_a_restart_does_not_inherit_an_old_ones_backoff() -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"
    first = health_server(port)
    old = channel(address)
    try:
        assert check(old) == grpc.StatusCode.OK
        first.stop(0).wait()
        time.sleep(0.5)  # round robin reconnects at once, is refused, and backs off (1 s, then 1.6 s, ...)
        assert check(old) == grpc.StatusCode.UNAVAILABLE
        second = health_server(port)  # the server back on its port, inside the old channel's backoff
        try:
            with channel(address) as new:
                assert check(new) == grpc.StatusCode.OK
        finally:
            second.stop(0)
    finally:
        old.close()
