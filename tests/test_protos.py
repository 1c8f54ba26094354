"""The committed gRPC modules are what protoc makes of vcflash.proto today."""

import shutil
import subprocess
import sys
from pathlib import Path

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
