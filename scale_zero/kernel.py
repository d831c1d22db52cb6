"""SCALE's fused normalized step, described once for every backend that runs it.

`scale_zero.scale` hands a backend the blocks of its pieces (`KernelBlock`), one `Batch` per
phase, built once per plan (`SCALE._kernel_plan`) and run at every step:

- "step": blocks whose RMS is complete on this rank, the whole step;
- "sums" then "apply": the two phases of the blocks the partition cuts, around the
  all_reduce of the batched buffer (`shard_layout.PartialSums`).

Two backends compute the same thing (docs/benchmarks.md, "How SCALE's step is made fast"):
`scale_zero.native`, the C++ kernel, on CPU tensors, and `scale_zero.triton_step`, a Triton
kernel, on CUDA tensors. Each module has `available()`, `accepts(*tensors)` and
`Batch(phase, blocks, owners)` with `.run(grads, lrs)`; `backend_for` picks one, and
tensors that neither takes go the torch path.
"""

from __future__ import annotations

from types import ModuleType
from typing import Callable, NamedTuple, Sequence

import torch


class KernelBlock(NamedTuple):
    """One `(rows, cols)` block, stored row-major from `offset` of contiguous fp32 flats on
    one device (for the "step" phase, one whose RMS over `dim` is complete on this rank):
    `momentum` None for a role without momentum; `weight_decay` and `beta` the param group's
    values as they are (its lr, which a schedule moves, each run hands the batch with the
    gradients); `count` the full parameter's size along `dim` (what each mean is over). For the two phases, `sumsq` is the block's entries of the per-row (dim 1) or
    per-column (dim 0) fp64 sums of squares: phase one adds to them, phase two takes the RMS
    from them once reduced; for dim 0, `row_nonzero` (uint8, one per row) is where phase one
    notes which rows of the direction hold a nonzero, so phase two leaves the zero rows (an
    embedding's rows of tokens the batch lacks) unread when there is no decay (the C++ kernel;
    the Triton kernel skips zero elements as it updates)."""

    param: torch.Tensor
    grad: torch.Tensor
    momentum: torch.Tensor | None
    offset: int
    rows: int
    cols: int
    dim: int
    weight_decay: float
    beta: float
    count: int
    sumsq: torch.Tensor | None = None
    row_nonzero: torch.Tensor | None = None

    def check(self, phase: str) -> None:
        """Refuse a block the kernels cannot trust: they read and write raw addresses, so the
        block must lie inside its tensors and, for the two phases, `sumsq` must be its entries."""
        end = self.offset + self.rows * self.cols
        if any(t is not None and end > t.numel() for t in (self.param, self.grad, self.momentum)):
            raise ValueError(f"a {self.rows}x{self.cols} block at {self.offset} is outside its flat tensors")
        if phase == "step":
            return
        entries = self.rows if self.dim == 1 else self.cols
        s = self.sumsq
        if (s is None or s.dtype != torch.float64 or not s.is_contiguous() or s.numel() != entries
                or s.device != self.param.device):
            raise ValueError(f"phase {phase!r} needs {entries} contiguous fp64 sums of squares on {self.param.device}")
        flags = self.row_nonzero
        if self.dim == 0 and (flags is None or flags.dtype != torch.uint8 or not flags.is_contiguous()
                              or flags.numel() != self.rows or flags.device != self.param.device):
            raise ValueError(f"phase {phase!r} of a dim-0 block needs {self.rows} contiguous uint8 row flags "
                             f"on {self.param.device}")


def gradient_lengths(blocks: Sequence[KernelBlock], owners: Sequence[int]) -> dict[int, int]:
    """Per owner, how many elements of its gradient the blocks read."""
    lengths: dict[int, int] = {}
    for owner, b in zip(owners, blocks, strict=True):
        lengths[owner] = max(lengths.get(owner, 0), b.offset + b.rows * b.cols)
    return lengths


def check_gradients(grads: Sequence[torch.Tensor], lengths: dict[int, int],
                    accepts: Callable[..., bool], takes: str) -> None:
    """Refuse a run's gradient that the backend does not take (`takes` says what it takes)
    or that is shorter than its blocks (`gradient_lengths`): the kernel trusts the address."""
    for owner, length in lengths.items():
        g = grads[owner]
        if not accepts(g) or g.numel() < length:
            raise ValueError(f"the kernel needs a {takes} gradient of at least {length} elements, "
                             f"got a {g.dtype} {g.device.type} tensor of {g.numel()}")


def backend_for(*tensors: torch.Tensor | None) -> ModuleType | None:
    """The module whose kernel steps blocks of these tensors, None for the torch path: the
    C++ kernel for contiguous fp32 CPU tensors, Triton for contiguous fp32 CUDA tensors, and
    for CPU tensors under Triton's interpreter (TRITON_INTERPRET=1) when the C++ kernel is
    off (SCALE_ZERO_NATIVE=0): how the Triton path is tested without a GPU."""
    from scale_zero import native, triton_step  # here: both import KernelBlock from this module

    for backend in (native, triton_step):
        if backend.accepts(*tensors) and backend.available():
            return backend
    return None
