"""An independent, plain per-tensor SCALE written straight from docs/algorithm.md ("The update").

Deliberately naive: a loop over tensors, no batching, no layouts, no collectives. Tests
compare every engine and world size against it."""

import torch


def rms(x, dim):
    return x.pow(2).mean(dim=dim, keepdim=True).sqrt().clamp_min(1e-8)


class ReferenceSCALE:
    def __init__(self, roles, lr, momentum=0.9, adam_lr=None, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8):
        self.roles = roles  # list of (param, role)
        self.peak_lr, self.lr = lr, lr
        self.momentum, self.wd, self.betas, self.eps = momentum, weight_decay, betas, eps
        self.adam_lr = lr if adam_lr is None else adam_lr
        self.state = {}

    @torch.no_grad()
    def step(self):
        for p, role in self.roles:
            if p.grad is None:
                continue
            g = p.grad.float()
            x = p.float()
            st = self.state.setdefault(p, {})
            if role == "vector":
                b1, b2 = self.betas
                lr = self.adam_lr * self.lr / self.peak_lr
                st["t"] = st.get("t", 0) + 1
                m = st.setdefault("m", torch.zeros_like(x))
                v = st.setdefault("v", torch.zeros_like(x))
                m.lerp_(g, 1 - b1)
                v.lerp_(g * g, 1 - b2)
                x = x * (1 - lr * self.wd)
                x = x - lr * (1 - b2 ** st["t"]) ** 0.5 / (1 - b1 ** st["t"]) * (m / (self.eps + v.sqrt()))
            else:
                g2 = g.reshape(g.shape[0], -1)
                if role == "output":
                    m = st.setdefault("m", torch.zeros_like(g2))
                    m.lerp_(g2, 1 - self.momentum)
                    u = m / rms(m, 1)
                elif role == "embedding":
                    u = g2 / rms(g2, 0)
                else:
                    u = g2 / rms(g2, 1)
                x = x * (1 - self.lr * self.wd)
                x = x - self.lr * u.reshape(x.shape)
            p.copy_(x)
