"""scale-zero: the SCALE optimizer for LLaMA pretraining under DeepSpeed ZeRO and FSDP2."""

from scale_zero.param_groups import scale_param_groups
from scale_zero.scale import ROLES, SCALE
from scale_zero.shard_layout import CommStats, ShardLayout, batched_rms

__all__ = ["SCALE", "initialize", "ROLES", "scale_param_groups", "ShardLayout", "CommStats", "batched_rms"]
__version__ = "0.1.0"


def __getattr__(name):
    # `scale_zero.initialize` (the DeepSpeed adapter) imports deepspeed only when used.
    if name == "initialize":
        from scale_zero.deepspeed_zero import initialize

        return initialize
    raise AttributeError(f"module 'scale_zero' has no attribute {name!r}")
