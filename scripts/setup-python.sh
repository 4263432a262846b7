#!/usr/bin/env bash
# Creates (once) the Python venv with a pinned torch that the interop tests and
# benchmarks use. Idempotent: a finished venv is marked and reused.
# Prints the venv path on stdout.
set -euo pipefail
TORCH_VERSION="${TORCHRUN_RS_TORCH_VERSION:-2.15.0}"
CACHE="${TORCHRUN_RS_CACHE:-$HOME/.cache/torchrun-rs}"
VENV="$CACHE/venv-torch-$TORCH_VERSION"
if [ ! -f "$VENV/.complete" ]; then
  mkdir -p "$CACHE"
  rm -rf "$VENV"
  python3 -m venv "$VENV" >&2
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "torch==$TORCH_VERSION" numpy prometheus_client py-spy >&2
  "$VENV/bin/python" -c "import torch, torch.distributed" >&2
  touch "$VENV/.complete"
fi
# Added later than the venv: the metrics test parses /metrics with
# prometheus_client; the hang test takes stacks with py-spy.
if ! "$VENV/bin/python" -c "import prometheus_client" 2>/dev/null || [ ! -x "$VENV/bin/py-spy" ]; then
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check prometheus_client py-spy >&2
fi
# The in-process tests run the real tools that call torchrun's Python API.
if ! "$VENV/bin/python" -c "import lightning, accelerate" 2>/dev/null; then
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "lightning==2.5.6" "accelerate==1.16.0" >&2
fi
echo "$VENV"
