#!/usr/bin/env bash
# Sets up .venv-torchserve at the repo root: TorchServe 0.12 and its model archiver, apart from the
# project's own venv (TorchServe pins its own dependencies). torch is pinned exactly: an unpinned
# torch pulls a multi-GB CUDA build. Idempotent: does nothing when the venv already has it all.
# TorchServe's frontend needs Java 11 or later on PATH.
set -euo pipefail
cd "$(dirname "$0")/../.."
venv=.venv-torchserve
if [ -x "$venv/bin/torchserve" ] && "$venv/bin/python" -c 'import torch, ts, yaml, model_archiver' 2>/dev/null; then
  echo "$venv is already set up"
  exit 0
fi
command -v java >/dev/null || { echo "TorchServe needs Java 11+ on PATH" >&2; exit 1; }
python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --upgrade pip
# The worker needs torch and TorchServe (ts), which imports yaml without declaring it; nothing else:
# the handler reads the weights from a state dict that bench/torchserve/build.py writes.
"$venv/bin/pip" install --quiet torch==2.13.0 torchserve==0.12.0 torch-model-archiver==0.12.0 pyyaml numpy
echo "$venv is ready: $("$venv/bin/python" -c 'import torch, ts.version as v; print("torch", torch.__version__, "torchserve", v.__version__)')"
