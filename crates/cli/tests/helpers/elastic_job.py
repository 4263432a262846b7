"""Elastic torch worker: joins gloo, all-reduces, prints its view, then
exits 0 if the world has WORLD workers, else waits to be re-formed."""
import os
import sys
import time

import torch
import torch.distributed as dist

want = int(sys.argv[1])
dist.init_process_group("gloo")
t = torch.tensor([1.0])
dist.all_reduce(t)
ws = dist.get_world_size()
assert int(t.item()) == ws
print(f"rank {dist.get_rank()} world {ws} restart {os.environ['TORCHELASTIC_RESTART_COUNT']} "
      f"master {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}", flush=True)
if ws == want:
    dist.destroy_process_group()
    sys.exit(0)
time.sleep(300)
