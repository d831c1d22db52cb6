"""What one rank holds of a parameter, and the row / column RMS built from partial sums.

Every engine describes its piece of a parameter the same way: the parameter seen as a 2-D
matrix `(rows, cols)` (tensors with more dims as `(size(0), -1)`), and the rectangular
blocks of that matrix stored, row-major, in the rank's local flat tensor:

- a contiguous range of the row-major flattening (ZeRO) is at most three blocks: a partial
  first row, a block of whole rows and a partial last row (views, never an index tensor);
- a `Shard(0)` block of whole rows (FSDP2) or a `Shard(1)` block of whole columns (tensor
  parallel) is one block.

A reduction over `dim` needs a collective only when the partition cuts that dim; the
layout names the process group for each such dim. `batched_rms` adds every piece's
partial sums of squares into fixed slots of ONE fp64 buffer per process group and issues
ONE `all_reduce(SUM)` per buffer, in the same order with the same sizes on every rank,
including ranks that hold nothing of a parameter (docs/algorithm.md, "Partial sums").
This module is geometry and that one reduction; the update itself is in `scale_zero.scale`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import torch
import torch.distributed as dist

RMS_FLOOR = 1e-8  # a floor, not an added epsilon: a zero row gives a zero update


def matrix_shape(shape: Sequence[int]) -> tuple[int, int]:
    """The 2-D view SCALE normalizes: `(size(0), -1)`."""
    if len(shape) < 2:
        raise ValueError(f"a normalized parameter needs >= 2 dims, got shape {tuple(shape)}")
    return int(shape[0]), math.prod(shape[1:])


class Block(NamedTuple):
    """Rows [r0, r1) x cols [c0, c1) of the full matrix, stored from `offset` of the local flat."""

    r0: int
    r1: int
    c0: int
    c1: int
    offset: int

    @property
    def numel(self) -> int:
        return (self.r1 - self.r0) * (self.c1 - self.c0)

    def view(self, flat: torch.Tensor) -> torch.Tensor:
        return flat[self.offset : self.offset + self.numel].view(self.r1 - self.r0, self.c1 - self.c0)

    def span(self, dim: int) -> tuple[int, int]:
        """The entries of a per-row (dim=1) or per-column (dim=0) statistic this block touches."""
        return (self.r0, self.r1) if dim == 1 else (self.c0, self.c1)


@dataclass(frozen=True)
class ShardLayout:
    """What one rank holds of a parameter viewed as a `shape = (rows, cols)` matrix."""

    shape: tuple[int, int]
    blocks: tuple[Block, ...]
    # For each dim the partition cuts, the process group the pieces along it live on.
    # A reduction over a dim absent here is complete on every rank.
    split_groups: dict = field(default_factory=dict)

    @classmethod
    @functools.cache  # layouts are immutable; a step asks for one per parameter
    def whole(cls, shape: tuple[int, int]) -> ShardLayout:
        rows, cols = shape
        return cls(shape, (Block(0, rows, 0, cols, 0),) if rows * cols else ())

    @classmethod
    def flat_range(
        cls, shape: tuple[int, int], start: int, end: int, group=None, boundaries: Sequence[int] | None = None
    ) -> ShardLayout:
        """Elements [start, end) of the row-major flattening (ZeRO). `group` is None when one
        rank holds everything, so no collective is needed. `boundaries`: where the ranks'
        ranges of this parameter begin and end, the same list on every rank; with it, a
        reduction needs the group only where the partition really cuts: rows only when a
        boundary falls inside a row (None: every dim counts as cut)."""
        rows, cols = shape
        if not 0 <= start <= end <= rows * cols:
            raise ValueError(f"range [{start}, {end}) is outside a {rows}x{cols} parameter")
        blocks = []
        offset, pos = 0, start
        while pos < end:
            r, c = divmod(pos, cols)
            if c or end - pos < cols:  # a partial row
                c1 = min(cols, c + end - pos)
                block = Block(r, r + 1, c, c1, offset)
            else:  # the whole rows that follow
                block = Block(r, r + (end - pos) // cols, 0, cols, offset)
            blocks.append(block)
            offset += block.numel
            pos += block.numel
        if group is None:
            split = {}
        elif boundaries is None:
            split = {0: group, 1: group}
        else:
            inside = [b for b in boundaries if 0 < b < rows * cols]
            split = {0: group} if inside else {}  # rows on several ranks: columns are cut
            if any(b % cols for b in inside):  # a row on several ranks
                split[1] = group
        return cls(shape, tuple(blocks), split)

    @classmethod
    def block(
        cls, shape: tuple[int, int], rows: tuple[int, int], cols: tuple[int, int], split_groups: dict
    ) -> ShardLayout:
        """A rectangular block (DTensor `Shard(0)` / `Shard(1)` placements)."""
        block = Block(rows[0], rows[1], cols[0], cols[1], 0)
        return cls(shape, (block,) if block.numel else (), dict(split_groups))

    @functools.cached_property
    def numel(self) -> int:
        return sum(b.numel for b in self.blocks)

    @functools.cached_property
    def holds_entries(self) -> dict[int, tuple[bool, ...]]:
        """Per dim, for each block: whether it holds whole rows (dim 1) or whole columns
        (dim 0), so its entries of the per-row / per-column statistic are complete on this
        rank (a partition gives every element to one rank: no other rank adds to them)."""
        rows, cols = self.shape
        return {1: tuple(b.c1 - b.c0 == cols for b in self.blocks), 0: tuple(b.r1 - b.r0 == rows for b in self.blocks)}


@dataclass
class CommStats:
    """Collectives SCALE issued, and the bytes they carried (for logs and benchmarks)."""

    collectives: int = 0
    bytes: int = 0

    def add(self, other: CommStats) -> None:
        self.collectives += other.collectives
        self.bytes += other.bytes


def comm_device(group, device: torch.device) -> torch.device:
    """Where a collective of `group` takes a tensor that lives on `device`."""
    # NCCL cannot reduce CPU tensors (optimizer offload): use the current accelerator then.
    if device.type == "cpu" and "gloo" not in str(dist.get_backend(group)):
        return torch.accelerator.current_accelerator(check_available=True)
    return device


class PartialSums:
    """The batched buffer: for each `(layout, dim)`, a slot of one fp64 sum of squares per
    entry of the full parameter's per-row (dim=1) or per-column (dim=0) statistic, in ONE
    buffer per process group. Fill the slots with this rank's partial sums (`add_`, or the
    fused kernel through `slot`), `all_reduce` once per group, then read `rms`.

    fp64 because a sum of fp32 squares is not safe in fp32: a row of 1e25 overflows it and
    one of subnormals vanishes; fp32 values squared span ~2e-90 .. 1.2e77, well inside fp64."""

    def __init__(self, pieces: Sequence[tuple[ShardLayout, int]], device: torch.device):
        self.pieces = list(pieces)
        self.slots, sizes = [], {}
        for layout, dim in self.pieces:
            group = layout.split_groups.get(dim)
            start = sizes.get(group, 0)
            sizes[group] = start + layout.shape[1 - dim]
            self.slots.append((group, start))
        self.buffers = {g: torch.zeros(n, dtype=torch.float64, device=device) for g, n in sizes.items()}

    def zero_(self) -> None:
        """Empty every slot, for the next step's sums."""
        for buf in self.buffers.values():
            buf.zero_()

    def slot(self, i: int) -> torch.Tensor:
        """Piece i's entries, the full length of its statistic."""
        (layout, dim), (group, start) = self.pieces[i], self.slots[i]
        return self.buffers[group][start : start + layout.shape[1 - dim]]

    def add_(self, i: int, flat: torch.Tensor) -> None:
        """Piece i's partial sums of squares, from `flat`, what this rank holds of it."""
        layout, dim = self.pieces[i]
        slot = self.slot(i)
        for block in layout.blocks:
            lo, hi = block.span(dim)
            partial = torch.linalg.vector_norm(block.view(flat), dim=dim, dtype=torch.float64)
            slot[lo:hi].addcmul_(partial, partial)

    def all_reduce(self, stats: CommStats | None = None) -> None:
        """ONE all_reduce(SUM) per process group, in the same order with the same sizes on
        every rank (those holding nothing of a parameter included)."""
        for group, buf in self.buffers.items():
            if group is None:
                continue
            comm_buf = buf.to(comm_device(group, buf.device))
            dist.all_reduce(comm_buf, op=dist.ReduceOp.SUM, group=group)
            buf.copy_(comm_buf)
            if stats is not None:
                stats.collectives += 1
                stats.bytes += buf.numel() * buf.element_size()

    def rms(self) -> list[torch.Tensor]:
        """Per piece, the fp32 RMS over dim of the FULL parameter, floored at 1e-8."""
        full = {}
        for g, buf in self.buffers.items():
            # Per entry, how many values its mean is over: the full parameter's size along dim
            # (the group's pieces in slot order).
            shapes = tuple((layout.shape[dim], layout.shape[1 - dim])
                           for (layout, dim), (group, _) in zip(self.pieces, self.slots) if group == g)
            full[g] = buf.div(_entry_counts(shapes, buf.device)).sqrt_().to(torch.float32).clamp_min_(RMS_FLOOR)
        return [full[group][start : start + layout.shape[1 - dim]]
                for (layout, dim), (group, start) in zip(self.pieces, self.slots)]


@functools.lru_cache(maxsize=256)
def _entry_counts(shapes: tuple[tuple[int, int], ...], device: torch.device) -> torch.Tensor:
    """For pieces of `(size along dim, entries)`, each entry's count, as an fp64 tensor on
    `device`: built once per layout, since a host-to-device copy makes the host wait for
    the device (on a GPU, every step would stall its launch queue)."""
    counts = torch.tensor([n for n, _ in shapes], dtype=torch.float64)
    return counts.repeat_interleave(torch.tensor([k for _, k in shapes])).to(device)


def batched_rms(
    pieces: Sequence[tuple[ShardLayout, torch.Tensor, int]], stats: CommStats | None = None
) -> list[torch.Tensor]:
    """For each `(layout, local_flat, dim)`, the fp32 RMS over `dim` of the FULL parameter:
    a vector with one entry per row (dim=1) or per column (dim=0), floored at 1e-8.

    `local_flat` is what this rank holds (may be empty). One all_reduce per process group."""
    if not pieces:
        return []
    sums = PartialSums([(layout, dim) for layout, _, dim in pieces], pieces[0][1].device)
    for i, (_, flat, _) in enumerate(pieces):
        sums.add_(i, flat)
    sums.all_reduce(stats)
    return sums.rms()
