#!/usr/bin/env bash
# Rendezvous at scale (c10d):
# 1. N agents in one process (the rendezvous stress test, release build),
#    each with its own two store connections, ranked then re-formed (every
#    agent leaves and re-joins, as at a restart). This machine's hard limit
#    on open files bounds N (four descriptors per agent, both ends of two
#    connections): the largest N is printed with the limit.
# 2. 1,024 real agent processes (one `--no-python` worker each) beside the
#    bare start of 1,024 standalone launchers, which is the floor here.
# Usage: bash bench/rendezvous_scale.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ulimit -n "$(ulimit -Hn)"
limit="$(ulimit -n)"
max_n=$(( (limit - 200) / 4 ))
echo "machine: $(nproc) cores; open-file limit $limit, so at most $max_n agents in one process"
echo
echo "| agents (in one process) | ranked | re-formed (all leave and re-join) |"
echo "| --- | --- | --- |"
for n in 1024 2048 4096 "$max_n"; do
  [ "$n" -le "$max_n" ] || continue
  out="$(RDZV_N=$n cargo test -q --release -p torchrun-rs-engine --lib hundreds_of_agents -- --nocapture 2>&1)"
  ranked="$(sed -n "s/^$n agents ranked in \(.*\)$/\1/p" <<<"$out")"
  reformed="$(sed -n "s/^$n agents re-formed in \(.*\)$/\1/p" <<<"$out")"
  echo "| $n | ${ranked:-failed} | ${reformed:-failed} |"
done
echo
cargo build -q --release -p torchrun-rs
python3 bench/rendezvous_scale.py target/release/torchrun-rs 1024
