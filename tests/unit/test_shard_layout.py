"""The layout math against brute force, the normalized update on ranges, and batched_rms
across real gloo ranks."""

import random

import pytest
import torch
import torch.distributed as dist

from scale_zero.scale import normalized_update_
from scale_zero.shard_layout import CommStats, ShardLayout, batched_rms
from tests.support.distributed import run_distributed


def covered(layout: ShardLayout) -> torch.Tensor:
    """Brute force: the full-matrix positions each local element maps to, via the blocks."""
    rows, cols = layout.shape
    index = torch.arange(rows * cols).view(rows, cols)
    local = torch.full((layout.numel,), -1)
    for b in layout.blocks:
        b.view(local).copy_(index[b.r0 : b.r1, b.c0 : b.c1])
    return local


def random_ranges(rng, rows, cols):
    n = rows * cols
    yield 0, 0
    yield n, n
    yield 0, n
    r = rng.randrange(rows)
    yield r * cols + 1, r * cols + max(2, cols - 1)  # inside one row
    for _ in range(20):
        s = rng.randrange(n + 1)
        yield s, rng.randrange(s, n + 1)


@pytest.mark.parametrize("seed", range(8))
def test_flat_range_blocks_are_the_range(seed):
    rng = random.Random(seed)
    rows, cols = rng.randrange(1, 9), rng.randrange(1, 9)
    for start, end in random_ranges(rng, rows, cols):
        layout = ShardLayout.flat_range((rows, cols), start, end)
        assert len(layout.blocks) <= 3
        assert torch.equal(covered(layout), torch.arange(start, end)), (rows, cols, start, end)


def zero3_ranges(numel, world):
    """ZeRO-3 partitioning: ceil(numel / world) per rank, the last ranks short or empty."""
    per_rank = -(-numel // world)
    return [(min(r * per_rank, numel), min((r + 1) * per_rank, numel)) for r in range(world)]


@pytest.mark.parametrize("seed", range(8))
def test_partial_sums_over_ranks_equal_the_full_rms(seed):
    """Summing every rank's partial sums of squares (the all_reduce, done by hand here)
    gives the full parameter's row and column RMS, for any split of the flattening."""
    rng = random.Random(seed)
    rows, cols, world = rng.randrange(1, 12), rng.randrange(1, 12), rng.randrange(1, 6)
    full = torch.randn(rows, cols)
    full[rng.randrange(rows)] = 0  # a zero row: floored, never NaN
    cuts = [zero3_ranges(rows * cols, world)]
    points = sorted(rng.randrange(rows * cols + 1) for _ in range(world - 1))
    cuts.append(list(zip([0, *points], [*points, rows * cols])))  # arbitrary, some empty
    for ranges in cuts:
        for dim in (0, 1):
            total = torch.zeros(full.shape[1 - dim])
            for start, end in ranges:
                layout = ShardLayout.flat_range((rows, cols), start, end)
                # one rank alone (no group): its rms is built from its partial sums only
                (rms,) = batched_rms([(layout, full.flatten()[start:end], dim)])
                total += rms.square() * full.shape[dim] * (rms > 1e-8)
            expected = full.pow(2).mean(dim).sqrt().clamp_min(1e-8)
            torch.testing.assert_close(total.div(full.shape[dim]).sqrt().clamp_min(1e-8), expected)


def test_normalized_update_on_ranges_equals_the_full_update():
    rows, cols = 5, 7
    full_p, full_g = torch.randn(rows, cols), torch.randn(rows, cols)
    for dim in (0, 1):
        rms = full_g.pow(2).mean(dim).sqrt()
        expected = full_p - 0.1 * full_g / rms.unsqueeze(dim)
        result = full_p.clone().flatten()
        for start, end in zero3_ranges(rows * cols, 4):
            layout = ShardLayout.flat_range((rows, cols), start, end)
            normalized_update_(layout, result[start:end], full_g.flatten()[start:end], rms, dim, 0.1, 0.0)
        torch.testing.assert_close(result.view(rows, cols), expected)


def _ranks_rms(shapes):
    """Each rank holds its ZeRO-3 range of every parameter; one all_reduce for all."""
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    fulls = [torch.randn(s) for s in shapes]
    pieces = []
    for full, dim in [(f, d) for f in fulls for d in (0, 1)]:
        start, end = zero3_ranges(full.numel(), world)[rank]
        layout = ShardLayout.flat_range(tuple(full.shape), start, end, dist.group.WORLD)
        pieces.append((layout, full.flatten()[start:end], dim))
    stats = CommStats()
    rms = batched_rms(pieces, stats)
    expected = [f.pow(2).mean(d).sqrt() for f in fulls for d in (0, 1)]
    return rms, expected, (stats.collectives, stats.bytes)


def test_batched_rms_over_gloo_ranks_issues_one_all_reduce():
    # (1, 2) has fewer elements than ranks: one rank holds nothing of it
    shapes = [(5, 7), (1, 2), (3, 11)]
    for rms, expected, (collectives, sent) in run_distributed(_ranks_rms, 3, shapes):
        for got, want in zip(rms, expected):
            torch.testing.assert_close(got, want)
        assert collectives == 1
        assert sent == 8 * sum(a + b for a, b in shapes)  # fp64 sums of squares


@pytest.mark.parametrize(
    "boundaries, split",
    [
        (None, {0, 1}),  # unknown: every reduction counts as cut
        ([0, 24, 48], {0}),  # two ranks, each holding whole rows: only columns are cut
        ([0, 30, 48], {0, 1}),  # a boundary inside row 2
        ([0, 48], set()),  # one rank holds it all
        ([], set()),  # nobody holds any (an empty parameter's ranges)
    ],
)
def test_flat_range_is_cut_only_where_a_boundary_falls(boundaries, split):
    group = object()  # any process group: only its presence matters to the geometry
    layout = ShardLayout.flat_range((4, 12), 0, 24, group, boundaries)
    assert set(layout.split_groups) == split and all(g is group for g in layout.split_groups.values())
    assert ShardLayout.flat_range((4, 12), 0, 24, None, boundaries).split_groups == {}
