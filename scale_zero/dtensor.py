"""DTensor parameters (FSDP2 `fully_shard`, HSDP, tensor parallel) as `ShardLayout`s.

FSDP2 gives every parameter a `Shard(0)` placement: whole rows, so per-row statistics are
local and only per-column ones (the embedding) need the collective. HSDP adds a
`Replicate()` mesh dim, which needs nothing (its gradients are already averaged). A
`Shard(1)` placement (row-parallel tensor parallelism) cuts the columns: per-row statistics
then reduce over that mesh dim's group. DTensor's own `vector_norm` on a sharded dim
would cost one collective per tensor; SCALE works on `to_local()` and batches them.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from scale_zero.shard_layout import ShardLayout, matrix_shape


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def dtensor_offset(p: DTensor) -> int:
    """Where this rank's piece of a 1-D DTensor starts in the full tensor."""
    return compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)[1][0]


def dtensor_layout(p: DTensor) -> ShardLayout:
    """The block of the `(size(0), -1)` matrix that this rank's `p.to_local()` holds."""
    shape = matrix_shape(p.shape)
    split_groups = {}
    for mesh_dim, placement in enumerate(p.placements):
        if isinstance(placement, Replicate):
            continue
        # A Shard(d) cuts matrix dim 0 for d == 0 and the flattened columns for d == 1;
        # Shard(1) of a >2-D tensor keeps whole trailing dims, so its columns stay contiguous.
        cut = placement.dim if isinstance(placement, Shard) else None
        if cut not in (0, 1) or cut in split_groups:
            raise NotImplementedError(
                f"SCALE supports Replicate, Shard(0) and Shard(1) placements (one shard per "
                f"dim); got {p.placements} for a parameter of shape {tuple(p.shape)}"
            )
        split_groups[cut] = p.device_mesh.get_group(mesh_dim)
    local_shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    inner = shape[1] // p.shape[1] if len(p.shape) > 1 and p.shape[1] else 1
    rows = (offset[0], offset[0] + local_shape[0])
    cols = (offset[1] * inner, (offset[1] + local_shape[1]) * inner)
    return ShardLayout.block(shape, rows, cols, split_groups)
