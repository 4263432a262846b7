"""Launcher benchmark: torchrun-rs and the real torchrun side by side.

For N = 1, 8, 32 workers of `--standalone --nproc-per-node=N --no-python true`:
wall time (median of RUNS) and the launcher's peak RSS. Then the restart gap:
time from a worker's failure to its replacement starting (median of RUNS).
Prints a markdown table with ratios. Usage: python bench/launch.py OURS TORCHRUN [RUNS]
"""
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ours, torchrun = sys.argv[1], sys.argv[2]
runs = int(sys.argv[3]) if len(sys.argv) > 3 else 5
here = os.path.dirname(os.path.abspath(__file__))
env = dict(os.environ, OMP_NUM_THREADS="1")


def run(cmd, extra_env=None):
    """Wall seconds and peak RSS (KiB) of the launcher process.

    GNU time starts the launcher, so the peak RSS is the launcher's own (a
    process forked from this Python would count Python's pages as its peak
    until it execs). Its workers' peaks are included when larger, for both
    launchers alike."""
    with tempfile.NamedTemporaryFile("r") as rss:
        t0 = time.perf_counter()
        p = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", rss.name] + cmd,
                           env=dict(env, **(extra_env or {})),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wall = time.perf_counter() - t0
        if p.returncode != 0:
            raise SystemExit(f"{cmd} exited {p.returncode}")
        return wall, int(rss.read().split()[-1])


def launch_row(launcher, n):
    walls, rss = [], []
    for _ in range(runs):
        w, r = run([launcher, "--standalone", f"--nproc-per-node={n}", "--no-python", "true"])
        walls.append(w)
        rss.append(r)
    return statistics.median(walls), max(rss)


def restart_gap(launcher):
    gaps = []
    for _ in range(runs):
        with tempfile.TemporaryDirectory() as out:
            run([launcher, "--standalone", "--nproc-per-node=2", "--max-restarts=1", "--no-python",
                 os.path.join(here, "workers/fail_then_start.sh")], {"BENCH_OUT": out})
            fail = int(open(os.path.join(out, "fail")).read())
            start = min(int(open(os.path.join(out, f"start.{r}")).read()) for r in range(2))
            gaps.append((start - fail) / 1e6)
    return statistics.median(gaps)


print(f"machine: {os.cpu_count()} cores, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB; "
      f"median of {runs} runs; workers: --no-python true")
print()
print("| measure | torchrun | torchrun-rs | torchrun-rs better by |")
print("| --- | --- | --- | --- |")
for n in (1, 8, 32):
    tw, tr = launch_row(torchrun, n)
    ow, orss = launch_row(ours, n)
    print(f"| wall time, N={n} | {tw * 1e3:.0f} ms | {ow * 1e3:.1f} ms | {tw / ow:.0f}x |")
    print(f"| launcher peak RSS, N={n} | {tr / 1024:.0f} MiB | {orss / 1024:.1f} MiB | {tr / orss:.0f}x |")
tg = restart_gap(torchrun)
og = restart_gap(ours)
print(f"| restart gap (failure to replacement start) | {tg:.0f} ms | {og:.1f} ms | {tg / og:.0f}x |")
