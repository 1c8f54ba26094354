"""Prometheus metrics listen on the gRPC host (loopback by default), not on every interface."""

from __future__ import annotations

import socket
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from vcflash.serve import lifecycle
from vcflash.serve.lifecycle import Service, run
from vcflash.serve.settings import Settings


class Stop(Exception):
    pass


class Stub(Service):
    async def start(self) -> int:
        raise Stop  # metrics are up by now: that is all this test needs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.asyncio
@pytest.mark.parametrize("address", ["127.0.0.1:0", "localhost:0"])
async def test_metrics_bind_to_the_grpc_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, address: str) -> None:
    started: list[Any] = []
    real = lifecycle.start_http_server

    def spy(*args: Any, **kwargs: Any) -> Any:
        started.append(real(*args, **kwargs))
        return started[-1]

    monkeypatch.setattr(lifecycle, "start_http_server", spy)
    port = free_port()
    settings = Settings.from_env({}, address=address, metrics_port=port, data_dir=tmp_path)
    try:
        with pytest.raises(Stop):
            await run(Stub(settings, CollectorRegistry()))
        (httpd, _thread) = started[0]
        host = httpd.server_address[0]
        assert host in ("127.0.0.1", "::1")  # not 0.0.0.0
        url = f"http://{host if ':' not in host else f'[{host}]'}:{port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            assert response.status == 200
    finally:
        for httpd, _thread in started:
            httpd.shutdown()
            httpd.server_close()
