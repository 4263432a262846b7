"""A worker that arms torch's file watchdog timer with a real FileTimerClient.
timer_job.py OUTDIR: on the first attempt, local rank 1 arms a 1 s timer
(scope "stuck-step") and hangs in it; rank 0 just waits. On a later attempt
every rank exits 0 at once. Each rank writes OUTDIR/pid.<rank>.<attempt>,
and rank 1 writes OUTDIR/armed once its timer request has been sent."""
import os
import sys
import time

from torch.distributed.elastic.timer import FileTimerClient, configure, expires

out = sys.argv[1]
rank, attempt = os.environ["LOCAL_RANK"], os.environ["TORCHELASTIC_RESTART_COUNT"]
open(os.path.join(out, f"pid.{rank}.{attempt}"), "w").write(str(os.getpid()))
if attempt != "0":
    sys.exit(0)
configure(FileTimerClient(os.environ["TORCHELASTIC_TIMER_FILE"]))
if rank == "1":
    with expires(after=1, scope="stuck-step"):
        open(os.path.join(out, "armed"), "w").close()
        time.sleep(120)
time.sleep(120)
