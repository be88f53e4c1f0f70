#!/usr/bin/env bash
# Regenerates the Python stubs (messages, gRPC service, and .pyi type stubs) from
# proto/lstmd/v1/lstmd.proto into proto/lstmd/v1/, or into the folder given as $1.
# Uses the `python` on PATH (the project's virtual environment, with the dev extra).
# The generated files are committed and never edited by hand; CI checks they are current.
set -euo pipefail
out=$(mkdir -p "${1:-$(dirname "$0")}" && cd "${1:-$(dirname "$0")}" && pwd)
python=$(command -v python)
bin=$(cd "$(dirname "$python")" && pwd)
cd "$(dirname "$0")"
"$bin/python" -m grpc_tools.protoc -I . \
  --plugin=protoc-gen-mypy="$bin/protoc-gen-mypy" --plugin=protoc-gen-mypy_grpc="$bin/protoc-gen-mypy_grpc" \
  --python_out="$out" --grpc_python_out="$out" --mypy_out="$out" --mypy_grpc_out="$out" \
  lstmd/v1/lstmd.proto
