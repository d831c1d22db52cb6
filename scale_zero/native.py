"""The fused CPU kernel for SCALE's normalized step (`normalized_step.cpp`), with its
pure-torch equivalent as the fallback.

The kernel is built on first use with torch's extension builder (about a second: it
includes no torch headers; cached under ~/.cache/torch_extensions, or
$TORCH_EXTENSIONS_DIR) for the vector instructions torch itself uses on this CPU, and
called through ctypes. `SCALE_ZERO_NATIVE=0` turns it off; without a C++ compiler the torch path is used
and a warning says so once.
"""

from __future__ import annotations

import ctypes
import functools
import os
import warnings
from pathlib import Path

import torch

_SOURCE = Path(__file__).with_name("normalized_step.cpp")
# Vector instructions for the CPU torch itself dispatches to. The build is named after
# them, so hosts of different kinds sharing one cache directory never load each other's.
_ISA_FLAGS = {"AVX512": ["-mavx512f", "-mavx2", "-mfma"], "AVX2": ["-mavx2", "-mfma"]}


class _Job(ctypes.Structure):
    """`ScaleJob` in normalized_step.cpp."""

    _fields_ = [
        ("param", ctypes.c_void_p),
        ("grad", ctypes.c_void_p),
        ("momentum", ctypes.c_void_p),
        ("rows", ctypes.c_int64),
        ("cols", ctypes.c_int64),
        ("dim", ctypes.c_int64),
        ("lr", ctypes.c_float),
        ("decay", ctypes.c_float),
        ("weight", ctypes.c_float),
    ]


@functools.cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get("SCALE_ZERO_NATIVE", "1") == "0":
        return None
    from torch.utils.cpp_extension import load

    isa = torch.backends.cpu.get_cpu_capability()
    try:
        path = load(
            f"scale_zero_normalized_step_{isa.lower()}",
            sources=[str(_SOURCE)],
            extra_cflags=["-O3", "-fopenmp-simd", *_ISA_FLAGS.get(isa, [])],
            is_python_module=False,
        )
    except Exception as error:  # no compiler, read-only cache, ...
        warnings.warn(f"SCALE: the fused CPU kernel did not build ({error}); using the torch path.")
        return None
    lib = ctypes.CDLL(path)
    lib.scale_normalized_steps.argtypes = [ctypes.POINTER(_Job), ctypes.c_int64, ctypes.c_int]
    lib.scale_normalized_steps.restype = None
    return lib


def available() -> bool:
    return _library() is not None


def fusable(*tensors: torch.Tensor | None) -> bool:
    """The kernel takes contiguous fp32 CPU tensors."""
    return all(
        t is None or (t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()) for t in tensors
    )


def normalized_steps_(blocks) -> None:
    """For each `(param, grad, momentum or None, offset, rows, cols, dim, lr, decay, beta)`:
    the fused SCALE step (see the .cpp file) of the `(rows, cols)` block stored from
    `offset` of the contiguous fp32 CPU flats, whose `dim` is whole (its RMS is local)."""
    if not blocks:
        return
    jobs = (_Job * len(blocks))()
    for job, (param, grad, momentum, offset, rows, cols, dim, lr, decay, beta) in zip(jobs, blocks):
        end = offset + rows * cols
        if end > param.numel() or end > grad.numel() or (momentum is not None and end > momentum.numel()):
            raise ValueError(f"a {rows}x{cols} block at {offset} is outside its flat tensors")
        job.param = param.data_ptr() + 4 * offset
        job.grad = grad.data_ptr() + 4 * offset
        job.momentum = None if momentum is None else momentum.data_ptr() + 4 * offset
        job.rows, job.cols, job.dim = rows, cols, dim
        job.lr, job.decay, job.weight = lr, decay, 1 - beta
    _library().scale_normalized_steps(jobs, len(blocks), torch.get_num_threads())
