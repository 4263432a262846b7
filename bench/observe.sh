#!/usr/bin/env bash
# Observability benchmark (see observe.py): release build, py-spy from the
# test venv.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="$(bash scripts/setup-python.sh)"
cargo build -q --release -p torchrun-rs
PATH="$VENV/bin:$PATH" "$VENV/bin/python" bench/observe.py target/release/torchrun-rs
