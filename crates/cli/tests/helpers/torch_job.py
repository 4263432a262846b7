"""A real torch worker: gloo all_reduce; with `fail-once RANK` that rank
raises (under @record) on the first attempt; with `raise` rank 1 always
raises; with `segv` rank 0 segfaults."""
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record


@record
def main():
    mode = sys.argv[1] if len(sys.argv) > 1 else ""
    rank = int(os.environ["RANK"])
    restart = os.environ["TORCHELASTIC_RESTART_COUNT"]
    if mode == "raise" and rank == 1:
        raise ValueError(f"boom from rank {rank}")
    if mode == "segv" and rank == 0:
        import ctypes
        ctypes.string_at(0)
    dist.init_process_group("gloo")
    if mode == "fail-once" and rank == int(sys.argv[2]) and restart == "0":
        raise RuntimeError("deliberate failure on the first attempt")
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    ws = dist.get_world_size()
    assert t.item() == ws * (ws + 1) / 2
    print(f"rank {rank} restart {restart} sum {int(t.item())}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
