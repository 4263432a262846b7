"""A/B of a rendezvous round between two torchrun-rs builds: two c10d nodes
on 127.0.0.2/.3, a Python worker that exits at once; the
rendezvous_completed duration (it includes rank assignment, where the
node fingerprints are exchanged) on both nodes, N runs per build,
alternating. Usage: python3 bench/round_ab.py OLD_BINARY NEW_BINARY [N]"""
import json, os, socket, subprocess, sys, tempfile, statistics
bins = {"old": sys.argv[1], "new": sys.argv[2]}
n = int(sys.argv[3]) if len(sys.argv) > 3 else 10
res = {k: [] for k in bins}
d = tempfile.mkdtemp()
script = os.path.join(d, "t.py"); open(script, "w").write("pass\n")
for i in range(n):
    for name, b in bins.items():
        s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
        evs = [os.path.join(d, f"e{i}{name[:3]}{k}") for k in range(2)]
        ps = [subprocess.Popen([b, "--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d",
              f"--rdzv-endpoint=127.0.0.2:{port}", f"--rdzv-id=fp{i}", f"--local-addr=127.0.0.{2+k}",
              "--rdzv-conf=last_call_timeout=1", f"--events-file={evs[k]}", script],
              env=dict(os.environ, PYTHON_EXEC="python3"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for k in range(2)]
        for p in ps: p.wait()
        for e in evs:
            for line in open(e):
                j = json.loads(line)
                if j["event"] == "rendezvous_completed":
                    res[name].append(j["duration_ms"])
for k, v in res.items():
    print(f"{k}: median {statistics.median(v):.2f} ms over {len(v)} node-rounds (min {min(v):.2f}, max {max(v):.2f})")
