"""Issue 8, item 2: no token short enough to guess (an empty one above all) ever starts a server, wherever it comes
from; a running server refuses every credential but its own, `Bearer ` with nothing after it included."""

from __future__ import annotations

import logging
import re
import stat
from pathlib import Path

import grpc
import pytest

from protos.vcflash.v1 import vcflash_pb2 as pb
from protos.vcflash.v1 import vcflash_pb2_grpc as pb_grpc
from vcflash.serve.rpc import BearerAuth, create_server
from vcflash.serve.settings import ClientSettings, Settings, read_or_create_token, token_path

SHORT = ["", " ", "   \n", "fifteen-chars-x"]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("token", SHORT)
def test_short_tokens_never_reach_the_interceptor(token: str) -> None:
    with pytest.raises(ValueError, match="at least 16 characters"):
        BearerAuth(token)
    with pytest.raises(ValueError, match="at least 16 characters"):
        create_server("127.0.0.1:0", [], token, 1 << 20)


@pytest.mark.parametrize("token", [t for t in SHORT if t])  # "" is unset: the data dir's token is used
def test_short_token_in_the_environment_fails_at_start_naming_it(token: str) -> None:
    with pytest.raises(ValueError, match=re.escape("API token from VCFLASH_API_TOKEN must be at least 16")):
        Settings.from_env({"VCFLASH_API_TOKEN": token})


@pytest.mark.parametrize("content", ["", "\n", "   \n", "short\n"])
def test_short_token_file_fails_at_start_naming_the_file(tmp_path: Path, content: str) -> None:
    token_path(tmp_path).write_text(content)
    message = re.escape(f"API token from {token_path(tmp_path)} must be at least 16")
    with pytest.raises(ValueError, match=message):
        Settings.from_env({"VCFLASH_DATA_DIR": str(tmp_path)}).with_token()
    with pytest.raises(ValueError, match=message):  # the CLI says so too, rather than sending `Bearer `
        ClientSettings.from_env({"VCFLASH_DATA_DIR": str(tmp_path)}).token()


def test_token_file_is_created_private_in_a_private_dir(tmp_path: Path) -> None:
    data_dir = tmp_path / "new" / "data"
    token = read_or_create_token(data_dir)
    assert len(token) >= 32 and read_or_create_token(data_dir) == token
    assert mode(data_dir) == 0o700 and mode(token_path(data_dir)) == 0o600
    assert [p.name for p in data_dir.iterdir()] == ["api_token"]  # no temporary file left behind


def test_a_data_dir_left_open_by_an_older_version_is_tightened(tmp_path: Path, caplog) -> None:
    tmp_path.chmod(0o755)
    with caplog.at_level(logging.WARNING):
        read_or_create_token(tmp_path)
    assert mode(tmp_path) == 0o700
    assert "event=data_dir_tightened" in caplog.text


@pytest.mark.asyncio
async def test_only_the_exact_bearer_token_passes(serve_memory) -> None:
    served = await serve_memory()
    refused = ["", "Bearer", "Bearer ", "Bearer  ", served.token, f"Bearer {served.token[:-1]}", "bearer x"]
    async with grpc.aio.insecure_channel(served.address) as channel:
        stats = pb_grpc.MemoryStub(channel).GetStats
        for value in refused:
            metadata = (("authorization", value),) if value else ()
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stats(pb.GetStatsRequest(), metadata=metadata, timeout=5)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED, repr(value)
        reply = await stats(pb.GetStatsRequest(), metadata=(("authorization", f"Bearer {served.token}"),), timeout=5)
        assert list(reply.streams) == []


def test_settings_without_a_token_get_the_data_dirs(tmp_path: Path) -> None:
    settings = Settings.from_env({"VCFLASH_DATA_DIR": str(tmp_path)}).with_token()
    assert settings.server.api_token == token_path(tmp_path).read_text().strip()
