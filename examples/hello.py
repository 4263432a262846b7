"""The bundled example: needs nothing but Python. Each worker prints what
torchrun-rs told it through the environment."""
import os

rank = os.environ["RANK"]
print(
    f"hello from rank {rank}/{os.environ['WORLD_SIZE']} "
    f"(local rank {os.environ['LOCAL_RANK']}, master {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}, "
    f"run {os.environ['TORCHELASTIC_RUN_ID']})",
    flush=True,
)
