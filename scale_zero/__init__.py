"""scale-zero: the SCALE optimizer for LLaMA pretraining under DeepSpeed ZeRO and FSDP2."""

from scale_zero.param_groups import scale_param_groups
from scale_zero.scale import ROLES, SCALE
from scale_zero.shard_layout import CommStats, ShardLayout, batched_rms

__all__ = ["SCALE", "initialize", "bind", "ROLES", "scale_param_groups", "ShardLayout", "CommStats", "batched_rms"]
__version__ = "0.1.0"


def __getattr__(name):
    # `scale_zero.initialize` / `bind` (the DeepSpeed adapter) import deepspeed only when used.
    if name in ("initialize", "bind"):
        from scale_zero import deepspeed_zero

        return getattr(deepspeed_zero, name)
    raise AttributeError(f"module 'scale_zero' has no attribute {name!r}")
