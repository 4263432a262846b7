#!/usr/bin/env bash
# Init-storm benchmark: N clients connect at once and do what a rank does
# with the env:// store during init_process_group (connect, validate, add to
# the shared counter, set its key, wait for the barrier key the last one
# sets, read a few keys), against torch's TCPStore server and
# torchrun-rs-store, a fresh server for every measurement. Prints the time
# from the first connect to the last release, and the refused or reset
# connects (retried). torch's server gets LIMIT seconds (default 120).
# Usage: bash bench/storm.sh [LIMIT]
set -euo pipefail
cd "$(dirname "$0")/.."
LIMIT="${1:-120}"
PY="$(bash scripts/setup-python.sh)/bin/python"
cargo build -q --release -p torchrun-rs --bin torchrun-rs-store
cargo build -q --release -p torchrun-rs-bench
LOAD=target/release/store-load
ulimit -n "$(ulimit -Hn)"
tmp=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$tmp"' EXIT

ours() { # N -> "ms errors"
  target/release/torchrun-rs-store --port 0 >"$tmp/ours_out" &
  local pid=$!
  for _ in $(seq 200); do [ -s "$tmp/ours_out" ] && break; sleep 0.02; done
  "$LOAD" storm 127.0.0.1 "$(sed 's/.*://' "$tmp/ours_out")" "$1" 60
  kill "$pid"; wait "$pid" 2>/dev/null || true
}
torchs() { # N -> "ms errors" or "timeout errors"
  rm -f "$tmp/torch_in" "$tmp/torch_port"; mkfifo "$tmp/torch_in"
  "$PY" crates/tcpstore/tests/python/torch_server.py <"$tmp/torch_in" >"$tmp/torch_port" &
  local pid=$!
  exec 3>"$tmp/torch_in"
  for _ in $(seq 400); do [ -s "$tmp/torch_port" ] && break; sleep 0.05; done
  "$LOAD" storm 127.0.0.1 "$(head -1 "$tmp/torch_port")" "$1" "$LIMIT"
  exec 3>&-
  kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null || true
}

echo "machine: $(nproc) cores, $(uname -m); torch $("$PY" -c 'import torch; print(torch.__version__)'); clients and server on one host"
echo
echo "| clients | torch TCPStore (libuv) | torchrun-rs-store | faster by |"
echo "| --- | --- | --- | --- |"
for n in 1000 4000 10000; do
  read -r o oe < <(ours "$n")
  read -r t te < <(torchs "$n")
  if [ "$t" = timeout ]; then
    echo "| $n | gave up after ${LIMIT} s ($te connects refused/reset) | $o ms ($oe refused/reset) | more than $((LIMIT * 1000 / o))x |"
  else
    echo "| $n | $t ms ($te refused/reset) | $o ms ($oe refused/reset) | $(awk -v t="$t" -v o="$o" 'BEGIN {printf "%.0fx", t/o}') |"
  fi
done
