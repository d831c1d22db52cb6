"""What the kernel tests (tests/unit/test_scale_fast_path.py, test_triton_step.py) share:
gradients with extreme values, and one step of a flat range evaluated in fp64."""

import torch


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
