"""A worker that joins a gloo process group through env:// and all-reduces
its rank. Prints the sum."""
import os

import torch
import torch.distributed as dist

dist.init_process_group("gloo")
t = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(t)
ws = dist.get_world_size()
assert t.item() == ws * (ws + 1) / 2, t
print(f"rank {dist.get_rank()} sum {int(t.item())}", flush=True)
dist.destroy_process_group()
