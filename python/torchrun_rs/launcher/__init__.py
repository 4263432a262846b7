"""torchrun's ``torch.distributed.launcher`` API, backed by torchrun-rs."""

from torchrun_rs.launcher.api import LaunchConfig, elastic_launch, launch_agent  # noqa: F401
