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
phases around that all_reduce: momentum and partial sums, then decay and the update; a
fused kernel (`scale_zero.kernel`: C++ on CPU, Triton on GPUs) runs both phases, and pieces
whose RMS is local take its one-pass step.
"""

from __future__ import annotations

import functools
import sys
import warnings
import weakref
from dataclasses import dataclass
from types import ModuleType
from typing import Sequence

import torch
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer

from scale_zero.dtensor import dtensor_layout, dtensor_offset, local_tensor
from scale_zero.kernel import KernelBlock, backend_for
from scale_zero.param_groups import module_roles, normalized_shape, param_shape, role_from_name
from scale_zero.rounding import block_index, round_into_, stream_key
from scale_zero.shard_layout import Block, CommStats, PartialSums, ShardLayout, batched_rms

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


# ---------------------------------------------------------------- bf16 storage, chunk by chunk in fp32

# The most elements one fp32 temporary of the bf16 path holds (16 MiB): whole rows, at least one.
CHUNK_NUMEL = 1 << 22
# Which stored tensor a rounding stream is for: the same element of each gets its own bits.
PARAM, FIRST_MOMENT, SECOND_MOMENT = range(3)


def row_chunks(block: Block) -> list[Block]:
    """`block` as runs of whole rows of at most CHUNK_NUMEL elements (at least one row each)."""
    width = block.c1 - block.c0
    rows = max(1, CHUNK_NUMEL // max(1, width))
    return [
        Block(r, min(block.r1, r + rows), block.c0, block.c1, block.offset + (r - block.r0) * width)
        for r in range(block.r0, block.r1, rows)
    ]


@dataclass(frozen=True)
class Rounding:
    """How a bf16 write of step `step` rounds: stochastically from `seed`, or (None) to nearest."""

    seed: int
    step: int

    def key(self, shape: tuple[int, int], stored: int) -> int:
        return stream_key(self.seed, self.step, (*shape, stored))


def _write_(rounding: Rounding | None, stored: int, shape: tuple[int, int], chunk: Block,
            target: torch.Tensor, values: torch.Tensor) -> None:
    """target = values, rounded as `rounding` says; `chunk` places them in the `shape` matrix."""
    if rounding is None or target.dtype != torch.bfloat16:
        target.copy_(values)
        return
    index = block_index((chunk.r0, chunk.r1), (chunk.c0, chunk.c1), shape[1], target.device)
    round_into_(target, values, rounding.key(shape, stored), index)


def chunked_momentum_(layout: ShardLayout, m: torch.Tensor, g: torch.Tensor, beta: float,
                      rounding: Rounding | None) -> None:
    """`momentum_` on low-precision flats: each chunk in fp32, written back as `rounding` says."""
    for block in layout.blocks:
        for chunk in row_chunks(block):
            m32 = chunk.view(m).float()
            momentum_([m32], [chunk.view(g).float()], beta)
            _write_(rounding, FIRST_MOMENT, layout.shape, chunk, chunk.view(m), m32)


def chunked_normalized_update_(
    layout: ShardLayout, p: torch.Tensor, s: torch.Tensor, rms: torch.Tensor | None, dim: int | None,
    lr: float, weight_decay: float, rounding: Rounding | None,
) -> None:
    """`normalized_update_` on low-precision flats: each chunk in fp32, written back as
    `rounding` says."""
    for block in layout.blocks:
        for chunk in row_chunks(block):
            p32 = chunk.view(p).float()
            one_block = ShardLayout(layout.shape, (chunk._replace(offset=0),))
            normalized_update_(one_block, p32.view(-1), chunk.view(s).float().view(-1), rms, dim, lr, weight_decay)
            _write_(rounding, PARAM, layout.shape, chunk, chunk.view(p), p32)


def chunked_adamw_update_(
    ranges: Sequence[tuple[int, ShardLayout]], p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor,
    step: int, lr: float, betas: tuple[float, float], eps: float, weight_decay: float, rounding: Rounding | None,
) -> None:
    """`adamw_update_` of one low-precision flat holding `ranges` (offset, (1, n) layout) of
    vectors: each chunk in fp32, parameter and moments written back as `rounding` says."""
    for offset, layout in ranges:
        for block in layout.blocks:
            for chunk in row_chunks(block):
                chunk = chunk._replace(offset=offset + chunk.offset)
                tensors = [chunk.view(t) for t in (p, g, m, v)]
                p32, g32, m32, v32 = (t.float() for t in tensors)
                adamw_update_([p32], [g32], [m32], [v32], [step], lr, betas, eps, weight_decay)
                for stored, target, values in ((PARAM, tensors[0], p32), (FIRST_MOMENT, tensors[2], m32),
                                               (SECOND_MOMENT, tensors[3], v32)):
                    _write_(rounding, stored, layout.shape, chunk, target, values)


@functools.cache
def _whole(shape: tuple[int, int]) -> tuple[tuple[int, ShardLayout], ...]:
    """A whole parameter's one piece, the same object at every step (the kernel plans are keyed by it)."""
    return ((0, ShardLayout.whole(shape)),)


def stored_in_fp32(*tensors: torch.Tensor | None) -> bool:
    return all(t is None or t.dtype == torch.float32 for t in tensors)


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


@dataclass
class _Normalized:
    """A unit of a normalized role with what its step takes: `momentum`, its state (None:
    the role keeps none), its group's hyperparameters, and `backend`, the kernel that steps
    it (None: the torch path, or bf16 storage's fp32 chunks). Decided per unit: its pieces
    share its flats."""

    unit: _Unit
    momentum: torch.Tensor | None
    dim: int | None
    lr: float
    weight_decay: float
    beta: float
    backend: ModuleType | None
    rounding: Rounding | None  # how bf16 writes round (low-precision units only)

    @property
    def in_fp32(self) -> bool:
        return stored_in_fp32(self.unit.param, self.unit.grad, self.momentum)

    def pieces(self) -> list[_Piece]:
        u = self.unit
        return [_Piece(layout, offset, u.param, u.grad, self.momentum, self.dim, self.lr, self.weight_decay, self.beta,
                       self.rounding) for offset, layout in u.pieces]


@dataclass
class _Piece:
    """What one rank holds of one normalized parameter: `layout`'s values, stored from
    `offset` of its unit's flats `flat_param`, `flat_grad` and `flat_momentum` (None: the
    role keeps no momentum, the direction is the gradient), with its group's
    hyperparameters. A kernel reads the flats at the offset; the torch path takes views."""

    layout: ShardLayout
    offset: int
    flat_param: torch.Tensor
    flat_grad: torch.Tensor
    flat_momentum: torch.Tensor | None
    dim: int | None
    lr: float
    weight_decay: float
    beta: float
    rounding: Rounding | None = None  # how bf16 writes round (low-precision pieces only)

    def _view(self, flat: torch.Tensor) -> torch.Tensor:
        if self.offset == 0 and self.layout.numel == flat.numel():
            return flat  # the whole tensor (no view to make)
        return flat[self.offset : self.offset + self.layout.numel]

    @property
    def param(self) -> torch.Tensor:
        return self._view(self.flat_param)

    @property
    def grad(self) -> torch.Tensor:
        return self._view(self.flat_grad)

    @property
    def momentum(self) -> torch.Tensor | None:
        return None if self.flat_momentum is None else self._view(self.flat_momentum)

    @property
    def direction(self) -> torch.Tensor:
        return self.grad if self.flat_momentum is None else self.momentum

    def needs_slot(self) -> bool:
        """Whether the piece takes part in the batched buffer: always where the partition
        may cut its rows (or columns), so every rank has the same slots; else only for a
        block holding part of a row (its entries are sums over the full row length)."""
        return self.dim in self.layout.split_groups or not all(self.layout.holds_entries[self.dim])


def _kernel_blocks(
    pieces: Sequence[_Piece], owners: Sequence[int], entries_here: bool, sums: Sequence[torch.Tensor] | None = None
) -> tuple[list[KernelBlock], list[int]]:
    """The blocks of these pieces whose RMS entries are complete here (`entries_here`,
    `ShardLayout.holds_entries`), or the others, and for each its piece's owner (the unit
    whose gradient and lr it takes). For the two phases, `sums[i]` is piece i's slot of the
    batched buffer (full length), handed to each block as the entries it spans, and a dim-0
    block gets its row flags (`KernelBlock.row_nonzero`)."""
    block_owners, blocks = [], []
    for i, (piece, owner) in enumerate(zip(pieces, owners, strict=True)):
        for block, complete in zip(piece.layout.blocks, piece.layout.holds_entries[piece.dim]):
            if complete != entries_here:
                continue
            block_owners.append(owner)
            rows, device = block.r1 - block.r0, piece.flat_param.device
            blocks.append(KernelBlock(
                piece.flat_param, piece.flat_grad, piece.flat_momentum, piece.offset + block.offset,
                rows, block.c1 - block.c0, piece.dim, piece.weight_decay, piece.beta,
                piece.layout.shape[piece.dim], None if sums is None else sums[i][slice(*block.span(piece.dim))],
                torch.empty(rows, dtype=torch.uint8, device=device) if sums is not None and piece.dim == 0 else None,
            ))
    return blocks, block_owners


def _batches(phase: str, backends: Sequence[ModuleType], blocks: list[KernelBlock], owners: list[int]) -> list:
    """`phase` of these blocks as one Batch per kernel backend of their owners (`backends[owner]`):
    usually one."""
    per_backend: dict[ModuleType, tuple[list[KernelBlock], list[int]]] = {}
    for block, owner in zip(blocks, owners, strict=True):
        backend_blocks, backend_owners = per_backend.setdefault(backends[owner], ([], []))
        backend_blocks.append(block)
        backend_owners.append(owner)
    return [backend.Batch(phase, *blocks_and_owners) for backend, blocks_and_owners in per_backend.items()]


@dataclass
class _KernelPlan:
    """The kernels' part of one call's step, its three phases (each a list of batches, one
    per backend, whose owners are the call's kernel units) and the batched buffer (the cut
    kernel pieces' `cut_slots` slots first, then the torch path's), kept while the call steps
    the same units (`SCALE._kernel_plan`): a step hands the batches only its gradients and
    lrs. `described` holds what the plan's key names by id; `row_flags`, the two phases' row
    flags of dim-0 blocks, whose addresses the batches hold."""

    described: tuple
    sums: PartialSums | None
    cut_slots: int
    step: list
    partial_sums: list
    apply: list
    row_flags: tuple[torch.Tensor, ...]


def _plan_key(kernel: Sequence[_Normalized], torch_normalized: Sequence[_Piece]) -> tuple:
    """What a `_KernelPlan` is built from, besides the gradients and lrs: each kernel unit's
    pieces (their offsets and layouts), settings, backend and storage, and the layout of each
    torch-path piece with a slot. Per unit, not per piece: a ZeRO flat holds dozens."""
    def storage(t: torch.Tensor | None):
        return None if t is None else (t.data_ptr(), t.numel())

    return (
        tuple((id(u.unit.pieces), u.dim, u.weight_decay, u.beta, u.backend, storage(u.unit.param),
               storage(u.momentum)) for u in kernel),
        tuple((id(p.layout), p.dim, p.flat_param.device) for p in torch_normalized),
    )


def _check_lr(lr: float | torch.Tensor) -> None:
    """torch.optim's checks (and messages) for `lr`, a float or a 1-element tensor."""
    if isinstance(lr, torch.Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    if not lr > 0:
        raise ValueError(f"Invalid learning rate: {lr} (SCALE needs lr > 0: the 1-D rate is adam_lr * lr / peak_lr)")


def _as_float(value: float | torch.Tensor) -> float:
    """A group's lr as the number the update takes (a tensor lr is read at each step)."""
    return value.item() if isinstance(value, torch.Tensor) else float(value)


class SCALE(Optimizer):
    """SGD with row/column-RMS-normalized gradients, momentum on the output layer only, and
    AdamW for 1-D parameters. Build the param groups with `scale_param_groups(model)`.

    A torch.optim optimizer like any other: ONE param group per group given, plain
    parameter lists and `named_parameters()` accepted, `lr` a float or a 1-element tensor,
    and everything a step depends on in `defaults`, the param groups or `state`, so
    `state_dict`, `copy.deepcopy` and pickling carry it. A group's `role` applies to all its
    parameters; in a group without one each parameter's role is inferred (`role_of`):
    from `model=` by module type, else from its name (`named_parameters()`), else by
    dimension (>=2-D matrix, 1-D vector; warned once, naming `scale_param_groups(model)`).

    Each group records `peak_lr`, its `lr` when added (like LRScheduler's `initial_lr`);
    its vectors' AdamW rate is `adam_lr * lr / peak_lr`, or `lr` itself when `adam_lr` is
    None (the default): a group behaves like a SCALE of its own with that lr and adam_lr.

    Ablations (per group, like every setting): `norm_dims` maps a role to the dim its RMS
    reduces over (0, 1, or None for no normalization; roles not named keep theirs);
    `momentum_roles` names the roles that keep momentum.

    `comm_stats` counts the collectives of one whole optimizer step. An engine may call
    `step` once per (sub-)group of its flat partitions (ZeRO); so a call joins the current
    count, and a new count starts only when a call holds a tensor the current count
    already stepped: the next engine step (or, without an engine, every step).

    bf16 storage (master-free: ZeRO's bf16 flats, FSDP2's bf16 shards, a bf16 model) is
    stepped chunk by chunk in fp32 and written back with stochastic rounding, seeded by
    `rounding_seed`, the tensor's step count and each element's place in its parameter
    (`scale_zero.rounding`); `stochastic_rounding=False` rounds to nearest instead.
    `state_dtype` is the dtype of the momentum and AdamW moments; None: that of a bound
    flat (DeepSpeed hands SCALE bf16 flats only with "bf16_optimizer_states"), else fp32."""

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-3,
        momentum: float = 0.9,
        adam_lr: float | None = None,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        norm_dims: dict[str, int | None] | None = None,
        momentum_roles: tuple[str, ...] = ("output",),
        stochastic_rounding: bool = True,
        rounding_seed: int = 0,
        state_dtype: torch.dtype | None = None,
        *,
        model: torch.nn.Module | None = None,
    ):
        _check_lr(lr)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.stochastic_rounding, self.rounding_seed, self.state_dtype = stochastic_rounding, rounding_seed, state_dtype
        defaults = dict(
            lr=lr, momentum=momentum, adam_lr=adam_lr, weight_decay=weight_decay, betas=betas, eps=eps,
            norm_dims={**NORM_DIMS, **(norm_dims or {})}, momentum_roles=tuple(momentum_roles),
        )
        self.comm_stats = CommStats()  # collectives of the last optimizer step
        self._counted: set[int] = set()  # ids of the tensors `comm_stats` has stepped
        self._flats: dict[torch.Tensor, tuple[tuple[int, ShardLayout], ...]] = {}  # see bind_flat
        self._kernel_plans: dict[tuple, _KernelPlan] = {}  # see _kernel_plan; not copied or pickled
        self._dtensor_layouts: dict[int, tuple] = {}  # see _dtensor_pieces; not copied or pickled
        self._roles: dict[torch.Tensor, str] = {}  # see role_of
        self._model_roles = module_roles(model) if model is not None else {}
        self._by_shape: list[str] = []  # >=2-D parameters whose role only their shape decided
        self._warned_roles_by_shape = False
        self._constructed = False
        super().__init__(params, defaults)
        self._constructed = True
        self._model_roles = {}  # `model=` resolves the groups given here; later groups come with roles or names
        self._warn_roles_by_shape()

    @property
    def norm_dims(self) -> dict[str, int | None]:
        """The constructor's `norm_dims` (each group holds its own, these by default)."""
        return self.defaults["norm_dims"]

    @property
    def momentum_roles(self) -> tuple[str, ...]:
        """The constructor's `momentum_roles` (each group holds its own, these by default)."""
        return self.defaults["momentum_roles"]

    # Attributes of SCALE's own that copies and pickles need (torch.optim keeps only
    # defaults, state and param_groups). `_counted` holds ids: a copy starts a new count.
    _OWN_STATE = (
        "comm_stats", "_flats", "_roles", "_by_shape", "_warned_roles_by_shape",
        "_constructed", "stochastic_rounding", "rounding_seed", "state_dtype",
    )

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), **{name: self.__dict__[name] for name in self._OWN_STATE}}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_counted", set())
        self.__dict__.setdefault("_kernel_plans", {})
        self.__dict__.setdefault("_dtensor_layouts", {})
        self.__dict__.setdefault("_model_roles", {})

    def add_param_group(self, param_group: dict) -> None:
        if "role" in param_group and param_group["role"] not in ROLES:
            raise ValueError(f"unknown role {param_group['role']!r}; expected one of {ROLES}")
        if "lr" in param_group:
            _check_lr(param_group["lr"])
        super().add_param_group(param_group)  # also splits named_parameters() into params and param_names
        group = self.param_groups[-1]
        group.setdefault("peak_lr", _as_float(group["lr"]))
        # The ablations, per group like every setting: a group may name only the roles it changes.
        group["norm_dims"] = {**NORM_DIMS, **group["norm_dims"]}
        group["momentum_roles"] = tuple(group["momentum_roles"])
        for role in [*group["norm_dims"], *group["momentum_roles"]]:
            if role not in ROLES[:3]:
                raise ValueError(f"unknown role {role!r}: ablations apply to {ROLES[:3]}")
        names = group.get("param_names", [None] * len(group["params"]))
        for p, name in zip(group["params"], names, strict=True):
            role = group.get("role") or self._model_roles.get(p) or role_from_name(name)
            if role is None:
                role = "matrix" if len(param_shape(p)) >= 2 else "vector"
                if role == "matrix":
                    self._by_shape.append(name or f"a {tuple(param_shape(p))} tensor")
            self._roles[p] = role
        if self._constructed:
            self._warn_roles_by_shape()

    def _warn_roles_by_shape(self) -> None:
        """ONE warning if >=2-D parameters are matrices by shape alone and nothing (a group's
        role, `model=`, a name) told SCALE where the input embedding or output layer is."""
        told = any(role in ("embedding", "output") for role in self._roles.values())
        if self._by_shape and not told and not self._warned_roles_by_shape:
            self._warned_roles_by_shape = True
            warnings.warn(
                f"SCALE: {len(self._by_shape)} >=2-D parameter(s) without a role (e.g. {self._by_shape[0]}) are "
                "treated as matrices (row RMS), an input embedding or output layer among them included. "
                "Pass scale_param_groups(model), model=model, or model.named_parameters().",
                stacklevel=3,
            )

    def role_of(self, param: torch.Tensor) -> str:
        """The role (one of ROLES) SCALE updates `param` with: its group's `role`, else the
        one inferred when the group was added."""
        if param not in self._roles:
            raise KeyError("this tensor is in none of SCALE's param groups")
        return self._roles[param]

    def load_state_dict(self, state_dict: dict) -> None:
        """torch.optim's load, except that state tensors keep their saved dtype: torch casts
        them to the parameter's (bf16 / fp16 / fp64), SCALE's state is fp32 whatever the
        parameter. Settings a saved group lacks (`peak_lr`, the ablations: a checkpoint of an
        older SCALE) keep their current values."""
        current = [{k: v for k, v in group.items() if k != "params"} for group in self.param_groups]
        saved = {}

        def set_state_aside(_optimizer, state_dict):  # after the user's pre-hooks
            saved.update(state=state_dict["state"], groups=state_dict["param_groups"])
            return {**state_dict, "state": {}}

        def restore_state(_optimizer):  # before the user's post-hooks
            ids = [i for group in saved["groups"] for i in group["params"]]
            params = [p for group in self.param_groups for p in group["params"]]
            by_id = dict(zip(ids, params, strict=True))
            for key, value in saved["state"].items():
                if key not in by_id:
                    self.state[key] = value  # as torch.optim does (backward compatibility)
                    continue
                param = by_id[key]
                self.state[param] = {
                    k: v.to(device=param.device) if torch.is_tensor(v) else v for k, v in value.items()
                }
            for group, settings in zip(self.param_groups, current, strict=True):
                for key, value in settings.items():
                    group.setdefault(key, value)

        pre = self.register_load_state_dict_pre_hook(set_state_aside)
        post = self.register_load_state_dict_post_hook(restore_state, prepend=True)
        try:
            super().load_state_dict(state_dict)
        finally:
            pre.remove()
            post.remove()

    def bind_flat(self, flat: torch.Tensor, pieces: Sequence[tuple[int, ShardLayout]], role: str) -> None:
        """Declare that the 1-D tensor `flat`, when it comes in a param group, holds these
        pieces of parameters of `role`: `(offset, layout)`, the layout's local values stored
        from `offset` of `flat`. An engine adapter calls it for every flat partition it hands
        the step (ZeRO); every rank must bind the same parameters in the same order, empty
        pieces included, so all ranks issue the same collectives. Binding a flat again
        replaces its description."""
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; expected one of {ROLES}")
        if flat.dim() != 1:
            raise ValueError(f"bind_flat takes a 1-D flat tensor, got shape {tuple(flat.shape)}")
        for offset, layout in pieces:
            if not 0 <= offset <= offset + layout.numel <= flat.numel():
                raise ValueError(
                    f"a piece of {layout.numel} elements at offset {offset} does not fit a flat of {flat.numel()}"
                )
        self._flats[flat] = tuple(pieces)
        self._roles[flat] = role

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._describe_engine_flats()
        self._count_step()

        # Per role, what this rank holds of each parameter with a gradient.
        normalized, vectors, units_stepped = [], [], []
        for group in self.param_groups:
            for role, params in self._params_by_role(group).items():
                units = [u for p in params if (u := self._unit(p, role)) is not None]
                for unit in units:  # AdamW's t and the rounding's step; DCP expects state for every tensor
                    self.state[unit.key]["step"] = self.state[unit.key].get("step", 0) + 1
                if role == "vector":
                    vectors.append((group, units))
                else:
                    normalized += [self._normalized(group, role, unit) for unit in units]
                units_stepped += units

        # bf16 storage in fp32 chunks; a kernel's units; the torch path's pieces.
        low_precision = [n for n in normalized if not n.in_fp32]
        self._step_low_precision([piece for n in low_precision for piece in n.pieces()])
        kernel = [n for n in normalized if n.backend is not None]
        torch_path = [piece for n in normalized if n.backend is None and n.in_fp32 for piece in n.pieces()]
        self._normalized_step(kernel, torch_path)
        # AdamW for vectors.
        for group, units in vectors:
            self._adamw(group, units)

        for unit in units_stepped:
            if unit.write_back is not None:
                unit.write_back.copy_(unit.param.view(unit.write_back.shape))
        return loss

    def _describe_engine_flats(self) -> None:
        """A plain tensor SCALE was neither built with nor bound to is an engine's flat
        partition: DeepSpeed ZeRO's, the only engine that hands the step flats, describes
        them (`scale_zero.deepspeed_zero.bind_at_first_step`) the first time one comes.
        DTensors describe themselves (FSDP2 may swap them in for the parameters)."""
        unknown = [
            p for group in self.param_groups for p in group["params"]
            if not isinstance(p, DTensor) and p not in self._flats and p not in self._roles
        ]
        if not unknown or "deepspeed" not in sys.modules:
            return
        from scale_zero.deepspeed_zero import bind_at_first_step

        bind_at_first_step(self)

    def _normalized_step(self, kernel: list[_Normalized], torch_path: list[_Piece]) -> None:
        """Every normalized fp32 unit, in two phases around ONE all_reduce per process group:
        momentum and this rank's partial sums of squares, then decay and the update. A fused
        kernel steps each block of its units holding whole rows (or columns) in its one
        pass, and runs the two phases for the blocks the partition cuts; the torch path
        steps `torch_path`'s pieces."""
        # No normalized piece (plain SGD, or nothing): no statistic, no collective.
        torch_normalized = [piece for piece in torch_path if piece.dim is not None]
        plan = self._kernel_plan(kernel, torch_normalized)
        grads, lrs = [u.unit.grad for u in kernel], [u.lr for u in kernel]
        for batch in plan.step:
            batch.run(grads, lrs)
        sums = plan.sums

        # Phase 1: momentum, where the role keeps it, and this rank's partial sums of squares.
        for batch in plan.partial_sums:
            batch.run(grads, lrs)
        for beta in {p.beta for p in torch_path if p.flat_momentum is not None}:
            with_momentum = [p for p in torch_path if p.flat_momentum is not None and p.beta == beta]
            momentum_([p.momentum for p in with_momentum], [p.grad for p in with_momentum], beta)
        for i, piece in enumerate(torch_normalized, start=plan.cut_slots):
            sums.add_(i, piece.direction)
        # The full-parameter sums of every direction: one all_reduce per process group.
        if sums is not None:
            sums.all_reduce(self.comm_stats)
        # Phase 2: decay and the normalized update (the kernel takes the RMS from the sums).
        for batch in plan.apply:
            batch.run(grads, lrs)
        torch_rms = iter(sums.rms()[plan.cut_slots :] if torch_normalized else [])
        for piece in torch_path:
            normalized_update_(
                piece.layout, piece.param, piece.direction, None if piece.dim is None else next(torch_rms),
                piece.dim, piece.lr, piece.weight_decay,
            )

    # How many calls' plans are kept: DeepSpeed calls the step once per (sub-)group.
    _PLANS_KEPT = 16

    def _kernel_plan(self, kernel: list[_Normalized], torch_normalized: list[_Piece]) -> _KernelPlan:
        """The plan for these kernel units (and the slots of these torch-path pieces), from
        the last steps' if one was built from the same pieces, storage and settings; its
        batched buffer zeroed for this step. The units' pieces are built only here."""
        key = _plan_key(kernel, torch_normalized)
        plan = self._kernel_plans.pop(key, None)
        if plan is None:
            pieces, owners = [], []
            for owner, unit in enumerate(kernel):
                unit_pieces = unit.pieces()
                pieces += unit_pieces
                owners += [owner] * len(unit_pieces)
            cut = [(piece, owner) for piece, owner in zip(pieces, owners) if piece.needs_slot()]
            # Slots for the kernel's pieces that need them, then the torch path's.
            normalized = [piece for piece, _ in cut] + torch_normalized
            sums = None
            if normalized:
                sums = PartialSums([(p.layout, p.dim) for p in normalized], normalized[0].flat_param.device)
            cut_blocks = _kernel_blocks([piece for piece, _ in cut], [owner for _, owner in cut], entries_here=False,
                                        sums=[sums.slot(i) for i in range(len(cut))])
            backends = [unit.backend for unit in kernel]
            plan = _KernelPlan(
                (tuple(unit.unit.pieces for unit in kernel), tuple(p.layout for p in torch_normalized)),
                sums, len(cut),
                _batches("step", backends, *_kernel_blocks(pieces, owners, entries_here=True)),
                _batches("sums", backends, *cut_blocks),  # the two phases of the same blocks
                _batches("apply", backends, *cut_blocks),
                tuple(b.row_nonzero for b in cut_blocks[0] if b.row_nonzero is not None),
            )
        elif plan.sums is not None:
            plan.sums.zero_()
        self._kernel_plans[key] = plan  # the most recent last
        while len(self._kernel_plans) > self._PLANS_KEPT:
            self._kernel_plans.pop(next(iter(self._kernel_plans)))
        return plan

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
        if p in self._flats:  # a bf16 flat (master-free ZeRO) keeps its bf16 gradient
            return _Unit(p, p, p.grad if p.dtype == torch.bfloat16 else p.grad.float(), self._flats[p])
        local, grad = local_tensor(p), local_tensor(p.grad)
        pieces = ()
        if role != "vector":
            pieces = self._dtensor_pieces(p) if isinstance(p, DTensor) else _whole(normalized_shape(p, role))
        if local.dtype == torch.bfloat16:  # stepped as bf16 storage, in place when contiguous
            if role == "vector" and isinstance(p, DTensor):  # where its elements are, for the rounding
                start = dtensor_offset(p)
                pieces = [(0, ShardLayout.flat_range((1, p.numel()), start, start + local.numel()))]
            exact = local.is_contiguous()
            param = local.view(-1) if exact else local.detach().clone(memory_format=torch.contiguous_format).view(-1)
            return _Unit(p, param, grad.reshape(-1), pieces, None if exact else local)
        exact = local.dtype == torch.float32 and local.is_contiguous()
        param = local.view(-1) if exact else local.detach().float().reshape(-1)
        return _Unit(p, param, grad.float().reshape(-1), pieces, None if exact else local)

    def _dtensor_pieces(self, p: DTensor) -> tuple[tuple[int, ShardLayout], ...]:
        """`((0, dtensor_layout(p)),)`, the same object at every step while `p`'s mesh and
        placements stay: the kernel plans are keyed by it."""
        kept = self._dtensor_layouts.get(id(p))  # by id: a tensor's == is elementwise
        if kept is None or kept[0]() is not p or kept[1] is not p.device_mesh or kept[2] != p.placements:
            kept = (weakref.ref(p), p.device_mesh, p.placements, ((0, dtensor_layout(p)),))
            self._dtensor_layouts[id(p)] = kept
        return kept[3]

    def _state(self, unit: _Unit, name: str) -> torch.Tensor:
        """A buffer shaped like the unit's local values (a DTensor for a DTensor), in
        `state_dtype`: by default a bound flat's dtype, else fp32."""
        state = self.state[unit.key]
        if name not in state:
            dtype = self.state_dtype or (unit.param.dtype if unit.key in self._flats else torch.float32)
            state[name] = torch.zeros_like(unit.key, dtype=dtype, memory_format=torch.contiguous_format)
        return local_tensor(state[name]).view(-1)

    def _rounding(self, step: int) -> Rounding | None:
        return Rounding(self.rounding_seed, step) if self.stochastic_rounding else None

    def _step_low_precision(self, low: list[_Piece]) -> None:
        """Step pieces with bf16 storage (parameter, gradient or momentum) in fp32 chunks,
        with their own batched RMS (one all_reduce per process group)."""
        for piece in low:
            if piece.momentum is not None:
                chunked_momentum_(piece.layout, piece.momentum, piece.grad, piece.beta, piece.rounding)
        rms = iter(batched_rms(
            [(piece.layout, piece.direction, piece.dim) for piece in low if piece.dim is not None], self.comm_stats
        ))
        for piece in low:
            chunked_normalized_update_(
                piece.layout, piece.param, piece.direction, None if piece.dim is None else next(rms), piece.dim,
                piece.lr, piece.weight_decay, piece.rounding,
            )

    def _params_by_role(self, group: dict) -> dict[str, list[torch.Tensor]]:
        """The group's tensors by role, in order: the group's `role`, else each one's own."""
        by_role: dict[str, list[torch.Tensor]] = {}
        for p in group["params"]:
            role = group.get("role") or self._roles.get(p)
            if role is None:
                raise RuntimeError(
                    "SCALE got a tensor in a param group without a role that was not in it when the group "
                    "was added (an engine's flat partition?): give the group a role, e.g. with "
                    "scale_param_groups(model)"
                )
            by_role.setdefault(role, []).append(p)
        return by_role

    def _normalized(self, group: dict, role: str, unit: _Unit) -> _Normalized:
        momentum = self._state(unit, "momentum_buffer") if role in group["momentum_roles"] else None
        dim = group["norm_dims"][role]
        backend = None if dim is None else backend_for(unit.param, unit.grad, momentum)
        bf16_writes = self.stochastic_rounding and not stored_in_fp32(unit.param, momentum)
        rounding = self._rounding(self.state[unit.key]["step"]) if bf16_writes else None
        return _Normalized(unit, momentum, dim, _as_float(group["lr"]), group["weight_decay"], group["momentum"],
                           backend, rounding)

    def _adamw(self, group: dict, units: list[_Unit]) -> None:
        lr = self._adamw_rate(group)
        moments = [(self._state(u, "exp_avg"), self._state(u, "exp_avg_sq")) for u in units]
        fp32 = [stored_in_fp32(u.param, u.grad, *m) for u, m in zip(units, moments)]
        for unit, (m, v), in_fp32 in zip(units, moments, fp32):
            if not in_fp32:  # bf16 storage: chunk by chunk in fp32
                step = self.state[unit.key]["step"]
                ranges = unit.pieces or [(0, ShardLayout.whole((1, unit.param.numel())))]
                chunked_adamw_update_(ranges, unit.param, unit.grad, m, v, step, lr, group["betas"], group["eps"],
                                      group["weight_decay"], self._rounding(step))
        units = [u for u, in_fp32 in zip(units, fp32) if in_fp32]
        moments = [m for m, in_fp32 in zip(moments, fp32) if in_fp32]
        if not units:
            return
        adamw_update_(
            [u.param for u in units], [u.grad for u in units], [m for m, _ in moments], [v for _, v in moments],
            [self.state[u.key]["step"] for u in units], lr, group["betas"], group["eps"], group["weight_decay"],
        )

    @staticmethod
    def _adamw_rate(group: dict) -> float:
        """The group's 1-D rate: adam_lr * lr / peak_lr, adam_lr None meaning the group's own peak lr."""
        peak_lr = group["peak_lr"]
        adam_lr = peak_lr if group["adam_lr"] is None else group["adam_lr"]
        return adamw_lr(adam_lr, _as_float(group["lr"]), peak_lr)
