"""Two ranks whose torch FileTimerClient timers expire together.
timer_pair.py OUTDIR: rank 0 arms a 1 s timer (scope "stuck-a"), rank 1 a
1.5 s one ("stuck-b"); neither is released. Rank 0 exits 0 after 2 s, while
the launcher is still taking the stack of its expiry; rank 1 stays stuck in
its timer for 120 s. Each rank writes OUTDIR/armed.<rank> once its timer
request is sent."""
import os
import sys
import time

from torch.distributed.elastic.timer import FileTimerClient, configure, expires

out = sys.argv[1]
rank = os.environ["LOCAL_RANK"]
configure(FileTimerClient(os.environ["TORCHELASTIC_TIMER_FILE"]))
with expires(after=1 + 0.5 * int(rank), scope=f"stuck-{'ab'[int(rank)]}"):
    open(os.path.join(out, f"armed.{rank}"), "w").close()
    if rank == "0":
        time.sleep(2)
        os._exit(0)
    time.sleep(120)
