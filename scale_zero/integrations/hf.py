"""The Hugging Face Trainer with SCALE: `SCALETrainer`.

The plain Trainer cannot train SCALE as it is meant to be trained: under `deepspeed=` it
drops an optimizer passed as `optimizers=` and builds AdamW (no error, no warning), and
`optimizer_cls_and_kwargs=` hands the optimizer decay / no-decay groups, without the
embedding and output roles. `SCALETrainer` builds `SCALE(scale_param_groups(model), ...)`
itself in `create_optimizer` (the hook the Trainer's DeepSpeed and FSDP set-ups call),
or takes the SCALE you pass, under any backend; DeepSpeed binds it at its first step,
FSDP2 hands it DTensors (docs/integrations.md).
"""

from __future__ import annotations

import torch
from transformers import Trainer

from scale_zero.param_groups import scale_param_groups
from scale_zero.scale import SCALE


class SCALETrainer(Trainer):
    """A `transformers.Trainer` whose optimizer is SCALE, with the role groups of
    `scale_param_groups(model)`.

    `lr` is `args.learning_rate` and `weight_decay` is `args.weight_decay`; other SCALE
    arguments (momentum, adam_lr, betas, eps, ablations) go in `scale_kwargs`, or in the
    kwargs of `optimizer_cls_and_kwargs=(SCALE, {...})`, which then may override lr and
    weight_decay too. `optimizers=(SCALE(...), scheduler)` is used as given, also under
    DeepSpeed (where the plain Trainer drops it). Any other optimizer is refused."""

    def __init__(self, *args, scale_kwargs: dict | None = None, **kwargs):
        optimizer, _ = kwargs.get("optimizers", (None, None))
        cls_and_kwargs = kwargs.pop("optimizer_cls_and_kwargs", None)
        if optimizer is not None and not isinstance(optimizer, SCALE):
            raise TypeError(f"SCALETrainer trains SCALE; got optimizers=({type(optimizer).__name__}, ...)")
        if cls_and_kwargs is not None and cls_and_kwargs[0] is not SCALE:
            raise TypeError(f"SCALETrainer trains SCALE; got optimizer_cls_and_kwargs=({cls_and_kwargs[0]}, ...)")
        if optimizer is not None and (scale_kwargs or cls_and_kwargs):
            raise ValueError("pass either a built SCALE (optimizers=) or its arguments, not both")
        super().__init__(*args, **kwargs)
        self.client_scale = optimizer
        self.scale_kwargs = {**(scale_kwargs or {}), **(cls_and_kwargs[1] if cls_and_kwargs else {})}

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        if self.optimizer is None:  # the DeepSpeed set-up resets it to None: take the client's SCALE again
            self.optimizer = self.client_scale or SCALE(
                scale_param_groups(self.model if model is None else model),
                **{"lr": self.args.learning_rate, "weight_decay": self.args.weight_decay, **self.scale_kwargs},
            )
        return self.optimizer


def check_trainer(trainer: Trainer) -> None:
    """Raise ValueError where a plain `Trainer` would train something other than the SCALE
    it was given: under `deepspeed=` it drops `optimizers=(SCALE(...), ...)` and builds
    AdamW; `optimizer_cls_and_kwargs=(SCALE, ...)` gets decay / no-decay groups without
    roles. Call it before `trainer.train()`; `SCALETrainer` needs no check."""
    if type(trainer).create_optimizer is not Trainer.create_optimizer:
        return  # a subclass builds its own optimizer (SCALETrainer, or the user's)
    problems = []
    if isinstance(trainer.optimizer, SCALE) and trainer.is_deepspeed_enabled:
        problems.append("Trainer(deepspeed=...) drops optimizers=(SCALE(...), ...) and trains AdamW instead")
    cls_and_kwargs = trainer.optimizer_cls_and_kwargs
    if cls_and_kwargs is not None and cls_and_kwargs[0] is SCALE:
        problems.append("optimizer_cls_and_kwargs=(SCALE, ...) builds SCALE on the Trainer's decay / no-decay "
                        "groups, without the embedding and output roles")
    if problems:
        raise ValueError("; ".join(problems) + ": use scale_zero.integrations.hf.SCALETrainer (the same arguments)")
