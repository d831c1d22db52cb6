"""Master-free bf16 under DeepSpeed ZeRO (configs/zero3_scale_bf16.json and
configs/zero2_scale_bf16.json), on real gloo processes and DeepSpeed's CPU accelerator.

A tiny LLaMA with odd sizes (parameters straddle rank boundaries) trains 6 steps of 2
micro-batches under a schedule, with bf16 weights, masters, gradients and SCALE state (and
FSDP2 through the trainer's engine with --master-weights bf16). Each rank records, for
every SCALE call, the gradient and the parameter values of its pieces before and after the
update; pytest reassembles the full tensors and replays the same gradients through a
single-process master-free SCALE:

- every vector (AdamW, elementwise) and every element whose RMS the partition did not cut
  is bitwise equal; where rows (or the embedding's columns) are split, the RMS is summed
  from partial sums in another order, a difference of about one fp32 ulp of the update,
  which flips a stochastic rounding with probability ~|difference| / bf16 spacing: the
  bound asserted is one element in 10^4, by at most 4 bf16 ulps (measured: 0 of 149256
  elements differ on 2 ranks, 1 on 3);
- a DeepSpeed checkpoint at step 3 plus 3 steps in a fresh engine is bitwise equal to 6
  steps straight (stochastic rounding draws from the step count in SCALE's state).
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read when deepspeed is imported, here and in the ranks

from tests.support.distributed import run_distributed  # noqa: E402
from tests.support.models import batches, tiny_llama_config  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
LR, ADAM_LR, MOMENTUM, WEIGHT_DECAY = 1e-2, 3e-3, 0.9, 0.1
ACCUMULATION, STEPS, SAVE_AT = 2, 6, 3
SEQ = 17
NAMES = {"zero3": "zero3_scale_bf16.json", "zero2": "zero2_scale_bf16.json"}


def config(name: str) -> dict:
    ds = json.loads((CONFIGS / NAMES[name]).read_text())
    ds.update(train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=ACCUMULATION, steps_per_print=10**6)
    ds.pop("train_batch_size", None)
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    return ds


def rank_batch(step: int, micro: int, rank: int) -> torch.Tensor:
    return batches(1, 2, seq_len=SEQ, seed=1000 * step + 10 * micro + rank)[0]


# ---------------------------------------------------------------- in the ranks


def build(name: str):
    import deepspeed
    from transformers import LlamaForCausalLM

    from scale_zero import SCALE, initialize, scale_param_groups

    ds = config(name)
    torch.manual_seed(0)  # whatever the weights, the ranks record them and the replay starts from them
    with deepspeed.zero.Init(config_dict_or_path=ds, enabled=ds["zero_optimization"]["stage"] == 3):
        model = LlamaForCausalLM(tiny_llama_config())
    opt = SCALE(scale_param_groups(model), lr=LR, momentum=MOMENTUM, adam_lr=ADAM_LR, weight_decay=WEIGHT_DECAY)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 - 0.1 * step)
    engine, *_ = initialize(model=model, optimizer=opt, lr_scheduler=scheduler, config=ds)
    return engine, opt


def record(engine, opt) -> list:
    """Per SCALE call: for each piece of each flat it steps, (name, role, shape, start, end,
    lr, gradient, values before, values after) of this rank's elements."""
    from scale_zero.deepspeed_zero import zero_partitions

    partitions = {id(part.flat): part for part in zero_partitions(engine)}
    calls, pending = [], []

    def pieces():
        for group in opt.param_groups:
            for flat in group["params"]:
                part = partitions[id(flat)]
                for pc in part.pieces:
                    yield group["lr"], flat, part.role, pc

    def before(*_):
        pending[:] = [(lr, flat, role, pc, flat.grad[pc.offset : pc.offset + pc.numel].clone(),
                       flat.detach()[pc.offset : pc.offset + pc.numel].clone()) for lr, flat, role, pc in pieces()]

    def after(*_):
        calls.append([
            (pc.name, role, pc.shape, pc.start, pc.end, lr, grad, old, flat.detach()[pc.offset : pc.offset + pc.numel].clone())
            for lr, flat, role, pc, grad, old in pending
        ])

    opt.register_step_pre_hook(before)
    opt.register_step_post_hook(after)
    return calls


def train(engine, steps) -> None:
    rank = torch.distributed.get_rank()
    for step, micro in itertools.product(steps, range(ACCUMULATION)):  # DeepSpeed steps at the last micro-batch
        ids = rank_batch(step, micro, rank)
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()


def flats_and_state(engine, opt) -> list:
    from scale_zero.deepspeed_zero import zero_partitions

    out = []
    for part in zero_partitions(engine):
        state = {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[part.flat].items()}
        out.append((part.flat.detach().clone(), state))
    return out


def ranks_run(names, root, resume: bool) -> dict:
    from scale_zero.deepspeed_zero import zero_partitions

    results = {}
    for name in names:
        engine, opt = build(name)
        calls = record(engine, opt)
        dtypes = sorted({str(part.flat.dtype) for part in zero_partitions(engine)})
        train(engine, range(SAVE_AT))
        if resume:
            engine.save_checkpoint(str(root / name), tag="mid")
        train(engine, range(SAVE_AT, STEPS))
        result = {"calls": calls, "flat_dtypes": dtypes, "final": flats_and_state(engine, opt),
                  "state_dtypes": sorted({str(v.dtype) for s in opt.state.values() for v in s.values() if torch.is_tensor(v)})}
        if resume:
            engine, opt = build(name)
            engine.load_checkpoint(str(root / name), tag="mid")
            train(engine, range(SAVE_AT, STEPS))
            result["resumed"] = flats_and_state(engine, opt)
        results[name] = result
    return results


def fsdp_run() -> dict:
    """The trainer's FSDP2 engine with --master-weights bf16: the same records, gathered."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from scale_zero_train.config import parse_args, resolve
    from scale_zero_train.engines import FSDPEngine

    args = parse_args(["--backend", "fsdp", "--master-weights", "bf16", "--global-batch-size", "4",
                       "--micro-batch-size", "1", "--seq-len", str(SEQ), "--steps", str(STEPS),
                       "--lr", str(LR), "--adam-lr", str(ADAM_LR), "--weight-decay", str(WEIGHT_DECAY)])
    engine = FSDPEngine(resolve(args, {}, tiny_llama_config(), dist.get_world_size()), torch.device("cpu"))
    opt, model = engine.optimizer, engine.model
    role = {id(p): (g["role"], g) for g in opt.param_groups for p in g["params"]}
    calls, pending, stored = [], {}, set()

    def full(t):
        return t.full_tensor().reshape(-1) if isinstance(t, DTensor) else t.reshape(-1)

    def before(*_):
        stored.update(str(t.to_local().dtype) for p in model.parameters() for t in (p, p.grad))
        pending.update({n: (full(p.grad), full(p.detach())) for n, p in model.named_parameters()})

    def after(*_):
        calls.append([(n, role[id(p)][0], tuple(p.shape), 0, p.numel(), role[id(p)][1]["lr"], *pending[n],
                       full(p.detach())) for n, p in model.named_parameters()])

    opt.register_step_pre_hook(before)
    opt.register_step_post_hook(after)
    for step in range(STEPS):
        engine.train_step([rank_batch(step, micro, dist.get_rank()) for micro in range(2)])
    stored |= {str(v.dtype) for state in opt.state.values() for v in state.values() if torch.is_tensor(v)}
    return {"fsdp": {"calls": calls, "stored": sorted(stored)}}


# ---------------------------------------------------------------- in pytest


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    return run_distributed(ranks_run, 2, list(NAMES), tmp_path_factory.mktemp("master_free"), True)


@pytest.fixture(scope="module")
def world3(tmp_path_factory):
    return run_distributed(ranks_run, 3, ["zero3"], tmp_path_factory.mktemp("master_free3"), False)


@pytest.fixture(scope="module")
def fsdp2():
    return run_distributed(fsdp_run, 2)


def assemble(ranks: list, name: str):
    """Per optimizer step: {param: (role, shape, lr, grad, before, after)} of the full tensors."""
    steps = []
    n_calls = len(ranks[0][name]["calls"])
    per_step = n_calls // STEPS
    for s in range(STEPS):
        full = {}
        for rank in ranks:
            for call in rank[name]["calls"][s * per_step : (s + 1) * per_step]:
                for pname, role, shape, start, end, lr, grad, old, new in call:
                    numel = torch.Size(shape).numel()
                    entry = full.setdefault(pname, (role, shape, lr, *(torch.zeros(numel, dtype=torch.bfloat16) for _ in range(3))))
                    for buf, values in zip(entry[3:], (grad, old, new)):
                        buf[start:end] = values
        steps.append(full)
    return steps


def replay(steps):
    """Single-process master-free SCALE on the recorded gradients, from the recorded start."""
    from scale_zero import SCALE

    start = steps[0]
    params = {n: torch.nn.Parameter(old.reshape(shape).clone()) for n, (_, shape, _, _, old, _) in start.items()}
    roles = {}
    for n, (role, *_rest) in start.items():
        roles.setdefault(role, []).append(params[n])
    opt = SCALE([{"params": ps, "role": r} for r, ps in roles.items()], lr=LR, momentum=MOMENTUM,
                adam_lr=ADAM_LR, weight_decay=WEIGHT_DECAY, state_dtype=torch.bfloat16)
    name_of = {id(p): n for n, p in params.items()}
    results = []
    for full in steps:
        for n, (role, shape, lr, grad, _, _) in full.items():
            params[n].grad = grad.reshape(shape).clone()
        for group in opt.param_groups:
            group["lr"] = full[name_of[id(group["params"][0])]][2]  # as the engine's schedule set it
        opt.step()
        results.append({n: p.detach().reshape(-1).clone() for n, p in params.items()})
    return results


def compare(ranks, name):
    steps = assemble(ranks, name)
    replayed = replay(steps)
    differing = total = 0
    for s, (full, mine) in enumerate(zip(steps, replayed)):
        for n, (role, shape, _, _, old, new) in full.items():
            diff = new.float() != mine[n].float()
            if role == "vector":
                assert not diff.any(), (name, s, n)
            differing += diff.sum().item()
            total += diff.numel()
            if diff.any():
                ulps = (new.view(torch.int16).int() - mine[n].view(torch.int16).int()).abs()
                assert ulps[diff].max() <= 4, (name, s, n)
    return differing, total


@pytest.mark.parametrize("name", list(NAMES))
def test_master_free_world2_matches_one_process(name, world2):
    result = world2[0][name]
    assert result["flat_dtypes"] == ["torch.bfloat16"]  # DeepSpeed's bf16 masters: SCALE steps bf16 flats
    assert result["state_dtypes"] == ["torch.bfloat16"]  # SCALE's own state follows them
    differing, total = compare(world2, name)
    assert differing <= 1e-4 * total, (differing, total)


def test_master_free_world3_matches_one_process(world3):
    differing, total = compare(world3, "zero3")
    assert differing <= 1e-4 * total, (differing, total)


@pytest.mark.parametrize("name", list(NAMES))
def test_master_free_resume_is_bitwise(name, world2):
    for rank in world2:
        for (flat, state), (flat2, state2) in zip(rank[name]["final"], rank[name]["resumed"], strict=True):
            assert flat.dtype == torch.bfloat16 and torch.equal(flat, flat2)
            assert state.keys() == state2.keys()
            for key, value in state.items():
                assert torch.equal(value, state2[key]) if torch.is_tensor(value) else value == state2[key], key


def test_fsdp2_master_free_matches_one_process(fsdp2):
    """FSDP2 with bf16-stored shards: parameters, gradients and SCALE's state are all bf16
    (no fp32 copy anywhere), and the steps match one process (whole rows are local; the
    embedding's columns and the vectors' offsets cross ranks)."""
    assert fsdp2[0]["fsdp"]["stored"] == ["torch.bfloat16"]
    differing, total = compare(fsdp2[:1], "fsdp")
    assert differing <= 1e-4 * total, (differing, total)
