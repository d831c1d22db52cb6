"""Writing an fp32 result into bf16 storage: stochastic rounding (docs/optimizer.md,
"Master-free bf16").

bf16 keeps 8 significant bits: at 1.0 its spacing is 2**-7, so a step of lr = 1e-3 is below
half a spacing and round-to-nearest throws every such update away. Stochastic rounding
rounds x up with probability equal to its distance from the value below, in units of the
spacing, so E[round(x)] = x and small updates accumulate in expectation.

The random bits come from a counter-based hash, not a generator, so there is no RNG state
to checkpoint or to keep in step across ranks. For element `e` (its index in the FULL
parameter's row-major flattening) of a tensor of matrix shape `(rows, cols)` at step `t`:

    u(e) = hash(hash(seed, t, rows, cols) + e, old bits of the stored element)

The old stored value stands in for a parameter index (engines hand SCALE flats of several
parameters, not parameters, so no index is the same on every engine): it separates
parameters of the same shape and is the same on every rank and after a resume. None of
the inputs depends on the rank or on how the parameter is partitioned, so a ZeRO-3 run on
any number of ranks rounds exactly as a single process does, and a resumed run exactly as
an uninterrupted one.
"""

from __future__ import annotations

from typing import Sequence

import torch

_LOW16_CLEARED = -(1 << 16)  # 0xFFFF0000 as an int32: keeps the bits a bf16 stores
# lowbias32's multipliers (C. Wellons) as int32 values: int32 products wrap mod 2**32.
_MUL1, _MUL2 = 0x7FEB352D, 0x846CA68B - (1 << 32)


def _int32(value: int) -> int:
    """A Python int's low 32 bits as a signed int32 value."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32, an integer finalizer, on int32 bit patterns (the masks make the shifts
    logical; int32 arithmetic is several times faster than int64 on CPU)."""
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * _MUL1
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * _MUL2
    return x ^ ((x >> 16) & 0xFFFF)


def stream_key(seed: int, step: int, shape: Sequence[int]) -> int:
    """The per-(seed, step, tensor shape) part of the hash, as an int32 value."""
    key = _mix32(torch.tensor([_int32(seed)], dtype=torch.int32))
    for value in (step, *shape):
        key = _mix32(key + _int32(value))
    return int(key)


def random_bits(key: int, index: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """16 uniform random bits per element (int32), from the stream key, the elements'
    indices in the full parameter and their stored bf16 values `old`."""
    old_bits = old.view(torch.int16).reshape(-1).to(torch.int32) & 0xFFFF
    h = _mix32(index.to(torch.int32) + key)
    return (_mix32(h ^ old_bits) >> 16) & 0xFFFF


def round_into_(target: torch.Tensor, values: torch.Tensor, key: int | None, index: torch.Tensor | None) -> None:
    """target[...] = values (fp32, same shape), rounded stochastically when `target` is bf16
    and `key` is given (`index`: each element's index in the full parameter, flattened),
    else as `copy_` rounds (to nearest)."""
    if key is None or target.dtype != torch.bfloat16:
        target.copy_(values)
        return
    bits = values.contiguous().view(torch.int32).reshape(-1)
    # Adding u in [0, 2**16) to the 16 bits bf16 drops carries into the kept bits with
    # probability (dropped bits) / 2**16; the sign bit is untouched, so negative values
    # round away from zero as often as positive ones do: unbiased either way.
    rounded = (bits + random_bits(key, index, target)) & _LOW16_CLEARED
    target.copy_(rounded.view(torch.float32).view(target.shape))  # exact: the dropped bits are zero


def block_index(rows: tuple[int, int], cols: tuple[int, int], width: int, device: torch.device) -> torch.Tensor:
    """Row-major indices in a matrix `width` columns wide of rows [r0, r1) x cols [c0, c1)."""
    r = torch.arange(rows[0], rows[1], dtype=torch.int64, device=device).unsqueeze(1)
    c = torch.arange(cols[0], cols[1], dtype=torch.int64, device=device)
    return (r * width + c).reshape(-1)
