"""Rendezvous benchmark: time from starting N agents (one worker each, on
their own loopback addresses) to every worker running with its rank, for
torchrun-rs at N = 2, 8, 64, 256, 512 (c10d, and etcd-v3 against a real
etcd when ETCD_ENDPOINT is set) and the real torchrun (c10d) at N = 2 and 8.
Usage: [ETCD_ENDPOINT=host:port] python bench/rendezvous.py OURS TORCHRUN [MAX_N]"""
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


etcd = os.environ.get("ETCD_ENDPOINT")


def run(launcher, n, timeout, backend="c10d"):
    port = free_port()
    endpoint = etcd if backend == "etcd-v3" else f"127.0.0.2:{port}"
    with tempfile.TemporaryDirectory() as out:
        env = dict(os.environ, BENCH_OUT=out, OMP_NUM_THREADS="1")
        t0 = time.time_ns()
        procs = [subprocess.Popen(
            [launcher, f"--nnodes={n}", "--nproc-per-node=1", f"--rdzv-backend={backend}",
             f"--rdzv-endpoint={endpoint}", f"--rdzv-id=bench-{port}", f"--local-addr={addr(i)}",
             "--no-python", stamp],
            env=env, stdout=subprocess.DEVNULL, stderr=None if os.environ.get("BENCH_DEBUG") else subprocess.DEVNULL) for i in range(n)]
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


print(f"machine: {os.cpu_count()} cores; agents on 127.0.x.y, one `--no-python` worker each"
      + ("; etcd 3.4 on loopback" if etcd else ""))
print()
print("| agents | torchrun (c10d) | torchrun-rs c10d | torchrun-rs faster by | torchrun-rs etcd-v3 |")
print("| --- | --- | --- | --- | --- |")


def show(t, limit):
    return f"{t:.2f} s" if t is not None else f"did not finish in {limit} s"


for n in (2, 8, 64, 256, 512):
    if n > max_n:
        break
    o = run(ours, n, 300)
    t = run(torchrun, n, 300) if n <= 8 else None
    e = run(ours, n, 300, "etcd-v3") if etcd else None
    ts = show(t, 300) if n <= 8 else "not run"
    es = show(e, 300) if etcd else "not run"
    ratio = f"{t / o:.0f}x" if (o and t) else ""
    print(f"| {n} | {ts} | {show(o, 300)} | {ratio} | {es} |", flush=True)
