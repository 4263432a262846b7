#!/usr/bin/env bash
# Launcher benchmark (see launch.py): builds torchrun-rs in release mode and
# runs it beside the real torchrun from the pinned venv.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="$(bash scripts/setup-python.sh)"
cargo build -q --release -p torchrun-rs
"$VENV/bin/python" bench/launch.py target/release/torchrun-rs "$VENV/bin/torchrun" "${1:-5}"
