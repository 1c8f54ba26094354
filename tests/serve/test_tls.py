"""Issue 8, item 5: TLS on every link, with certificates the tests make themselves (conftest.make_tls_files).

A real gRPC server over TLS serves a client that trusts its CA and refuses plaintext and other CAs; WHIP's HTTP
server answers over HTTPS; Redis is reached over `rediss://` when this redis-server was built with TLS.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import ssl
import subprocess
import time
from pathlib import Path

import aiohttp
import grpc
import numpy as np
import pytest
from aiohttp import web
from cryptography.fernet import Fernet
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ingest.http import start_http
from memory import ClipMeta, ClipRecord, ConfigCipher, MemoryUnavailable, RedisStore, clip_vector
from vcflash.cli import main
from vcflash.client import Client
from vcflash.serve.settings import ClientSettings, Settings
from vcflash.serve.tls import channel, server_credentials, server_ssl_context


def health(address: str, ca: Path | None) -> int:
    with channel(address, ca) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status


@pytest.mark.asyncio
async def test_grpc_over_tls_serves_a_client_with_the_ca_and_refuses_others(serve_memory, tls_files) -> None:
    served = await serve_memory(server_credentials(tls_files.cert, tls_files.key))
    assert await asyncio.to_thread(health, served.address, tls_files.ca) == health_pb2.HealthCheckResponse.SERVING
    with Client(served.address, served.token, timeout_s=5, tls_ca=tls_files.ca) as client:
        assert await asyncio.to_thread(client.stats) == []  # an authenticated call, through the token check
    for ca in (None, tls_files.other_ca):  # plaintext, and TLS against a CA that did not sign the certificate
        with pytest.raises(grpc.RpcError) as e:
            await asyncio.to_thread(health, served.address, ca)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.asyncio
async def test_cli_health_takes_the_ca(serve_memory, tls_files, monkeypatch, capsys) -> None:
    monkeypatch.delenv("VCFLASH_TLS_CA", raising=False)
    served = await serve_memory(server_credentials(tls_files.cert, tls_files.key))
    argv = ["health", "--address", served.address]
    assert await asyncio.to_thread(main, [*argv, "--tls-ca", str(tls_files.ca)]) == 0
    assert "SERVING" in capsys.readouterr().out
    assert await asyncio.to_thread(main, argv) == 1  # plaintext to a TLS port
    monkeypatch.setenv("VCFLASH_TLS_CA", str(tls_files.ca))
    assert await asyncio.to_thread(main, argv) == 0


@pytest.mark.asyncio
async def test_whip_http_over_tls_answers_a_client_with_the_ca(tls_files) -> None:
    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    runner, port = await start_http(app, "127.0.0.1", 0, ssl_context=server_ssl_context(tls_files.cert, tls_files.key))
    try:
        trusting = ssl.create_default_context(cafile=tls_files.ca)
        async with aiohttp.ClientSession() as session:
            async with session.get(f"https://127.0.0.1:{port}/healthz", ssl=trusting) as reply:
                assert reply.status == 200 and await reply.text() == "ok\n"
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                await session.get(f"https://127.0.0.1:{port}/healthz", ssl=ssl.create_default_context())
            with pytest.raises(aiohttp.ClientError):  # plaintext HTTP to the HTTPS port
                await session.get(f"http://127.0.0.1:{port}/healthz")
    finally:
        await runner.cleanup()


def test_tls_settings_come_in_pairs(tls_files) -> None:
    s = Settings.from_env({"VCFLASH_TLS_CERT": str(tls_files.cert), "VCFLASH_TLS_KEY": str(tls_files.key)})
    assert (s.server.tls_cert, s.server.tls_key) == (tls_files.cert, tls_files.key)
    assert server_ssl_context(None, None) is None
    with pytest.raises(ValueError, match="VCFLASH_TLS_CERT and VCFLASH_TLS_KEY go together"):
        Settings.from_env({"VCFLASH_TLS_CERT": str(tls_files.cert)})
    env = {"VCFLASH_TLS_CA": str(tls_files.ca)}
    assert ClientSettings.from_env(env).tls_ca == Settings.from_env(env).link.tls_ca == tls_files.ca


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_redis_over_tls(tmp_path: Path, tls_files) -> None:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not on PATH")
    port = free_port()
    args = ["--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(tmp_path)]
    args += ["--tls-cert-file", str(tls_files.cert), "--tls-key-file", str(tls_files.key)]
    args += ["--tls-ca-cert-file", str(tls_files.ca), "--tls-auth-clients", "no"]
    proc = subprocess.Popen(["redis-server", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={tls_files.ca}"
    try:
        cipher = ConfigCipher(Fernet.generate_key().decode())
        with RedisStore(url, prefix="tls", cipher=cipher) as store:
            deadline = time.monotonic() + 10
            while True:
                if proc.poll() is not None:
                    pytest.skip(f"this redis-server has no TLS: {proc.stdout.read().decode()[-300:]}")  # type: ignore[union-attr]
                try:
                    store.streams()
                    break
                except MemoryUnavailable:
                    assert time.monotonic() < deadline, "redis-server over TLS did not come up"
                    time.sleep(0.05)
            tokens = np.ones((4, 8), dtype=np.float16)
            assert store.put(ClipRecord(ClipMeta("cam", 0, 1.0, 2.0, 0.0, 1.0, (0.0,)), tokens, clip_vector(tokens)))
            store.put_stream_config("cam", {"source": "rtsp://u:p@cam/1"})
            assert [m.seq for m in store.clips("cam")] == [0]
            assert store.stream_configs() == {"cam": {"source": "rtsp://u:p@cam/1"}}
        with RedisStore(f"redis://127.0.0.1:{port}/0", prefix="tls") as plain, pytest.raises(MemoryUnavailable):
            plain.streams()  # plaintext to the TLS port
    finally:
        proc.terminate()
        proc.wait(timeout=10)
