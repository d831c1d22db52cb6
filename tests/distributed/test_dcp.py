"""SCALE under FSDP2 through torch.distributed.checkpoint with DCP's DEFAULT options
(strict: every parameter must have optimizer state), on 2 real gloo ranks: a resumed run
continues bitwise like the run that was never interrupted."""

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from scale_zero import SCALE, scale_param_groups
from tests.support.distributed import run_distributed
from tests.support.models import batches, narrow_net

OPT = dict(lr=1e-2, adam_lr=5e-3, weight_decay=0.1)
DATA = batches(5, 4, seq_len=8, vocab=11)


def _sharded(seed):
    model = narrow_net(seed)
    fully_shard(model, mesh=init_device_mesh("cpu", (2,)))
    return model, SCALE(scale_param_groups(model), **OPT)


def _train(model, opt, data):
    for ids in data:
        opt.zero_grad()
        model.loss(ids).backward()
        opt.step()


def _resume_through_dcp(path):
    model, opt = _sharded(seed=0)
    _train(model, opt, DATA[:3])
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=path)
    resumed, resumed_opt = _sharded(seed=7)
    target = {"model": get_model_state_dict(resumed), "optim": get_optimizer_state_dict(resumed, resumed_opt)}
    dcp.load(target, checkpoint_id=path)
    set_model_state_dict(resumed, target["model"])
    set_optimizer_state_dict(resumed, resumed_opt, target["optim"])
    _train(model, opt, DATA[3:])
    _train(resumed, resumed_opt, DATA[3:])
    full = [p.full_tensor() for p in model.parameters()]
    return full, [p.full_tensor() for p in resumed.parameters()]


def test_fsdp2_dcp_default_options_resume_is_bitwise(tmp_path):
    for straight, resumed in run_distributed(_resume_through_dcp, 2, str(tmp_path)):
        for p, q in zip(straight, resumed, strict=True):
            assert torch.equal(p, q)
