"""Run PyTorch's generic optimizer tests (test/test_optim.py of the pytorch repository,
class TestOptimRenewed) against SCALE, with an OptimizerInfo for SCALE in place of optim_db.

    python scripts/torch_optim_suite.py PATH/TO/test_optim.py [unittest arguments, e.g. -k lr]

The test file is not part of this repository: take it from the pytorch release matching
the installed torch. What does not apply to SCALE is left out by the OptimizerInfo's
flags, as for any optimizer lacking the feature: complex parameters
(supports_complex=False: SCALE's row/column RMS is defined on real tensors), sparse
gradients (supports_sparse=False), and the foreach / fused / capturable / differentiable
implementations (supported_impls=(): SCALE has one implementation, whose fused CPU kernel
is chosen per piece, not by a flag). CUDA-only tests skip themselves on a CPU machine.
"""

from __future__ import annotations

import importlib.util
import sys
import types
import unittest
from pathlib import Path

import torch
from torch.nn import Parameter
from torch.optim.lr_scheduler import (
    ConstantLR, CosineAnnealingLR, ExponentialLR, LambdaLR, LinearLR, PolynomialLR, ReduceLROnPlateau, StepLR,
)
from torch.testing._internal import common_optimizers
from torch.testing._internal.common_optimizers import (
    ErrorOptimizerInput, OptimizerErrorEnum, OptimizerInfo, OptimizerInput, get_error_inputs_for_all_optims,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's scale_zero first
from scale_zero import SCALE  # noqa: E402


def scale_inputs(device, dtype=None):
    return [
        OptimizerInput(params=None, kwargs={}, desc="default"),
        OptimizerInput(params=None, kwargs={"lr": 0.01}, desc="non-default lr"),
        OptimizerInput(params=None, kwargs={"lr": torch.tensor(0.01)}, desc="tensor lr"),
        OptimizerInput(params=None, kwargs={"lr": torch.tensor([0.01])}, desc="1-D tensor lr"),
        OptimizerInput(params=None, kwargs={"weight_decay": 0.1}, desc="weight decay"),
        OptimizerInput(params=None, kwargs={"lr": torch.tensor(0.01), "weight_decay": 0.1}, desc="tensor lr, decay"),
        OptimizerInput(params=None, kwargs={"adam_lr": 0.02, "momentum": 0.5}, desc="adam_lr, momentum"),
        OptimizerInput(params=None, kwargs={"betas": (0.8, 0.99), "eps": 1e-6}, desc="AdamW betas, eps"),
        OptimizerInput(params=None, kwargs={"momentum_roles": ("output", "matrix")}, desc="momentum on matrices"),
        OptimizerInput(params=None, kwargs={"norm_dims": {"matrix": 0}}, desc="column RMS for matrices"),
        OptimizerInput(params=None, kwargs={"norm_dims": {"matrix": None}}, desc="no normalization"),
    ]


def scale_error_inputs(device, dtype):
    errors = get_error_inputs_for_all_optims(device, dtype)
    if common_optimizers._get_device_type(device) != "cpu":
        return errors
    matrix = Parameter(torch.randn(3, 4, device=device, dtype=dtype))
    flat = Parameter(torch.randn(12, device=device, dtype=dtype))
    flat.grad = torch.ones_like(flat)
    return errors + [
        ErrorOptimizerInput(
            OptimizerInput(params=None, kwargs={"lr": -1.0}, desc="negative lr"),
            error_type=ValueError, error_regex="Invalid learning rate: -1.0",
        ),
        ErrorOptimizerInput(
            OptimizerInput(params=None, kwargs={"momentum": 1.0}, desc="momentum 1"),
            error_type=ValueError, error_regex="momentum must be in",
        ),
        ErrorOptimizerInput(
            OptimizerInput(params=[{"params": [matrix], "role": "bias"}], kwargs={}, desc="unknown role"),
            error_type=ValueError, error_regex="unknown role 'bias'",
        ),
        ErrorOptimizerInput(
            OptimizerInput(params=[matrix], kwargs={"momentum_roles": ("vector",)}, desc="ablation of vectors"),
            error_type=ValueError, error_regex="ablations apply to",
        ),
        ErrorOptimizerInput(
            OptimizerInput(params=[{"params": [flat], "role": "matrix"}], kwargs={}, desc="unbound flat"),
            error_on=OptimizerErrorEnum.STEP_ERROR, error_type=RuntimeError, error_regex="SCALE.bind_flat",
        ),
    ]


SCHEDULERS = (
    [lambda opt: StepLR(opt, gamma=0.9, step_size=10)],
    [lambda opt: ReduceLROnPlateau(opt)],
    [lambda opt: ConstantLR(opt, factor=0.4, total_iters=4), lambda opt: ExponentialLR(opt, gamma=0.9)],
    [lambda opt: LinearLR(opt, start_factor=0.1, total_iters=5)],
    [lambda opt: CosineAnnealingLR(opt, T_max=20)],
    [lambda opt: PolynomialLR(opt, total_iters=20, power=2.0)],
    [lambda opt: LambdaLR(opt, lambda step: 0.95**step)],
)

SCALE_INFO = OptimizerInfo(
    SCALE,
    optim_inputs_func=scale_inputs,
    optim_error_inputs_func=scale_error_inputs,
    scheduler_inputs=SCHEDULERS,
    supported_impls=(),
    # flags an older SCALE's checkpoint lacks: test_can_load_older_state_dict deletes them
    not_og_supported_flags=("peak_lr", "norm_dims", "momentum_roles"),
    supports_complex=False,
    supports_sparse=False,
    supports_fused_on=(),
)


def load_suite(path: Path) -> types.ModuleType:
    """Import `path` with optim_db = [SCALE_INFO]. Its sibling imports (optim.test_optim,
    optim.test_lrscheduler, optim.test_swa_utils: torch's own optimizers, schedulers and
    SWA) are not about SCALE and get empty stand-ins."""
    common_optimizers.optim_db = [SCALE_INFO]
    stand_ins = {
        "optim.test_optim": ("TestOptim", "TestDifferentiableOptimizer"),
        "optim.test_lrscheduler": ("TestLRScheduler",),
        "optim.test_swa_utils": ("TestSWAUtils",),
    }
    sys.modules.setdefault("optim", types.ModuleType("optim"))
    for name, classes in stand_ins.items():
        module = types.ModuleType(name)
        for cls in classes:
            setattr(module, cls, type(cls, (), {}))  # not a TestCase: nothing collected
        sys.modules[name] = module
    spec = importlib.util.spec_from_file_location("torch_test_optim", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str]) -> int:
    if not argv or not Path(argv[0]).is_file():
        print(__doc__)
        return 2
    module = load_suite(Path(argv[0]))
    program = unittest.main(module=module, argv=["torch_optim_suite", *argv[1:]], exit=False, verbosity=2)
    return 0 if program.result.wasSuccessful() else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
