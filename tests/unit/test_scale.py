"""SCALE on one process: the exact update of docs/algorithm.md ("The update"), against
hand-computed answers and against the independent per-tensor reference in
tests/support/reference.py."""

import copy
import io
import logging
import math

import pytest
import torch
from torch import nn

from scale_zero import SCALE, scale_param_groups
from tests.support.models import batches, narrow_net, tiny_llama
from tests.support.reference import ReferenceSCALE


def role_pairs(groups, model, twin):
    roles = {id(p): g["role"] for g in groups for p in g["params"]}
    return [(q, roles[id(p)]) for p, q in zip(model.parameters(), twin.parameters())]


def lm_step(model, ids):
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()


def set_lr(opt, lr):
    for group in opt.param_groups:
        group["lr"] = lr


def test_llama_matches_reference_with_weight_decay_and_changing_lr():
    model = tiny_llama()
    twin = copy.deepcopy(model)
    groups = scale_param_groups(model)
    assert [(g["role"], len(g["params"])) for g in groups] == [
        ("embedding", 1), ("output", 1), ("matrix", 14), ("vector", 5)
    ]
    kwargs = dict(lr=1e-2, adam_lr=3e-2, weight_decay=0.1, momentum=0.8)
    opt = SCALE(groups, **kwargs)
    ref = ReferenceSCALE(role_pairs(groups, model, twin), **kwargs)
    for step, ids in enumerate(batches(5, 2)):
        lm_step(model, ids)
        lm_step(twin, ids)
        lr = 1e-2 * (1 - 0.15 * step)  # the schedule moves the 1-D rate too
        set_lr(opt, lr)
        ref.lr = lr
        opt.step()
        ref.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
    assert sum((p - q).abs().sum() for p, q in zip(model.parameters(), tiny_llama().parameters())) > 1


def single_step(role, p0, g, **kwargs):
    p = nn.Parameter(torch.tensor(p0))
    p.grad = torch.tensor(g)
    SCALE([{"params": [p], "role": role}], **kwargs).step()
    return p.detach()


def test_known_answer_matrix_normalizes_rows_and_zero_row_stays():
    # row 0: rms = sqrt((3^2 + 4^2) / 2) = 5 / sqrt(2); row 1 is zero -> zero update, no NaN
    p = single_step("matrix", [[1.0, 1.0], [2.0, 2.0]], [[3.0, 4.0], [0.0, 0.0]], lr=0.5)
    s = math.sqrt(2) / 5
    torch.testing.assert_close(p, torch.tensor([[1 - 0.5 * 3 * s, 1 - 0.5 * 4 * s], [2.0, 2.0]]))


def test_known_answer_embedding_normalizes_columns():
    # column 0: rms = sqrt((3^2 + 4^2) / 2); column 1 is zero
    p = single_step("embedding", [[0.0, 0.0], [0.0, 0.0]], [[3.0, 0.0], [4.0, 0.0]], lr=1.0)
    s = math.sqrt(2) / 5
    torch.testing.assert_close(p, torch.tensor([[-3 * s, 0.0], [-4 * s, 0.0]]))


def test_known_answer_weight_decay_is_decoupled():
    # p *= 1 - lr*wd, then p -= lr * g/rms: with g = [[2, 2]] the direction is [[1, 1]]
    p = single_step("matrix", [[1.0, -1.0]], [[2.0, 2.0]], lr=0.1, weight_decay=0.5)
    torch.testing.assert_close(p, torch.tensor([[1 * 0.95 - 0.1, -1 * 0.95 - 0.1]]))


def test_known_answer_output_momentum_is_an_ema_without_bias_correction():
    p = nn.Parameter(torch.zeros(1, 2))
    opt = SCALE([{"params": [p], "role": "output"}], lr=1.0, momentum=0.5)
    p.grad = torch.tensor([[2.0, 0.0]])
    opt.step()  # m = [1, 0]: rms = sqrt(1/2) -> u = [sqrt 2, 0]
    torch.testing.assert_close(p.detach(), torch.tensor([[-math.sqrt(2), 0.0]]))
    p.grad = torch.tensor([[0.0, 2.0]])
    opt.step()  # m = [0.5, 1]: rms = sqrt(1.25 / 2)
    r = math.sqrt(1.25 / 2)
    torch.testing.assert_close(p.detach(), torch.tensor([[-math.sqrt(2) - 0.5 / r, -1 / r]]))
    assert set(opt.state[p]) == {"momentum_buffer", "step"}  # one buffer; the step count every tensor keeps


def test_known_answer_vector_adamw_eps_before_bias_correction_and_scheduled_lr():
    p = nn.Parameter(torch.tensor([1.0, 1.0]))
    opt = SCALE([{"params": [p], "role": "vector"}], lr=0.1, adam_lr=0.2, weight_decay=0.5, eps=0.1)
    set_lr(opt, 0.05)  # half the peak: the 1-D rate is 0.2 * 0.05 / 0.1 = 0.1
    p.grad = torch.tensor([2.0, 0.0])
    opt.step()
    lr, b1, b2 = 0.1, 0.9, 0.999
    m, v = (1 - b1) * 2.0, (1 - b2) * 4.0
    step_size = lr * math.sqrt(1 - b2) / (1 - b1)
    expected0 = 1 * (1 - lr * 0.5) - step_size * m / (0.1 + math.sqrt(v))
    torch.testing.assert_close(p.detach(), torch.tensor([expected0, 1 - lr * 0.5]))


def test_state_round_trip_is_bitwise():
    def run(model, opt, steps):
        for ids in steps:
            lm_step(model, ids)
            opt.step()

    data = batches(6, 2)
    straight = tiny_llama()
    opt = SCALE(scale_param_groups(straight), lr=1e-2, weight_decay=0.1)
    run(straight, opt, data)

    first = tiny_llama()
    opt = SCALE(scale_param_groups(first), lr=1e-2, weight_decay=0.1)
    run(first, opt, data[:3])
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "optim": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf)
    resumed = tiny_llama(seed=123)
    resumed.load_state_dict(saved["model"])
    opt = SCALE(scale_param_groups(resumed), lr=1e-2, weight_decay=0.1)
    opt.load_state_dict(saved["optim"])
    run(resumed, opt, data[3:])
    for p, q in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


def test_missing_gradients_are_skipped_and_zero_gradients_give_no_nan():
    model = tiny_llama()
    before = copy.deepcopy(model)
    opt = SCALE(scale_param_groups(model), lr=1e-2)
    lm_step(model, batches(1, 2)[0])
    model.model.layers[0].mlp.up_proj.weight.grad = None
    model.model.layers[1].mlp.up_proj.weight.grad.zero_()
    model.model.embed_tokens.weight.grad[:, :5] = 0  # whole columns zero
    opt.step()
    for p in model.parameters():
        assert torch.isfinite(p).all()
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, before.model.layers[0].mlp.up_proj.weight)
    assert torch.equal(model.model.layers[1].mlp.up_proj.weight, before.model.layers[1].mlp.up_proj.weight)
    assert torch.equal(model.model.embed_tokens.weight[:, :5], before.model.embed_tokens.weight[:, :5])
    assert model.model.layers[0].mlp.up_proj.weight not in opt.state


def test_bf16_parameters_are_updated_in_fp32():
    model = tiny_llama()
    twin = copy.deepcopy(model)
    model.to(torch.bfloat16)
    groups = scale_param_groups(model)
    # rounded to nearest here; stochastic rounding (the default) is tests/unit/test_rounding.py's
    opt = SCALE(groups, lr=1e-2, adam_lr=1e-2, stochastic_rounding=False)
    ref = ReferenceSCALE(role_pairs(groups, model, twin), lr=1e-2, adam_lr=1e-2)
    ids = batches(1, 2)[0]
    lm_step(model, ids)
    for p, q in zip(model.parameters(), twin.parameters()):  # the same bf16 gradient
        q.grad = p.grad.float()
        q.data = p.data.float()
    opt.step()
    ref.step()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert p.dtype == torch.bfloat16 and torch.isfinite(p).all()
        # the fp32 update rounded once to bf16 (half a bf16 ulp: 2**-9 relative)
        torch.testing.assert_close(p.float(), q, rtol=2**-8, atol=1e-6, msg=name)
    assert opt.state[model.lm_head.weight]["momentum_buffer"].dtype == torch.float32


@pytest.mark.parametrize("variant", ["column_sgd", "row_scale", "sgd_momentum"])
def test_ablations(variant):
    """The paper's ablations: column-normalized SGD without momentum, its 'row' variant
    (RMS over dim 0 of a Linear weight), and plain SGD with momentum everywhere."""
    p = nn.Parameter(torch.zeros(3, 4))
    g = torch.randn(3, 4)
    p.grad = g.clone()
    if variant == "column_sgd":
        opt = SCALE([{"params": [p], "role": "output"}], lr=1.0, momentum_roles=())
        expected = -g / g.pow(2).mean(1, keepdim=True).sqrt()
    elif variant == "row_scale":
        opt = SCALE([{"params": [p], "role": "matrix"}], lr=1.0, norm_dims={"matrix": 0})
        expected = -g / g.pow(2).mean(0, keepdim=True).sqrt()
    else:
        opt = SCALE([{"params": [p], "role": "matrix"}], lr=1.0, momentum=0.5,
                    norm_dims={"matrix": None}, momentum_roles=("matrix",))
        expected = -0.5 * g
    opt.step()
    torch.testing.assert_close(p.detach(), expected)
    assert ("momentum_buffer" in opt.state[p]) == (variant == "sgd_momentum")


def test_a_group_without_role_stays_one_group_roles_by_dimension_and_bad_role_is_refused():
    model = narrow_net()
    with pytest.warns(UserWarning, match=r"scale_param_groups\(model\)"):
        opt = SCALE(model.parameters(), lr=0.1)
    assert len(opt.param_groups) == 1 and "role" not in opt.param_groups[0]
    assert [opt.role_of(p) for p in model.parameters()] == [
        "matrix" if p.dim() >= 2 else "vector" for p in model.parameters()
    ]
    with pytest.raises(ValueError, match="unknown role"):
        SCALE([{"params": list(model.parameters()), "role": "bias"}], lr=0.1)
    with pytest.raises(ValueError, match="ablations apply"):
        SCALE(model.parameters(), lr=0.1, momentum_roles=("vector",))


def test_param_groups_on_plain_module_and_tied_weights(caplog):
    groups = {g["role"]: g["params"] for g in scale_param_groups(narrow_net())}
    net = narrow_net()
    assert groups["embedding"][0].shape == net.embed.weight.shape
    assert groups["output"][0].shape == net.head.weight.shape
    assert [p.shape for p in groups["matrix"]] == [net.narrow.weight.shape, net.wide.weight.shape]
    assert len(groups["vector"]) == 3  # two biases and the norm gain

    tied = tiny_llama(tie_word_embeddings=True)
    with caplog.at_level(logging.WARNING):
        groups = {g["role"]: g["params"] for g in scale_param_groups(tied)}
    assert "tied" in caplog.text
    assert "embedding" not in groups and groups["output"] == [tied.lm_head.weight]


def test_a_flat_tensor_not_bound_by_an_engine_is_refused_clearly():
    flat = nn.Parameter(torch.zeros(10))
    flat.grad = torch.ones(10)
    opt = SCALE([{"params": [flat], "role": "matrix"}], lr=0.1)
    with pytest.raises(RuntimeError, match="scale_zero.initialize"):
        opt.step()
