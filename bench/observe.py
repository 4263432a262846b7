"""Observability benchmark (issue: events, metrics, watchdog, hang diagnosis):
observe.py LAUNCHER prints the launch time at N=8 with and without every
observability feature on, the 99th percentile of 1,000 /metrics scrapes
during a run, and the time of one /stacks dump of 8 Python ranks."""
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

launcher = sys.argv[1]
tmp = tempfile.mkdtemp()
env = dict(os.environ, TMPDIR=tmp)
on = ["--metrics-port=0", "--events-file", os.path.join(tmp, "events.jsonl"),
      "--event-log-handler=console", "--hang-timeout=1h"]
watchdog = dict(env, TORCHELASTIC_ENABLE_FILE_TIMER="1")


def launch(extra, e):
    ts = []
    for _ in range(30):
        t = time.perf_counter()
        subprocess.run([launcher, "--standalone", "--nproc-per-node=8", *extra, "--no-python", "true"],
                       env=e, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1000


plain = launch([], env)
full = launch(on, watchdog)
p = subprocess.Popen([launcher, "--standalone", "--nproc-per-node=8", "--metrics-port=0",
                      "--no-python", sys.executable, "-c", "import time; time.sleep(60)"],
                     env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
port = None
for line in p.stderr:
    if "health and metrics on http://" in line:
        port = int(line.strip().rsplit(":", 1)[1])
        break
base = f"http://127.0.0.1:{port}"
while '"running"' not in urllib.request.urlopen(base + "/status").read().decode():
    time.sleep(0.05)
took = []
for _ in range(1000):
    t = time.perf_counter()
    urllib.request.urlopen(base + "/metrics").read()
    took.append(time.perf_counter() - t)
took.sort()
t = time.perf_counter()
stacks = urllib.request.urlopen(base + "/stacks").read().decode()
dump = time.perf_counter() - t
p.terminate()
p.wait()
print(f"machine: {os.cpu_count()} cores")
print()
print("| measure | value |")
print("| --- | --- |")
print(f"| launch, N=8, plain | {plain:.1f} ms |")
print(f"| launch, N=8, metrics + events file + console events + watchdog + hang watch | {full:.1f} ms |")
print(f"| /metrics, 99th percentile of 1,000 scrapes during a run | {took[int(len(took) * 0.99) - 1] * 1000:.2f} ms |")
print(f"| /stacks of 8 Python ranks (py-spy) | {dump * 1000:.0f} ms ({stacks.count('== local rank')} ranks dumped) |")
