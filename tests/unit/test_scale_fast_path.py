"""The fused CPU kernel (scale_zero/normalized_step.cpp) against the torch path and the
reference: odd shapes, every role, zero rows and columns, bf16, ablations, a
world-size-1 ZeRO-style flat unit, and determinism. Under FSDP2 (fused rows and
collective columns in one step): tests/distributed/test_fsdp.py."""

import copy
import shutil

import pytest
import torch

from scale_zero import SCALE, ShardLayout, native
from tests.support import kernel_cases
from tests.support.kernel_cases import (
    LR, WEIGHT_DECAY, flat, one_step_of_pieces, run_reference, set_grads,
)

pytestmark = pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler: the torch path is the only path")


def test_kernel_builds():
    assert native.available()

SHAPES = {"embedding": [(257, 48)], "output": [(257, 48)], "matrix": [(48, 48), (130, 48), (48, 130), (7, 3, 5)], "vector": [(48,), (1,)]}


def make_params(dtype=torch.float32, seed=0):
    return kernel_cases.make_params(SHAPES, dtype, seed)


def run_scale(params, fused, monkeypatch, steps=4, **kwargs):
    def kernel_off(m):
        m.setattr(native, "available", lambda: False)

    return kernel_cases.run_scale(params, monkeypatch, steps, None if fused else kernel_off, **kwargs)


def test_fused_matches_torch_path_and_reference(monkeypatch):
    kwargs = dict(lr=1e-2, adam_lr=3e-2, weight_decay=0.1)
    fused, plain = make_params(), make_params()
    run_scale(fused, True, monkeypatch, **kwargs)
    run_scale(plain, False, monkeypatch, **kwargs)

    reference = make_params()
    run_reference(reference, 4, **kwargs)
    torch.testing.assert_close(flat(fused), flat(plain), rtol=0, atol=1e-6)
    torch.testing.assert_close(flat(fused), flat(reference), rtol=0, atol=1e-6)


def test_zero_rows_and_columns_get_zero_update(monkeypatch):
    params = make_params()
    before = {id(p): p.detach().clone() for ps in params.values() for p in ps}
    set_grads(params, 0)
    for role, ps in params.items():
        for p in ps:
            p.grad.zero_()
    opt = SCALE([{"params": ps, "role": r} for r, ps in params.items() if r != "vector"], lr=1.0)
    opt.step()
    for role, ps in params.items():
        for p in ps:
            assert torch.equal(p.detach(), before[id(p)]), role


def test_bf16_parameters_match_torch_path(monkeypatch):
    fused, plain = make_params(torch.bfloat16), make_params(torch.bfloat16)
    run_scale(fused, True, monkeypatch, lr=1e-2)
    run_scale(plain, False, monkeypatch, lr=1e-2)
    assert all(p.dtype == torch.bfloat16 for ps in fused.values() for p in ps)
    assert torch.isfinite(flat(fused)).all()
    # Both compute in fp32 and round once to bf16: at most one bf16 ulp apart.
    torch.testing.assert_close(flat(fused), flat(plain), rtol=2**-7, atol=1e-6)


def test_ablations_match_torch_path(monkeypatch):
    kwargs = dict(lr=1e-2, norm_dims={"matrix": 0, "embedding": 1}, momentum_roles=("matrix", "embedding", "output"))
    fused, plain = make_params(), make_params()
    opt = run_scale(fused, True, monkeypatch, **kwargs)
    run_scale(plain, False, monkeypatch, **kwargs)
    torch.testing.assert_close(flat(fused), flat(plain), rtol=0, atol=1e-6)
    assert all("momentum_buffer" in opt.state[p] for p in fused["matrix"])


def test_flat_unit_of_several_parameters(monkeypatch):
    """A ZeRO partition on one rank: one flat tensor holding pieces of three matrices."""
    shapes = [(48, 130), (130, 48), (5, 7)]
    numels = [r * c for r, c in shapes]
    results = []
    for fused in (True, False):
        gen = torch.Generator().manual_seed(1)
        flat_param = torch.randn(sum(numels) + 3, generator=gen)  # + ZeRO tail padding
        with monkeypatch.context() as m:
            if not fused:
                m.setattr(native, "available", lambda: False)
            opt = SCALE([{"params": [flat_param], "role": "output"}], lr=1e-2, weight_decay=0.1)
            offsets = [sum(numels[:i]) for i in range(len(shapes))]
            opt.bind_flat(
                flat_param, [(o, ShardLayout.flat_range(s, 0, n)) for o, s, n in zip(offsets, shapes, numels)], "output"
            )
            for _ in range(3):
                flat_param.grad = torch.randn(flat_param.shape, generator=gen)
                opt.step()
        results.append(flat_param)
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=1e-6)


def test_fused_step_is_deterministic(monkeypatch):
    a, b = make_params(), make_params()
    run_scale(a, True, monkeypatch, lr=1e-2)
    run_scale(b, True, monkeypatch, lr=1e-2)
    assert torch.equal(flat(a), flat(b))


# ---------------------------------------------------------------- both phases, cut pieces, extreme values

# (shape, [start, end) of its row-major flattening) per piece of one flat: whole rows, a
# range cutting the first and last row, one inside a single row, and the whole parameter.
CUT_PIECES = [((13, 48), 0, 13 * 48), ((13, 48), 30, 400), ((9, 33), 40, 60), ((6, 130), 0, 6 * 130)]


@pytest.mark.parametrize("kind", ["ordinary", "extreme"])
@pytest.mark.parametrize("role", ["matrix", "embedding", "output"])
def test_both_phases_match_torch_path_and_fp64(kind, role, monkeypatch):
    """Pieces cut by the partition take the kernel's two phases, whole ones its one pass;
    the torch path computes the same, within 1e-6, on rows of 1e25, zero rows and subnormals."""
    def kernel_off(m):
        m.setattr(native, "available", lambda: False)

    results, expected, p0, _ = one_step_of_pieces(CUT_PIECES, kind, role, monkeypatch, kernel_off)
    assert all(torch.isfinite(r).all() for r in results)
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=1e-6)
    for got in results:
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    if kind == "extreme" and role != "embedding":  # the 1e25 row moved by about lr per element, not zero
        first_row = slice(0, 48)
        assert (results[0][first_row] - p0[first_row] * (1 - LR * WEIGHT_DECAY)).abs().max() > LR / 2


def test_kept_kernel_plan_follows_what_changes_between_steps(monkeypatch):
    """The kernel's jobs are kept between steps and take each step's new gradient tensor
    (ZeRO flattens a new one every step) and lr; a changed weight decay, momentum buffers
    replaced by load_state_dict and a flat bound again with other pieces build new ones.
    Every step matches the torch path within 1e-6."""
    numels = [end - start for _, start, end in CUT_PIECES]
    offsets = [sum(numels[:i]) for i in range(len(numels))]
    cut = [(o, ShardLayout.flat_range(s, a, b)) for o, (s, a, b) in zip(offsets, CUT_PIECES)]
    whole = [(0, ShardLayout.whole((4, sum(numels) // 4)))]
    p0 = torch.randn(sum(numels), generator=torch.Generator().manual_seed(5))
    runs = []
    for fused in (True, False):
        gen = torch.Generator().manual_seed(6)
        flat_param = p0.clone()
        with monkeypatch.context() as m:
            if not fused:
                m.setattr(native, "available", lambda: False)
            opt = SCALE([{"params": [flat_param], "role": "output"}], lr=1e-2, weight_decay=0.1)
            opt.bind_flat(flat_param, cut, "output")
            steps = []
            for t in range(6):
                flat_param.grad = torch.randn(flat_param.shape, generator=gen)  # new storage every step
                opt.param_groups[0]["lr"] = 1e-2 * (1 - 0.1 * t)
                if t == 2:
                    opt.param_groups[0]["weight_decay"] = 0.3
                if t == 3:
                    replaced = opt.state_dict()  # kept alive: a stale job would write into it
                    opt.load_state_dict(copy.deepcopy(replaced))  # new momentum tensors
                if t == 4:
                    opt.bind_flat(flat_param, whole, "output")
                opt.step()
                steps.append(flat_param.clone())
                if fused and t == 1:
                    assert len(opt._kernel_plans) == 1  # the same pieces: the plan was kept
        runs.append(steps)
    for t, (fused_step, torch_step) in enumerate(zip(*runs, strict=True)):
        torch.testing.assert_close(fused_step, torch_step, rtol=0, atol=1e-6, msg=lambda m: f"step {t}: {m}")


@pytest.mark.parametrize("cut", [False, True], ids=["one-pass", "two-phase"])
@pytest.mark.parametrize("role", ["matrix", "embedding", "output"])
def test_zero_rows_without_decay_are_left_as_they_are(role, cut, monkeypatch):
    """Rows whose gradient is zero (an embedding's rows of tokens the batch lacks) get a zero
    update: with no weight decay the kernel leaves them untouched, bit for bit, and every
    other value matches the torch path within 1e-6."""
    gen = torch.Generator().manual_seed(8)
    shape = (40, 24)
    p0 = torch.randn(shape, generator=gen).flatten()
    zero_rows = [0, 5, 6, 39]
    grads = []
    for _ in range(3):
        g = torch.randn(shape, generator=gen)
        g[zero_rows] = 0
        grads.append(g.flatten())
    start, end = (30, 40 * 24 - 7) if cut else (0, 40 * 24)  # a range cutting the first and last row
    results = []
    for fused in (True, False):
        flat_param = p0[start:end].clone()
        with monkeypatch.context() as m:
            if not fused:
                m.setattr(native, "available", lambda: False)
            opt = SCALE([{"params": [flat_param], "role": role}], lr=1e-2, weight_decay=0.0)
            opt.bind_flat(flat_param, [(0, ShardLayout.flat_range(shape, start, end))], role)
            for g in grads:
                flat_param.grad = g[start:end].clone()
                opt.step()
        results.append(flat_param)
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=1e-6)
    full = torch.full((40 * 24,), float("nan"))
    full[start:end] = results[0]
    unchanged = full.view(shape)[zero_rows[1:3]]  # rows 5 and 6: whole rows in both ranges
    assert torch.equal(unchanged, p0.view(shape)[zero_rows[1:3]])
    moved = full.view(shape)[10]
    assert not torch.equal(moved, p0.view(shape)[10])
