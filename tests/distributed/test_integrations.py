"""SCALE where Hugging Face users train (issue 11): the Trainer (`SCALETrainer`) under
DeepSpeed ZeRO-3 and under FSDP2, and `accelerator.prepare(model, SCALE(...), loader)`
with Accelerate's DeepSpeed and FSDP2 plugins, each on 2 gloo ranks with the CPU recipe
of docs/integrations.md (tests/support/hf_cpu.py), against the single-process reference.

Each rank records the micro-batches it trained on; the reference replays them (a step
averages both ranks' micro-batches). Two spawns: one for DeepSpeed, one for FSDP2."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read when deepspeed is imported, here and in the ranks

from tests.support.distributed import run_distributed  # noqa: E402
from tests.support.docs import python_blocks, run_snippet, snippets  # noqa: E402
from tests.support.hf_cpu import CONFIGURED_STATE, cpu_state  # noqa: E402
from tests.support.models import batches, tiny_llama  # noqa: E402
from tests.support.reference import ReferenceSCALE  # noqa: E402

WORLD, MICRO_BATCH, STEPS = 2, 2, 3
LR, ADAM_LR, WEIGHT_DECAY = 1e-2, 5e-3, 0.1
# Several sub-groups, nothing persistent: every role's group is split and every forward gathers.
ZERO3 = {
    "zero_optimization": {"stage": 3, "sub_group_size": 400, "stage3_param_persistence_threshold": 0},
    "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto", "bf16": {"enabled": False},
    "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False,
}


def dataset() -> list[dict]:
    ids = batches(1, WORLD * MICRO_BATCH * STEPS, seed=3)[0]
    return [{"input_ids": row, "labels": row} for row in ids]


def full_params(model) -> dict[str, torch.Tensor]:
    """Every parameter, whole (collectives: all ranks call)."""
    from deepspeed import DeepSpeedEngine
    from torch.distributed.tensor import DTensor

    if isinstance(model, DeepSpeedEngine):
        from deepspeed.utils import safe_get_full_fp32_param

        return {n: safe_get_full_fp32_param(p).clone() for n, p in model.module.named_parameters()}
    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for n, p in model.named_parameters()}


def facts(model, optimizer) -> dict:
    """What trained: the SCALE under the wrappers (Accelerate's, DeepSpeed's), and how the
    engine holds the parameters (ZeRO flats SCALE bound, or FSDP2 DTensors)."""
    from deepspeed import DeepSpeedEngine
    from torch.distributed.tensor import DTensor

    from scale_zero import SCALE

    while not isinstance(optimizer, SCALE) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    if not isinstance(optimizer, SCALE):
        return {"optimizer": type(optimizer).__name__}
    if isinstance(model, DeepSpeedEngine):
        return {"optimizer": "SCALE", "zero": type(model.optimizer).__name__, "flats": len(optimizer._flats)}
    return {"optimizer": "SCALE", "dtensors": all(isinstance(p, DTensor) for p in model.parameters())}


# ---------------------------------------------------------------- in the ranks


def record_inputs(model) -> list[torch.Tensor]:
    """The input_ids of every forward of `model` (under any engine's wrapper), in order."""
    seen = []
    model.register_forward_pre_hook(lambda _m, _args, kwargs: seen.append(kwargs["input_ids"].clone()),
                                    with_kwargs=True)
    return seen


BACKENDS = {"deepspeed": {"deepspeed": ZERO3}, "fsdp": {"fsdp": True, "fsdp_config": {"version": 2}}}


def trainer_runs(tmp, engine: str, hows: tuple[str, ...]) -> dict:
    """docs/integrations.md's Trainer snippets: SCALETrainer building SCALE ("trainer"), then
    taking a built one ("trainer_optimizers"), each on a fresh model, STEPS steps."""
    os.chdir(tmp)  # the snippet's output_dir
    names, results = {"backend": BACKENDS[engine], "train_dataset": dataset()}, {}
    for how in hows:
        cpu_state(engine)  # a fresh state: one Accelerator per DeepSpeed plugin
        model = tiny_llama(0)
        seen = record_inputs(model)
        names = run_snippet("integrations.md", how, **{**names, "model": model})
        trainer = names["trainer"]
        assert trainer.args.max_steps == STEPS and trainer.args.learning_rate == LR
        results[how] = {"seen": seen, "params": full_params(trainer.model_wrapped),
                        **facts(trainer.model_wrapped, trainer.optimizer)}
    return results


def accelerate_run(engine: str) -> dict:
    """docs/integrations.md's Accelerate snippet."""
    from torch.utils.data import DataLoader

    cpu_state(engine)
    model = tiny_llama(0)
    seen = record_inputs(model)
    loader = DataLoader([row["input_ids"] for row in dataset()], batch_size=MICRO_BATCH)
    names = run_snippet("integrations.md", "accelerate", model=model, loader=loader, engine=engine,
                        zero3_config={**ZERO3, "gradient_clipping": 0.0})
    return {"seen": seen, "params": full_params(names["model"]), **facts(names["model"], names["opt"])}


def deepspeed_runs(tmp) -> dict:
    from transformers import Trainer, TrainingArguments

    from scale_zero import SCALE, scale_param_groups
    from scale_zero.integrations.hf import check_trainer

    results = {**trainer_runs(tmp, "deepspeed", ("trainer", "trainer_optimizers")),
               "accelerate": accelerate_run("deepspeed")}
    # The plain Trainer would drop this SCALE and train AdamW: check_trainer says so.
    cpu_state("deepspeed")
    model = tiny_llama(0)
    args = TrainingArguments(output_dir=str(tmp), deepspeed=ZERO3, report_to=[], accelerator_config=CONFIGURED_STATE)
    plain = Trainer(model=model, args=args, optimizers=(SCALE(scale_param_groups(model), lr=LR), None))
    try:
        check_trainer(plain)
    except ValueError as error:
        results["dropped"] = str(error)
    return results


def fsdp_runs(tmp) -> dict:
    return {**trainer_runs(tmp, "fsdp", ("trainer",)), "accelerate": accelerate_run("fsdp")}


# ---------------------------------------------------------------- in pytest


def reference(seen: list[list[torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Single-process SCALE on what the ranks trained on: step t averages every rank's t-th batch."""
    from scale_zero import scale_param_groups

    model = tiny_llama(0)
    roles = [(p, g["role"]) for g in scale_param_groups(model) for p in g["params"]]
    ref = ReferenceSCALE(roles, lr=LR, adam_lr=ADAM_LR, weight_decay=WEIGHT_DECAY)
    for step_batches in zip(*seen, strict=True):
        model.zero_grad()
        for ids in step_batches:
            (model(input_ids=ids, labels=ids).loss / len(step_batches)).backward()
        ref.step()
    return {n: p.detach() for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def deepspeed(tmp_path_factory):
    return run_distributed(deepspeed_runs, WORLD, tmp_path_factory.mktemp("hf_deepspeed"))


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory):
    return run_distributed(fsdp_runs, WORLD, tmp_path_factory.mktemp("hf_fsdp"))


def assert_matches_reference(results: list[dict], run: str) -> None:
    seen = [rank_result[run]["seen"] for rank_result in results]
    assert all(len(s) == STEPS for s in seen)
    assert not torch.equal(seen[0][0], seen[1][0]), "each rank trains on its own batches"
    expected = reference(seen)
    params = results[0][run]["params"]
    assert params.keys() == expected.keys()
    assert max((params[n] - expected[n]).abs().max().item() for n in params) < 1e-5


@pytest.mark.parametrize("run", ["trainer", "trainer_optimizers", "accelerate"])
def test_deepspeed_zero3(run, deepspeed):
    """optimizers=(SCALE, None) under deepspeed=: SCALETrainer trains the SCALE given, exactly."""
    result = deepspeed[0][run]
    assert result["optimizer"] == "SCALE" and result["zero"] == "DeepSpeedZeroOptimizer_Stage3"
    assert result["flats"] >= 6  # sub-groups, each bound at SCALE's first step
    assert_matches_reference(deepspeed, run)


@pytest.mark.parametrize("run", ["trainer", "accelerate"])
def test_fsdp2(run, fsdp):
    assert fsdp[0][run]["optimizer"] == "SCALE" and fsdp[0][run]["dtensors"]
    assert_matches_reference(fsdp, run)


def test_every_snippet_is_run():
    """Each python block of docs/integrations.md is a marked snippet, run by a test here or in
    test_deepspeed_client.py ("deepspeed")."""
    assert python_blocks("integrations.md") == len(snippets("integrations.md"))
    assert set(snippets("integrations.md")) == {"deepspeed", "trainer", "trainer_optimizers", "accelerate", "cpu"}


def test_plain_trainer_dropping_scale_is_refused(deepspeed):
    message = deepspeed[0]["dropped"]
    assert "drops" in message and "SCALETrainer" in message
