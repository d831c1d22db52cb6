"""The Triton kernel (scale_zero/triton_step.py) against the torch path, the reference and an
fp64 evaluation, within 1e-6: every role, odd and wide shapes, zero rows and columns, weight
decay, ablations, cut pieces in a flat unit (both phases), extreme gradients, the plan kept
between steps, misuse, Triton missing, and ZeRO-3 on two real processes.

There is no GPU here: the kernels run on CPU tensors in Triton's interpreter
(TRITON_INTERPRET=1 with the C++ kernel off), which reads and writes the same addresses a
GPU would, one program at a time. Shapes are small: it is slow."""

import copy
import sys

import pytest
import torch

pytest.importorskip("triton")

import scale_zero  # noqa: E402
from scale_zero import SCALE, ShardLayout, native, triton_step  # noqa: E402
from scale_zero.kernel import KernelBlock, backend_for  # noqa: E402
from tests.support.distributed import run_distributed  # noqa: E402
from tests.support import kernel_cases  # noqa: E402
from tests.support.kernel_cases import (  # noqa: E402
    LR, WEIGHT_DECAY, bind_pieces, flat, one_step_of_pieces, run_reference,
)


@pytest.fixture(autouse=True)
def interpreted(monkeypatch):
    """CPU pieces take the Triton kernel: its interpreter on, the C++ kernel off (the
    environment says so; `native.available` may have been built by an earlier test)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("SCALE_ZERO_NATIVE", "0")
    monkeypatch.setattr(native, "available", lambda: False)


def torch_path(monkeypatch):
    monkeypatch.setattr(triton_step, "available", lambda: False)


def batches(opt) -> list:
    return [b for plan in opt._kernel_plans.values() for b in plan.step + plan.partial_sums + plan.apply]


def stepped_by_triton(opt) -> bool:
    found = batches(opt)
    return bool(found) and all(isinstance(b, triton_step.Batch) for b in found)


def test_backend_for_picks_the_kernel_that_takes_the_tensors(monkeypatch):
    t = torch.zeros(4, 3)
    assert backend_for(t, t, None) is triton_step
    assert backend_for(t, t.bfloat16()) is None  # fp32 only
    assert backend_for(t.t(), t.t()) is None  # contiguous only
    with monkeypatch.context() as m:
        m.setattr(native, "available", lambda: True)
        assert backend_for(t, t) is native  # on CPU the C++ kernel comes first
    for variable in ("TRITON_INTERPRET", "SCALE_ZERO_NATIVE"):
        with monkeypatch.context() as m:
            m.delenv(variable)
            assert backend_for(t, t) is None  # compiled Triton takes CUDA tensors; the interpreter, CPU ones if asked


# ---------------------------------------------------------------- every role, whole parameters

# Rows few (the interpreter runs a program's rows one by one); widths of 1100 take two column tiles.
SHAPES = {
    "embedding": [(19, 12), (5, 1100)], "output": [(19, 12)],
    "matrix": [(12, 12), (17, 12), (12, 17), (5, 3, 4), (2, 1100)], "vector": [(12,), (1,)],
}


def make_params(seed=0):
    return kernel_cases.make_params(SHAPES, seed=seed)


def run_scale(params, on_triton, monkeypatch, steps=3, **kwargs):
    opt = kernel_cases.run_scale(params, monkeypatch, steps, None if on_triton else torch_path, **kwargs)
    assert stepped_by_triton(opt) == on_triton
    return opt


def test_every_role_matches_torch_path_and_reference(monkeypatch):
    kwargs = dict(lr=1e-2, adam_lr=3e-2, weight_decay=0.1)
    on_triton, plain, reference = make_params(), make_params(), make_params()
    run_scale(on_triton, True, monkeypatch, **kwargs)
    run_scale(plain, False, monkeypatch, **kwargs)
    run_reference(reference, 3, **kwargs)
    torch.testing.assert_close(flat(on_triton), flat(plain), rtol=0, atol=1e-6)
    torch.testing.assert_close(flat(on_triton), flat(reference), rtol=0, atol=1e-6)


def test_ablations_match_torch_path(monkeypatch):
    """Each role's RMS over the other dim, and momentum on every role."""
    kwargs = dict(lr=1e-2, norm_dims={"matrix": 0, "embedding": 1, "output": 0},
                  momentum_roles=("matrix", "embedding", "output"))
    on_triton, plain = make_params(), make_params()
    opt = run_scale(on_triton, True, monkeypatch, **kwargs)
    run_scale(plain, False, monkeypatch, **kwargs)
    torch.testing.assert_close(flat(on_triton), flat(plain), rtol=0, atol=1e-6)
    assert all("momentum_buffer" in opt.state[p] for p in on_triton["matrix"])


# ---------------------------------------------------------------- a flat unit: cut pieces, both phases

# (shape, [start, end) of its row-major flattening) per piece of one flat: a whole parameter,
# a range cutting its first and last row, one inside a single row, and a wide parameter.
CUT_PIECES = [((7, 12), 0, 7 * 12), ((7, 12), 5, 70), ((5, 9), 11, 16), ((4, 1100), 0, 4 * 1100)]


def bind_cut_pieces(opt, flat_param, role):
    return bind_pieces(opt, flat_param, CUT_PIECES, role)


@pytest.mark.parametrize("kind", ["ordinary", "extreme"])
@pytest.mark.parametrize("role", ["matrix", "embedding", "output"])
def test_both_phases_match_torch_path_and_fp64(kind, role, monkeypatch):
    """Whole pieces take the one-pass launch, cut ones the two phases (column sums with
    atomics); rows of 1e25, zero rows and subnormals as the torch path and fp64 have them."""
    results, expected, p0, opt = one_step_of_pieces(CUT_PIECES, kind, role, monkeypatch, torch_path)
    assert stepped_by_triton(opt)
    plan = next(iter(opt._kernel_plans.values()))  # whole pieces in the one pass, cut ones in the two phases
    assert plan.step and plan.partial_sums and plan.apply
    assert all(torch.isfinite(r).all() for r in results)
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=1e-6)
    torch.testing.assert_close(results[0], expected, rtol=0, atol=1e-6)
    if kind == "extreme" and role != "embedding":  # the 1e25 row moved by about lr per element, not zero
        first_row = slice(0, 12)
        assert (results[0][first_row] - p0[first_row] * (1 - LR * WEIGHT_DECAY)).abs().max() > LR / 2


def test_kept_plan_takes_new_gradient_storage_and_lr(monkeypatch):
    """The plan (the launches' tables) is built once and kept: each step hands a new gradient
    tensor (as ZeRO-3 does) and a new lr, and every step matches the torch path; state
    replaced by load_state_dict builds a new plan."""
    p0 = torch.randn(sum(end - start for _, start, end in CUT_PIECES), generator=torch.Generator().manual_seed(5))
    runs = []
    for on_triton in (True, False):
        gen = torch.Generator().manual_seed(6)
        flat_param = p0.clone()
        with monkeypatch.context() as m:
            if not on_triton:
                torch_path(m)
            opt = SCALE([{"params": [flat_param], "role": "output"}], lr=1e-2, weight_decay=0.1)
            bind_cut_pieces(opt, flat_param, "output")
            steps, plans = [], []
            for t in range(4):
                flat_param.grad = torch.randn(flat_param.shape, generator=gen)  # new storage every step
                opt.param_groups[0]["lr"] = 1e-2 * (1 - 0.2 * t)
                if t == 3:
                    replaced = opt.state_dict()  # kept alive: a stale table would write into it
                    opt.load_state_dict(copy.deepcopy(replaced))  # new momentum tensors
                opt.step()
                steps.append(flat_param.clone())
                plans.append(list(opt._kernel_plans.values())[-1])
        if on_triton:
            assert stepped_by_triton(opt)
            assert plans[0] is plans[1] is plans[2] is not plans[3]
        runs.append(steps)
    for t, (triton_step_t, torch_step_t) in enumerate(zip(*runs, strict=True)):
        torch.testing.assert_close(triton_step_t, torch_step_t, rtol=0, atol=1e-6, msg=lambda m: f"step {t}: {m}")


@pytest.mark.parametrize("cut", [False, True], ids=["one-pass", "two-phase"])
@pytest.mark.parametrize("role", ["matrix", "embedding"])
def test_zero_rows_without_decay_are_left_as_they_are(role, cut, monkeypatch):
    """A zero gradient row with no weight decay (an embedding's rows of tokens a batch lacks)
    is left untouched bit for bit; the other rows move."""
    gen = torch.Generator().manual_seed(8)
    shape = (9, 12)
    p0 = torch.randn(shape, generator=gen).flatten()
    g = torch.randn(shape, generator=gen)
    g[[0, 4, 8]] = 0
    start, end = (5, 9 * 12 - 7) if cut else (0, 9 * 12)
    flat_param = p0[start:end].clone()
    flat_param.grad = g.flatten()[start:end].clone()
    opt = SCALE([{"params": [flat_param], "role": role}], lr=1e-2)
    opt.bind_flat(flat_param, [(0, ShardLayout.flat_range(shape, start, end))], role)
    opt.step()
    assert stepped_by_triton(opt)
    full = torch.full((9 * 12,), float("nan"))
    full[start:end] = flat_param
    assert torch.equal(full.view(shape)[4], p0.view(shape)[4])
    assert not torch.equal(full.view(shape)[5], p0.view(shape)[5])


# ---------------------------------------------------------------- misuse, and no Triton


def test_misuse_is_refused():
    p, g = torch.zeros(40), torch.zeros(40)
    block = KernelBlock(p, g, None, 0, 4, 10, 1, 0.0, 0.9, 10)
    with pytest.raises(ValueError, match="unknown phase 'update'"):
        triton_step.Batch("update", [block], [0])
    with pytest.raises(ValueError, match="outside its flat tensors"):
        triton_step.Batch("step", [block._replace(offset=1)], [0])
    with pytest.raises(ValueError, match="needs 4 contiguous fp64 sums of squares"):
        triton_step.Batch("sums", [block._replace(sumsq=torch.zeros(4))], [0])
    with pytest.raises(ValueError, match="takes contiguous fp32"):
        triton_step.Batch("step", [block._replace(param=p.double())], [0])
    columns = block._replace(dim=0, count=4, sumsq=torch.zeros(10, dtype=torch.float64))
    with pytest.raises(ValueError, match="dim-0 block needs 4 contiguous uint8 row flags"):
        triton_step.Batch("sums", [columns], [0])
    batch = triton_step.Batch("step", [block], [0])
    with pytest.raises(ValueError, match="gradient of at least 40 elements, got a torch.bfloat16 cpu"):
        batch.run([g.bfloat16()], [0.1])
    with pytest.raises(ValueError, match="at least 40 elements, got a torch.float32 cpu tensor of 39"):
        batch.run([g[:39]], [0.1])


def test_without_triton_the_torch_path_steps(monkeypatch):
    """Triton missing: one warning, and the step takes the torch path."""
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` raises ImportError
    monkeypatch.delitem(sys.modules, "scale_zero.triton_kernels", raising=False)
    monkeypatch.delattr(scale_zero, "triton_kernels", raising=False)
    triton_step._kernels.cache_clear()
    try:
        t = torch.zeros(4, 3)
        with pytest.warns(UserWarning, match="Triton is not installed"):
            assert backend_for(t, t) is None
        params, reference = make_params(), make_params()
        run_scale(params, False, monkeypatch, steps=1, lr=1e-2)
        run_reference(reference, 1, lr=1e-2)
        torch.testing.assert_close(flat(params), flat(reference), rtol=0, atol=1e-6)
    finally:
        triton_step._kernels.cache_clear()  # the next test imports the kernels again


# ---------------------------------------------------------------- ZeRO-3 on two processes


def _zero3_steps():
    from tests.support.deepspeed_cases import COMPARE_AT, build, case_config, full_fp32, full_momentum, train

    engine, opt = build(case_config("zero3"))
    train(engine, range(COMPARE_AT))
    return full_fp32(engine), full_momentum(engine, opt), stepped_by_triton(opt)


def test_zero3_on_two_ranks_matches_reference(monkeypatch):
    """DeepSpeed ZeRO-3 (rows cut at rank boundaries, the embedding's columns reduced) with
    every rank's normalized step in the Triton kernel, against the single-process reference."""
    from tests.support.deepspeed_cases import CASES, COMPARE_AT, max_diff, reference

    # The ranks inherit the environment (`interpreted`): the interpreter on, the C++ kernel off.
    params, momenta = reference((2,) * COMPARE_AT, CASES["zero3"]["gradient_clipping"])
    for got, momentum, on_triton in run_distributed(_zero3_steps, 2):
        assert on_triton
        assert max_diff(got, params[-1]) < 1e-5
        assert (momentum - momenta[-1]).abs().max().item() < 1e-5
