"""Tee throughput: 8 ranks each writing SIZE_MB of short lines through `-t 3`,
console output to a file. The floor is the same workers piped through `cat`
into files, with no launcher. torchrun-rs and the real torchrun run in the
same invocation; both outputs are checked for lost and torn lines.
Usage: python bench/tee.py OURS TORCHRUN [SIZE_MB]"""
import os
import re
import subprocess
import sys
import tempfile
import time

ours, torchrun = sys.argv[1], sys.argv[2]
size = sys.argv[3] if len(sys.argv) > 3 else "100"  # whole MB
ranks = 8
here = os.path.dirname(os.path.abspath(__file__))
spew = os.path.join(here, "workers/spew.sh")
py = sys.executable
env = dict(os.environ, PYTHON_EXEC=py, OMP_NUM_THREADS="1")
total_lines = int(float(size) * 2**20) // 64


def floor(tmp):
    os.sync()  # each run starts without the last one's writeback
    t0 = time.perf_counter()
    procs = []
    for r in range(ranks):
        with open(os.path.join(tmp, f"floor.{r}"), "wb") as f:
            gen = subprocess.Popen([spew, size], stdout=subprocess.PIPE, env=dict(env, SPEW_RANK=str(r)))
            cat = subprocess.Popen(["cat"], stdin=gen.stdout, stdout=f)
            gen.stdout.close()
            procs += [gen, cat]
    for p in procs:
        p.wait()
    return time.perf_counter() - t0


def launched(launcher, tmp, name, extra=()):
    out_path = os.path.join(tmp, f"{name}.out")
    os.sync()  # each run starts without the last one's writeback
    with open(out_path, "wb") as out:
        t0 = time.perf_counter()
        p = subprocess.run([launcher, *extra, "--standalone", f"--nproc-per-node={ranks}", "-t", "3",
                            "--log-dir", os.path.join(tmp, f"{name}-logs"), "--no-python", spew, size],
                           stdout=out, stderr=subprocess.DEVNULL, env=env)
        wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{launcher} exited {p.returncode}")
    return wall, check(out_path)


LINE = re.compile(rb"^\[default(\d)\]:r(\d) (\d{9}) x+$")


def check(path):
    """Counts lines that are lost, torn or out of order."""
    nxt = [0] * ranks
    bad = 0
    with open(path, "rb") as f:
        for line in f:
            m = LINE.match(line.rstrip(b"\n"))
            if not m or m.group(1) != m.group(2) or len(line) != 64 + len(b"[defaultN]:"):
                bad += 1
                continue
            r, seq = int(m.group(1)), int(m.group(3))
            if seq != nxt[r]:
                bad += 1
            nxt[r] = seq + 1
    lost = sum(total_lines - n for n in nxt)
    return bad, lost


with tempfile.TemporaryDirectory() as tmp:
    mb = ranks * float(size)
    f = floor(tmp)
    o, (o_bad, o_lost) = launched(ours, tmp, "ours")
    # Every line distinct: the worst case for --dedup-output (each line
    # waits for copies that never come).
    d, (d_bad, d_lost) = launched(ours, tmp, "dedup", ["--dedup-output"])
    t, (t_bad, t_lost) = launched(torchrun, tmp, "torchrun")
print(f"machine: {os.cpu_count()} cores; {ranks} ranks x {size} MB of 64-byte lines, -t 3, console to a file")
print()
print("| run | wall | throughput | vs floor | torn or out-of-order lines | lost lines |")
print("| --- | --- | --- | --- | --- | --- |")
print(f"| floor: workers piped through cat | {f:.2f} s | {mb / f:.0f} MB/s | 1.0x | – | – |")
print(f"| torchrun-rs | {o:.2f} s | {mb / o:.0f} MB/s | {o / f:.2f}x | {o_bad} | {o_lost} |")
print(f"| torchrun-rs --dedup-output | {d:.2f} s | {mb / d:.0f} MB/s | {d / f:.2f}x | {d_bad} | {d_lost} |")
print(f"| torchrun | {t:.2f} s | {mb / t:.0f} MB/s | {t / f:.2f}x | {t_bad} | {t_lost} |")
print()
print(f"torchrun-rs throughput is {t / o:.1f}x torchrun's; --dedup-output takes {d / o:.2f}x the time of plain -t 3")
