"""SCALE under DeepSpeed ZeRO, as a plain client optimizer of `deepspeed.initialize`.

ZeRO hands the client optimizer flat fp32 partitions, not parameters: one 1-D tensor per
param group (ZeRO-1/2, BF16_Optimizer) or per sub-group (ZeRO-3), holding this rank's
ranges of several parameters. SCALE's row/column RMS needs to know which parameter, which
range of its row-major flattening and which process group each piece of a flat is, so
`bind(engine)` describes every flat with `SCALE.bind_flat`. Every parameter of a flat's
group gets a piece on every rank, empty ones included, so all ranks issue the same
collectives (docs/algorithm.md, "DeepSpeed layouts").

Nobody has to call `bind`: SCALE's first step finds flats it was not built with and calls
`bind_at_first_step`, which takes the engine from the call stack (the engine's `step` is
always there: engine.step -> ZeRO optimizer step -> SCALE.step). The stack, not the
parameters, because ZeRO-1/2 and BF16_Optimizer leave no reference to themselves or to
the engine on the parameters, and the configuration checks need the engine.
`scale_zero.initialize` is `deepspeed.initialize` + `bind`, refusing before any step.

This is the one module that reads DeepSpeed's internals: `scale_zero.resharding` gets the
partitions and the low-precision refresh from here.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
from deepspeed.runtime.engine import DeepSpeedEngine
from deepspeed.runtime.zero.offload_config import OffloadDeviceEnum
from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

from scale_zero.scale import SCALE
from scale_zero.shard_layout import ShardLayout, comm_device, matrix_shape

# Exactly these classes: their subclasses (MiCS, ZenFlow, SuperOffload) lay out or step
# their partitions differently and are refused.
ZERO_OPTIMIZERS = (DeepSpeedZeroOptimizer, DeepSpeedZeroOptimizer_Stage3, BF16_Optimizer)


@dataclass(frozen=True)
class FlatPiece:
    """Elements [start, end) of parameter `name`'s row-major flattening, stored from
    `offset` of a flat partition. Empty (start == end) when this rank holds none of it."""

    name: str
    shape: tuple[int, ...]
    offset: int
    start: int
    end: int

    @property
    def numel(self) -> int:
        return self.end - self.start

    def layout(self, group, boundaries: list[int] | None = None) -> ShardLayout:
        shape = matrix_shape(self.shape) if len(self.shape) >= 2 else (1, math.prod(self.shape))
        return ShardLayout.flat_range(shape, self.start, self.end, group, boundaries)


@dataclass
class FlatPartition:
    """One flat fp32 partition DeepSpeed hands SCALE's step, and what it holds."""

    flat: torch.Tensor
    role: str
    group: dist.ProcessGroup | None  # None when one rank holds the whole group
    pieces: list[FlatPiece]


def _partition_role(scale: SCALE, params: list, names: dict) -> str:
    """The one role of the parameters DeepSpeed flattened into one partition (one per param
    group): a partition of several roles cannot be stepped as one."""
    roles = {scale.role_of(p) for p in params}
    if len(roles) > 1:
        raise ValueError(
            f"SCALE: DeepSpeed flattens each param group into one partition, and a group holds parameters of "
            f"roles {sorted(roles)} (e.g. {names[params[0]]}): give DeepSpeed one group per role, "
            "SCALE(scale_param_groups(model), ...)"
        )
    return roles.pop()


def _range_boundaries(part: FlatPartition) -> list[list[int]]:
    """Per piece, where the ranks' ranges of its parameter begin and end, the same on every
    rank: one all_gather of the (start, end) pairs at bind time, so that a row no boundary
    cuts (the usual case: LLaMA's shapes on a power-of-two world) needs no collective."""
    if part.group is None or not part.pieces:
        return [[] for _ in part.pieces]
    device = comm_device(part.group, torch.device("cpu"))
    local = torch.tensor([[piece.start, piece.end] for piece in part.pieces], dtype=torch.int64, device=device)
    ranges = [torch.empty_like(local) for _ in range(dist.get_world_size(group=part.group))]
    dist.all_gather(ranges, local, group=part.group)
    ranges = torch.stack(ranges, dim=1).tolist()  # piece, rank, (start, end)
    return [sorted({b for start, end in piece if end > start for b in (start, end)}) for piece in ranges]


def _group_or_none(group):
    return group if dist.get_world_size(group=group) > 1 else None


def _stage3_partitions(zero_opt: DeepSpeedZeroOptimizer_Stage3, names: dict, scale: SCALE) -> list[FlatPartition]:
    # Sub-group i's flat is each parameter's ds_tensor slice, `partition_numel()` long,
    # rank r holding [r*pn, min((r+1)*pn, numel)); the tail beyond numel is padding.
    partitions = []
    for i, params in enumerate(zero_opt.fp16_groups):
        group = zero_opt._get_sub_group_process_group(i)
        rank = dist.get_rank(group=group)
        pieces, offset = [], 0
        for p in params:
            pn, numel = p.partition_numel(), p.ds_numel
            start, end = min(rank * pn, numel), min((rank + 1) * pn, numel)
            pieces.append(FlatPiece(names[p], tuple(p.ds_shape), offset, start, end))
            offset += pn
        partitions.append(FlatPartition(
            zero_opt.fp32_partitioned_groups_flat[i], _partition_role(scale, params, names), _group_or_none(group), pieces
        ))
    return partitions


def _hp_mapping_partitions(lp_groups, flats, process_groups, names, scale: SCALE) -> list[FlatPartition]:
    # ZeRO-1/2 and BF16_Optimizer: `p._hp_mapping` (None if p has no element on this rank)
    # gives the range inside p and the offset inside this rank's flat slice. The role comes
    # from the parameters: during a ZeRO-1/2 step the optimizer's param_groups hold only
    # the group being stepped.
    partitions = []
    for params, flat, group in zip(lp_groups, flats, process_groups, strict=True):
        pieces = []
        for p in params:
            mapping = p._hp_mapping
            if mapping is None:
                start = end = offset = 0
            else:
                start = mapping.lp_fragment_address.start
                end = start + mapping.lp_fragment_address.numel
                offset = mapping.hp_fragment_address.start
            pieces.append(FlatPiece(names[p], tuple(p.shape), offset, start, end))
        partitions.append(FlatPartition(flat, _partition_role(scale, params, names), _group_or_none(group), pieces))
    return partitions


def zero_partitions(engine) -> list[FlatPartition]:
    """The flat partitions the engine's ZeRO optimizer hands SCALE, in step order.
    Empty for an engine without ZeRO (SCALE then sees whole parameters)."""
    zero_opt, names, scale = engine.optimizer, engine.param_names, engine.basic_optimizer
    if type(zero_opt) is DeepSpeedZeroOptimizer_Stage3:
        return _stage3_partitions(zero_opt, names, scale)
    if type(zero_opt) is DeepSpeedZeroOptimizer:
        return _hp_mapping_partitions(
            zero_opt.bit16_groups, zero_opt.single_partition_of_fp32_groups, zero_opt.real_dp_process_group,
            names, scale,
        )
    if type(zero_opt) is BF16_Optimizer:
        return _hp_mapping_partitions(
            zero_opt.bf16_groups, zero_opt.fp32_groups_flat_partition, zero_opt.real_dp_process_group,
            names, scale,
        )
    return []


def _unsupported(engine) -> list[str]:
    """Why this engine cannot run SCALE exactly (empty when it can)."""
    zero_opt = engine.optimizer
    offload = engine.zero_offload_optimizer()
    offload_param = engine.zero_offload_param()
    stage = engine.zero_optimization_stage()
    checks = [
        (engine.fp16_enabled(), "fp16 is not supported with SCALE: use bf16 (\"bf16\": {\"enabled\": true})"),
        (stage > 0 and type(zero_opt) not in ZERO_OPTIMIZERS,
         f"ZeRO optimizer {type(zero_opt).__name__} (MiCS / ZenFlow / SuperOffload) is not supported: "
         "use plain ZeRO stage 1, 2 or 3"),
        (stage in (1, 2) and engine.zero_round_robin_gradients(),
         "zero_optimization.round_robin_gradients reorders the flat partitions: set it to false"),
        (stage in (1, 2) and engine.zero_elastic_checkpoint(),
         "zero_optimization.elastic_checkpoint would re-slice SCALE's state as if it were Adam's: set it to "
         "false; resume on another world size with scale_zero.resharding.export_state/import_state"),
        (offload is not None and offload.device == OffloadDeviceEnum.nvme,
         "offload_optimizer.device=nvme is not supported: use \"cpu\""),
        (offload_param is not None and offload_param.device == OffloadDeviceEnum.nvme,
         "offload_param.device=nvme is not supported: use \"cpu\" or \"none\""),
        (engine.zero_partial_offload() != 1.0,
         "offload_optimizer.ratio < 1 steps part of the partitions with a GPU AdamW: leave ratio at 1.0"),
        (engine.zero_hpz_partition_size() > 1, "zero_hpz_partition_size > 1 (ZeRO++ hpZ) is not supported"),
        (engine.autotp_size() > 1 or engine.mpu is not None,
         "tensor / model parallelism is not supported with SCALE under DeepSpeed: the row/column RMS "
         "would miss the other tensor-parallel shards"),
        (engine.has_moe_layers, "MoE expert groups are not supported with SCALE"),
        (engine.torch_autocast_enabled(), "torch_autocast is not supported with SCALE: use \"bf16\""),
        (engine.pipeline_parallelism, "pipeline parallelism is not supported with SCALE"),
    ]
    return [message for bad, message in checks if bad]


def _relink_optimizer_state_after_each_step(zero_opt, scale: SCALE) -> None:
    """ZeRO-1/2 and BF16_Optimizer link each parameter to its optimizer state (for
    `deepspeed.utils.safe_get_full_optimizer_state`) once, right after the FIRST client
    step, and never again, not even after load_checkpoint replaces the state tensors.
    SCALE creates a group's state in that group's own step, so the first link misses the
    later groups. A hook is needed because only DeepSpeed knows when its step ends: after
    every SCALE step we clear DeepSpeed's "linked" flag, and the relink DeepSpeed runs
    right after each client step (with all param groups restored) links everything."""
    if type(zero_opt) is DeepSpeedZeroOptimizer_Stage3:
        return  # ZeRO-3 looks its state up at every access

    def clear_linked(_optimizer, _args, _kwargs):
        zero_opt._hp_optimizer_states_linked = False

    scale.register_step_post_hook(clear_linked)


def refresh_low_precision_params(engine) -> None:
    """Copy the fp32 masters into the model's (bf16 / fp32) parameters, as a step would."""
    zero_opt = engine.optimizer
    if type(zero_opt) is DeepSpeedZeroOptimizer_Stage3:
        for i in range(len(zero_opt.fp16_groups)):
            zero_opt._reassign_or_swap_out_partitioned_parameters(i)
        zero_opt._post_step(set())  # re-gathers the persistent (never partitioned) parameters
    else:
        zero_opt.update_lp_params()


def bind(engine) -> None:
    """Describe every flat partition of the engine's ZeRO optimizer to its SCALE optimizer,
    after checking the configuration (ValueError listing every problem). SCALE's first
    step does this by itself; call it only to refuse a configuration before training, or
    when something other than the engine's `step` drives the ZeRO optimizer."""
    scale = engine.basic_optimizer
    if not isinstance(scale, SCALE):
        raise TypeError(f"the engine's client optimizer is {type(scale).__name__}, not SCALE")
    problems = _unsupported(engine)
    if problems:
        raise ValueError("SCALE cannot run with this DeepSpeed configuration:\n  - " + "\n  - ".join(problems))
    partitions = zero_partitions(engine)
    for part in partitions:
        pieces = [(piece.offset, piece.layout(part.group, boundaries))
                  for piece, boundaries in zip(part.pieces, _range_boundaries(part), strict=True)]
        scale.bind_flat(part.flat, pieces, part.role)
    if partitions:
        _relink_optimizer_state_after_each_step(engine.optimizer, scale)


def _engine_stepping(scale: SCALE) -> DeepSpeedEngine | None:
    """The DeepSpeed engine on the call stack whose client optimizer is `scale`."""
    frame = sys._getframe(1)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, DeepSpeedEngine) and candidate.basic_optimizer is scale:
            return candidate
        frame = frame.f_back
    return None


def bind_at_first_step(scale: SCALE) -> None:
    """SCALE.step got flat partitions it was not built with: bind the engine stepping it."""
    engine = _engine_stepping(scale)
    if engine is None:
        raise RuntimeError(
            "SCALE got flat partitions it was not built with, and no DeepSpeed engine's step is "
            "driving it: call scale_zero.bind(engine) once after deepspeed.initialize(...)"
        )
    bind(engine)


def initialize(*args, **kwargs):
    """`deepspeed.initialize(*args, **kwargs)` (same arguments, same `(engine, optimizer,
    dataloader, lr_scheduler)` back) that also binds a `SCALE` optimizer, given as
    `optimizer=`, right away: unsupported combinations raise ValueError here, before any
    step, instead of at the first step. Any other optimizer passes through untouched."""
    engine, optimizer, dataloader, lr_scheduler = deepspeed.initialize(*args, **kwargs)
    if isinstance(getattr(engine, "basic_optimizer", None), SCALE):
        bind(engine)
    return engine, optimizer, dataloader, lr_scheduler
