"""What the kernel tests (tests/unit/test_scale_fast_path.py, test_triton_step.py) share:
parameters of every role stepped by SCALE (its kernel on or off) and by the reference,
gradients with extreme values, and one step of a flat range evaluated in fp64."""

import torch

from scale_zero import SCALE, ShardLayout
from tests.support.reference import ReferenceSCALE


def make_params(shapes: dict, dtype=torch.float32, seed=0) -> dict:
    """Per role, parameters of these shapes."""
    gen = torch.Generator().manual_seed(seed)
    return {
        role: [torch.randn(shape, generator=gen).to(dtype).requires_grad_() for shape in role_shapes]
        for role, role_shapes in shapes.items()
    }


def set_grads(params: dict, step: int) -> None:
    """Step `step`'s gradients, each normalized one with a zero row and a zero column."""
    gen = torch.Generator().manual_seed(100 + step)
    for role, ps in params.items():
        for p in ps:
            g = torch.randn(p.shape, generator=gen)
            if role != "vector":
                g.view(g.shape[0], -1)[1] = 0
                g.view(g.shape[0], -1)[:, 2] = 0
            p.grad = g.to(p.dtype)


def run_scale(params: dict, monkeypatch, steps: int, kernel_off=None, **kwargs) -> SCALE:
    """`steps` steps of SCALE, one group per role, lr falling by a tenth per step;
    `kernel_off(m)` (with a monkeypatch context) sends the step down the torch path."""
    with monkeypatch.context() as m:
        if kernel_off is not None:
            kernel_off(m)
        opt = SCALE([{"params": ps, "role": r} for r, ps in params.items()], **kwargs)
        for t in range(steps):
            set_grads(params, t)
            for group in opt.param_groups:
                group["lr"] = kwargs["lr"] * (1 - 0.1 * t)
            opt.step()
    return opt


def run_reference(params: dict, steps: int, **kwargs) -> None:
    """`run_scale`'s steps with the reference implementation."""
    ref = ReferenceSCALE([(p, role) for role, ps in params.items() for p in ps], **kwargs)
    for t in range(steps):
        set_grads(params, t)
        ref.lr = kwargs["lr"] * (1 - 0.1 * t)
        ref.step()


def flat(params: dict) -> torch.Tensor:
    return torch.cat([p.detach().float().reshape(-1) for ps in params.values() for p in ps])


def gradients(kind: str, shape, gen) -> torch.Tensor:
    """Random gradients; "extreme": a row of 1e25 (its fp32 sum of squares would overflow),
    a zero row, a row of subnormals and a column of 1e25 (the embedding's statistic)."""
    g = torch.randn(shape, generator=gen)
    if kind == "extreme":
        g[0] *= 1e25
        g[1] = 0
        g[2] *= 1e-40
        g[3:, 3] *= 1e25
    return g


def expected_step(p, g, start, end, shape, dim, momentum, lr, weight_decay, beta):
    """One step from zero momentum, in fp64, of the range [start, end) alone (no group)."""
    rows, cols = shape
    s = g.double() * (1 - beta) if momentum else g.double()
    full = torch.zeros(rows * cols, dtype=torch.float64)
    full[start:end] = s
    rms = full.view(rows, cols).square().mean(dim).sqrt().clamp_min(1e-8).float().double()
    per_element = rms.unsqueeze(dim).expand(rows, cols).reshape(-1)[start:end]
    return (p.double() * (1 - lr * weight_decay) - lr * s / per_element).float()


def bind_pieces(opt: SCALE, flat_param: torch.Tensor, pieces: list, role: str) -> list[int]:
    """Bind `flat_param` as holding `pieces`, (shape, start, end) each, one after another;
    returns their offsets."""
    numels = [end - start for _, start, end in pieces]
    offsets = [sum(numels[:i]) for i in range(len(numels))]
    opt.bind_flat(flat_param, [(o, ShardLayout.flat_range(s, a, b)) for o, (s, a, b) in zip(offsets, pieces)], role)
    return offsets


def one_step_of_pieces(pieces: list, kind: str, role: str, monkeypatch, kernel_off):
    """One step of a flat holding `pieces` (`bind_pieces`), with `kind` gradients, by the
    kernel and by the torch path (`kernel_off`), and its fp64 evaluation: returns the two
    results, the expected one, the starting parameter and the SCALE that ran the kernel."""
    lr, weight_decay, beta = LR, WEIGHT_DECAY, 0.9
    gen = torch.Generator().manual_seed(3)
    p0 = torch.randn(sum(end - start for _, start, end in pieces), generator=gen)
    g = torch.cat([gradients(kind, shape, gen).flatten()[start:end] for shape, start, end in pieces])
    results, optimizers = [], []
    for off in (None, kernel_off):
        flat_param = p0.clone()
        flat_param.grad = g.clone()
        with monkeypatch.context() as m:
            if off is not None:
                off(m)
            opt = SCALE([{"params": [flat_param], "role": role}], lr=lr, weight_decay=weight_decay, momentum=beta)
            offsets = bind_pieces(opt, flat_param, pieces, role)
            opt.step()
        results.append(flat_param)
        optimizers.append(opt)
    dim = {"matrix": 1, "embedding": 0, "output": 1}[role]
    expected = torch.cat([
        expected_step(p0[o : o + b - a], g[o : o + b - a], a, b, s, dim, role == "output", lr, weight_decay, beta)
        for o, (s, a, b) in zip(offsets, pieces)
    ])
    return results, expected, p0, optimizers[0]


# The settings of `one_step_of_pieces`.
LR, WEIGHT_DECAY = 1e-2, 0.1
