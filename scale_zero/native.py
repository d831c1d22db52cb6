"""The fused CPU kernel for SCALE's normalized step (`normalized_step.cpp`): a backend of
`scale_zero.kernel`, whose blocks carry the fields of the C `struct Job` by name, run as a
`Batch` of one phase ("step", or "sums" then "apply" around the all_reduce). Which pieces
take which is decided by `scale_zero.scale`, whose torch path computes the same thing.

The kernel is built on first use with torch's extension builder (about a second: it
includes no torch headers; cached under ~/.cache/torch_extensions, or
$TORCH_EXTENSIONS_DIR) for the vector instructions torch itself uses on this CPU, and
called through ctypes. `SCALE_ZERO_NATIVE=0` turns it off; without a C++ compiler the torch path is used
and a warning says so once.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import warnings
from pathlib import Path
from typing import Sequence

import torch

from scale_zero.kernel import KernelBlock, check_gradients, gradient_lengths

_SOURCE = Path(__file__).with_name("normalized_step.cpp")
# Vector instructions for the CPU torch itself dispatches to. The build is named after
# them, so hosts of different kinds sharing one cache directory never load each other's.
_ISA_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx2", "-mfma", "-mprefer-vector-width=512"],
    "AVX2": ["-mavx2", "-mfma"],
}
_FP32_BYTES = 4  # the kernel takes fp32 tensors only (`accepts`)
# The C entry point of each phase.
_ENTRIES = {"step": "scale_normalized_step", "sums": "scale_partial_sums", "apply": "scale_apply_rms"}


class _Job(ctypes.Structure):
    """`struct Job` in normalized_step.cpp, field for field."""

    _fields_ = [
        ("param", ctypes.c_void_p),
        ("grad", ctypes.c_void_p),
        ("momentum", ctypes.c_void_p),
        ("owner", ctypes.c_int64),
        ("grad_offset", ctypes.c_int64),
        ("rows", ctypes.c_int64),
        ("cols", ctypes.c_int64),
        ("dim", ctypes.c_int64),
        ("lr", ctypes.c_double),
        ("weight_decay", ctypes.c_double),
        ("beta", ctypes.c_double),
        ("count", ctypes.c_int64),
        ("sumsq", ctypes.c_void_p),
        ("row_nonzero", ctypes.c_void_p),
    ]


@functools.cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get("SCALE_ZERO_NATIVE", "1") == "0":
        return None
    from torch.utils.cpp_extension import load

    isa = torch.backends.cpu.get_cpu_capability()
    # The source's hash in the name too: processes running different versions of the kernel
    # (checkouts sharing one cache) never rebuild a library another one has loaded.
    version = hashlib.sha256(_SOURCE.read_bytes()).hexdigest()[:12]
    try:
        path = load(
            f"scale_zero_normalized_step_{isa.lower()}_{version}",
            sources=[str(_SOURCE)],
            extra_cflags=["-O3", "-fopenmp-simd", *_ISA_FLAGS.get(isa, [])],
            is_python_module=False,
        )
    except Exception as error:  # no compiler, read-only cache, ...
        warnings.warn(f"SCALE: the fused CPU kernel did not build ({error}); using the torch path.")
        return None
    lib = ctypes.CDLL(path)
    for entry in _ENTRIES.values():
        getattr(lib, entry).argtypes = [
            ctypes.POINTER(_Job), ctypes.c_int64, ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_double),
            ctypes.c_int,
        ]
        getattr(lib, entry).restype = None
    return lib


def available() -> bool:
    return _library() is not None


def accepts(*tensors: torch.Tensor | None) -> bool:
    """The kernel takes contiguous fp32 CPU tensors."""
    return all(
        t is None or (t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()) for t in tensors
    )


class Batch:
    """One phase's blocks as the C side's job array, built once and run at every step that
    steps the same blocks: a run hands the C side only each owner's gradient (ZeRO flattens a
    new one at every step) and lr (the schedule), `owners[i]` saying which block i takes. The
    caller keeps a batch only while the blocks' parameter and momentum storage, shapes,
    settings and `sumsq` stay what it was built with; the batch holds no tensor (a gradient
    must be free to go after its step)."""

    def __init__(self, phase: str, blocks: Sequence[KernelBlock], owners: Sequence[int]):
        self.entry = _ENTRIES[phase]
        self.jobs = (_Job * len(blocks))(*(_job(phase, b, owner) for b, owner in zip(blocks, owners, strict=True)))
        self.grad_lengths = gradient_lengths(blocks, owners)

    def run(self, grads: Sequence[torch.Tensor], lrs: Sequence[float]) -> None:
        if not self.jobs:
            return
        check_gradients(grads, self.grad_lengths, accepts, "contiguous fp32 CPU")
        addresses = (ctypes.c_void_p * len(grads))(*(g.data_ptr() for g in grads))
        rates = (ctypes.c_double * len(lrs))(*lrs)
        getattr(_library(), self.entry)(self.jobs, len(self.jobs), addresses, rates, torch.get_num_threads())


def _job(phase: str, b: KernelBlock, owner: int) -> _Job:
    b.check(phase)  # the C side trusts these pointers
    sumsq = None if phase == "step" else b.sumsq.data_ptr()
    row_nonzero = None if phase == "step" or b.dim == 1 else b.row_nonzero.data_ptr()
    start = _FP32_BYTES * b.offset
    return _Job(
        b.param.data_ptr() + start, None, None if b.momentum is None else b.momentum.data_ptr() + start,
        owner, b.offset, b.rows, b.cols, b.dim, 0.0, b.weight_decay, b.beta, b.count, sumsq, row_nonzero,
    )
