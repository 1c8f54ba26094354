"""A new user's first hour (issue 8, items 11-14): what the README tells them to paste must work, fast.

- gRPC-only commands start without torch or transformers, in well under a second;
- ports: two servers never share a gRPC port, a busy port is one line naming its setting (exit 2), and the
  split deployment's services have distinct default ports;
- `vcflash up` says "ready", `vcflash wait` waits for it, `--version`, `--json` on read commands, and the
  Python client finds the token as the CLI does.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers")


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60, importtime: bool = False):
    flags = ["-X", "importtime"] if importtime else []
    return subprocess.run(
        [sys.executable, *flags, "-m", "vcflash.cli", *args],
        cwd=ROOT,
        env=os.environ | (env or {}),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize(
    "args",
    [
        ["health", "--address", "127.0.0.1:1"],  # runs: the probe fails fast on a closed port
        ["health", "--help"],
        ["streams", "ls", "--help"],
        ["memory", "ls", "--help"],
        ["ask-live", "--help"],
        ["search", "--help"],
        ["wait", "--address", "127.0.0.1:1", "--timeout", "0.2"],
        ["--version"],
    ],
)
def test_grpc_commands_start_without_torch(args: list[str]) -> None:
    t0 = time.monotonic()
    run = cli(*args, importtime=True)
    elapsed = time.monotonic() - t0
    imported = {line.rsplit("|", 1)[-1].strip() for line in run.stderr.splitlines() if line.startswith("import time:")}
    assert not imported & set(HEAVY), f"{args} imported {imported & set(HEAVY)}"
    assert "hico.model" not in imported and "hico.checkpoint" not in imported
    assert elapsed < 1.5 + (0.2 if "wait" in args else 0), f"{args} took {elapsed:.2f} s"  # ~0.1-0.2 s here


def test_version() -> None:
    from vcflash.cli import version

    run = cli("--version")
    assert run.returncode == 0 and run.stdout.strip() == f"vcflash {version()}" and version() != "unknown"


# -- ports ------------------------------------------------------------------------------------------------------


def test_two_servers_cannot_share_a_grpc_port() -> None:
    from vcflash.serve.rpc import create_server

    async def two() -> None:
        first, port, _ = create_server("127.0.0.1:0", [], "t" * 16, 1 << 20)
        await first.start()
        try:
            with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}"):
                create_server(f"127.0.0.1:{port}", [], "t" * 16, 1 << 20)
        finally:
            await first.stop(0)

    asyncio.run(two())


@pytest.mark.parametrize(
    ("command", "port", "metrics"),
    [("up", 50051, 9464), ("ingest", 50051, 9464), ("encoder", 50052, 9465), ("reasoner", 50053, 9466)],
)
def test_split_services_have_distinct_default_ports(
    monkeypatch: pytest.MonkeyPatch, command: str, port: int, metrics: int
) -> None:
    from vcflash.cli import build_parser, service_settings

    for name in ("VCFLASH_ADDRESS", "VCFLASH_METRICS_PORT", "VCFLASH_API_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    s = service_settings(build_parser().parse_args([command])).server
    assert (s.address, s.metrics_port) == (f"127.0.0.1:{port}", metrics)
    # the environment (compose) beats the command's default, a flag beats both
    monkeypatch.setenv("VCFLASH_ADDRESS", "0.0.0.0:6000")
    monkeypatch.setenv("VCFLASH_METRICS_PORT", "7000")
    s = service_settings(build_parser().parse_args([command])).server
    assert (s.address, s.metrics_port) == ("0.0.0.0:6000", 7000)
    s = service_settings(build_parser().parse_args([command, "--port", "6001", "--metrics-port", "0"])).server
    assert (s.address, s.metrics_port) == ("127.0.0.1:6001", 0)


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def ingest_env(tmp_path: Path) -> dict[str, str]:
    return {"VCFLASH_DATA_DIR": str(tmp_path / "data"), "VCFLASH_API_TOKEN": "t" * 24, "VCFLASH_ADDRESS": ""}


@pytest.mark.parametrize("which", ["grpc", "metrics", "http"])
def test_a_busy_port_is_one_line_naming_its_setting(tmp_path: Path, busy_port: int, which: str) -> None:
    ports = {"grpc": free_port(), "metrics": "0", "http": "0"} | {which: busy_port}
    env = ingest_env(tmp_path) | {"VCFLASH_HTTP_PORT": str(ports["http"])}
    run = cli("ingest", "--port", str(ports["grpc"]), "--metrics-port", str(ports["metrics"]), env=env)
    assert run.returncode == 2, (run.stdout, run.stderr)
    assert "Traceback" not in run.stderr
    line = run.stderr.strip().splitlines()[-1]
    setting = {"grpc": "VCFLASH_ADDRESS", "metrics": "VCFLASH_METRICS_PORT", "http": "VCFLASH_HTTP_PORT"}[which]
    assert line.startswith("vcflash: error: ") and str(busy_port) in line and setting in line, line


# -- a running server: ready, wait, --json, the Python client ---------------------------------------------------


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, str], Path]]:
    """`vcflash up --model tiny` as the README starts it, token left to the data dir."""
    tmp = tmp_path_factory.mktemp("up")
    from vcflash.media import write_test_video

    video = Path(write_test_video(tmp / "demo.mp4", seconds=8))
    address = f"127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if k != "VCFLASH_API_TOKEN"} | {
        "VCFLASH_DATA_DIR": str(tmp / "data"),
        "VCFLASH_CACHE": str(tmp / "cache"),
        "VCFLASH_ADDRESS": address,
        "VCFLASH_METRICS_PORT": "0",
        "VCFLASH_HTTP_PORT": "0",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    log = tmp / "up.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vcflash.cli", "up", "--model", "tiny", "--media-root", str(tmp)],
            cwd=tmp,
            env=env,
            stdout=out,
            stderr=out,
        )
    try:
        wait = subprocess.run(
            [sys.executable, "-m", "vcflash.cli", "wait", "--timeout", "120"],
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert wait.returncode == 0 and wait.stdout.strip() == "SERVING", (wait.stderr, log.read_text())
        yield address, env, video
    finally:
        proc.terminate()
        proc.wait(20)
        assert "ready" in log.read_text()


def test_wait_times_out_on_a_closed_port() -> None:
    run = cli("wait", "--address", f"127.0.0.1:{free_port()}", "--timeout", "0.5")
    assert run.returncode == 1 and "not serving after 0.5 s" in run.stderr


def test_json_read_commands_and_client_token(up: tuple[str, dict[str, str], Path], monkeypatch) -> None:
    address, env, video = up
    health = cli("health", "--json", env=env)
    assert health.returncode == 0 and json.loads(health.stdout) == {
        "address": address,
        "service": "",
        "status": "SERVING",
    }

    added = cli("streams", "add", "cam", video.name, "--fast", env=env)  # relative to where the user is
    assert added.returncode == 0, added.stderr
    streams = json.loads(cli("streams", "ls", "--json", env=env).stdout)
    assert [s["stream_id"] for s in streams] == ["cam"] and "frames_in" in streams[0]

    # the README's client example, no token passed: found as the CLI finds it
    for name in ("VCFLASH_DATA_DIR", "VCFLASH_ADDRESS"):
        monkeypatch.setenv(name, env[name])
    monkeypatch.delenv("VCFLASH_API_TOKEN", raising=False)
    from vcflash.client import Client

    deadline = time.monotonic() + 60
    with Client() as c:
        while not c.list_streams()[0].clips_stored:
            assert time.monotonic() < deadline, "no clip stored"
            time.sleep(0.2)

    answer = cli("ask-live", "--stream", "cam", "What moves?", "--max-new-tokens", "4", "--json", env=env)
    assert answer.returncode == 0, answer.stderr
    record = json.loads(answer.stdout)
    assert "answer" in record and record["evidence"] and record["evidence"][0]["clip"]["stream_id"] == "cam"
