"""SCALE: Stochastic Column-normalized Last-layer momEntum (arXiv 2506.16659).

Per parameter role, from the gradient g (PyTorch layout, a Linear weight is (out, in)):

    matrix     u = g / rms(g, dim=1)                      one scale per output unit (row)
    embedding  u = g / rms(g, dim=0)                      one scale per hidden unit (column)
    output     m = lerp(m, g, 1 - beta);  u = m / rms(m, dim=1)
    all three  p *= 1 - lr * wd;  p -= lr * u
    vector     AdamW (eps before bias correction), lr_adam = adam_lr * lr / peak_lr

rms(x, dim) = sqrt(mean(x**2, dim)).clamp_min(1e-8), the mean over the FULL parameter's dim.
Arithmetic is fp32 whatever the parameter dtype. See ../shared/spec/SCALE.md section 1.

A rank may hold only part of a parameter (FSDP2, ZeRO); `scale_zero.shard_layout` turns
local partial sums into the full-parameter RMS with one batched all_reduce per group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer

from scale_zero.dtensor import dtensor_layout, local_tensor
from scale_zero.shard_layout import CommStats, NormalizedStep, ShardLayout, matrix_shape, normalized_steps_

ROLES = ("matrix", "embedding", "output", "vector")
# The dim each role's RMS reduces over: matrix and output rows, embedding columns.
NORM_DIMS = {"matrix": 1, "embedding": 0, "output": 1}


def param_shape(p: torch.Tensor) -> tuple[int, ...]:
    """The parameter's real shape, also under `deepspeed.zero.Init` (where p.ndim == 1)."""
    return tuple(getattr(p, "ds_shape", p.shape))


@dataclass
class _Unit:
    """One tensor the step updates: a parameter, a DTensor's local piece, or a ZeRO flat
    partition holding pieces of several parameters (`pieces`: offset, layout)."""

    key: torch.Tensor  # the state key
    param: torch.Tensor  # flat fp32 values updated in place
    grad: torch.Tensor  # flat fp32 gradient
    pieces: list[tuple[int, ShardLayout]]
    write_back: torch.Tensor | None = None  # the low-precision parameter `param` was copied from

    def piece(self, flat: torch.Tensor, offset: int, layout: ShardLayout) -> torch.Tensor:
        if offset == 0 and layout.numel == flat.numel():
            return flat  # the whole tensor (no view to make)
        return flat[offset : offset + layout.numel]


class SCALE(Optimizer):
    """SGD with row/column-RMS-normalized gradients, momentum on the output layer only, and
    AdamW for 1-D parameters. Build the param groups with `scale_param_groups(model)`.

    Ablations: `norm_dims` maps a role to the dim its RMS reduces over (0, 1, or None for
    no normalization); `momentum_roles` names the roles that keep momentum."""

    def __init__(
        self,
        params,
        lr: float,
        momentum: float = 0.9,
        adam_lr: float | None = None,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        norm_dims: dict[str, int | None] | None = None,
        momentum_roles: tuple[str, ...] = ("output",),
    ):
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.peak_lr = lr
        self.norm_dims = {**NORM_DIMS, **(norm_dims or {})}
        self.momentum_roles = tuple(momentum_roles)
        for role in [*self.norm_dims, *self.momentum_roles]:
            if role not in ROLES[:3]:
                raise ValueError(f"unknown role {role!r}: ablations apply to {ROLES[:3]}")
        defaults = dict(
            lr=lr, momentum=momentum, adam_lr=lr if adam_lr is None else adam_lr,
            weight_decay=weight_decay, betas=betas, eps=eps,
        )
        self.comm_stats = CommStats()  # collectives of the last step
        # Flat tensors whose pieces an engine adapter describes (ZeRO partitions).
        self.flat_pieces: dict[torch.Tensor, list[tuple[int, ShardLayout]]] = {}
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        if "role" in param_group:
            if param_group["role"] not in ROLES:
                raise ValueError(f"unknown role {param_group['role']!r}; expected one of {ROLES}")
            return super().add_param_group(param_group)
        # No role given: >=2-D parameters are matrices, 1-D ones vectors.
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        for role, is_vector in (("matrix", False), ("vector", True)):
            chosen = [p for p in params if (len(param_shape(p)) < 2) == is_vector]
            if chosen:
                super().add_param_group({**param_group, "params": chosen, "role": role})

    def _unit(self, p: torch.Tensor, role: str) -> _Unit | None:
        if p.grad is None:
            return None
        if p in self.flat_pieces:
            return _Unit(p, p, p.grad.float(), self.flat_pieces[p])
        local, grad = local_tensor(p), local_tensor(p.grad)
        pieces = []
        if role != "vector":
            if len(param_shape(p)) < 2:
                raise RuntimeError(
                    f"SCALE got a 1-D tensor of {p.numel()} elements in its {role!r} group: a "
                    "ZeRO flat partition it was not bound to. Create the engine with "
                    "scale_zero.initialize(...) instead of deepspeed.initialize(...)."
                )
            layout = dtensor_layout(p) if isinstance(p, DTensor) else ShardLayout.whole(matrix_shape(p.shape))
            pieces = [(0, layout)]
        exact = local.dtype == torch.float32 and local.is_contiguous()
        param = local.view(-1) if exact else local.detach().float().reshape(-1)
        return _Unit(p, param, grad.float().reshape(-1), pieces, None if exact else local)

    def _state(self, unit: _Unit, name: str) -> torch.Tensor:
        """A fp32 buffer shaped like the unit's local values (a DTensor for a DTensor)."""
        state = self.state[unit.key]
        if name not in state:
            state[name] = torch.zeros_like(unit.key, dtype=torch.float32, memory_format=torch.contiguous_format)
        return local_tensor(state[name]).view(-1)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.comm_stats = CommStats()
        # matrix, embedding, output: m = lerp(m, g, 1 - beta) where kept, then
        # p = (1 - lr * wd) * p - lr * s / rms(s, dim), s = m or g: one NormalizedStep per piece.
        steps, units_stepped = [], []
        for group in self.param_groups:
            role = group["role"]
            units = [u for p in group["params"] if (u := self._unit(p, role)) is not None]
            if role == "vector":
                self._adamw(group, units)
                continue
            for unit in units:
                momentum = self._state(unit, "momentum_buffer") if role in self.momentum_roles else None
                steps += [
                    NormalizedStep(
                        layout, unit.piece(unit.param, offset, layout), unit.piece(unit.grad, offset, layout),
                        None if momentum is None else unit.piece(momentum, offset, layout),
                        self.norm_dims[role], group["lr"], group["weight_decay"], group["momentum"],
                    )
                    for offset, layout in unit.pieces
                ]
            units_stepped += units
        normalized_steps_(steps, self.comm_stats)
        for unit in units_stepped:
            self._write_back(unit)
        return loss

    def _adamw(self, group: dict, units: list[_Unit]) -> None:
        if not units:
            return
        beta1, beta2 = group["betas"]
        lr = group["adam_lr"] * group["lr"] / self.peak_lr
        step_sizes = []  # lr * sqrt(1 - beta2^t) / (1 - beta1^t), per unit's own t
        for unit in units:
            state = self.state[unit.key]
            state["step"] = step = state.get("step", 0) + 1
            step_sizes.append(-lr * (1 - beta2**step) ** 0.5 / (1 - beta1**step))
        params, grads = [u.param for u in units], [u.grad for u in units]
        exp_avgs = [self._state(u, "exp_avg") for u in units]
        exp_avg_sqs = [self._state(u, "exp_avg_sq") for u in units]
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_lerp_(exp_avg_sqs, torch._foreach_mul(grads, grads), 1 - beta2)
        if group["weight_decay"]:
            torch._foreach_mul_(params, 1 - lr * group["weight_decay"])
        denominators = torch._foreach_sqrt(exp_avg_sqs)  # eps before the bias correction
        torch._foreach_add_(denominators, group["eps"])
        torch._foreach_addcdiv_(params, exp_avgs, denominators, step_sizes)
        for unit in units:
            self._write_back(unit)

    @staticmethod
    def _write_back(unit: _Unit) -> None:
        if unit.write_back is not None:
            unit.write_back.copy_(unit.param.view(unit.write_back.shape))
