"""Rendezvous benchmark: time from starting N agents (one worker each, on
their own loopback addresses) to every worker running with its rank, for
torchrun-rs at N = 2, 8, 64, 512 and the real torchrun at N = 2 and 8.
Usage: python bench/rendezvous.py OURS TORCHRUN [MAX_N]"""
import os
import socket
import subprocess
import sys
import tempfile
import time

ours, torchrun = sys.argv[1], sys.argv[2]
max_n = int(sys.argv[3]) if len(sys.argv) > 3 else 512
here = os.path.dirname(os.path.abspath(__file__))
stamp = os.path.join(here, "workers/stamp.sh")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def addr(i):
    return f"127.0.{2 + i // 250}.{2 + i % 250}" if i else "127.0.0.2"


def run(launcher, n, timeout):
    port = free_port()
    with tempfile.TemporaryDirectory() as out:
        env = dict(os.environ, BENCH_OUT=out, OMP_NUM_THREADS="1")
        t0 = time.time_ns()
        procs = [subprocess.Popen(
            [launcher, f"--nnodes={n}", "--nproc-per-node=1", "--rdzv-backend=c10d",
             f"--rdzv-endpoint=127.0.0.2:{port}", "--rdzv-id=bench", f"--local-addr={addr(i)}",
             "--no-python", stamp],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for i in range(n)]
        deadline = time.time() + timeout
        ok = True
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                ok = False
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        stamps = [int(open(os.path.join(out, f)).read()) for f in os.listdir(out)]
        ranks = sorted(int(f) for f in os.listdir(out))
        if not ok or ranks != list(range(n)):
            return None
        return (max(stamps) - t0) / 1e9


print(f"machine: {os.cpu_count()} cores; agents on 127.0.x.y, one `--no-python` worker each")
print()
print("| agents | torchrun | torchrun-rs | torchrun-rs faster by |")
print("| --- | --- | --- | --- |")
for n in (2, 8, 64, 512):
    if n > max_n:
        break
    o = run(ours, n, 300)
    t = run(torchrun, n, 300) if n <= 8 else None
    os_ = f"{o:.2f} s" if o is not None else "did not finish in 300 s"
    ts = f"{t:.2f} s" if t is not None else ("not run" if n > 8 else "did not finish")
    ratio = f"{t / o:.0f}x" if (o and t) else ""
    print(f"| {n} | {ts} | {os_} | {ratio} |", flush=True)
