"""TLS from PEM files, for both ends: gRPC and WHIP servers (VCFLASH_TLS_CERT/KEY), gRPC clients (VCFLASH_TLS_CA).

No file given means plaintext, the default on a trusted host or network; the token then crosses it in clear.
"""

from __future__ import annotations

import ipaddress
import json
import ssl
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

Options = Sequence[tuple[str, Any]]


def server_credentials(cert: Path, key: Path) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials([(Path(key).read_bytes(), Path(cert).read_bytes())])


def server_ssl_context(cert: Path | None, key: Path | None) -> ssl.SSLContext | None:
    """An SSLContext for the HTTP (WHIP) server, or None without a certificate."""
    if cert is None or key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


# Calls spread over every address a target has (each replica behind a dns:/// name, or an IP list) instead of
# gRPC's default of sticking to the first: clients balance over replicated reasoners without a proxy.
ROUND_ROBIN = ("grpc.service_config", json.dumps({"loadBalancingConfig": [{"round_robin": {}}]}))
# Each channel its own connections: gRPC otherwise shares them, and their reconnect backoff, between the channels of a
# process to one address, so a client opened right after a server restart failed at once (UNAVAILABLE) while an
# older channel's backoff ran (round robin keeps reconnecting to a dead server, backing off up to 2 min).
OWN_SUBCHANNELS = ("grpc.use_local_subchannel_pool", 1)


def grpc_target(address: str) -> str:
    """An address as users write it -> a gRPC target: `host:port`, `dns:///name:port` (every address the name
    resolves to, re-resolved as replicas come and go: a Kubernetes headless Service) or a comma-separated list of
    `IP:port` (one family; `ipv4:`/`ipv6:` targets). ValueError for a list holding names."""
    parts = [p.strip() for p in address.split(",")]
    if len(parts) == 1:
        return parts[0]
    families = set()
    for part in parts:
        host = part.rpartition(":")[0].strip("[]")
        try:
            families.add(ipaddress.ip_address(host).version)
        except ValueError:
            raise ValueError(
                f"a comma-separated address list takes IP:port entries (got {part!r}); for names use one "
                "dns:///name:port that resolves to every replica"
            ) from None
        if not part.rpartition(":")[2].isdigit():
            raise ValueError(f"{part!r} needs a port")
    if len(families) > 1:
        raise ValueError(f"an address list is one IP family, got {address!r}")
    return f"ipv{families.pop()}:{','.join(parts)}"


def channel(address: str, ca: Path | None = None, options: Options = ()) -> grpc.Channel:
    """A blocking channel to `address` (see `grpc_target`), calls balanced round-robin over its addresses: TLS
    verified against the CA certificate `ca`, or plaintext without one."""
    target, options = grpc_target(address), [ROUND_ROBIN, OWN_SUBCHANNELS, *options]
    if ca is None:
        return grpc.insecure_channel(target, options=options)
    return grpc.secure_channel(target, grpc.ssl_channel_credentials(Path(ca).read_bytes()), options=options)


def aio_channel(address: str, ca: Path | None = None, options: Options = ()) -> grpc.aio.Channel:
    """`channel` for asyncio callers."""
    target, options = grpc_target(address), [ROUND_ROBIN, OWN_SUBCHANNELS, *options]
    if ca is None:
        return grpc.aio.insecure_channel(target, options=options)
    return grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(Path(ca).read_bytes()), options=options)
