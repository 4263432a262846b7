#!/usr/bin/env bash
# Recovery benchmark (see recovery.py): torchrun 2.15 beside torchrun-rs on
# the same five faults of a three-node gloo job. Takes a few minutes.
# Usage: bash bench/recovery.sh [SCENARIOS, e.g. abcde]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="$(bash scripts/setup-python.sh)"
cargo build -q --release -p torchrun-rs
"$VENV/bin/python" bench/recovery.py target/release/torchrun-rs "$VENV/bin/torchrun" "${1:-abcde}"
