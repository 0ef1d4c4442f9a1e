#!/usr/bin/env bash
# The GPU path end to end on a CUDA machine: train the seed recipe on DialoGPT-medium's architecture,
# check the loss, reload the adapter with the seed's snippet, half vs fp32 eval loss, packed attention.
# Options go to bench/gpu_check.py (--steps, --micro-batch, --tolerance, --keep DIR; --help).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
exec "$PY" bench/gpu_check.py "$@"
