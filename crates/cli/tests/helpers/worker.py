"""Helper worker for the launcher's integration tests (plain Python, no torch).

usage: worker.py MODE OUTDIR [ARGS...]
Every mode first writes OUTDIR/env.<RANK>.<restart>.json (its environment and
argv) and OUTDIR/pid.<RANK> (its pid), so tests wait on files, never on time.
"""
import json
import os
import signal
import sys
import time

mode, outdir = sys.argv[1], sys.argv[2]
args = sys.argv[3:]
rank = int(os.environ.get("RANK", "0"))
restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")


def write(name, text):
    tmp = os.path.join(outdir, name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
    os.rename(tmp, os.path.join(outdir, name))


write(f"env.{rank}.{restart}.json", json.dumps({"env": dict(os.environ), "argv": sys.argv}))


def ready():
    write(f"pid.{rank}", str(os.getpid()))


if mode == "env":
    sys.exit(0)
elif mode == "exit":
    # exit CODE [RANK]: that rank (default all) exits with CODE, others wait.
    code = int(args[0])
    if len(args) < 2 or int(args[1]) == rank:
        sys.exit(code)
    ready()
    time.sleep(60)
elif mode == "fail-once":
    # The given rank fails on the first attempt only.
    if int(args[0]) == rank and restart == "0":
        sys.exit(7)
    sys.exit(0)
elif mode == "signal":
    # signal SIGNUM RANK: that rank kills itself with SIGNUM.
    if int(args[1]) == rank:
        os.kill(os.getpid(), int(args[0]))
    ready()
    time.sleep(60)
elif mode == "record":
    # Records every signal it gets; exits 0 on SIGUSR2, ignores the rest
    # unless told to die: record [die|ignore]
    die = args and args[0] == "die"

    def handler(sig, _frame):
        with open(os.path.join(outdir, f"signals.{rank}"), "a") as f:
            f.write(f"{signal.Signals(sig).name}\n")
        if sig == signal.SIGUSR2:
            sys.exit(0)
        if die:
            sys.exit(128 + sig)

    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(s, handler)
    ready()
    while True:
        time.sleep(60)
elif mode == "double-fork":
    # The worker forks a child that starts a new session and forks a
    # grandchild (a daemon that left every group of the worker); the
    # intermediate child exits.
    r, w = os.pipe()
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            write(f"daemon.{rank}", str(os.getpid()))
            while True:
                time.sleep(60)
        os._exit(0)
    if os.fork() == 0:
        write(f"child.{rank}", str(os.getpid()))
        while True:
            time.sleep(60)
    for _ in range(500):
        if os.path.exists(os.path.join(outdir, f"daemon.{rank}")) and os.path.exists(os.path.join(outdir, f"child.{rank}")):
            break
        time.sleep(0.01)
    ready()
    time.sleep(60)
elif mode == "lines":
    # lines COUNT: prints COUNT numbered lines on stdout and stderr, the
    # last one without a newline.
    n = int(args[0])
    out = sys.stdout
    for i in range(n - 1):
        out.write(f"r{rank} line {i} " + "x" * (i % 50) + "\n")
        sys.stderr.write(f"r{rank} err {i}\n")
    out.write(f"r{rank} last-partial")
    out.flush()
    sys.stderr.flush()
    sys.exit(0)
elif mode == "leak-pipe":
    # A background process inherits stdout and outlives the worker.
    if os.fork() == 0:
        write(f"leaker.{rank}", str(os.getpid()))
        time.sleep(60)
        os._exit(0)
    while not os.path.exists(os.path.join(outdir, f"leaker.{rank}")):
        time.sleep(0.01)
    print(f"worker {rank} done", flush=True)
    sys.exit(0)
elif mode == "bad-error-file":
    # Writes a malformed error file, then fails.
    with open(os.environ["TORCHELASTIC_ERROR_FILE"], "w") as f:
        f.write("{not json")
    sys.exit(1)
elif mode == "until-file":
    # Runs until the test creates OUTDIR/go, then exits 0.
    ready()
    while not os.path.exists(os.path.join(outdir, "go")):
        time.sleep(0.01)
    sys.exit(0)
elif mode == "say-until-file":
    # Writes one line to stderr, then runs until OUTDIR/go exists.
    sys.stderr.write(f"hello from rank {rank}\n")
    sys.stderr.flush()
    ready()
    while not os.path.exists(os.path.join(outdir, "go")):
        time.sleep(0.01)
    sys.exit(0)
elif mode == "chorus":
    # chorus: once every local rank is here (files in OUTDIR), each prints
    # "all say hello", "only rank R", "all say bye" on stdout.
    ready()
    n = int(os.environ["LOCAL_WORLD_SIZE"])
    while not all(os.path.exists(os.path.join(outdir, f"pid.{r}")) for r in range(n)):
        time.sleep(0.001)
    for line in ("all say hello", f"only rank {rank}", "all say bye"):
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
    sys.exit(0)
elif mode == "until-world":
    # Exits 0 in a world of the given size; otherwise waits to be re-formed.
    ready()
    if os.environ["WORLD_SIZE"] == args[0]:
        sys.exit(0)
    time.sleep(300)
elif mode == "fail-on-file":
    # fail-on-file RANK: waits for OUTDIR/go; then that rank exits 1 and the
    # others sleep.
    ready()
    while not os.path.exists(os.path.join(outdir, "go")):
        time.sleep(0.01)
    if int(args[0]) == rank:
        sys.exit(1)
    time.sleep(60)
elif mode == "complain":
    # complain RANK LINES: that rank writes LINES lines to stderr and exits 3;
    # the others wait.
    if int(args[0]) == rank:
        for i in range(int(args[1])):
            sys.stderr.write(f"complaint {i} from rank {rank}\n")
        sys.stderr.flush()
        sys.exit(3)
    ready()
    time.sleep(60)
elif mode == "stubborn":
    # Ignores SIGTERM and waits in stubborn().
    signal.signal(signal.SIGTERM, signal.SIG_IGN)

    def stubborn():
        ready()
        time.sleep(60)

    stubborn()
elif mode == "fail-first-on-file":
    # The first attempt waits for OUTDIR/go, then rank 0 exits 1; a later
    # attempt exits 0 at once.
    ready()
    if restart != "0":
        sys.exit(0)
    while not os.path.exists(os.path.join(outdir, "go")):
        time.sleep(0.01)
    sys.exit(1 if rank == 0 else 0)
elif mode == "daemon-fail-once":
    # The first attempt leaves a daemon (its own session: out of every
    # group of the worker) and fails; the next says whether that daemon is
    # still alive (OUTDIR/daemon-alive.<rank>) and exits 0.
    path = os.path.join(outdir, f"daemon.{rank}")
    if restart == "0":
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                write(f"daemon.{rank}", str(os.getpid()))
                time.sleep(301)
            os._exit(0)
        while not os.path.exists(path):
            time.sleep(0.01)
        sys.exit(1)
    # (A rank stopped early, as its sibling failed, may have been swept
    # before its daemon was born: then there is no pid file.)
    try:
        pid = int(open(path).read())
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        state = "gone"
    write(f"daemon-alive.{rank}", "no" if state in ("gone", "Z", "X") else "yes")
    sys.exit(0)
elif mode == "rank0-fails-first":
    # On its first start, global rank 0 fails and the other ranks wait to
    # be re-formed (they see a membership change, not a failure); on a
    # later start, every rank exits 0. (Ranks stay with their nodes here.)
    starts = os.path.join(outdir, f"starts.{rank}")
    with open(starts, "a") as f:
        f.write("x")
    if os.path.getsize(starts) > 1:
        sys.exit(0)
    if rank == 0:
        sys.exit(1)
    ready()
    time.sleep(120)
elif mode == "fail-if-env":
    # fail-if-env SECONDS: where FAIL_HERE is set (a bad node), runs
    # SECONDS and exits 1; elsewhere waits to be re-formed on the first
    # attempt, and exits 0 on a later one.
    ready()
    if os.environ.get("FAIL_HERE"):
        time.sleep(float(args[0]))
        sys.exit(1)
    if restart == "0":
        time.sleep(120)
    sys.exit(0)
elif mode == "fail-on-start":
    # fail-on-start: on a node whose launcher has FAIL_ON_START=N, the
    # worker fails on that node's N-th start (counted in
    # OUTDIR/starts-<NODE_TAG>); every other start waits to be re-formed.
    tag = os.environ.get("NODE_TAG", "x")
    starts = os.path.join(outdir, f"starts-{tag}")
    with open(starts, "a") as f:
        f.write("x")
    ready()
    if str(os.path.getsize(starts)) == os.environ.get("FAIL_ON_START"):
        sys.exit(1)
    time.sleep(120)
elif mode == "sleep":
    ready()
    time.sleep(float(args[0]) if args else 60)
else:
    sys.exit(f"unknown mode {mode}")
