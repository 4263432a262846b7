#!/usr/bin/env bash
# Node-death benchmark (see node_death.py).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -q --release -p torchrun-rs
python3 bench/node_death.py target/release/torchrun-rs crates/cli/tests/helpers/worker.py
