"""A real PyTorch job: every worker joins a gloo process group through
torchrun-rs's store and all-reduces its rank. Needs torch (CPU is enough)."""
import torch
import torch.distributed as dist

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
t = torch.tensor([float(rank)])
dist.all_reduce(t)
expected = world * (world - 1) / 2
assert t.item() == expected, (t.item(), expected)
print(f"rank {rank}/{world}: all_reduce sum {int(t.item())} (expected {int(expected)})", flush=True)
dist.destroy_process_group()
