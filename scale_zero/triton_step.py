"""The fused GPU kernel for SCALE's normalized step: a backend of `scale_zero.kernel`, in
Triton (`triton_kernels.py`), with the arithmetic of the C++ kernel (normalized_step.cpp)
and ONE launch per phase over every block of a batch, whatever the number of parameters.

How a launch finds its blocks. When a `Batch` is built (once per plan), two device tables:
per block (a job) its parameter, momentum and sums-of-squares addresses, gradient offset,
owner, cols, dim, count, weight decay and beta; and the tasks, `(job, first row, last
row)` of whole rows, about `TASK_ELEMENTS` elements each, one program per task. At each run only a
small table is written: each owner's gradient address (ZeRO-3 hands a new gradient tensor
every step) and lr, copied from pinned host memory without waiting (torch's pinned-memory
allocator keeps that host buffer until the copy has run), so the host never waits for the
device: no `.item()`, no synchronization in a step.

What a phase launches:

- "step": blocks with whole rows (dim 1, matrix and output) take one pass per row: the
  momentum `lerp`, the row's sum of squares, then the update re-reading the row. Blocks
  with whole columns (dim 0, the embedding) need every row before any update: the same
  launch adds their column sums into a scratch buffer the batch owns (zeroed per run), and
  a second launch applies them. One launch; with dim-0 blocks, a fill of the scratch buffer
  and two;
- "sums": momentum and partial sums added into the blocks' slots of the batched buffer:
  a plain add per row (one program owns a row), `atomic_add` per column (several programs
  add into one column);
- "apply": the RMS from the reduced sums, decay and the update.

The arithmetic is the C++ kernel's and the torch path's: torch.lerp's formula for the
momentum; sums of squares in fp64 from the exact fp64 products of fp32 values (rows of 1e25
and of subnormals are safe); `rms = max(float32(sqrt(sum / count)), 1e-8)`;
`p = (1 - lr*wd) * p - lr * (s / rms)`, an IEEE division per element as the torch path's
addcdiv rounds it; a zero direction element with no decay leaves its parameter unread
and unwritten (the rows of tokens a batch lacks cost one read of their gradient).

Deterministic: every row statistic (dim 1), summed by one program in a fixed order, and so
the whole "step" of matrices and the output layer. Not bitwise: column sums (dim 0, and
the "sums" phase of the embedding under ZeRO / FSDP2) are added with fp64 atomics in the
order programs finish; the fp64 sum may differ in its last bits from run to run, which can
move a column's fp32 RMS by one ulp. The GPU compiler may also fuse a multiply and an add
(FMA) where the torch path rounds twice; both stay within 1e-6 of the torch path.

Tested on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1 with the C++ kernel
off, SCALE_ZERO_NATIVE=0; tests/unit/test_triton_step.py); not yet measured on a GPU
(benchmarks/gpu_step.py). Triton is an optional dependency: without it the step on a GPU
takes the torch path and a warning says so once.
"""

from __future__ import annotations

import contextlib
import functools
import os
import struct
import warnings
from types import ModuleType
from typing import Sequence

import torch

from scale_zero.kernel import KernelBlock, check_gradients, gradient_lengths

# A job's fields, in the order of a row of the job table (int64; the fp64 settings as bits).
JOB_FIELDS = ("param", "momentum", "sumsq", "grad_offset", "owner", "cols", "dim", "count", "weight_decay", "beta")
# A task's row (rows [first, last) of one job), and an owner's row, written at every run.
TASK_FIELDS = ("job", "first_row", "last_row")
OWNER_FIELDS = ("grad", "lr")
# A task: rows [first, last) of one job, about this many elements (whole rows, at least one).
TASK_ELEMENTS = 1 << 16
_FP32_BYTES, _FP64_BYTES = 4, 8
_PHASES = ("step", "sums", "apply")
_TAKES = "contiguous fp32 CUDA (CPU under TRITON_INTERPRET=1 with SCALE_ZERO_NATIVE=0)"


def _device_type() -> str | None:
    """Whose tensors the kernel takes: CUDA's, or under Triton's interpreter, which runs the
    kernels on the host (TRITON_INTERPRET, read as Triton reads it), CPU tensors, and only
    with the C++ kernel off (SCALE_ZERO_NATIVE=0): how the Triton path is tested without a GPU."""
    if os.environ.get("TRITON_INTERPRET", "").lower() not in ("1", "true", "on"):
        return "cuda"
    return "cpu" if os.environ.get("SCALE_ZERO_NATIVE") == "0" else None


@functools.cache
def _kernels() -> ModuleType | None:
    """The Triton kernels, imported on first use (jit decided there: compiled, or interpreted)."""
    try:
        from scale_zero import triton_kernels
    except ImportError as error:
        warnings.warn(f"SCALE: Triton is not installed ({error}); the step on GPUs uses the torch path.")
        return None
    return triton_kernels


def available() -> bool:
    return _kernels() is not None


def accepts(*tensors: torch.Tensor | None) -> bool:
    """The kernel takes contiguous fp32 tensors of `_device_type()`."""
    device = _device_type()
    return all(
        t is None or (t.device.type == device and t.dtype == torch.float32 and t.is_contiguous()) for t in tensors
    )


def _bits(values: Sequence[float]) -> tuple[int, ...]:
    """fp64 values as the int64 words that hold them (the tables are int64)."""
    return struct.unpack(f"={len(values)}q", struct.pack(f"={len(values)}d", *values))


class Batch:
    """One phase's blocks as a launch's tables, built once and run at every step that steps
    the same blocks: per run only each owner's gradient and lr are written in. `owners[i]`
    says which of the run's gradients and rates block i takes. The caller keeps a batch only
    while the blocks' parameter and momentum storage, shapes, settings and `sumsq` stay what
    it was built with; the batch holds no tensor of theirs (a gradient must be free to go)."""

    def __init__(self, phase: str, blocks: Sequence[KernelBlock], owners: Sequence[int]):
        if phase not in _PHASES:
            raise ValueError(f"unknown phase {phase!r}; expected one of {_PHASES}")
        self.kernels = _kernels()
        if self.kernels is None:
            raise RuntimeError("the Triton kernel needs Triton (pip install triton)")
        self.owner_ids = sorted(set(owners))  # the run's gradients this batch reads, in table order
        self.grad_lengths = gradient_lengths(blocks, owners)
        devices = {b.param.device for b in blocks}
        if len(devices) > 1:
            raise ValueError(f"a batch's blocks must be on one device, got {sorted(map(str, devices))}")
        self.device = devices.pop() if devices else torch.device("cpu")
        for b in blocks:
            b.check(phase)
            if not accepts(b.param, b.grad, b.momentum):
                raise ValueError(f"the Triton kernel takes {_TAKES} tensors")
        # "step" keeps the column sums of its dim-0 blocks in a scratch buffer of its own.
        columns = sum(b.cols for b in blocks if b.dim == 0) if phase == "step" else 0
        self.scratch = torch.zeros(columns, dtype=torch.float64, device=self.device) if columns else None
        table_index = {owner: i for i, owner in enumerate(self.owner_ids)}
        jobs, scratch_used = [], 0
        for b, owner in zip(blocks, owners, strict=True):
            start = _FP32_BYTES * b.offset
            if phase != "step":
                sumsq = b.sumsq.data_ptr()
            elif b.dim == 0:
                sumsq = self.scratch.data_ptr() + _FP64_BYTES * scratch_used
                scratch_used += b.cols
            else:
                sumsq = 0
            weight_decay, beta = _bits([b.weight_decay, b.beta])
            fields = dict(
                param=b.param.data_ptr() + start, momentum=0 if b.momentum is None else b.momentum.data_ptr() + start,
                sumsq=sumsq, grad_offset=start, owner=table_index[owner], cols=b.cols, dim=b.dim, count=b.count,
                weight_decay=weight_decay, beta=beta,
            )
            jobs.append([fields[name] for name in JOB_FIELDS])
        self.jobs = self._table(jobs, len(JOB_FIELDS))
        self.owner_table = self._table([(0, 0)] * len(self.owner_ids), len(OWNER_FIELDS))
        # Column tile: the widest block's row as a power of two, within what a program holds well.
        widest = max((b.cols for b in blocks), default=1)
        self.block_cols = min(1024, max(16, 1 << (widest - 1).bit_length()))
        # The phase's launches, each a kernel, its tasks and its options.
        tasks = _tasks(blocks)
        if phase == "apply":
            launches = [(self.kernels.apply_rms, tasks, {})]
        else:  # "step" finishes whole rows in the first pass; "sums" adds every block's sums
            launches = [(self.kernels.first_pass, tasks, dict(UPDATE_ROWS=phase == "step"))]
        if columns:  # then the dim-0 blocks' update, once their column sums are complete
            launches.append((self.kernels.apply_rms, [t for t in tasks if blocks[t[0]].dim == 0], {}))
        self.launches = [(kernel, self._table(t, len(TASK_FIELDS)), options) for kernel, t, options in launches if t]

    def _table(self, rows: list, width: int) -> torch.Tensor:
        return torch.tensor(rows, dtype=torch.int64).view(-1, width).to(self.device)

    def run(self, grads: Sequence[torch.Tensor], lrs: Sequence[float]) -> None:
        if not self.launches:
            return
        check_gradients(grads, self.grad_lengths, accepts, _TAKES)
        owners = [*zip((grads[o].data_ptr() for o in self.owner_ids), _bits([lrs[o] for o in self.owner_ids]))]
        on_cuda = self.device.type == "cuda"
        self.owner_table.copy_(torch.tensor(owners, dtype=torch.int64, pin_memory=on_cuda), non_blocking=True)
        with torch.cuda.device(self.device) if on_cuda else contextlib.nullcontext():  # where Triton launches
            if self.scratch is not None:
                self.scratch.zero_()
            for kernel, tasks, options in self.launches:
                kernel[(len(tasks),)](self.jobs, tasks, self.owner_table, BLOCK=self.block_cols, **options)


def _tasks(blocks: Sequence[KernelBlock]) -> list[tuple[int, int, int]]:
    """Each block's rows cut into tasks `(block, first row, last row)` of whole rows, about
    TASK_ELEMENTS elements each."""
    tasks = []
    for k, b in enumerate(blocks):
        if b.rows * b.cols:
            rows = max(1, TASK_ELEMENTS // b.cols)
            tasks += [(k, r, min(b.rows, r + rows)) for r in range(0, b.rows, rows)]
    return tasks
