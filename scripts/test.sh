#!/usr/bin/env bash
# The project's test command: sets up what the tests need on a fresh machine
# (idempotently; caches live under ~/.cache/torchrun-rs), then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="$(bash scripts/setup-python.sh)"
export TORCHRUN_RS_PYTHON="$VENV/bin/python"
export PATH="$VENV/bin:$PATH"
cargo build --workspace --all-targets
cargo test --workspace -- --test-threads="${TEST_THREADS:-2}"
