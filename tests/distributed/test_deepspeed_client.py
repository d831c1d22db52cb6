"""SCALE as a plain DeepSpeed client optimizer (issue 11): `deepspeed.initialize(optimizer=
SCALE(...))` and nothing else. SCALE's first step finds the flat partitions DeepSpeed put
into its param groups and binds them itself (scale_zero/deepspeed_zero.py), so the update
is exact without scale_zero.initialize.

One spawn of 3 ranks (uneven partitions) runs every configuration: 5 optimizer steps of 2
micro-batches each, compared with the single-process reference within 1e-5; a bf16 run
(BF16_Optimizer) checked by its first update; a configuration SCALE refuses, refused at
the first step with the same message scale_zero.initialize gives; and sparse use, a
module that gets no gradient, pinned per stage."""

from __future__ import annotations

import pytest
import torch

from tests.support.deepspeed_cases import (
    BASE, CASES, COMPARE_AT, LR, build, case_config, full_fp32, full_momentum, max_diff, reference, schedule, train,
)
from tests.support.distributed import run_distributed
from tests.support.docs import run_snippet

WORLD = 3
EXACT = ["zero1", "zero2_offload", "zero3_subgroups"]  # stage 2 with optimizer offload


def client_run(names) -> dict:
    from scale_zero.deepspeed_zero import zero_partitions

    results = {}
    for name in names:
        engine, opt = build(case_config(name), plain=True)
        assert not opt._flats, "plain deepspeed.initialize binds nothing"
        train(engine, range(COMPARE_AT))
        results[name] = {
            "params5": full_fp32(engine), "momentum5": full_momentum(engine, opt),
            "bound": sorted(len(opt._flats[part.flat]) for part in zero_partitions(engine)),
            "partitions": sorted(len(part.pieces) for part in zero_partitions(engine)),
        }
    engine, _ = build(case_config("bf16_zero1"), plain=True)
    before = full_fp32(engine)
    train(engine, [0])
    results["bf16_zero1"] = {"initial": before, "step1": full_fp32(engine)}
    engine, _ = build({**BASE, "zero_optimization": {"stage": 2, "round_robin_gradients": True}}, plain=True)
    try:
        train(engine, [0])
    except ValueError as error:
        results["refused"] = str(error)
    results["sparse"] = {stage: sparse_run(stage) for stage in SPARSE_STAGES}
    return results


SPARSE_STAGES, SPARSE_LR, SPARSE_WD = (0, 1, 2, 3), 1e-2, 0.1


def sparse_run(stage: int) -> dict:
    """Two steps of a model whose `spare` module (a weight and a bias) the loss never uses,
    made with docs/integrations.md's plain deepspeed.initialize."""
    import deepspeed
    import torch.distributed as dist
    from torch import nn

    from tests.support.models import narrow_net

    config = {**BASE, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
              "zero_optimization": {"stage": stage}}
    with deepspeed.zero.Init(config_dict_or_path=config, enabled=stage == 3):
        model = narrow_net(0)
        model.spare = nn.Linear(7, 5)
    names = run_snippet("integrations.md", "deepspeed", model=model, config=config)  # the page's plain line
    engine, opt = names["engine"], names["opt"]
    assert (opt.defaults["lr"], opt.defaults["weight_decay"]) == (SPARSE_LR, SPARSE_WD)
    before = {n: p.detach().clone() for n, p in full_fp32(engine).items() if n.startswith("spare")}
    for step in range(2):
        ids = torch.randint(0, 11, (2, 9), generator=torch.Generator().manual_seed(10 * step + dist.get_rank()))
        engine.backward(engine.module.loss(ids))
        engine.step()
    after = {n: p for n, p in full_fp32(engine).items() if n.startswith("spare")}
    assert sorted(after) == ["spare.bias", "spare.weight"]
    return {"before": before, "after": after}


@pytest.fixture(scope="module")
def client():
    return run_distributed(client_run, WORLD, EXACT)


@pytest.mark.parametrize("name", EXACT)
def test_plain_deepspeed_initialize_is_exact(name, client):
    for rank_result in client:
        result = rank_result[name]
        assert result["bound"] == result["partitions"]  # every flat described, piece by piece
    result = client[0][name]
    params, momenta = reference((WORLD,) * COMPARE_AT, CASES[name]["gradient_clipping"])
    assert max_diff(result["params5"], params[-1]) < 1e-5
    assert (result["momentum5"] - momenta[-1]).abs().max().item() < 1e-5


def test_sub_groups_are_bound(client):
    assert len(client[0]["zero3_subgroups"]["bound"]) >= 6


def test_bf16_optimizer_takes_the_normalized_step(client):
    """BF16_Optimizer: every matrix row moved by exactly lr in RMS after the first step."""
    result = client[0]["bf16_zero1"]
    moved = 0
    for name, initial in result["initial"].items():
        if initial.dim() == 2 and "embed_tokens" not in name:
            delta = (initial - result["step1"][name]).pow(2).mean(1).sqrt() / (LR * schedule(0))
            torch.testing.assert_close(delta, torch.ones_like(delta), rtol=1e-4, atol=0, msg=name)
            moved += 1
    assert moved > 5


def test_sparse_use(client):
    """A module the loss never uses. Single-process PyTorch gives its parameters no gradient
    and SCALE leaves them alone. Under DeepSpeed, every stage (0 too: its all-reduce gives a
    missing gradient zeros; ZeRO-1/2/3 a zero range of the flat) hands SCALE a zero
    gradient, which SCALE cannot tell from a real one: they are not moved by the update
    (a zero direction, zero AdamW moments) but ARE decayed, p *= 1 - lr * wd per step;
    and a vector's AdamW step count includes those steps, so a module first used at step
    k starts with the bias correction of step k (docs/integrations.md, "Sparse use")."""
    decay = (1 - SPARSE_LR * SPARSE_WD) ** 2
    for stage, result in client[0]["sparse"].items():
        for name, before in result["before"].items():
            torch.testing.assert_close(result["after"][name], before * decay, rtol=1e-6, atol=0, msg=f"{stage} {name}")


def test_unsupported_configuration_refused_at_first_step(client):
    for rank_result in client:
        assert "round_robin_gradients" in rank_result["refused"]
