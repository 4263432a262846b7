"""A stranger takes a finished worker's PID; the launcher must leave it alone.

Run as PID 1 of a fresh PID namespace (`unshare --pid --fork --mount-proc`),
where writing /proc/sys/kernel/ns_last_pid makes the next fork get a chosen
PID:

    pid_reuse.py orchestrate LAUNCHER OUTDIR MODE

starts `LAUNCHER --standalone --nproc-per-node=2 ... pid_reuse.py worker`,
forks a decoy that takes (or tries to take) the PID of attempt 0's rank 0
after that worker has exited, lets the job end as MODE says, and prints one
JSON line: how the launcher exited, whether the decoy got the PID, and
whether the decoy is still alive.

MODE:
  success  rank 0 exits 0 at once, rank 1 waits for `go`, exits 0
  failure  the same, but rank 1 exits 1 (its siblings' groups are stopped)
  restart  rank 0 exits 1 at once, rank 1 is stopped; attempt 1 waits for
           `go` and exits 0 (the decoy holds a PID of the finished attempt)
  sigterm  as restart, but the launcher gets SIGTERM instead of `go`
"""

import json
import os
import signal
import subprocess
import sys
import time

DEADLINE = 60.0


def wait_until(what, cond):
    end = time.monotonic() + DEADLINE
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > end:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.005)


def exited(pid):
    """True once `pid` is a zombie or gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return True


def take_pid(target):
    """Forks a decoy (its own session, sleeping) with PID `target` if that PID
    is free. Returns (decoy pid or None, 'taken' | 'reserved')."""
    for _ in range(5000):
        if os.path.exists(f"/proc/{target}"):
            # Still held: by the exited worker's zombie, say.
            return None, "reserved"
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            f.write(str(target - 1))
        pid = os.fork()
        if pid == 0:
            os.setsid()
            while True:
                signal.pause()
        if pid == target:
            return pid, "taken"
        # Another fork got in between: try again.
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    raise SystemExit(f"could not take pid {target}")


def orchestrate(launcher, out, mode):
    restarts = "1" if mode in ("restart", "sigterm") else "0"
    env = dict(os.environ, TMPDIR=out, PID_REUSE_MODE=mode, PYTHON_EXEC=sys.executable)
    launcher_proc = subprocess.Popen(
        [launcher, "--standalone", "--nproc-per-node=2", f"--max-restarts={restarts}",
         os.path.abspath(__file__), "worker", out],
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=open(os.path.join(out, "launcher.err"), "w"),
    )
    pid_file = os.path.join(out, "pid.0.0")
    target = int(wait_until("attempt 0 rank 0", lambda: os.path.exists(pid_file)
                            and open(pid_file).read().strip()))
    wait_until("attempt 0 rank 0 to exit", lambda: exited(target))
    if mode in ("restart", "sigterm"):
        for r in (0, 1):
            ready = os.path.join(out, f"ready.1.{r}")
            wait_until(f"attempt 1 rank {r}", lambda: os.path.exists(ready))
    decoy, status = take_pid(target)
    if mode == "sigterm":
        launcher_proc.send_signal(signal.SIGTERM)
    else:
        open(os.path.join(out, "go"), "w").close()
    rc = launcher_proc.wait(timeout=DEADLINE)
    alive = None
    decoy_signal = None
    if decoy is not None:
        done, st = os.waitpid(decoy, os.WNOHANG)
        alive = done == 0
        if not alive and os.WIFSIGNALED(st):
            decoy_signal = os.WTERMSIG(st)
        if alive:
            os.kill(decoy, signal.SIGKILL)
            os.waitpid(decoy, 0)
    print(json.dumps({"launcher_rc": rc, "target": target, "decoy": status,
                      "decoy_alive": alive, "decoy_signal": decoy_signal}), flush=True)


def worker(out):
    mode = os.environ["PID_REUSE_MODE"]
    rank = int(os.environ["LOCAL_RANK"])
    attempt = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
    tmp = os.path.join(out, f"pid.{attempt}.{rank}.tmp")
    with open(tmp, "w") as f:
        f.write(str(os.getpid()))
    os.rename(tmp, os.path.join(out, f"pid.{attempt}.{rank}"))
    if attempt == 0 and rank == 0:
        sys.exit(1 if mode in ("restart", "sigterm") else 0)
    if attempt == 0 and mode in ("restart", "sigterm"):
        time.sleep(DEADLINE)  # stopped by the launcher when rank 0 fails
        sys.exit(0)
    open(os.path.join(out, f"ready.{attempt}.{rank}"), "w").close()
    # Wait without forking, so this job uses no PIDs meanwhile.
    go = os.path.join(out, "go")
    wait_until("go", lambda: os.path.exists(go))
    sys.exit(1 if mode == "failure" else 0)


if __name__ == "__main__":
    if sys.argv[1] == "orchestrate":
        orchestrate(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        worker(sys.argv[2])
