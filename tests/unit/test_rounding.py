"""Master-free bf16 on one process: stochastic rounding (scale_zero/rounding.py) is unbiased
and reproducible, small updates survive in every role where round-to-nearest loses them,
and the chunked bf16 step does not depend on how the storage is partitioned or chunked."""

import io

import pytest
import torch
from torch import nn

from scale_zero import SCALE, ShardLayout, scale_param_groups
from scale_zero import scale as scale_module
from scale_zero.rounding import round_into_, stream_key
from tests.support.models import batches, tiny_llama

LR, STEPS = 1e-3, 100


def bf16_neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For x >= 0: the bf16 value at or below x (truncation) and the one above it (x itself
    when x is a bf16 value)."""
    down = (x.view(torch.int32) & -(1 << 16)).view(torch.float32)
    up = (down.view(torch.int32) + (1 << 16)).view(torch.float32)
    return down, torch.where(down == x, down, up)


def test_rounding_is_unbiased_and_lands_on_a_neighbour():
    x = (torch.rand(1 << 16, dtype=torch.float64) * 4 - 2).float()
    down, up = bf16_neighbours(x.abs())
    down, up = down * x.sign(), up * x.sign()
    trials = []
    for step in range(64):
        out = torch.empty(x.shape, dtype=torch.bfloat16)
        round_into_(out, x, stream_key(0, step, (1, x.numel(), 0)), torch.arange(x.numel()))
        out = out.float()
        assert ((out == down) | (out == up)).all()
        trials.append(out.double())
    mean = torch.stack(trials).mean(0)
    spacing = (up - down).abs().double().clamp_min(1e-30)
    # Each element: 64 Bernoulli draws, so its mean is within a few 1/16 spacings; on
    # average over 65536 elements the bias is far smaller.
    bias = ((mean - x.double()) / spacing)
    assert bias.abs().max() < 0.5
    assert bias.mean().abs() < 2e-3


def test_rounding_bits_depend_on_step_element_and_stored_value_only():
    x = torch.full((4096,), 1.0 + 2**-9)  # a quarter of the way from 1 to the next bf16 (2**-7)
    index = torch.arange(x.numel())

    def rounded(step, old, idx=index):
        out = torch.full(x.shape, old, dtype=torch.bfloat16)
        round_into_(out, x, stream_key(7, step, (64, 64, 0)), idx)
        return out

    assert torch.equal(rounded(3, 1.0), rounded(3, 1.0))  # no generator state: reproducible
    assert not torch.equal(rounded(3, 1.0), rounded(4, 1.0))  # a new draw every step
    assert not torch.equal(rounded(3, 1.0), rounded(3, 2.0))  # and for another stored value
    up = (rounded(3, 1.0).float() > 1).float().mean()
    assert 0.2 < up < 0.3
    # A piece of the tensor (another rank's) draws what the whole tensor draws there.
    out = torch.ones(1000, dtype=torch.bfloat16)
    round_into_(out, x[3000:4000], stream_key(7, 3, (64, 64, 0)), index[3000:4000])
    assert torch.equal(out, rounded(3, 1.0)[3000:4000])


def role_params(dtype=torch.bfloat16):
    """One parameter of each role at 1.0, with constant gradients that make every update
    exactly lr: g / rms(g) = 1 for the normalized roles, m_hat / sqrt(v_hat) = 1 for AdamW."""
    shapes = {"matrix": (32, 48), "embedding": (40, 24), "output": (24, 32), "vector": (2000,)}
    return {role: nn.Parameter(torch.ones(shape, dtype=dtype)) for role, shape in shapes.items()}


def constant_gradient_run(stochastic_rounding: bool, state_dtype=None):
    params = role_params()
    opt = SCALE([{"params": [p], "role": r} for r, p in params.items()], lr=LR, adam_lr=LR, eps=1e-30,
                stochastic_rounding=stochastic_rounding, state_dtype=state_dtype)
    for _ in range(STEPS):
        for p in params.values():
            p.grad = torch.full_like(p, 0.5)
        opt.step()
    return params


@pytest.mark.parametrize("state_dtype", [None, torch.bfloat16])
def test_constant_gradient_every_role_lands_on_0_9_with_stochastic_rounding(state_dtype):
    """100 steps of lr 1e-3 from 1.0 (below half of bf16's spacing at 1.0): stochastic
    rounding lands on 0.9 on average in every role, bf16 moments included; round-to-nearest
    never leaves 1.0."""
    for role, p in constant_gradient_run(True, state_dtype).items():
        assert p.dtype == torch.bfloat16
        assert abs(p.float().mean().item() - (1 - STEPS * LR)) < 0.005, role
    for role, p in constant_gradient_run(False, state_dtype).items():
        assert torch.equal(p, torch.ones_like(p)), role


def test_state_dtype_follows_a_bound_flat_or_the_argument():
    flat = nn.Parameter(torch.ones(12, dtype=torch.bfloat16))
    opt = SCALE([{"params": [flat], "role": "output"}], lr=LR)
    opt.bind_flat(flat, [(0, ShardLayout.whole((3, 4)))], "output")
    flat.grad = torch.ones_like(flat)
    opt.step()
    assert opt.state[flat]["momentum_buffer"].dtype == torch.bfloat16
    plain = {role: p for role, p in role_params().items()}
    opt = SCALE([{"params": [p], "role": r} for r, p in plain.items()], lr=LR)
    for p in plain.values():
        p.grad = torch.ones_like(p)
    opt.step()
    assert opt.state[plain["output"]]["momentum_buffer"].dtype == torch.float32
    assert opt.state[plain["vector"]]["exp_avg_sq"].dtype == torch.float32


def bf16_llama():
    model = tiny_llama()
    model.to(torch.bfloat16)
    return model


def lm_step(model, ids):
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()


def test_resume_is_bitwise_with_stochastic_rounding():
    """3 steps, a checkpoint, 3 more in a new model and optimizer == 6 straight steps."""
    kwargs = dict(lr=1e-2, adam_lr=1e-2, weight_decay=0.1, state_dtype=torch.bfloat16, rounding_seed=5)
    data = batches(6, 2)
    straight = bf16_llama()
    opt = SCALE(scale_param_groups(straight), **kwargs)
    for ids in data:
        lm_step(straight, ids)
        opt.step()

    first = bf16_llama()
    opt = SCALE(scale_param_groups(first), **kwargs)
    for ids in data[:3]:
        lm_step(first, ids)
        opt.step()
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "optim": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf)
    resumed = tiny_llama(seed=123).to(torch.bfloat16)
    resumed.load_state_dict(saved["model"])
    opt = SCALE(scale_param_groups(resumed), **kwargs)
    opt.load_state_dict(saved["optim"])
    for ids in data[3:]:
        lm_step(resumed, ids)
        opt.step()
    moved = 0
    for p, q, r in zip(straight.parameters(), resumed.parameters(), bf16_llama().parameters()):
        assert p.dtype == torch.bfloat16 and torch.equal(p, q)
        moved += (p != r).sum().item()
    assert moved > 0
    assert opt.state[resumed.lm_head.weight]["step"] == 6


def flat_of(params):
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    grad = torch.cat([p.grad.reshape(-1) for p in params])
    flat = nn.Parameter(flat)
    flat.grad = grad
    return flat


@pytest.mark.parametrize("role", ["matrix", "embedding", "output", "vector"])
def test_flats_round_as_the_parameters_do(role, monkeypatch):
    """ZeRO's view on one process: bf16 flats holding three parameters step bitwise as the
    three parameters do on their own (the rounding draws from each element's place in its
    parameter, not in the flat), and the chunk size of the fp32 temporaries changes nothing.
    Vectors are cut mid-parameter between two flats; a normalized parameter cut across
    flats needs the collective, which tests/distributed/test_master_free.py runs."""
    shapes = [(7, 13), (13, 7), (5, 9)] if role != "vector" else [(91,), (13,), (45,)]
    torch.manual_seed(0)
    params = [torch.randn(s).to(torch.bfloat16) for s in shapes]
    grads = [[torch.randn(s).to(torch.bfloat16) for s in shapes] for _ in range(4)]
    alone = [nn.Parameter(p.clone()) for p in params]
    opt = SCALE([{"params": alone, "role": role}], lr=1e-2, adam_lr=1e-2, state_dtype=torch.bfloat16)
    for g in grads:
        for p, gi in zip(alone, g):
            p.grad = gi
        opt.step()

    monkeypatch.setattr(scale_module, "CHUNK_NUMEL", 8)  # several chunks per block
    numels = [p.numel() for p in params]
    total = sum(numels)
    cuts = [0, 100, total] if role == "vector" else [0, total]
    values = torch.cat([p.reshape(-1) for p in params])
    flats = [nn.Parameter(values[lo:hi].clone()) for lo, hi in zip(cuts, cuts[1:])]
    opt = SCALE([{"params": flats, "role": role}], lr=1e-2, adam_lr=1e-2)  # state dtype: the flats'
    for flat, lo, hi in zip(flats, cuts, cuts[1:]):
        pieces, start = [], 0
        for n, shape in zip(numels, shapes):
            a, b = min(max(lo - start, 0), n), min(max(hi - start, 0), n)
            pieces.append((min(max(start - lo, 0), hi - lo), ShardLayout.flat_range(shape if len(shape) == 2 else (1, n), a, b)))
            start += n
        opt.bind_flat(flat, pieces, role)
    for g in grads:
        whole = torch.cat([gi.reshape(-1) for gi in g])
        for flat, lo, hi in zip(flats, cuts, cuts[1:]):
            flat.grad = whole[lo:hi].clone()
        opt.step()
    assert torch.equal(torch.cat([f.detach() for f in flats]), torch.cat([p.detach().reshape(-1) for p in alone]))


def test_the_trainer_selects_master_free_bf16():
    """--master-weights (default: the DeepSpeed JSON's bf16_master_weights_and_grads) picks
    the mode; contradictions are refused naming the fix."""
    import json
    from pathlib import Path

    from scale_zero_train.config import ConfigError, parse_args, resolve
    from scale_zero_train.optim import build_optimizer
    from tests.support.models import tiny_llama_config

    configs = Path(__file__).resolve().parents[2] / "configs"

    def resolved(*argv, config=None):
        ds = json.loads((configs / config).read_text()) if config else {}
        extra = ["--backend", "deepspeed", "--config", str(configs / config)] if config else ["--backend", "fsdp"]
        args = parse_args([*extra, "--global-batch-size", "8", "--micro-batch-size", "1", "--seq-len", "16", *argv])
        return resolve(args, ds, tiny_llama_config(), 2)

    assert resolved().model.master_weights == "fp32"
    assert resolved(config="zero3_scale.json").model.master_weights == "fp32"
    for name in ("zero3_scale_bf16.json", "zero2_scale_bf16.json"):
        assert resolved(config=name).model.master_weights == "bf16"
    assert resolved("--master-weights", "bf16-nearest").model.master_weights == "bf16-nearest"
    for argv, config, problem in [
        (["--master-weights", "fp32"], "zero3_scale_bf16.json", "keeps bf16 master weights"),
        (["--master-weights", "bf16"], "zero3_scale.json", "bf16_master_weights_and_grads"),
        (["--master-weights", "bf16", "--optimizer", "adamw"], None, "AdamW needs --master-weights fp32"),
        (["--master-weights", "bf16", "--no-bf16"], None, "needs bf16 compute"),
    ]:
        with pytest.raises(ConfigError, match=problem):
            resolved(*argv, config=config)
    for mode, stochastic in (("bf16", True), ("bf16-nearest", False)):
        opt = build_optimizer("scale", tiny_llama(), 1e-3, 1e-2, 0.9, 0.0, mode)
        assert (opt.stochastic_rounding, opt.state_dtype) == (stochastic, torch.bfloat16)
    opt = build_optimizer("scale", tiny_llama(), 1e-3, 1e-2, 0.9, 0.0)
    assert (opt.stochastic_rounding, opt.state_dtype) == (True, None)
