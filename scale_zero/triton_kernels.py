"""The Triton kernels of SCALE's normalized step: `scale_zero.triton_step` builds their
tables and launches them (what each phase does, and what is deterministic, is described
there); the arithmetic is normalized_step.cpp's. Imported only when the Triton path is
used: `triton.jit` decides at import whether they are compiled for the GPU or run in
Triton's interpreter (TRITON_INTERPRET=1).

One program per task, rows [r0, r1) of one job (a block). Every address comes from the
tables as an int64 and is cast to a pointer: the job table is static, the owner table holds
this run's gradient address and lr of each owner.

Only Triton's builtins and this module's functions are called, not the `@triton.jit`
helpers of Triton's own library (`tl.zeros`, `tl.sum`): those are compiled or interpreted as
TRITON_INTERPRET was when `triton` was first imported, these as it is when this module is,
so a test can turn the interpreter on after something else imported Triton.
"""

import triton
import triton.language as tl

from scale_zero.shard_layout import RMS_FLOOR
from scale_zero.triton_step import JOB_FIELDS, OWNER_FIELDS, TASK_FIELDS

# Globals a kernel reads must be constexpr: the tables' widths, and where each field sits in
# a row of the job table (a task's row is job, first row, last row; an owner's, grad and lr).
_FIELDS = tl.constexpr(len(JOB_FIELDS))
_TASK_FIELDS = tl.constexpr(len(TASK_FIELDS))
_OWNER_FIELDS = tl.constexpr(len(OWNER_FIELDS))
_PARAM, _MOMENTUM, _SUMSQ, _GRAD_OFFSET, _OWNER, _COLS, _DIM, _COUNT, _WEIGHT_DECAY, _BETA = (
    tl.constexpr(JOB_FIELDS.index(name))
    for name in ("param", "momentum", "sumsq", "grad_offset", "owner", "cols", "dim", "count", "weight_decay", "beta")
)
_RMS_FLOOR = tl.constexpr(RMS_FLOOR)


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _fp32_at(address):
    return address.to(tl.pointer_type(tl.float32))


@triton.jit
def _task(jobs, tasks, owners):
    """This program's rows [r0, r1) and its job: parameter, gradient and momentum pointers
    (`momentum` 0 for a role without one), the direction `s` (the momentum, else the
    gradient), the job's fp64 sums of squares, its shape along `dim`, and this run's
    fp32 decay, lr and lerp weight, each rounded from fp64 as the C++ kernel does."""
    task = tasks + tl.program_id(0) * _TASK_FIELDS
    job = jobs + tl.load(task) * _FIELDS
    owner = owners + _OWNER_FIELDS * tl.load(job + _OWNER)
    grad = tl.load(owner) + tl.load(job + _GRAD_OFFSET)
    lr = tl.load(owner + 1).to(tl.float64, bitcast=True)
    momentum = tl.load(job + _MOMENTUM)
    direction = tl.where(momentum != 0, momentum, grad)
    weight_decay = tl.load(job + _WEIGHT_DECAY).to(tl.float64, bitcast=True)
    beta = tl.load(job + _BETA).to(tl.float64, bitcast=True)
    return (
        _fp32_at(tl.load(job + _PARAM)), _fp32_at(grad), _fp32_at(momentum), momentum != 0, _fp32_at(direction),
        tl.load(job + _SUMSQ).to(tl.pointer_type(tl.float64)), tl.load(job + _COLS), tl.load(job + _DIM),
        tl.load(job + _COUNT), tl.load(task + 1), tl.load(task + 2),
        (1.0 - lr * weight_decay).to(tl.float32), lr.to(tl.float32), (1.0 - beta).to(tl.float32),
    )


@triton.jit
def _direction(g, m, has_momentum, w, at, inside):
    """The direction at offsets `at`: the gradient, or the momentum advanced by it (stored)."""
    s = tl.load(g + at, mask=inside, other=0.0)
    if has_momentum:
        old = tl.load(m + at, mask=inside, other=0.0)
        s = tl.where(w < 0.5, old + w * (s - old), s - (s - old) * (1.0 - w))  # torch.lerp's formula
        tl.store(m + at, s, mask=inside)
    return s


@triton.jit
def _rms(sumsq, count):
    # The fp64 sqrt is correctly rounded (tl.sqrt_rn is fp32 only), then rounded to fp32; a
    # NaN stays NaN, as in torch's clamp_min and std::max.
    return tl.maximum(tl.sqrt(sumsq / count).to(tl.float32), _RMS_FLOOR, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _update(p, s, at, inside, decay, lr, rms):
    """p = decay * p - lr * s / rms at offsets `at`. Where s is 0 and there is no decay the
    value stays as it is, so it is neither read nor written."""
    x = tl.load(s + at, mask=inside, other=0.0)
    touched = tl.where(decay != 1.0, inside, inside & (x != 0.0))
    tl.store(p + at, decay * tl.load(p + at, mask=touched) - lr * tl.div_rn(x, rms), mask=touched)


@triton.jit
def first_pass(jobs, tasks, owners, UPDATE_ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """The momentum, where the role keeps it, and the sums of squares of the task's rows.
    dim 1: per row, its sum; then with UPDATE_ROWS ("step": whole rows) its update, re-reading
    the row; without ("sums") the sum added to the row's entry, which this program alone
    owns. dim 0: the task's column sums added to the job's entries with fp64 atomics (other
    tasks of the job, and other blocks of its parameter, add to the same columns)."""
    p, g, m, has_momentum, s, sumsq, cols, dim, count, r0, r1, decay, lr, w = _task(jobs, tasks, owners)
    columns = tl.arange(0, BLOCK)
    if dim == 1:
        for r in range(r0, r1):
            squares = tl.full([BLOCK], 0, tl.float64)
            for c0 in range(0, cols, BLOCK):
                inside = c0 + columns < cols
                x = _direction(g, m, has_momentum, w, r * cols + c0 + columns, inside).to(tl.float64)
                squares += x * x  # exact: the product of two fp32 values fits an fp64
            total = tl.reduce(squares, 0, _add)
            if UPDATE_ROWS:
                tl.debug_barrier()  # the row's momentum, just stored, is read back by other threads
                rms = _rms(total, count)
                for c0 in range(0, cols, BLOCK):
                    _update(p, s, r * cols + c0 + columns, c0 + columns < cols, decay, lr, rms)
            else:
                tl.store(sumsq + r, tl.load(sumsq + r) + total)
    else:
        for c0 in range(0, cols, BLOCK):
            inside = c0 + columns < cols
            squares = tl.full([BLOCK], 0, tl.float64)
            for r in range(r0, r1):
                x = _direction(g, m, has_momentum, w, r * cols + c0 + columns, inside).to(tl.float64)
                squares += x * x
            tl.atomic_add(sumsq + c0 + columns, squares, mask=inside)


@triton.jit
def apply_rms(jobs, tasks, owners, BLOCK: tl.constexpr):
    """Decay and the update of the task's rows, each entry's RMS from its complete sum of
    squares: per row (dim 1), or per column (dim 0, taken once per column tile)."""
    p, g, m, has_momentum, s, sumsq, cols, dim, count, r0, r1, decay, lr, w = _task(jobs, tasks, owners)
    columns = tl.arange(0, BLOCK)
    if dim == 1:
        for r in range(r0, r1):
            rms = _rms(tl.load(sumsq + r), count)
            for c0 in range(0, cols, BLOCK):
                _update(p, s, r * cols + c0 + columns, c0 + columns < cols, decay, lr, rms)
    else:
        for c0 in range(0, cols, BLOCK):
            inside = c0 + columns < cols
            rms = _rms(tl.load(sumsq + c0 + columns, mask=inside, other=0.0), count)
            for r in range(r0, r1):
                _update(p, s, r * cols + c0 + columns, inside, decay, lr, rms)
