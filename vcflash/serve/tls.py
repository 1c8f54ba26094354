"""TLS from PEM files, for both ends: gRPC and WHIP servers (VCFLASH_TLS_CERT/KEY), gRPC clients (VCFLASH_TLS_CA).

No file given means plaintext, the default on a trusted host or network; the token then crosses it in clear.
"""

from __future__ import annotations

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


def channel(address: str, ca: Path | None = None, options: Options = ()) -> grpc.Channel:
    """A blocking channel: TLS verified against the CA certificate `ca`, or plaintext without one."""
    if ca is None:
        return grpc.insecure_channel(address, options=options)
    return grpc.secure_channel(address, grpc.ssl_channel_credentials(Path(ca).read_bytes()), options=options)


def aio_channel(address: str, ca: Path | None = None, options: Options = ()) -> grpc.aio.Channel:
    """`channel` for asyncio callers."""
    if ca is None:
        return grpc.aio.insecure_channel(address, options=options)
    return grpc.aio.secure_channel(address, grpc.ssl_channel_credentials(Path(ca).read_bytes()), options=options)
