"""Recovery benchmark: torchrun and torchrun-rs on the same faults.
Three c10d nodes on 127.0.0.2-4 (one gloo worker each, all-reducing every
50 ms: bench/workers/recovery_worker.py), --nnodes=2:3 --max-restarts=3,
torch's default rendezvous settings unless a scenario says otherwise:
  a  a worker exits 1 on one node
  b  SIGKILL of a node that does not host the store (agent and worker)
  c  SIGKILL of the node that hosts the store (agent and worker);
     join_timeout=30, so that giving up is bounded
  d  a frozen node (SIGSTOP of agent and worker), heartbeats 1 s x 3
  e  a node that fails at every start once it went bad, a spare waiting,
     --nnodes=3:3 (torchrun-rs: --max-node-failures=2, which torch lacks)
For each: the time from the fault to every surviving node's new workers
running (or to the last survivor's exit where the job ends), the outcome,
and the restart count each surviving node's workers were given.
Usage: python bench/recovery.py TORCHRUN_RS TORCHRUN [SCENARIOS]"""
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

ours, theirs = sys.argv[1], sys.argv[2]
only = sys.argv[3] if len(sys.argv) > 3 else "abcde"
here = os.path.dirname(os.path.abspath(__file__))
worker = os.path.join(here, "workers", "recovery_worker.py")
python = os.path.join(os.path.dirname(theirs), "python")
CAP = 90.0  # seconds a recovery may take before it is reported as none


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


class Job:
    def __init__(self, launcher, scenario):
        self.launcher, self.scenario = launcher, scenario
        self.out = tempfile.mkdtemp(prefix=f"recovery-{scenario}-")
        self.port = free_port()
        self.agents = {}

    def start(self, node, nnodes="2:3", conf="", extra=(), env=None):
        cmd = [self.launcher, f"--nnodes={nnodes}", "--nproc-per-node=1",
               "--max-restarts=3", "--rdzv-backend=c10d",
               f"--rdzv-endpoint=127.0.0.2:{self.port}",
               f"--rdzv-id=recovery-{self.scenario}-{self.port}",
               f"--local-addr=127.0.0.{2 + node}", *extra]
        if conf:
            cmd.append(f"--rdzv-conf={conf}")
        e = dict(os.environ, BENCH_NODE=str(node), PYTHON_EXEC=python, **(env or {}))
        log = open(os.path.join(self.out, f"agent.{node}.log"), "w")
        self.agents[node] = subprocess.Popen(
            cmd + [worker, self.out], env=e, stdout=log, stderr=log,
            start_new_session=True)

    def starts(self, node):
        """(time, restarts, world) of each start of the node's worker."""
        try:
            lines = open(os.path.join(self.out, f"start.{node}")).read().split("\n")
        except FileNotFoundError:
            return []
        return [(float(t), r, w) for t, r, w in
                (l.split() for l in lines if l.strip())]

    def worker_pid(self, node):
        return int(open(os.path.join(self.out, f"pid.{node}")).read())

    def fault_time(self):
        try:
            return float(open(os.path.join(self.out, "fault")).read().split()[0])
        except (FileNotFoundError, IndexError):
            return None

    def running_in(self, node, world, after):
        return any(t > after and w == str(world) for t, _, w in self.starts(node))

    def kill_node(self, node, sig):
        pid = self.worker_pid(node)
        for p in (self.agents[node].pid, pid):
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass

    def stop(self):
        for node, a in self.agents.items():
            try:
                wpid = self.worker_pid(node)
            except (FileNotFoundError, ValueError):
                wpid = None
            for p in (a.pid, wpid):
                if p is None:
                    continue
                for sig in (signal.SIGCONT, signal.SIGKILL):
                    try:
                        os.kill(p, sig)
                    except ProcessLookupError:
                        pass
            try:
                os.killpg(a.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            a.wait()
            # Workers of either launcher that outlived it (their own groups).
            subprocess.run(["pkill", "-KILL", "-f", self.out], check=False)


def wait(pred, cap=CAP):
    t0 = time.time()
    while time.time() - t0 < cap:
        v = pred()
        if v:
            return v
        time.sleep(0.01)
    return None


def restarts(job, nodes, after):
    out = []
    for n in nodes:
        s = [r for t, r, _ in job.starts(n) if t > after]
        out.append(s[-1] if s else "-")
    return "/".join(out)


def formed(job, nodes, world):
    """Every node's workers all-reduce in a world of `world`."""
    def ready(n):
        try:
            os.stat(os.path.join(job.out, f"ready.{n}"))
        except FileNotFoundError:
            return False
        return job.running_in(n, world, 0)
    return wait(lambda: all(ready(n) for n in nodes), 120)


def scenario(launcher, name):
    job = Job(launcher, name)
    try:
        return run(job, name)
    finally:
        job.stop()


def recovered(job, survivors, world, t0):
    done = wait(lambda: all(job.running_in(n, world, t0) for n in survivors))
    if not done:
        return None
    return max(min(t for t, _, w in job.starts(n) if t > t0 and w == str(world))
               for n in survivors) - t0


def run(job, name):
    conf = {"c": "join_timeout=30", "d": "keep_alive_interval=1,keep_alive_max_attempt=3"}.get(name, "")
    if name == "e":
        extra = ["--max-node-failures=2"] if job.launcher == ours else []
        for n in range(3):
            job.start(n, nnodes="3:3", extra=extra, env={"BENCH_BAD": "1"} if n == 2 else None)
            time.sleep(0.5 if n == 0 else 0)
        if not formed(job, range(3), 3):
            return ("-", "did not form", "-")
        job.start(3, nnodes="3:3", extra=extra)
        time.sleep(5)  # the spare is waiting
        open(os.path.join(job.out, "fail.2"), "w").close()
        t0 = wait(job.fault_time, 30)
        survivors, world = [0, 1, 3], 3
    else:
        for n in range(3):
            job.start(n, conf=conf)
            time.sleep(0.5 if n == 0 else 0)  # node 0 hosts the store
        if not formed(job, range(3), 3):
            return ("-", "did not form", "-")
        if name == "a":
            open(os.path.join(job.out, "fail.1"), "w").close()
            t0 = wait(job.fault_time, 30)
            survivors, world = [0, 1, 2], 3
        else:
            victim = 0 if name == "c" else 2
            t0 = time.time()
            job.kill_node(victim, signal.SIGSTOP if name == "d" else signal.SIGKILL)
            survivors, world = [n for n in range(3) if n != victim], 2
    if name == "c" or (name == "e" and job.launcher != ours):
        # Re-forming is impossible (c: the store is gone) or not what the
        # launcher does (e: no exclusion): recovery, or the job's end.
        def ended():
            if all(job.running_in(n, world, t0) for n in survivors):
                return "recovered"
            if all(job.agents[n].poll() is not None for n in survivors):
                return "exited"
            return None
        how = wait(ended, 120)
        took = time.time() - t0
        if how == "recovered":
            took = recovered(job, survivors, world, t0)
            return (f"{took:.2f}", f"re-formed ({world} nodes)", restarts(job, survivors, t0))
        if how == "exited":
            codes = ",".join(str(job.agents[n].returncode) for n in survivors)
            return (f"{took:.2f}", f"survivors exited ({codes})", restarts(job, survivors, 0))
        return ("-", "no outcome in 120 s", restarts(job, survivors, 0))
    took = recovered(job, survivors, world, t0)
    if took is None:
        return ("-", f"not re-formed in {CAP:.0f} s", restarts(job, survivors, t0))
    what = {"a": "restarted (3 nodes)", "e": "spare in, bad node out"}.get(name, f"re-formed ({world} nodes)")
    return (f"{took:.2f}", what, restarts(job, survivors, t0))


names = {
    "a": "(a) a worker exits 1",
    "b": "(b) SIGKILL of a node",
    "c": "(c) SIGKILL of the store's host",
    "d": "(d) a frozen node (1 s x 3)",
    "e": "(e) a bad node, a spare",
}
print("| fault | torchrun 2.15 | outcome | restarts | torchrun-rs | outcome | restarts |")
print("|---|---:|---|---|---:|---|---|")
for s in only:
    t = scenario(theirs, s)
    o = scenario(ours, s)
    print(f"| {names[s]} | {t[0]} s | {t[1]} | {t[2]} | {o[0]} s | {o[1]} | {o[2]} |", flush=True)
