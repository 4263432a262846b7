"""A training loop in miniature: allreduce_loop.py OUTDIR WANT.
Appends its start time to OUTDIR/start.<group rank> and writes its pid to
OUTDIR/pid.<group rank> (before torch is imported), joins gloo, then all-reduces every 50 ms. In a world of WANT it
prints its view and exits 0 after one all-reduce; otherwise it loops until
a collective fails (a peer died), and then fails too."""
import os
import sys
import time

out, want = sys.argv[1], int(sys.argv[2])
group, attempt = os.environ["GROUP_RANK"], os.environ["TORCHELASTIC_RESTART_COUNT"]
with open(os.path.join(out, f"start.{group}"), "a") as f:
    f.write(f"{time.time()}\n")
with open(os.path.join(out, f"pid.{group}"), "w") as f:
    f.write(str(os.getpid()))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

dist.init_process_group("gloo")
ws = dist.get_world_size()
t = torch.tensor([1.0])
dist.all_reduce(t)
print(f"rank {dist.get_rank()} world {ws} restart {attempt}", flush=True)
if ws == want:
    dist.destroy_process_group()
    sys.exit(0)
while True:
    dist.all_reduce(t)
    time.sleep(0.05)
