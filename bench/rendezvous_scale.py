"""N real c10d agents (one `--no-python` worker each, on their own loopback
addresses) from start to every worker running with its rank, beside N
standalone launchers (no rendezvous at all): the cost of starting that many
launchers on this machine, which the rendezvous cannot go below.

Each worker is `sh -c ': > $BENCH_OUT/$RANK.$GROUP_RANK'`: it creates a file
named for its rank, and the file's modification time (nanoseconds) is when
that worker ran. A worker that forks `date` for a timestamp would add a third
process start per agent to what is measured, which is not the launcher's.
Usage: python bench/rendezvous_scale.py TORCHRUN_RS N"""
import os
import socket
import sys
import tempfile
import time

bin_, n = sys.argv[1], int(sys.argv[2])


def addr(i):
    # Agent 0 is at the endpoint's address: it hosts the store.
    return f"127.0.{2 + i // 250}.{2 + i % 250}" if i else "127.0.0.2"


def run(args_of):
    """(time to every worker running, time to the last launcher's exit,
    lines of the first launcher's stderr saying a peer is gone), or None."""
    with tempfile.TemporaryDirectory() as out:
        env = dict(os.environ, BENCH_OUT=out)
        devnull = os.open(os.devnull, os.O_WRONLY)
        err0 = os.open(os.path.join(out, "stderr.0"), os.O_WRONLY | os.O_CREAT, 0o600)
        fa = [(os.POSIX_SPAWN_DUP2, devnull, 1), (os.POSIX_SPAWN_DUP2, devnull, 2)]
        fa0 = [(os.POSIX_SPAWN_DUP2, devnull, 1), (os.POSIX_SPAWN_DUP2, err0, 2)]
        t0 = time.time_ns()
        pids = [os.posix_spawn(bin_, ["torchrun-rs", *args_of(i)], env,
                               file_actions=fa0 if i == 0 else fa)
                for i in range(n)]
        codes = [os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) for p in pids]
        ended = time.time_ns()
        with open(os.path.join(out, "stderr.0"), errors="replace") as f:
            gone = sum("is gone" in line for line in f)
        stamps = [os.stat(os.path.join(out, f)).st_mtime_ns for f in os.listdir(out)
                  if f != "stderr.0"]
        if any(codes) or len(stamps) != n:
            return None
        return (max(stamps) - t0) / 1e9, (ended - t0) / 1e9, gone


s = socket.socket()
s.bind(("127.0.0.1", 0))
port = s.getsockname()[1]
s.close()
stamp = ": > \"$BENCH_OUT/$RANK.$GROUP_RANK\""
c10d = run(lambda i: [f"--nnodes={n}", "--nproc-per-node=1", "--rdzv-backend=c10d",
                      f"--rdzv-endpoint=127.0.0.2:{port}", "--rdzv-id=scale",
                      f"--local-addr={addr(i)}", "--no-python", "sh", "-c", stamp])
bare = run(lambda i: ["--standalone", "--nproc-per-node=1", "--no-python", "sh", "-c",
                      f": > \"$BENCH_OUT/{i}\""])
show = lambda r, i: f"{r[i]:.2f} s" if r is not None else "failed"
print(f"{n} real c10d agents, every worker running with its rank: {show(c10d, 0)}; "
      f"the last launcher exited: {show(c10d, 1)}; peers reported gone by the store's host: "
      f"{c10d[2] if c10d else '-'}")
print(f"{n} standalone launchers (no rendezvous), every worker running: {show(bare, 0)}; "
      f"the last launcher exited: {show(bare, 1)}")
