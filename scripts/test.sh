#!/usr/bin/env bash
# The project's test command: sets up what the tests need on a fresh machine
# (idempotently; caches live under ~/.cache/torchrun-rs), then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
# The network-cut test puts an agent in a network namespace of its own; the
# clock-skew test runs agents under faketime.
missing=()
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
command -v faketime >/dev/null 2>&1 || missing+=(faketime)
# The completion test loads the zsh script in zsh.
command -v zsh >/dev/null 2>&1 || missing+=(zsh)
# The etcd-v3 rendezvous tests run a real etcd and manage it with etcdctl.
command -v etcd >/dev/null 2>&1 || missing+=(etcd-server)
command -v etcdctl >/dev/null 2>&1 || missing+=(etcd-client)
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null
fi
# A real one-node Slurm (slurm-wlm, munge; the daemons started here, no
# systemd). Where it cannot start, the Slurm tests say so and skip.
if ! bash scripts/slurm-up.sh >/dev/null; then
  echo "test.sh: no Slurm daemons here; the Slurm tests will be skipped" >&2
fi
# Store tests hold thousands of connections.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
VENV="$(bash scripts/setup-python.sh)"
export TORCHRUN_RS_PYTHON="$VENV/bin/python"
export PATH="$VENV/bin:$PATH"
# The habits CI holds us to: formatted, and no clippy warning.
if cargo fmt --version >/dev/null 2>&1 || rustup component add rustfmt >/dev/null 2>&1; then
  cargo fmt --all --check
else
  echo "test.sh: rustfmt is not installed and cannot be added here; format check skipped" >&2
fi
if cargo clippy --version >/dev/null 2>&1 || rustup component add clippy >/dev/null 2>&1; then
  cargo clippy --workspace --all-targets -- -D warnings
else
  echo "test.sh: clippy is not installed and cannot be added here; lint check skipped" >&2
fi
cargo build --workspace --all-targets
cargo test --workspace -- --test-threads="${TEST_THREADS:-2}"
