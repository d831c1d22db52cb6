"""The two ways to shard a LLaMA model over data-parallel ranks, behind one interface
(`Engine`, which both implement the same way):

    engine = build_engine(cfg, device)                     # DeepSpeedEngine or FSDPEngine
    loss, grad_norm = engine.train_step(micro_batches)     # one optimizer step
    engine.eval_loss(batches); engine.lr; engine.optimizer_metrics()
    engine.save(folder, client_state); engine.load(folder)  # model + optimizer + scheduler

Neither builds the whole model on one rank: DeepSpeed ZeRO-3 constructs it inside
`deepspeed.zero.Init` (each parameter partitioned as its module is built), FSDP2 on the
meta device, sharded per decoder layer, then allocated shard by shard.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist
from torch import nn
from transformers import LlamaForCausalLM

import scale_zero
from scale_zero_train.checkpoint import safe_load
from scale_zero_train.config import TrainConfig
from scale_zero_train.optim import base_optimizer, build_optimizer, build_scheduler, optimizer_metrics


class Engine(Protocol):
    """A model sharded over the data-parallel ranks with its optimizer and lr schedule."""

    optimizer: torch.optim.Optimizer
    """the torch optimizer (SCALE, AdamW, ...) inside the engine's wrappers"""

    @property
    def lr(self) -> float:
        """The learning rate of the next step."""

    def train_step(self, micro_batches: list[torch.Tensor]) -> tuple[float, float]:
        """One optimizer step over gradient-accumulation micro-batches: (mean loss, grad norm) on this rank."""

    def eval_loss(self, batches: list[torch.Tensor]) -> float:
        """Mean loss over `batches` in eval mode, without gradients; back in train mode after."""

    def optimizer_metrics(self) -> dict[str, float]:
        """The optimizer's scalars (a collective: every rank calls it at the same step)."""

    def save(self, folder: Path, client_state: dict) -> None:
        """Model, optimizer and scheduler state into `folder` (every rank calls it)."""

    def load(self, folder: Path) -> None:
        """Restore what `save` wrote."""


def init_distributed(backend: str) -> torch.device:
    """Join the process group the launcher set up; the device this rank computes on."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if backend == "deepspeed":
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        deepspeed.init_distributed()
        device = torch.device(get_accelerator().device_name(local_rank))
        if device.type == "cpu":
            release_cpu_allreduce_buffer()
    else:
        device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
        dist.init_process_group("cuda:nccl,cpu:gloo" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def release_cpu_allreduce_buffer() -> None:
    """DeepSpeed's CPU accelerator gives each rank of a one-machine job a shared-memory
    all-reduce buffer (about 70 MB in /dev/shm, named after the user, MASTER_ADDR,
    MASTER_PORT and the rank by its csrc/cpu/comm/shm.cpp) and never removes it, so every
    CPU run would leave its ranks' buffers in memory until the machine restarts. Every rank
    maps every buffer inside `deepspeed.init_distributed()`; once all have (the barrier), the
    names can go, the mappings stay until each process ends. Every rank calls this."""
    dist.barrier()
    name = "_".join(("deepspeed_allreduce_buffer", str(os.getuid()), os.environ.get("MASTER_ADDR", ""),
                     os.environ.get("MASTER_PORT", ""), str(dist.get_rank())))
    (Path("/dev/shm") / name).unlink(missing_ok=True)  # absent: ranks on several machines use no buffer


def deepspeed_config(cfg: TrainConfig) -> dict:
    """The DeepSpeed config this run hands to DeepSpeed: a new dict, the JSON as read with the
    resolved batch, clipping and precision, and the command line's lr for the JSON's own
    optimizer (configs/zero3_adamw.json); a client optimizer (SCALE) needs
    zero_allow_untested_optimizer unless the JSON says otherwise."""
    ds = copy.deepcopy(cfg.deepspeed_json)
    ds.update(
        train_batch_size=cfg.schedule.global_batch_size,
        train_micro_batch_size_per_gpu=cfg.schedule.micro_batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        gradient_clipping=cfg.optim.grad_clip,
        bf16={**ds.get("bf16", {}), "enabled": cfg.model.bf16},
    )
    if "optimizer" in ds:
        ds["optimizer"]["params"] = {**ds["optimizer"].get("params", {}), "lr": cfg.optim.lr}
    else:
        ds.setdefault("zero_allow_untested_optimizer", True)
    return ds


def _build_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    o = cfg.optim
    return build_optimizer(o.optimizer, model, o.lr, o.adam_lr, o.momentum, o.weight_decay, cfg.model.master_weights)


def _build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer):
    s = cfg.schedule
    return build_scheduler(optimizer, s.steps, s.warmup_ratio, s.min_lr_ratio)


def _enable_checkpointing(cfg: TrainConfig, model: LlamaForCausalLM) -> None:
    if cfg.model.activation_checkpointing:
        # Non-reentrant: works with ZeRO-3's and FSDP2's parameter hooks and needs no input grads.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


@torch.no_grad()
def _eval_loss(module: nn.Module, batches: list[torch.Tensor], device: torch.device) -> float:
    """Both engines' evaluation: eval mode (no dropout), no gradients, train mode again after."""
    module.eval()
    try:
        losses = [module(input_ids=b.to(device), labels=b.to(device)).loss.float() for b in batches]
    finally:
        module.train()
    return torch.stack(losses).mean().item()


class _Common:
    """What both engines share: the lr of the scheduler, evaluation and the optimizer's scalars."""

    module: nn.Module  # the callable model: DeepSpeed's engine or the FSDP2-sharded model
    optimizer: torch.optim.Optimizer
    device: torch.device

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def eval_loss(self, batches: list[torch.Tensor]) -> float:
        return _eval_loss(self.module, batches, self.device)

    def optimizer_metrics(self) -> dict[str, float]:
        return optimizer_metrics(self.optimizer)


class DeepSpeedEngine(_Common):
    def __init__(self, cfg: TrainConfig, device: torch.device):
        import deepspeed

        self.cfg, self.device = cfg, device
        ds = deepspeed_config(cfg)
        with deepspeed.zero.Init(config_dict_or_path=ds, enabled=cfg.zero_stage == 3):
            model = LlamaForCausalLM(cfg.model_config)
        if cfg.zero_stage == 3:
            _init_partitioned_weights(model)
        _enable_checkpointing(cfg, model)
        # DeepSpeed's own AdamW if the JSON defines it (configs/zero3_adamw.json), else ours.
        optimizer = None if "optimizer" in ds else _build_optimizer(cfg, model)
        # scale_zero.initialize binds SCALE to ZeRO's flat partitions; other optimizers pass through.
        self.engine, _, _, self.scheduler = scale_zero.initialize(
            model=model,
            optimizer=optimizer,
            model_parameters=model.parameters() if optimizer is None else None,
            lr_scheduler=lambda opt: _build_scheduler(cfg, opt),
            config=ds,
        )
        self.module = self.engine
        self.optimizer = base_optimizer(self.engine.optimizer)

    def train_step(self, micro_batches: list[torch.Tensor]) -> tuple[float, float]:
        losses = []
        for batch in micro_batches:
            batch = batch.to(self.device)
            loss = self.engine(input_ids=batch, labels=batch).loss
            self.engine.backward(loss)  # scaled by 1 / accumulation steps inside
            self.engine.step()  # the optimizer and the scheduler step at the last micro-batch
            losses.append(loss.detach().float())
        return torch.stack(losses).mean().item(), float(self.engine.get_global_grad_norm() or 0.0)

    def save(self, folder, client_state: dict) -> None:
        self.engine.save_checkpoint(str(folder), tag="engine", client_state=client_state, save_latest=False)

    def load(self, folder) -> None:
        path, _ = self.engine.load_checkpoint(str(folder), tag="engine", load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint in {folder}/engine")


@torch.no_grad()
def _init_partitioned_weights(model: LlamaForCausalLM) -> None:
    """Hugging Face's initialization of a model built inside zero.Init, one module at a time:
    rank 0 initializes the gathered weights and DeepSpeed scatters them back."""
    import deepspeed

    for module in model.modules():
        params = list(module.parameters(recurse=False))
        if params:
            with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
                if dist.get_rank() == 0:
                    model._init_weights(module)


class FSDPEngine(_Common):
    def __init__(self, cfg: TrainConfig, device: torch.device):
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        from torch.distributed.device_mesh import init_device_mesh

        self.cfg, self.device = cfg, device
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        with torch.device("meta"):
            model = LlamaForCausalLM(cfg.model_config)
        if cfg.model.master_weights != "fp32":
            store_parameters_in_bf16(model)
        _enable_checkpointing(cfg, model)
        policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if cfg.model.bf16
                  else MixedPrecisionPolicy())
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
        model.to_empty(device=device)
        # DTensor's random ops give each shard its part of one global random stream on GPUs;
        # on CPU they fall back to the local generator, so seed it per rank there.
        if device.type == "cpu":
            torch.manual_seed(cfg.schedule.seed + dist.get_rank())
        model.init_weights()  # on the local shards; also recomputes the RoPE buffers
        torch.manual_seed(cfg.schedule.seed)
        self.model = self.module = model
        self.optimizer = _build_optimizer(cfg, model)
        self.scheduler = _build_scheduler(cfg, self.optimizer)

    def train_step(self, micro_batches: list[torch.Tensor]) -> tuple[float, float]:
        losses = []
        for i, batch in enumerate(micro_batches):
            batch = batch.to(self.device)
            # Reduce-scatter gradients only after the last micro-batch.
            self.model.set_requires_gradient_sync(i == len(micro_batches) - 1)
            loss = self.model(input_ids=batch, labels=batch).loss
            (loss / len(micro_batches)).backward()
            losses.append(loss.detach().float())
        max_norm = self.cfg.optim.grad_clip or float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return torch.stack(losses).mean().item(), grad_norm.item()

    def _state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        return {"model": model_state, "optimizer": optim_state}

    def save(self, folder, client_state: dict) -> None:
        import torch.distributed.checkpoint as dcp

        dcp.save(self._state(), checkpoint_id=os.path.join(folder, "dcp"))
        if dist.get_rank() == 0:
            torch.save({**client_state, "scheduler": self.scheduler.state_dict()}, os.path.join(folder, "client_state.pt"))

    def load(self, folder) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions, set_model_state_dict, set_optimizer_state_dict,
        )

        state = self._state()  # the layout to load into (initializes empty optimizer state)
        dcp.load(state, checkpoint_id=os.path.join(folder, "dcp"))
        set_model_state_dict(self.model, state["model"])
        # SCALE keeps no state for matrices and the embedding: not strict about missing entries.
        set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"], options=StateDictOptions(strict=False))
        client = safe_load(Path(folder) / "client_state.pt")
        self.scheduler.load_state_dict(client["scheduler"])


def store_parameters_in_bf16(model: nn.Module) -> None:
    """Master-free FSDP2: the parameters themselves in bf16 (so the shards, their gradients
    and SCALE's updates are bf16, with no fp32 copy); buffers (RoPE's inverse frequencies)
    keep their dtype. A weight shared by two modules stays shared."""
    converted = {}
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) not in converted:
                converted[id(p)] = nn.Parameter(p.detach().to(torch.bfloat16), requires_grad=p.requires_grad)
            module.register_parameter(name, converted[id(p)])


def build_engine(cfg: TrainConfig, device: torch.device) -> Engine:
    """The engine of `cfg.run.backend` (scale_zero_train.vocab.BACKENDS)."""
    return DeepSpeedEngine(cfg, device) if cfg.run.backend == "deepspeed" else FSDPEngine(cfg, device)
