#!/usr/bin/env bash
# Regenerate the Python gRPC modules after editing vcflash.proto (grpcio-tools pinned like grpcio).
# PYTHON=.venv/bin/python protos/generate.sh
set -euo pipefail
cd "$(dirname "$0")/.."
"${PYTHON:-python}" -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. protos/vcflash/v1/vcflash.proto
