"""The committed gRPC modules are what protoc makes of vcflash.proto today."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from protos.clip import check_stream_name
from vcflash.serve.errors import Invalid

ROOT = Path(__file__).parent.parent
PROTO = "protos/vcflash/v1/vcflash.proto"


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    (tmp_path / "protos/vcflash/v1").mkdir(parents=True)
    shutil.copy(ROOT / PROTO, tmp_path / PROTO)
    args = ["-I.", "--python_out=.", "--pyi_out=.", "--grpc_python_out=.", PROTO]
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", *args], cwd=tmp_path, check=True)
    for name in ("vcflash_pb2.py", "vcflash_pb2.pyi", "vcflash_pb2_grpc.py"):
        generated = (tmp_path / "protos/vcflash/v1" / name).read_text()
        assert generated == (ROOT / "protos/vcflash/v1" / name).read_text(), f"{name} is stale: run protos/generate.sh"


@pytest.mark.parametrize("name", ["", ".", "..", "...", "a/b", "a b", "x" * 65, "cam\n"])
def test_bad_stream_names_are_invalid(name: str) -> None:
    with pytest.raises(Invalid):
        check_stream_name(name)


@pytest.mark.parametrize("name", ["cam-1", "door.v2", "..a", "A_b.c-d", "x" * 64])
def test_good_stream_names_pass(name: str) -> None:
    assert check_stream_name(name) == name
