#!/usr/bin/env bash
# Rendezvous benchmark (see rendezvous.py), then the node-death time
# (node_death.py), for c10d and, with etcd installed (apt-get install
# etcd-server), etcd-v3 against a real etcd on loopback.
# Usage: bash bench/rendezvous.sh [MAX_N]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="$(bash scripts/setup-python.sh)"
cargo build -q --release -p torchrun-rs
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
ETCD_ENDPOINT=""
if command -v etcd >/dev/null 2>&1; then
  dir="$(mktemp -d)"
  port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
  peer="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
  etcd --data-dir "$dir/data" --listen-client-urls "http://127.0.0.1:$port" \
    --advertise-client-urls "http://127.0.0.1:$port" --listen-peer-urls "http://127.0.0.1:$peer" \
    --initial-advertise-peer-urls "http://127.0.0.1:$peer" --initial-cluster "default=http://127.0.0.1:$peer" \
    >"$dir/etcd.log" 2>&1 &
  etcd_pid=$!
  trap 'kill $etcd_pid 2>/dev/null; wait $etcd_pid 2>/dev/null || true; rm -rf "$dir"' EXIT
  until grep -q "ready to serve client requests" "$dir/etcd.log"; do sleep 0.1; done
  ETCD_ENDPOINT="127.0.0.1:$port"
else
  echo "etcd is not installed: the etcd-v3 column is skipped" >&2
fi
ETCD_ENDPOINT="$ETCD_ENDPOINT" "$VENV/bin/python" bench/rendezvous.py target/release/torchrun-rs "$VENV/bin/torchrun" "${1:-512}"
# The issue's third figure, printed beside the table.
echo
python3 bench/node_death.py target/release/torchrun-rs crates/cli/tests/helpers/worker.py
if [ -n "$ETCD_ENDPOINT" ]; then
  python3 bench/node_death.py target/release/torchrun-rs crates/cli/tests/helpers/worker.py "$ETCD_ENDPOINT"
fi
