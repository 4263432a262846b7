"""GPU benchmark worker: an NCCL all_reduce on the worker's GPU (LOCAL_RANK),
then its CPU affinity. GPU_JOB_FAIL_ONCE=DIR: the first attempt's rank 0
touches the GPU, writes DIR/fail (ns) and exits 1; every rank of the second
attempt writes DIR/start.<rank> (ns) once its CUDA context is up."""
import os
import sys
import time

import torch
import torch.distributed as dist

local = int(os.environ["LOCAL_RANK"])
torch.cuda.set_device(local)
fail_dir = os.environ.get("GPU_JOB_FAIL_ONCE")
attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
if fail_dir:
    torch.zeros(1, device="cuda")  # a CUDA context, as a real worker has
    if attempt == "0":
        if local == 0:
            open(os.path.join(fail_dir, "fail"), "w").write(str(time.time_ns()))
            sys.exit(1)
        time.sleep(60)
    open(os.path.join(fail_dir, f"start.{local}"), "w").write(str(time.time_ns()))
    sys.exit(0)
dist.init_process_group("nccl")
t = torch.ones(1 << 20, device="cuda")
dist.all_reduce(t)
torch.cuda.synchronize()
assert t[0].item() == dist.get_world_size()
cpus = sorted(os.sched_getaffinity(0))
print(f"rank {dist.get_rank()} gpu {torch.cuda.get_device_name(local)} cpus {cpus[0]}-{cpus[-1]} ({len(cpus)})", flush=True)
dist.destroy_process_group()
