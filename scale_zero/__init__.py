"""scale-zero: the SCALE optimizer for LLaMA pretraining under DeepSpeed ZeRO and FSDP2."""

from scale_zero.param_groups import scale_param_groups
from scale_zero.scale import ROLES, SCALE
from scale_zero.shard_layout import CommStats, ShardLayout, batched_rms

__all__ = ["SCALE", "ROLES", "scale_param_groups", "ShardLayout", "CommStats", "batched_rms"]
__version__ = "0.1.0"
