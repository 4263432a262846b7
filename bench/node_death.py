"""Node-death benchmark: three c10d agents (one worker each, default
heartbeats: 5 s x 3), one SIGKILLed; prints the time until both survivors'
workers run again in a world of 2. torchrun does not re-form here: it waits
for the workers' own collectives to fail.
With an etcd endpoint, the same with --rdzv-backend=etcd-v3 (a node's lease
TTL is then the same 15 s window).
Usage: python bench/node_death.py TORCHRUN_RS WORKER_PY [ETCD_ENDPOINT]"""
import json, os, signal, socket, subprocess, sys, tempfile, time
bin_, helper = sys.argv[1], sys.argv[2]
etcd = sys.argv[3] if len(sys.argv) > 3 else None
s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
backend = ["--rdzv-backend=etcd-v3", f"--rdzv-endpoint={etcd}"] if etcd else [
    "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.2:{port}"]
out = tempfile.mkdtemp()
procs = [subprocess.Popen([bin_, "--nnodes=2:3", "--nproc-per-node=1", *backend,
    f"--rdzv-id=death-{port}", f"--local-addr=127.0.0.{2+i}",
    helper, "until-world", out, "2"], env=dict(os.environ, PYTHON_EXEC="python3"),
    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for i in range(3)]
def world_of(r):
    try: return json.load(open(os.path.join(out, f"env.{r}.0.json")))["env"]["WORLD_SIZE"]
    except Exception: return None
while not all(world_of(r) == "3" for r in range(3)): time.sleep(0.01)
t0 = time.time()
procs[2].send_signal(signal.SIGKILL)
while not all(world_of(r) == "2" for r in range(2)): time.sleep(0.01)
print(f"node death to survivors' workers running again ({'etcd-v3, lease TTL 15 s' if etcd else 'c10d, default heartbeats 5 s x 3'}): {time.time() - t0:.1f} s")
for p in procs[:2]: p.wait(timeout=60)
