"""SCALE under DeepSpeed ZeRO (issue 4), on real gloo processes and DeepSpeed's CPU accelerator.

A tiny LLaMA (odd sizes, so parameters straddle rank boundaries; built under
`deepspeed.zero.Init` for ZeRO-3) trains 6 optimizer steps of 2 micro-batches each, under
a learning-rate schedule. Spawning costs more than training here, so each spawn runs every
configuration in sequence and the tests below check its results:

- world 2: all configurations; gathered fp32 parameters and output momentum after step 5
  against the single-process `ReferenceSCALE`; save (DeepSpeed checkpoint and
  `export_state`) at step 3;
- world 2, fresh processes: `load_checkpoint` + 3 steps, and `import_state` + 3 steps,
  both bitwise equal to 6 uninterrupted steps;
- world 3: the same 5-step comparison, and `import_state` of the world-2 export + 3 steps
  against the reference (steps 1-3 on 2 ranks' data, 4-6 on 3 ranks');
- world 2: the shipped configs/*.json each take a step; refusals.

SCALE given to plain `deepspeed.initialize` (binding itself at its first step) is
tests/distributed/test_deepspeed_client.py.
"""

from __future__ import annotations

import functools
import math
import json
import os

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read when deepspeed is imported, here and in the ranks

from tests.support.deepspeed_cases import (  # noqa: E402
    ACCUMULATION, ADAM_LR, BASE, CASES, COMPARE_AT, CONFIGS, FP32, LR, SAVE_AT, STEPS, ZERO, batch, build,
    case_config, full_fp32, full_momentum, llama_config, max_diff, reference, schedule, train,
)
from tests.support.distributed import run_distributed  # noqa: E402


def state_bytes(opt, partitions) -> dict:
    """This rank's SCALE state bytes, and those held for matrix / embedding partitions."""
    roles = {id(part.flat): part.role for part in partitions}
    total = normalized_only = 0
    for key, state in opt.state.items():
        size = sum(t.numel() * t.element_size() for t in state.values() if torch.is_tensor(t))
        total += size
        if roles.get(id(key)) in ("matrix", "embedding"):
            normalized_only += size
    return {"total": total, "matrix_embedding": normalized_only}


def first_run(names, root) -> dict:
    """World 2: 6 steps per configuration, saving at step 3."""
    from scale_zero.deepspeed_zero import zero_partitions
    from scale_zero.resharding import export_state

    results = {}
    for name in names:
        engine, opt = build(case_config(name))
        model = engine.module
        calls = []
        opt.register_step_pre_hook(lambda *_: calls.append(engine.micro_steps))
        partitions = zero_partitions(engine)
        result = {
            "ndims": sorted({p.ndim for p in model.parameters()}),
            "partitions": [(part.role, [(pc.name, pc.shape, pc.start, pc.end) for pc in part.pieces]) for part in partitions],
            "initial": full_fp32(engine),
        }
        train(engine, [0])
        result["step1"] = full_fp32(engine)
        train(engine, range(1, SAVE_AT))
        engine.save_checkpoint(str(root / name), tag=f"step{SAVE_AT}")
        if partitions:
            export_state(engine, root / name / "export", client_state={"case": name})
        train(engine, range(SAVE_AT, COMPARE_AT))
        result["params5"] = full_fp32(engine)
        result["momentum5"] = full_momentum(engine, opt)
        train(engine, range(COMPARE_AT, STEPS))
        result.update(
            params6=full_fp32(engine), momentum6=full_momentum(engine, opt), step_calls=calls,
            comm=(opt.comm_stats.collectives, opt.comm_stats.bytes), state_bytes=state_bytes(opt, partitions),
            zero_optimizer=type(engine.optimizer).__name__,
        )
        results[name] = result
    return results


def resumed_run(names, root) -> dict:
    """World 2, fresh processes: DeepSpeed checkpoint + 3 steps; export_state + 3 steps."""
    from scale_zero.resharding import import_state

    results = {}
    for name in names:
        engine, opt = build(case_config(name))
        engine.load_checkpoint(str(root / name), tag=f"step{SAVE_AT}")
        assert engine.global_steps == SAVE_AT
        train(engine, range(SAVE_AT, STEPS))
        result = {"checkpoint": (full_fp32(engine), full_momentum(engine, opt))}
        if name in ZERO:
            engine, opt = build(case_config(name))
            client_state = import_state(engine, root / name / "export")
            assert client_state == {"case": name} and engine.global_steps == SAVE_AT
            train(engine, range(SAVE_AT, STEPS))
            result["import"] = (full_fp32(engine), full_momentum(engine, opt))
        results[name] = result
    return results


def world3_run(names, reshard, root) -> dict:
    """World 3: 5 steps per configuration; resume the world-2 exports."""
    from scale_zero.resharding import import_state

    results = {}
    for name in names:
        engine, opt = build(case_config(name))
        train(engine, range(COMPARE_AT))
        results[name] = {"params5": full_fp32(engine), "momentum5": full_momentum(engine, opt)}
    for saved, target in reshard:
        engine, opt = build(case_config(target))
        import_state(engine, root / saved / "export")
        train(engine, range(SAVE_AT, STEPS))
        results[(saved, target)] = {"params6": full_fp32(engine), "momentum6": full_momentum(engine, opt)}
    return results


def misc_run(root) -> dict:
    """World 2: shipped configs take a step; refusals; bad exports."""
    import deepspeed
    import torch.distributed as dist
    from transformers import LlamaForCausalLM

    from scale_zero import SCALE, initialize, scale_param_groups
    from scale_zero.resharding import export_state, import_state

    results = {"configs": {}, "refused": {}, "export": {}}
    for path in sorted(CONFIGS.glob("*.json")):
        config = json.loads(path.read_text())
        with deepspeed.zero.Init(config_dict_or_path=config, enabled=config["zero_optimization"]["stage"] == 3):
            model = LlamaForCausalLM(llama_config())
        if "optimizer" in config:  # the AdamW baseline: DeepSpeed builds its optimizer
            engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
        else:
            opt = SCALE(scale_param_groups(model), lr=LR, adam_lr=ADAM_LR)
            engine, *_ = initialize(model=model, optimizer=opt, config=config)
        before = full_fp32(engine)
        losses = []
        for micro in range(engine.gradient_accumulation_steps()):
            ids = batch(0, micro, engine.global_rank)
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        after = full_fp32(engine)
        results["configs"][path.name] = {
            "losses": losses, "global_steps": engine.global_steps,
            "changed": all(not torch.equal(before[n], after[n]) for n in before),
            "bf16": engine.bfloat16_enabled(), "optimizer": type(engine.optimizer).__name__,
        }

    refused = {
        "round_robin": {"zero_optimization": {"stage": 2, "round_robin_gradients": True}},
        "elastic": {"zero_optimization": {"stage": 1, "elastic_checkpoint": True}},
        "hpz": {"zero_optimization": {"stage": 3, "zero_hpz_partition_size": 2}},
    }
    for name, extra in refused.items():
        try:
            build({**BASE, **extra})
        except ValueError as error:
            results["refused"][name] = str(error)

    engine, _ = build(case_config("zero2"))
    export = root / "misc_export"
    if dist.get_rank() == 0:  # the leftover of an export that crashed midway
        (export.parent / (export.name + ".tmp")).mkdir()
        (export.parent / (export.name + ".tmp") / "rank00000.pt").write_text("partial")
    dist.barrier()
    export_state(engine, export)
    results["export"]["files"] = sorted(p.name for p in export.iterdir())
    results["export"]["tmp_left"] = (export.parent / (export.name + ".tmp")).exists()
    for attempt, call in {
        "again": lambda: export_state(engine, export),
        "missing": lambda: import_state(engine, root / "no_such_export"),
        "no_zero": lambda: import_state(build(case_config("zero0"))[0], export),
    }.items():
        try:
            call()
        except (OSError, ValueError) as error:
            results["export"][attempt] = f"{type(error).__name__}: {error}"
    return results


# ---------------------------------------------------------------- in pytest


@functools.lru_cache(maxsize=None)
def roles_by_name() -> dict[str, str]:
    from transformers import LlamaForCausalLM

    from scale_zero import scale_param_groups

    model = LlamaForCausalLM(llama_config())
    names = {p: n for n, p in model.named_parameters()}
    return {names[p]: g["role"] for g in scale_param_groups(model) for p in g["params"]}


def single_process_state_bytes() -> int:
    """SCALE's state after one step of the tiny model on one process, without DeepSpeed."""
    from transformers import LlamaForCausalLM

    from scale_zero import SCALE, scale_param_groups

    model = LlamaForCausalLM(llama_config())
    opt = SCALE(scale_param_groups(model), lr=LR)
    ids = batch(0, 0, 0)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("deepspeed")


@pytest.fixture(scope="module")
def world2(root):
    return run_distributed(first_run, 2, list(CASES), root)


@pytest.fixture(scope="module")
def world2_resumed(root, world2):
    return run_distributed(resumed_run, 2, list(CASES), root)


RESHARD = [(name, name) for name in ZERO if name in FP32] + [("zero2", "zero3_subgroups"), ("zero3", "zero1")]


@pytest.fixture(scope="module")
def world3(root, world2):
    return run_distributed(world3_run, 3, FP32, RESHARD, root)


@pytest.fixture(scope="module")
def misc(root):
    return run_distributed(misc_run, 2, root)


@pytest.mark.parametrize("name", FP32)
@pytest.mark.parametrize("world", [2, 3])
def test_matches_reference(name, world, world2, world3):
    result = (world2 if world == 2 else world3)[0][name]
    params, momenta = reference((world,) * COMPARE_AT, CASES[name]["gradient_clipping"])
    assert max_diff(result["params5"], params[-1]) < 1e-5
    assert (result["momentum5"] - momenta[-1]).abs().max().item() < 1e-5


@pytest.mark.parametrize("name", list(CASES))
def test_every_update_is_normalized(name, world2):
    """#8461 (a bf16 path applied no matrix step): after step 1 every matrix / output row
    and every embedding column moved by exactly lr in RMS, in bf16 as in fp32."""
    result = world2[0][name]
    lr = LR * schedule(0)
    for param, role in roles_by_name().items():
        delta = result["initial"][param] - result["step1"][param]
        if role == "vector":  # AdamW's first step moves each element by about adam_lr
            assert 0 < delta.abs().max().item() <= ADAM_LR * 1.001
            continue
        dim = 0 if role == "embedding" else 1
        rms = delta.reshape(delta.shape[0], -1).pow(2).mean(dim).sqrt()
        torch.testing.assert_close(rms / lr, torch.ones_like(rms), rtol=1e-4, atol=0, msg=f"{name} {param}")


def cut_pieces(role: str, ranks_pieces: list) -> list[tuple]:
    """The pieces (name, shape) whose row (dim 1) or column (embedding, dim 0) reduction the
    ranks' ranges cut: a boundary inside a row, or any boundary inside the parameter."""
    cut = []
    for pieces in zip(*ranks_pieces, strict=True):  # one parameter, every rank's range
        name, shape = pieces[0][:2]
        cols = math.prod(shape[1:])
        inside = {b for *_, start, end in pieces if end > start for b in (start, end) if 0 < b < shape[0] * cols}
        if inside if role == "embedding" else any(b % cols for b in inside):
            cut.append((name, shape))
    return cut


@pytest.mark.parametrize("name", ZERO)
def test_one_update_per_optimizer_step(name, world2):
    """#8443/#8600 (momentum advanced per micro-batch): SCALE runs once per partition per
    optimizer step, never on a micro-batch that is not an accumulation boundary, and
    `comm_stats` covers all of one engine step's calls: one all_reduce per partition whose
    ranges cut a row (or, for the embedding, its columns), carrying only those pieces' sums."""
    partitions = [rank_result[name]["partitions"] for rank_result in world2]
    cut = [(role, cut_pieces(role, [ranks[k][1] for ranks in partitions]))
           for k, (role, _) in enumerate(partitions[0]) if role != "vector"]
    for rank_result in world2:
        result = rank_result[name]
        calls = result["step_calls"]
        # ZeRO-1/2/3 call SCALE once per partition, BF16_Optimizer once for all of them
        once = result["zero_optimizer"] == "BF16_Optimizer"
        assert len(calls) == STEPS * (1 if once else len(partitions[0]))
        assert all((micro + 1) % ACCUMULATION == 0 for micro in calls)
        needed = [bool(pieces) for _, pieces in cut]
        collectives = int(any(needed)) if once else sum(needed)
        rows_cols = sum(shape[1] if role == "embedding" else shape[0] for role, pieces in cut for _, shape in pieces)
        assert result["comm"] == (collectives, 8 * rows_cols)  # fp64 sums of squares
    # The tiny LLaMA has both: whole rows on each rank (no collective) and cut ones.
    normalized = sum(len(pieces) for role, pieces in partitions[0] if role != "vector")
    assert 0 < sum(len(pieces) for _, pieces in cut) < normalized


def test_zero3_sub_groups(world2):
    roles = [role for role, _ in world2[0]["zero3_subgroups"]["partitions"]]
    assert roles.count("matrix") >= 3


@pytest.mark.parametrize("name", [n for n in ZERO if "zero3" in n])
def test_zero_init_params_look_1d(name, world2):
    """#8438 (zero.Init params report ndim 1, the matrix step became SGD): they do look
    1-D here, and still get their roles and 2-D layouts from ds_shape (the step's
    exactness is test_matches_reference)."""
    result = world2[0][name]
    assert result["ndims"] == [1]
    roles = roles_by_name()
    for role, pieces in result["partitions"]:
        for param, shape, *_ in pieces:
            assert roles[param] == role
            assert len(shape) == (1 if role == "vector" else 2)


@pytest.mark.parametrize("name", ZERO)
def test_state_only_for_owned_ranges(name, world2):
    """Per rank at world 2 at most 55% of single-process SCALE's state; none for matrix
    or embedding partitions."""
    single = single_process_state_bytes()
    for rank_result in world2:
        state = rank_result[name]["state_bytes"]
        assert state["matrix_embedding"] == 0
        assert 0 < state["total"] <= 0.55 * single, (state, single)


def assert_resumed_bitwise(resumed, straight):
    params, momentum = resumed
    assert all(torch.equal(params[n], straight["params6"][n]) for n in params)
    assert torch.equal(momentum, straight["momentum6"])


@pytest.mark.parametrize("name", list(CASES))
def test_checkpoint_resume_is_bitwise(name, world2, world2_resumed):
    assert_resumed_bitwise(world2_resumed[0][name]["checkpoint"], world2[0][name])


@pytest.mark.parametrize("name", ZERO)
def test_export_import_same_world_is_bitwise(name, world2, world2_resumed):
    assert_resumed_bitwise(world2_resumed[0][name]["import"], world2[0][name])


@pytest.mark.parametrize("saved,target", RESHARD)
def test_resume_on_three_ranks(saved, target, world3):
    """Export at step 3 on 2 ranks, import on 3 (also into another stage / sub-group
    layout), 3 more steps: the reference trained on 2 ranks' data then 3 ranks'."""
    result = world3[0][(saved, target)]
    clip = CASES[saved]["gradient_clipping"]
    assert clip == CASES[target]["gradient_clipping"], "resume under the same clipping"
    params, momenta = reference((2,) * SAVE_AT + (3,) * (STEPS - SAVE_AT), clip)
    assert max_diff(result["params6"], params[-1]) < 1e-5
    assert (result["momentum6"] - momenta[-1]).abs().max().item() < 1e-5


def test_shipped_configs_load_and_step(misc):
    configs = misc[0]["configs"]
    assert sorted(configs) == sorted(p.name for p in CONFIGS.glob("*.json"))
    assert {"zero1_scale.json", "zero2_scale.json", "zero3_scale.json", "zero3_offload_scale.json",
            "zero3_adamw.json"} <= set(configs)
    for name, result in configs.items():
        assert result["global_steps"] == 1 and result["changed"] and result["bf16"], name
        assert all(torch.isfinite(torch.tensor(result["losses"]))), name
        raw = json.loads((CONFIGS / name).read_text())
        assert {"gradient_clipping", "bf16", "data_types"} <= raw.keys(), name
        assert "grad_accum_dtype" in raw["data_types"], name
    assert configs["zero1_scale.json"]["optimizer"] == "BF16_Optimizer"


def test_unsupported_combinations_are_refused(misc):
    refused = misc[0]["refused"]
    assert "round_robin_gradients" in refused["round_robin"]
    assert "elastic_checkpoint" in refused["elastic"]
    assert "hpZ" in refused["hpz"]


def test_export_is_atomic_and_never_overwrites(misc):
    export = misc[0]["export"]
    assert export["files"] == ["meta.pt", "rank00000.pt", "rank00001.pt"] and not export["tmp_left"]
    assert export["again"].startswith("FileExistsError") and "never overwritten" in export["again"]
    assert export["missing"].startswith("FileNotFoundError") and "no meta.pt" in export["missing"]
    assert export["no_zero"].startswith("ValueError") and "ZeRO stage 1, 2 or 3" in export["no_zero"]


def measure_run(names) -> dict:
    """Per rank after one step: SCALE's state bytes and the all_reduces of that step."""
    from scale_zero.deepspeed_zero import zero_partitions

    measured = {}
    for name in names:
        engine, opt = build(case_config(name))
        train(engine, [0])
        measured[name] = (state_bytes(opt, zero_partitions(engine))["total"], opt.comm_stats.collectives, opt.comm_stats.bytes)
    return measured


if __name__ == "__main__":  # the numbers in docs/deepspeed.md
    print(f"single process, no DeepSpeed: {single_process_state_bytes()} B of SCALE state")
    for world in (1, 2, 3):
        for name, (size, collectives, sent) in run_distributed(measure_run, world, ["zero1", "zero2", "zero3", "zero3_subgroups", "bf16_zero1"])[0].items():
            print(f"world {world} {name:16s} state {size:6d} B/rank  {collectives:2d} all_reduce, {sent} B")
