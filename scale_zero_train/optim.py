"""The optimizer by name, its learning-rate schedule, and what it holds in memory."""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from scale_zero import SCALE, scale_param_groups
from scale_zero_train.metrics import all_reduce

# SCALE and its ablations (docs/algorithm.md, "The paper's setup"): how each role is
# normalized and which keep momentum.
SCALE_VARIANTS = {
    "scale": dict(),
    "colnorm-sgd": dict(momentum_roles=()),
    "sgd": dict(norm_dims={"matrix": None, "embedding": None, "output": None},
                momentum_roles=("matrix", "embedding", "output")),
    # The paper's "row" normalization: the other dim of every matrix; no momentum, as in its ablation.
    "row-scale": dict(norm_dims={"matrix": 0, "embedding": 1, "output": 0}, momentum_roles=()),
}


def build_optimizer(name: str, model: nn.Module, lr: float, adam_lr: float, momentum: float,
                    weight_decay: float, master_weights: str = "fp32") -> torch.optim.Optimizer:
    """`master_weights` (scale_zero_train.vocab.MASTER_WEIGHTS): "bf16" keeps SCALE's state in
    bf16 with stochastic rounding, "bf16-nearest" rounds to nearest."""
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, betas=(momentum, 0.999), weight_decay=weight_decay)
    master_free = master_weights != "fp32"
    return SCALE(scale_param_groups(model), lr=lr, momentum=momentum, adam_lr=adam_lr,
                 weight_decay=weight_decay, stochastic_rounding=master_weights != "bf16-nearest",
                 state_dtype=torch.bfloat16 if master_free else None, **SCALE_VARIANTS[name])


def lr_lambda(steps: int, warmup_ratio: float, min_lr_ratio: float) -> Callable[[int], float]:
    """Linear warmup from 0 over the first `warmup_ratio` of the steps, then cosine decay to
    `min_lr_ratio` of the peak at the last step (docs/algorithm.md, "The paper's setup").
    `step` counts optimizer steps taken: step `warmup - 1` is the peak, step `steps - 1` the
    floor, and the first step already has a non-zero lr."""
    warmup = math.ceil(warmup_ratio * steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step + 1 - warmup) / max(1, steps - warmup))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, steps: int, warmup_ratio: float, min_lr_ratio: float) -> LambdaLR:
    return LambdaLR(optimizer, lr_lambda(steps, warmup_ratio, min_lr_ratio))


def base_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside an engine's wrapper (DeepSpeed's ZeRO optimizers keep it
    as `.optimizer`)."""
    while not isinstance(optimizer, torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of optimizer state this rank holds (momenta, moments; not master weights)."""
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                local = value.to_local() if hasattr(value, "to_local") else value
                total += local.numel() * local.element_size()
    return total


def optimizer_metrics(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """The optimizer's scalars; a collective (every rank calls it at the same step): the state
    bytes summed over the ranks and, for SCALE, what its last step issued on this rank."""
    (total_state,) = all_reduce([state_bytes(optimizer)])
    values = {"memory/optimizer_state_bytes": total_state}
    if isinstance(optimizer, SCALE):
        comm = optimizer.comm_stats
        values.update({"comm/scale_collectives": comm.collectives, "comm/scale_bytes": comm.bytes})
    return values
