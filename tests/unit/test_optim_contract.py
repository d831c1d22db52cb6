"""SCALE keeps torch.optim's contract (one process): resume in any parameter dtype, DCP's
default state-dict round trip, tensor lr, copies and pickles, named_parameters(), the 1-D
rate per group, one param group per group given, and roles inferred where they can be."""

import copy
import pickle
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

from scale_zero import SCALE, scale_param_groups
from tests.support.models import batches, narrow_net, tiny_llama

OPT = dict(lr=1e-2, adam_lr=3e-2, weight_decay=0.1)
DATA = batches(6, 3, seq_len=8, vocab=11)


def train(model, opt, data, sched=None):
    for ids in data:
        opt.zero_grad()
        model.loss(ids).backward()
        opt.step()
        if sched is not None:
            sched.step()


def assert_same_params(a, b):
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), name


def resumed_run(dtype, rebuild_kwargs=OPT):
    """3 steps, a state_dict through torch.save, then 3 more steps on a rebuilt model and
    optimizer; against 6 steps straight."""
    straight = narrow_net().to(dtype)
    train(straight, SCALE(scale_param_groups(straight), **OPT), DATA)
    first = narrow_net().to(dtype)
    opt = SCALE(scale_param_groups(first), **OPT)
    train(first, opt, DATA[:3])
    saved = copy.deepcopy({"model": first.state_dict(), "optim": opt.state_dict()})
    resumed = narrow_net(seed=5).to(dtype)
    resumed.load_state_dict(saved["model"])
    opt = SCALE(scale_param_groups(resumed), **rebuild_kwargs)
    opt.load_state_dict(saved["optim"])
    return straight, resumed, opt


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_1_resume_keeps_fp32_state_whatever_the_parameter_dtype(dtype):
    straight, resumed, opt = resumed_run(dtype)
    buffers = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    assert buffers and all(v.dtype == torch.float32 for v in buffers)
    train(resumed, opt, DATA[3:])
    assert_same_params(straight, resumed)


def test_1_load_state_dict_hooks_see_the_real_state():
    model = narrow_net().to(torch.bfloat16)
    opt = SCALE(scale_param_groups(model), **OPT)
    train(model, opt, DATA[:1])
    seen = []
    opt.register_load_state_dict_pre_hook(lambda o, sd: seen.append(len(sd["state"])))
    opt.register_load_state_dict_post_hook(lambda o: seen.append(len(o.state)))
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert seen == [len(opt.state), len(opt.state)] and seen[0] > 0  # hooks see the real state


def test_2_dcp_default_options_round_trip(tmp_path):
    model = narrow_net()
    opt = SCALE(scale_param_groups(model), **OPT)
    train(model, opt, DATA[:3])
    dcp.save({"optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=tmp_path)
    straight = copy.deepcopy(model)
    straight_opt = SCALE(scale_param_groups(straight), **OPT)
    straight_opt.load_state_dict(copy.deepcopy(opt.state_dict()))

    resumed = copy.deepcopy(model)
    resumed_opt = SCALE(scale_param_groups(resumed), **OPT)
    target = {"optim": get_optimizer_state_dict(resumed, resumed_opt)}
    dcp.load(target, checkpoint_id=tmp_path)
    set_optimizer_state_dict(resumed, resumed_opt, target["optim"])  # default options: strict
    train(straight, straight_opt, DATA[3:])
    train(resumed, resumed_opt, DATA[3:])
    assert_same_params(straight, resumed)


def test_3_tensor_lr_with_weight_decay_and_a_scheduler_moves_both_rates():
    def run(lr):
        model = narrow_net()
        opt = SCALE(scale_param_groups(model), **{**OPT, "lr": lr})
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 / (1 + step))
        train(model, opt, DATA, sched)
        return model

    floats = run(1e-2)
    for lr in (torch.tensor(1e-2), torch.tensor([1e-2])):
        assert_same_params(floats, run(lr))
    # the 1-D rate followed the schedule: a run at the constant lr differs in the vectors
    constant = narrow_net()
    train(constant, SCALE(scale_param_groups(constant), **OPT), DATA)
    assert not torch.equal(constant.norm.weight, floats.norm.weight)


def test_3_tensor_lr_peak_is_a_copy_and_a_multi_element_lr_is_refused_as_torch_does():
    lr, model = torch.tensor(1e-2), narrow_net()
    opt = SCALE(model.parameters(), lr=lr, model=model)
    lr.mul_(0.5)  # a scheduler moving the tensor in place
    assert opt.param_groups[0]["peak_lr"] == pytest.approx(1e-2)
    with pytest.raises(ValueError, match="Tensor lr must be 1-element"):
        SCALE(scale_param_groups(narrow_net()), lr=torch.tensor([1e-2, 1e-3]))
    with pytest.raises(ValueError, match="Tensor lr must be 1-element"):
        opt.add_param_group({"params": [nn.Parameter(torch.ones(2))], "lr": torch.ones(2)})


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_4_copies_and_pickles_keep_scale_settings_and_step_the_same(how):
    model = narrow_net()
    opt = SCALE(scale_param_groups(model), **OPT, norm_dims={"matrix": 0}, momentum_roles=("output", "matrix"))
    train(model, opt, DATA[:2])
    twin, twin_opt = copy.deepcopy((model, opt)) if how == "deepcopy" else pickle.loads(pickle.dumps((model, opt)))
    ablation = [(g["norm_dims"], g["momentum_roles"]) for g in opt.param_groups]
    assert [(g["norm_dims"], g["momentum_roles"]) for g in twin_opt.param_groups] == ablation
    assert ablation[0] == ({"matrix": 0, "embedding": 0, "output": 1}, ("output", "matrix"))
    assert [twin_opt.role_of(p) for p in twin.parameters()] == [opt.role_of(p) for p in model.parameters()]
    train(model, opt, DATA[2:])
    train(twin, twin_opt, DATA[2:])
    assert_same_params(model, twin)


def test_5_named_parameters_infer_embedding_and_output_by_name():
    model = tiny_llama()
    twin = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the names told the roles: no warning
        opt = SCALE(model.named_parameters(), **OPT)
    ref = SCALE(scale_param_groups(twin), **OPT)
    assert len(opt.param_groups) == 1
    assert opt.param_groups[0]["param_names"] == [name for name, _ in model.named_parameters()]
    assert opt.role_of(model.model.embed_tokens.weight) == "embedding"
    assert opt.role_of(model.lm_head.weight) == "output"
    for ids in batches(2, 2):
        for m, o in ((model, opt), (twin, ref)):
            o.zero_grad()
            m(input_ids=ids, labels=ids).loss.backward()
            o.step()
    assert_same_params(model, twin)


def test_6_a_group_with_its_own_lr_and_adam_lr_behaves_like_its_own_optimizer():
    model, twin = narrow_net(), narrow_net()
    vectors = [p for p in model.parameters() if p.dim() == 1]
    twin_vectors = [p for p in twin.parameters() if p.dim() == 1]
    rest = [p for p in model.parameters() if p.dim() > 1]
    twin_rest = [p for p in twin.parameters() if p.dim() > 1]
    joint = SCALE([{"params": rest}, {"params": vectors, "lr": 4e-3, "adam_lr": 1e-2}], lr=1e-2, model=model)
    apart = [SCALE(twin_rest, lr=1e-2, model=twin), SCALE(twin_vectors, lr=4e-3, adam_lr=1e-2)]
    schedules = [torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5) for o in [joint, *apart]]
    for ids in DATA:
        for m, opts in ((model, [joint]), (twin, apart)):
            for o in opts:
                o.zero_grad()
            m.loss(ids).backward()
            for o in opts:
                o.step()
        for s in schedules:
            s.step()
    assert_same_params(model, twin)


def test_6_rebuilding_with_another_lr_does_not_change_the_resumed_1d_rate():
    straight, resumed, opt = resumed_run(torch.float32, rebuild_kwargs={**OPT, "lr": 5.0})
    # the rebuilt optimizer's groups, lr and peak_lr included, are the saved ones
    assert all(g["lr"] == OPT["lr"] and g["peak_lr"] == OPT["lr"] for g in opt.param_groups)
    train(resumed, opt, DATA[3:])
    assert_same_params(straight, resumed)


def test_7_one_group_per_group_given_with_per_group_schedules_and_empty_groups():
    model = narrow_net()
    groups = [{"params": [model.embed.weight, model.norm.weight]}, {"params": [model.head.weight], "lr": 5e-3}]
    opt = SCALE(groups, lr=1e-2, model=model)
    assert [len(g["params"]) for g in opt.param_groups] == [2, 1]
    assert [opt.role_of(p) for p in (model.embed.weight, model.norm.weight, model.head.weight)] == [
        "embedding", "vector", "output"
    ]
    opt.add_param_group({"params": []})
    assert len(opt.param_groups) == 3
    rest = [p for p in model.parameters() if all(p is not q for g in opt.param_groups for q in g["params"])]
    opt.add_param_group({"params": rest})
    assert [opt.role_of(p) for p in rest] == ["matrix" if p.dim() > 1 else "vector" for p in rest]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, [lambda s: 1.0, lambda s: 0.5, lambda s: 1.0, lambda s: 0.1])
    train(model, opt, DATA[:2], sched)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert [g["lr"] for g in opt.param_groups] == [1e-2, 2.5e-3, 1e-2, 1e-3]


def test_roles_by_model_match_scale_param_groups_and_tied_weights_get_output():
    model = narrow_net()
    by_model = SCALE(model.parameters(), lr=1e-2, model=model)
    by_groups = SCALE(scale_param_groups(model), lr=1e-2)
    assert [by_model.role_of(p) for p in model.parameters()] == [by_groups.role_of(p) for p in model.parameters()]
    tied = tiny_llama(tie_word_embeddings=True)
    assert SCALE(tied.parameters(), lr=1e-2, model=tied).role_of(tied.lm_head.weight) == "output"
    with pytest.raises(KeyError, match="none of SCALE's param groups"):
        by_model.role_of(nn.Parameter(torch.ones(2, 2)))


def test_roles_by_shape_alone_warn_once_naming_scale_param_groups():
    model = narrow_net()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = SCALE([model.embed.weight, model.narrow.weight], lr=1e-2)
        opt.add_param_group({"params": [model.head.weight, model.wide.weight]})
    messages = [str(w.message) for w in caught if "SCALE" in str(w.message)]
    assert len(messages) == 1 and "scale_param_groups(model)" in messages[0]
    assert opt.role_of(model.embed.weight) == "matrix"  # what it warned about
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a 1-D-only group, explicit roles, or the model: nothing to warn
        SCALE([model.norm.weight], lr=1e-2)
        SCALE(scale_param_groups(model), lr=1e-2)
        SCALE(model.parameters(), lr=1e-2, model=model)


def test_every_stepped_tensor_keeps_a_step_count_and_matrices_no_buffer():
    model = narrow_net()
    opt = SCALE(scale_param_groups(model), **OPT)
    train(model, opt, DATA[:2])
    assert opt.state[model.narrow.weight] == {"step": 2}
    assert set(opt.state[model.head.weight]) == {"momentum_buffer", "step"}
