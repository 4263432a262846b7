#!/usr/bin/env bash
# GPU benchmark, for a machine with NVIDIA GPUs and torch with CUDA: run it
# there as it is (bash bench/gpu.sh). It needs a release build of
# torchrun-rs (built here if cargo exists) and a Python with CUDA torch
# (PYTHON, default python3; torchrun comes from the same environment).
# Prints a markdown table: --nproc-per-node=gpu on the real driver, a
# one-GPU NCCL all_reduce job under torchrun and torchrun-rs (wall time,
# launcher peak RSS), the restart gap with a CUDA worker, and the CPUs each
# worker got with --numa-binding=node.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
BIN="${TORCHRUN_RS:-target/release/torchrun-rs}"
if command -v cargo >/dev/null && [ ! -x "$BIN" ]; then cargo build -q --release -p torchrun-rs; fi
TORCHRUN="$(dirname "$(command -v "$PY")")/torchrun"
export PYTHON_EXEC="$PY"
gpus=$("$PY" -c 'import torch; print(torch.cuda.device_count())')
card=$("$PY" -c 'import torch; print(torch.cuda.get_device_name(0))')
echo "machine: $card x $gpus, $(nproc) CPUs; torch $("$PY" -c 'import torch; print(torch.__version__)')"
echo
nproc_rs=$("$BIN" --nproc-per-node=gpu --dry-run bench/gpu_job.py | awk '/nproc_per_node/ {print $2}')
echo "| measure | torchrun | torchrun-rs | ratio |"
echo "| --- | --- | --- | --- |"
echo "| --nproc-per-node=gpu resolves to | $gpus (torch.cuda.device_count) | $nproc_rs | |"
measure() { # launcher -> "wall_ms rss_mib" (median wall of 3, max RSS)
  for _ in 1 2 3; do
    /usr/bin/time -f "%e %M" -o /tmp/gpu_bench_time "$@" --standalone --nproc-per-node=1 bench/gpu_job.py >/dev/null 2>&1
    cat /tmp/gpu_bench_time
  done | sort -n | awk 'NR==2 {w=$1*1000} {if ($2>r) r=$2} END {printf "%.0f %.1f\n", w, r/1024}'
}
read -r tw tr < <(measure "$TORCHRUN")
read -r ow or < <(measure "$BIN")
awk -v t="$tw" -v o="$ow" 'BEGIN {printf "| one-GPU NCCL all_reduce job, wall (ms) | %s | %s | %.1fx |\n", t, o, t/o}'
awk -v t="$tr" -v o="$or" 'BEGIN {printf "| launcher peak RSS (MiB) | %s | %s | %.0fx |\n", t, o, t/o}'
gap() { # launcher -> restart gap in ms (2 CUDA workers, rank 0 fails once)
  d=$(mktemp -d)
  GPU_JOB_FAIL_ONCE="$d" "$@" --standalone --nproc-per-node=2 --max-restarts=1 bench/gpu_job.py >/dev/null 2>&1 || true
  "$PY" -c "import sys; d=sys.argv[1]; f=int(open(d+'/fail').read()); s=min(int(open(d+f'/start.{r}').read()) for r in (0,1)); print(round((s-f)/1e6))" "$d"
  rm -rf "$d"
}
if [ "$gpus" -ge 2 ]; then
  tg=$(gap "$TORCHRUN"); og=$(gap "$BIN")
  awk -v t="$tg" -v o="$og" 'BEGIN {printf "| restart gap with CUDA workers, failure to CUDA up again (ms) | %s | %s | %.1fx |\n", t, o, t/o}'
fi
echo
echo "CPUs each worker got with --numa-binding=node (torchrun-rs, all GPUs):"
"$BIN" --nproc-per-node=gpu --numa-binding=node -t 3 bench/gpu_job.py 2>/dev/null | grep -o 'rank .*' || true
