#!/usr/bin/env bash
# Rendezvous benchmark (see rendezvous.py), then the node-death time
# (node_death.py). Usage: bash bench/rendezvous.sh [MAX_N]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="$(bash scripts/setup-python.sh)"
cargo build -q --release -p torchrun-rs
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
"$VENV/bin/python" bench/rendezvous.py target/release/torchrun-rs "$VENV/bin/torchrun" "${1:-512}"
# The issue's third figure, printed beside the table.
echo
python3 bench/node_death.py target/release/torchrun-rs crates/cli/tests/helpers/worker.py
