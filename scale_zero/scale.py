"""SCALE: Stochastic Column-normalized Last-layer momEntum (arXiv 2506.16659).

Per parameter role, from the gradient g (PyTorch layout, a Linear weight is (out, in)):

    matrix     u = g / rms(g, dim=1)                      one scale per output unit (row)
    embedding  u = g / rms(g, dim=0)                      one scale per hidden unit (column)
    output     m = lerp(m, g, 1 - beta);  u = m / rms(m, dim=1)
    all three  p *= 1 - lr * wd;  p -= lr * u
    vector     AdamW (eps before bias correction), lr_adam = adam_lr * lr / peak_lr

rms(x, dim) = sqrt(mean(x**2, dim)).clamp_min(1e-8), the mean over the FULL parameter's dim.
Arithmetic is fp32 whatever the parameter dtype. See docs/algorithm.md, "The update".

A rank may hold only part of a parameter (FSDP2, ZeRO): every tensor the step sees is a
list of pieces, each a `ShardLayout` at an offset of the tensor's flat values, and
`shard_layout.PartialSums` turns local partial sums into the full-parameter RMS with one
all_reduce per process group (docs/algorithm.md, "Partial sums"). The step runs in two
phases around that all_reduce: momentum and partial sums, then decay and the update; on
CPU the fused kernel (`scale_zero.native`) runs both phases, and pieces whose RMS is local
take its one-pass step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer

from scale_zero import native
from scale_zero.dtensor import dtensor_layout, local_tensor
from scale_zero.param_groups import normalized_shape, param_shape
from scale_zero.shard_layout import CommStats, PartialSums, ShardLayout

ROLES = ("matrix", "embedding", "output", "vector")
# The dim each role's RMS reduces over: matrix and output rows, embedding columns.
NORM_DIMS = {"matrix": 1, "embedding": 0, "output": 1}


# ---------------------------------------------------------------- the update, on fp32 flats


def momentum_(ms: list[torch.Tensor], gs: list[torch.Tensor], beta: float) -> None:
    """m = lerp(m, g, 1 - beta) for each pair: an EMA of the gradient, no bias correction
    (the output layer). One foreach call, not one op per tensor."""
    if ms:
        torch._foreach_lerp_(ms, gs, 1 - beta)


def normalized_update_(
    layout: ShardLayout, p: torch.Tensor, s: torch.Tensor, rms: torch.Tensor | None, dim: int | None,
    lr: float, weight_decay: float,
) -> None:
    """p *= 1 - lr * wd (decoupled), then p -= lr * s / rms, the RMS over `dim` of the FULL
    parameter broadcast along `dim`, block by block of what this rank holds. `dim` None
    (an ablation, `rms` None) is plain SGD: p -= lr * s."""
    if weight_decay:
        p.mul_(1 - lr * weight_decay)
    if dim is None:
        p.add_(s, alpha=-lr)
        return
    for block in layout.blocks:
        lo, hi = block.span(dim)
        block.view(p).addcdiv_(block.view(s), rms[lo:hi].unsqueeze(dim), value=-lr)


def adamw_lr(adam_lr: float, lr: float, peak_lr: float) -> float:
    """The vectors' rate follows the schedule of `lr`: adam_lr * lr / peak_lr."""
    return adam_lr * lr / peak_lr


def adamw_update_(
    params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor], steps: list[int], lr: float, betas: tuple[float, float],
    eps: float, weight_decay: float,
) -> None:
    """AdamW for vectors, each tensor at its own step t:

        m = lerp(m, g, 1 - b1);  v = lerp(v, g^2, 1 - b2);  p *= 1 - lr * wd
        p -= lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)     eps before bias correction
    """
    beta1, beta2 = betas
    step_sizes = [-lr * (1 - beta2**t) ** 0.5 / (1 - beta1**t) for t in steps]
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_lerp_(exp_avg_sqs, torch._foreach_mul(grads, grads), 1 - beta2)
    if weight_decay:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    denominators = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_add_(denominators, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denominators, step_sizes)


# ---------------------------------------------------------------- what the step works on


@dataclass
class _Unit:
    """One tensor the step updates: a parameter, a DTensor's local piece, or a bound flat
    partition holding pieces of several parameters (`pieces`: offset, layout)."""

    key: torch.Tensor  # the state key
    param: torch.Tensor  # flat fp32 values updated in place
    grad: torch.Tensor  # flat fp32 gradient
    pieces: Sequence[tuple[int, ShardLayout]]
    write_back: torch.Tensor | None = None  # the low-precision parameter `param` was copied from

    def piece(self, flat: torch.Tensor, offset: int, layout: ShardLayout) -> torch.Tensor:
        if offset == 0 and layout.numel == flat.numel():
            return flat  # the whole tensor (no view to make)
        return flat[offset : offset + layout.numel]


@dataclass
class _Piece:
    """What one rank holds of one normalized parameter, as fp32 flats, with its group's
    hyperparameters. `momentum` None: the role keeps none, the direction is the gradient."""

    layout: ShardLayout
    param: torch.Tensor
    grad: torch.Tensor
    momentum: torch.Tensor | None
    dim: int | None
    lr: float
    weight_decay: float
    beta: float

    @property
    def direction(self) -> torch.Tensor:
        return self.grad if self.momentum is None else self.momentum

    def rms_is_local(self) -> bool:
        """The partition cuts neither `dim` nor the blocks along it: whole rows (dim 1) or
        whole columns (dim 0), so the RMS needs no collective."""
        if self.dim is None or self.dim in self.layout.split_groups:
            return False
        full = self.layout.shape[self.dim]
        return all(b.span(1 - self.dim)[1] - b.span(1 - self.dim)[0] == full for b in self.layout.blocks)


def _by_kernel(piece: _Piece) -> bool:
    """Whether the fused CPU kernel steps this piece (both phases, or the one-pass step)."""
    return piece.dim is not None and native.accepts(piece.param, piece.grad, piece.momentum) and native.available()


def _kernel_blocks(
    pieces: Sequence[_Piece], stats: Sequence[torch.Tensor] | None = None
) -> list[native.KernelBlock]:
    """Every block of these pieces; `stats[i]`, piece i's per-row or per-column statistic
    (full length), handed to each block as the entries it spans."""
    return [
        native.KernelBlock(
            piece.param, piece.grad, piece.momentum, block.offset, block.r1 - block.r0, block.c1 - block.c0,
            piece.dim, piece.lr, piece.weight_decay, piece.beta,
            None if stats is None else stats[i][slice(*block.span(piece.dim))],
        )
        for i, piece in enumerate(pieces)
        for block in piece.layout.blocks
    ]


class SCALE(Optimizer):
    """SGD with row/column-RMS-normalized gradients, momentum on the output layer only, and
    AdamW for 1-D parameters. Build the param groups with `scale_param_groups(model)`.

    Ablations: `norm_dims` maps a role to the dim its RMS reduces over (0, 1, or None for
    no normalization); `momentum_roles` names the roles that keep momentum.

    `comm_stats` counts the collectives of one whole optimizer step. An engine may call
    `step` once per (sub-)group of its flat partitions (ZeRO); so a call joins the current
    count, and a new count starts only when a call holds a tensor the current count
    already stepped: the next engine step (or, without an engine, every step)."""

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
        self.comm_stats = CommStats()  # collectives of the last optimizer step
        self._counted: set[int] = set()  # ids of the tensors `comm_stats` has stepped
        self._flats: dict[torch.Tensor, tuple[tuple[int, ShardLayout], ...]] = {}  # see bind_flat
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

    def bind_flat(self, flat: torch.Tensor, pieces: Sequence[tuple[int, ShardLayout]]) -> None:
        """Declare that the 1-D tensor `flat`, when it comes in a param group, holds these
        pieces: `(offset, layout)`, the layout's local values stored from `offset` of `flat`.
        An engine adapter calls it for every flat partition it hands the step (ZeRO); every
        rank must bind the same parameters in the same order, empty pieces included, so all
        ranks issue the same collectives. Binding a flat again replaces its description."""
        if flat.dim() != 1:
            raise ValueError(f"bind_flat takes a 1-D flat tensor, got shape {tuple(flat.shape)}")
        for offset, layout in pieces:
            if not 0 <= offset <= offset + layout.numel <= flat.numel():
                raise ValueError(
                    f"a piece of {layout.numel} elements at offset {offset} does not fit a flat of {flat.numel()}"
                )
        self._flats[flat] = tuple(pieces)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._count_step()

        # Per role, what this rank holds of each parameter with a gradient.
        pieces, vectors, units_stepped = [], [], []
        for group in self.param_groups:
            units = [u for p in group["params"] if (u := self._unit(p, group["role"])) is not None]
            if group["role"] == "vector":
                vectors.append((group, units))
            else:
                pieces += self._pieces(group, units)
            units_stepped += units

        self._normalized_step(pieces)
        # AdamW for vectors.
        for group, units in vectors:
            self._adamw(group, units)

        for unit in units_stepped:
            if unit.write_back is not None:
                unit.write_back.copy_(unit.param.view(unit.write_back.shape))
        return loss

    def _normalized_step(self, pieces: list[_Piece]) -> None:
        """Every normalized piece, in two phases around ONE all_reduce per process group:
        momentum and this rank's partial sums of squares, then decay and the update. On CPU
        the fused kernel runs both phases; a piece whose RMS is local takes its one pass."""
        one_pass, kernel, torch_path = [], [], []
        for piece in pieces:
            by_kernel = _by_kernel(piece)
            (one_pass if by_kernel and piece.rms_is_local() else kernel if by_kernel else torch_path).append(piece)
        native.normalized_step_(_kernel_blocks(one_pass))
        normalized = kernel + [p for p in torch_path if p.dim is not None]  # their slots, in this order
        # No normalized piece (plain SGD only, or nothing): no statistic, no collective.
        sums = PartialSums([(p.layout, p.dim) for p in normalized], normalized[0].param.device) if normalized else None

        # Phase 1: momentum, where the role keeps it, and this rank's partial sums of squares.
        native.partial_sums_(_kernel_blocks(kernel, [sums.slot(i) for i in range(len(kernel))]))
        for beta in {p.beta for p in torch_path if p.momentum is not None}:
            with_momentum = [p for p in torch_path if p.momentum is not None and p.beta == beta]
            momentum_([p.momentum for p in with_momentum], [p.grad for p in with_momentum], beta)
        for i, piece in enumerate(normalized[len(kernel) :], start=len(kernel)):
            sums.add_(i, piece.direction)
        # The full-parameter RMS of every direction: one all_reduce per process group.
        rms = []
        if sums is not None:
            sums.all_reduce(self.comm_stats)
            rms = sums.rms()
        # Phase 2: decay and the normalized update.
        native.apply_rms_(_kernel_blocks(kernel, rms[: len(kernel)]))
        torch_rms = iter(rms[len(kernel) :])
        for piece in torch_path:
            normalized_update_(
                piece.layout, piece.param, piece.direction, None if piece.dim is None else next(torch_rms),
                piece.dim, piece.lr, piece.weight_decay,
            )

    def _count_step(self) -> None:
        """Start a new `comm_stats` count if this call holds a tensor the current one stepped."""
        held = {id(p) for group in self.param_groups for p in group["params"]}
        if held & self._counted:
            self.comm_stats = CommStats()
            self._counted = set()
        self._counted |= held

    def _unit(self, p: torch.Tensor, role: str) -> _Unit | None:
        if p.grad is None:
            return None
        if p in self._flats:
            return _Unit(p, p, p.grad.float(), self._flats[p])
        local, grad = local_tensor(p), local_tensor(p.grad)
        pieces = []
        if role != "vector":
            layout = dtensor_layout(p) if isinstance(p, DTensor) else ShardLayout.whole(normalized_shape(p, role))
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

    def _pieces(self, group: dict, units: list[_Unit]) -> list[_Piece]:
        role = group["role"]
        pieces = []
        for unit in units:
            momentum = self._state(unit, "momentum_buffer") if role in self.momentum_roles else None
            pieces += [
                _Piece(
                    layout, unit.piece(unit.param, offset, layout), unit.piece(unit.grad, offset, layout),
                    None if momentum is None else unit.piece(momentum, offset, layout),
                    self.norm_dims[role], group["lr"], group["weight_decay"], group["momentum"],
                )
                for offset, layout in unit.pieces
            ]
        return pieces

    def _adamw(self, group: dict, units: list[_Unit]) -> None:
        if not units:
            return
        steps = []
        for unit in units:
            state = self.state[unit.key]
            state["step"] = state.get("step", 0) + 1
            steps.append(state["step"])
        adamw_update_(
            [u.param for u in units], [u.grad for u in units],
            [self._state(u, "exp_avg") for u in units], [self._state(u, "exp_avg_sq") for u in units],
            steps, adamw_lr(group["adam_lr"], group["lr"], self.peak_lr), group["betas"], group["eps"],
            group["weight_decay"],
        )
