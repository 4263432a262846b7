#!/usr/bin/env bash
# Tee throughput benchmark (see tee.py). Usage: bash bench/tee.sh [SIZE_MB]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="$(bash scripts/setup-python.sh)"
cargo build -q --release -p torchrun-rs
"$VENV/bin/python" bench/tee.py target/release/torchrun-rs "$VENV/bin/torchrun" "${1:-100}"
