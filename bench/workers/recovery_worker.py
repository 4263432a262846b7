"""The recovery benchmark's worker: recovery_worker.py OUTDIR.
Appends `<time> <restart count> <world size>` to OUTDIR/start.<node> when
it starts (before torch is imported: the launcher's part of a recovery is
what is timed), then joins gloo, writes OUTDIR/ready.<node> after its
first all-reduce, and all-reduces every 50 ms for ever.
BENCH_NODE names the node (the launcher passes its environment on).
On the node whose OUTDIR/fail.<node> exists it exits 1 at the next step,
once (the file is removed), writing OUTDIR/fault; with BENCH_BAD=1 it
also exits 1 at every start after the first (a node gone bad)."""
import os
import sys
import time

out, node = sys.argv[1], os.environ["BENCH_NODE"]
restarts = os.environ.get("TORCHELASTIC_RESTART_COUNT", "?")
world = os.environ.get("WORLD_SIZE", "?")
with open(os.path.join(out, f"start.{node}"), "a") as f:
    f.write(f"{time.time()} {restarts} {world}\n")
with open(os.path.join(out, f"pid.{node}"), "w") as f:
    f.write(str(os.getpid()))
if os.environ.get("BENCH_BAD") == "1" and restarts != "0":
    with open(os.path.join(out, "fault"), "a") as f:
        f.write(f"{time.time()}\n")
    sys.exit(1)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

dist.init_process_group("gloo")
t = torch.tensor([1.0])
dist.all_reduce(t)
with open(os.path.join(out, f"ready.{node}"), "w") as f:
    f.write(f"{time.time()}\n")
trigger = os.path.join(out, f"fail.{node}")
while True:
    dist.all_reduce(t)
    if os.path.exists(trigger):
        os.unlink(trigger)
        with open(os.path.join(out, "fault"), "a") as f:
            f.write(f"{time.time()}\n")
        os._exit(1)
    time.sleep(0.05)
