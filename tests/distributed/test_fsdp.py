"""SCALE on FSDP2 (`fully_shard`) DTensor parameters across real gloo ranks, against the
single-process reference: uneven shards, empty shards, HSDP, mixed DTensor / plain
parameters, tensor-parallel Shard(1) placements, and the fused CPU kernel on local rows
next to the collective columns."""

import shutil

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from torch import nn

from scale_zero import SCALE, native, scale_param_groups
from tests.support.distributed import run_distributed
from tests.support.models import batches, narrow_net, tiny_llama
from tests.support.reference import ReferenceSCALE

STEPS, BATCH = 5, 12
OPT = dict(lr=1e-2, adam_lr=5e-3, weight_decay=0.1)


def llama_loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


def narrow_loss(model, ids):
    return model.loss(ids)


CASES = {
    "llama": (tiny_llama, llama_loss, {}),
    "narrow": (narrow_net, narrow_loss, {"vocab": 11}),
}


def reference_params(case):
    build, loss_fn, data_kwargs = CASES[case]
    model = build()
    groups = scale_param_groups(model)
    roles = {id(p): g["role"] for g in groups for p in g["params"]}
    ref = ReferenceSCALE([(p, roles[id(p)]) for p in model.parameters()], **OPT)
    for ids in batches(STEPS, BATCH, **data_kwargs):
        model.zero_grad()
        loss_fn(model, ids).backward()
        ref.step()
    return [p.detach() for p in model.parameters()]


def _train_fsdp(case, mesh_shape, shard_root):
    build, loss_fn, data_kwargs = CASES[case]
    model = build()
    names = ("replicate", "shard")[-len(mesh_shape):]
    mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=names)
    if case == "llama":
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    else:
        fully_shard(model.narrow, mesh=mesh)
        fully_shard(model.head, mesh=mesh)
    plain = [p for p in model.parameters() if not isinstance(p, DTensor)]
    opt = SCALE(scale_param_groups(model), **OPT)
    rank, world = dist.get_rank(), dist.get_world_size()
    per_rank = BATCH // world
    comm = []
    for ids in batches(STEPS, BATCH, **data_kwargs):
        loss_fn(model, ids[rank * per_rank : (rank + 1) * per_rank]).backward()
        for p in plain:  # parameters left unsharded are data-parallel: average by hand
            dist.all_reduce(p.grad)
            p.grad /= world
        opt.step()
        opt.zero_grad()
        comm.append((opt.comm_stats.collectives, opt.comm_stats.bytes))
    full = [p.full_tensor() if isinstance(p, DTensor) else p for p in model.parameters()]
    return [p.detach() for p in full], comm, len(plain)


@pytest.mark.parametrize(
    "case,mesh_shape",
    [("llama", (2,)), ("llama", (3,)), ("narrow", (3,)), ("llama", (2, 2))],
    ids=["llama-fsdp2", "llama-fsdp3", "narrow-mixed-fsdp3", "llama-hsdp2x2"],
)
def test_fsdp2_matches_single_process(case, mesh_shape):
    world = 1
    for size in mesh_shape:
        world *= size
    expected = reference_params(case)
    for params, comm, num_plain in run_distributed(_train_fsdp, world, case, mesh_shape, True):
        for got, want in zip(params, expected, strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        # only the embedding's columns need the collective; rows of every matrix are local
        hidden = 48 if case == "llama" else 7
        embedding_sharded = case == "llama"
        assert comm == [(int(embedding_sharded), 8 * hidden * embedding_sharded)] * STEPS  # fp64 sums
        assert num_plain == (0 if case == "llama" else 4)


def _row_only_collectives():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7, bias=False), nn.Linear(7, 3, bias=False))
    fully_shard(model, mesh=init_device_mesh("cpu", (dist.get_world_size(),)))
    opt = SCALE(model.parameters(), lr=0.1)
    model(torch.randn(4, 5)).sum().backward()
    opt.step()
    return opt.comm_stats.collectives


def test_row_reduced_matrices_need_no_collective():
    assert run_distributed(_row_only_collectives, 2) == [0, 0]


def _tensor_parallel(full_params, full_grads, placements, mesh_shape):
    mesh = init_device_mesh("cpu", mesh_shape)
    params = [nn.Parameter(distribute_tensor(p, mesh, pl)) for p, pl in zip(full_params, placements)]
    for p, g, pl in zip(params, full_grads, placements):
        p.grad = distribute_tensor(g, mesh, pl)
    roles = ["matrix", "embedding", "output"]
    opt = SCALE([{"params": [p], "role": r} for p, r in zip(params, roles)], lr=0.1, weight_decay=0.1)
    opt.step()
    opt.step()  # a second step exercises the output momentum
    return [p.full_tensor() for p in params], opt.comm_stats.collectives


def test_tensor_parallel_shard1_reduces_rows_over_the_group():
    torch.manual_seed(0)
    shapes = [(5, 7), (9, 4), (6, 5)]
    full_params = [torch.randn(s) for s in shapes]
    full_grads = [torch.randn(s) for s in shapes]
    ref_params = [nn.Parameter(p.clone()) for p in full_params]
    for p, g in zip(ref_params, full_grads):
        p.grad = g.clone()
    ref = ReferenceSCALE(list(zip(ref_params, ["matrix", "embedding", "output"])), lr=0.1, weight_decay=0.1)
    ref.step()
    ref.step()
    placements = [[Shard(1)], [Shard(0)], [Shard(1)]]  # 5 columns over 3 ranks: uneven
    for params, collectives in run_distributed(_tensor_parallel, 3, full_params, full_grads, placements, (3,)):
        for got, want in zip(params, ref_params):
            torch.testing.assert_close(got, want.detach(), rtol=0, atol=1e-6)
        assert collectives == 1  # matrix rows + embedding columns + output rows, one buffer


def _fsdp2_steps():
    """FSDP2 on this rank: matrix/output rows are local (the fused kernel), embedding columns
    need the collective (the torch path): both in one step."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(37, 16), torch.nn.Linear(16, 3, bias=False), torch.nn.Linear(3, 37))
    roles = {"0.weight": "embedding", "1.weight": "matrix", "2.weight": "output", "2.bias": "vector"}
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model:
        fully_shard(layer, mesh=mesh)  # 3 rows over 2 ranks: uneven
    named = dict(model.named_parameters())
    opt = SCALE([{"params": [named[n]], "role": r} for n, r in roles.items()], lr=1e-2, weight_decay=0.1)
    for t in range(3):
        gen = torch.Generator().manual_seed(t)
        for n, p in named.items():
            p.grad = distribute_tensor(torch.randn(p.shape, generator=gen), mesh, p.placements)
        opt.step()
    return {n: p.full_tensor() for n, p in named.items()}, opt.comm_stats.collectives, native.available()


@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler: the torch path is the only path")
def test_fsdp2_fused_rows_match_reference():
    per_rank = run_distributed(_fsdp2_steps, 2)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(37, 16), torch.nn.Linear(16, 3, bias=False), torch.nn.Linear(3, 37))
    named = dict(model.named_parameters())
    roles = {"0.weight": "embedding", "1.weight": "matrix", "2.weight": "output", "2.bias": "vector"}
    ref = ReferenceSCALE([(named[n], r) for n, r in roles.items()], lr=1e-2, weight_decay=0.1)
    for t in range(3):
        gen = torch.Generator().manual_seed(t)
        for p in named.values():
            p.grad = torch.randn(p.shape, generator=gen)
        ref.step()
    for params, collectives, fused in per_rank:
        assert fused and collectives == 1  # the kernel ran; only the embedding's columns reduce
        for n, p in named.items():
            torch.testing.assert_close(params[n], p.detach(), rtol=0, atol=1e-6, msg=n)
