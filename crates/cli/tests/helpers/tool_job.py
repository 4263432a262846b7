"""A job as accelerate and Lightning Fabric launch it: tool_job.py OUTDIR.
Joins gloo, all-reduces its rank + 1 and writes OUTDIR/rank.<RANK> as JSON:
the sum, the world size and the launcher's marker (TORCHRUN_RS_JOB: set by
torchrun-rs only)."""
import json
import os
import sys

import torch
import torch.distributed as dist

out = sys.argv[1]
dist.init_process_group("gloo")
t = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(t)
with open(os.path.join(out, f"rank.{dist.get_rank()}"), "w") as f:
    json.dump({"sum": t.item(), "world": dist.get_world_size(),
               "torchrun_rs": os.environ.get("TORCHRUN_RS_JOB") is not None}, f)
dist.destroy_process_group()
