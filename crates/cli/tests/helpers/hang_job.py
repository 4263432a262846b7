"""A 2-rank gloo job that hangs: rank 1 never reaches the collective
(stuck_forever), rank 0 waits in all_reduce. hang_job.py OUTDIR writes
OUTDIR/ready.<rank> once the process group is up."""
import os
import sys
import time

import torch
import torch.distributed as dist

dist.init_process_group("gloo")
rank = dist.get_rank()
open(os.path.join(sys.argv[1], f"ready.{rank}"), "w").close()


def stuck_forever():
    time.sleep(3600)


if rank == 1:
    stuck_forever()
t = torch.ones(1)
dist.all_reduce(t)
