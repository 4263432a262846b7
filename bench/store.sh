#!/usr/bin/env bash
# Store benchmark: torch's own TCPStore server (libuv backend) and
# torchrun-rs-store, driven by the same Rust load generator in one run.
# Prints a markdown table with ratios. Usage: bash bench/store.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
SECS="${1:-3}"
PY="$(bash scripts/setup-python.sh)/bin/python"
# Two builds: a --bin filter would apply to both packages and leave out
# the load generator.
cargo build -q --release -p torchrun-rs --bin torchrun-rs-store
cargo build -q --release -p torchrun-rs-bench
LOAD=target/release/store-load
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

tmp=$(mktemp -d)
cleanup() { stop_servers; rm -rf "$tmp"; }
trap cleanup EXIT

# Each measurement gets freshly started servers: torch's server slows down
# after many thousand connections have come and gone.
start_servers() {
  stop_servers
  rm -f "$tmp/torch_in" "$tmp/torch_port" "$tmp/ours_out"
  mkfifo "$tmp/torch_in"
  "$PY" crates/tcpstore/tests/python/torch_server.py <"$tmp/torch_in" >"$tmp/torch_port" &
  TORCH_PID=$!
  exec 3>"$tmp/torch_in"
  target/release/torchrun-rs-store --port 0 >"$tmp/ours_out" &
  OURS_PID=$!
  for _ in $(seq 400); do [ -s "$tmp/torch_port" ] && [ -s "$tmp/ours_out" ] && break; sleep 0.05; done
  TORCH_PORT=$(head -1 "$tmp/torch_port")
  OURS_PORT=$(sed 's/.*://' "$tmp/ours_out")
}
stop_servers() {
  # (Grouped: a bare `exec 2>/dev/null` would silence the script's own
  # stderr from here on.)
  { exec 3>&-; } 2>/dev/null || true
  kill "${TORCH_PID:-}" "${OURS_PID:-}" 2>/dev/null || true
  wait 2>/dev/null || true
}

row() { # name torch ours better(higher|lower)
  awk -v n="$1" -v t="$2" -v o="$3" -v b="$4" 'BEGIN {
    r = (b == "higher") ? o / t : t / o;
    printf "| %s | %s | %s | %.1fx |\n", n, t, o, r }'
}

echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -m); torch $("$PY" -c 'import torch; print(torch.__version__)')"
echo
echo "| measure | torch TCPStore (libuv) | torchrun-rs-store | ours vs torch |"
echo "| --- | --- | --- | --- |"
for c in 1 100 1000; do
  start_servers
  # Single runs on two shared cores vary by 15 %: the median of 3 rounds.
  read -r t tc < <("$LOAD" mix 127.0.0.1 "$TORCH_PORT" "$c" "$SECS" "$TORCH_PID" 3)
  read -r o oc < <("$LOAD" mix 127.0.0.1 "$OURS_PORT" "$c" "$SECS" "$OURS_PID" 3)
  row "set/get/add ops/s, $c connections (median of 3)" "$t" "$o" higher
  row "server CPU µs per op, $c connections (median of 3)" "$tc" "$oc" lower
done
start_servers
t=$("$LOAD" fanout 127.0.0.1 "$TORCH_PORT" 1000)
o=$("$LOAD" fanout 127.0.0.1 "$OURS_PORT" 1000)
row "1,000 WAITs released by one SET (ms, median of 5)" "$t" "$o" lower
# torch's server accepts ever more slowly past a few thousand connections
# (minutes for 10,000), so the side-by-side row uses 1,000; ours alone is
# also measured at 10,000.
start_servers
t=$("$LOAD" idle 127.0.0.1 "$TORCH_PORT" 1000 "$TORCH_PID")
o=$("$LOAD" idle 127.0.0.1 "$OURS_PORT" 1000 "$OURS_PID")
row "server RSS per idle connection (bytes, 1,000 open)" "$t" "$o" lower
o=$("$LOAD" idle 127.0.0.1 "$OURS_PORT" 10000 "$OURS_PID")
echo "| server RSS per idle connection (bytes, 10,000 open) | not measured | $o | |"
