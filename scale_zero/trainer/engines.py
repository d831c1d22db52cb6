"""The two ways to shard a LLaMA model over data-parallel ranks, behind one small interface.

    engine = DeepSpeedEngine(cfg, device) | FSDPEngine(cfg, device)
    loss, grad_norm = engine.train_step(micro_batches)   # one optimizer step
    engine.eval_loss(batches); engine.lr
    engine.save(folder); engine.load(folder)               # model + optimizer + scheduler

Neither builds the whole model on one rank: DeepSpeed ZeRO-3 constructs it inside
`deepspeed.zero.Init` (each parameter partitioned as its module is built), FSDP2 on the
meta device, sharded per decoder layer, then allocated shard by shard.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn
from transformers import LlamaForCausalLM

import scale_zero
from scale_zero.trainer.config import TrainConfig
from scale_zero.trainer.optim import base_optimizer, build_optimizer, build_scheduler


def init_distributed(backend: str) -> torch.device:
    """Join the process group the launcher set up; the device this rank computes on."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if backend == "deepspeed":
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        deepspeed.init_distributed()
        device = torch.device(get_accelerator().device_name(local_rank))
    else:
        device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
        dist.init_process_group("cuda:nccl,cpu:gloo" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def _checkpointing_kwargs() -> dict:
    # Non-reentrant: works with ZeRO-3's and FSDP2's parameter hooks and needs no input grads.
    return {"gradient_checkpointing_kwargs": {"use_reentrant": False}}


class DeepSpeedEngine:
    def __init__(self, cfg: TrainConfig, device: torch.device):
        import deepspeed

        self.cfg, self.device = cfg, device
        ds = cfg.ds_config
        with deepspeed.zero.Init(config_dict_or_path=ds, enabled=cfg.zero_stage == 3):
            model = LlamaForCausalLM(cfg.model_config)
        if cfg.zero_stage == 3:
            _init_partitioned_weights(model)
        if cfg.activation_checkpointing:
            model.gradient_checkpointing_enable(**_checkpointing_kwargs())

        optimizer = None
        if "optimizer" in ds:  # DeepSpeed's own AdamW (configs/zero3_adamw.json); the CLI lr wins
            ds["optimizer"].setdefault("params", {})["lr"] = cfg.lr
        else:
            optimizer = build_optimizer(cfg.optimizer, model, cfg.lr, cfg.adam_lr, cfg.momentum, cfg.weight_decay)
            ds.setdefault("zero_allow_untested_optimizer", True)
        # scale_zero.initialize binds SCALE to ZeRO's flat partitions; other optimizers pass through.
        self.engine, _, _, self.scheduler = scale_zero.initialize(
            model=model,
            optimizer=optimizer,
            model_parameters=model.parameters() if optimizer is None else None,
            lr_scheduler=lambda opt: build_scheduler(opt, cfg.steps, cfg.warmup_ratio, cfg.min_lr_ratio),
            config=ds,
        )
        self.optimizer = base_optimizer(self.engine.optimizer)

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def train_step(self, micro_batches: list[torch.Tensor]) -> tuple[float, float]:
        losses = []
        for batch in micro_batches:
            batch = batch.to(self.device)
            loss = self.engine(input_ids=batch, labels=batch).loss
            self.engine.backward(loss)  # scaled by 1 / accumulation steps inside
            self.engine.step()  # the optimizer and the scheduler step at the last micro-batch
            losses.append(loss.detach().float())
        return torch.stack(losses).mean().item(), float(self.engine.get_global_grad_norm() or 0.0)

    @torch.no_grad()
    def eval_loss(self, batches: list[torch.Tensor]) -> float:
        self.engine.eval()
        losses = [self.engine(input_ids=b.to(self.device), labels=b.to(self.device)).loss.float() for b in batches]
        self.engine.train()
        return torch.stack(losses).mean().item()

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


class FSDPEngine:
    def __init__(self, cfg: TrainConfig, device: torch.device):
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        from torch.distributed.device_mesh import init_device_mesh

        self.cfg, self.device = cfg, device
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        with torch.device("meta"):
            model = LlamaForCausalLM(cfg.model_config)
        if cfg.activation_checkpointing:
            model.gradient_checkpointing_enable(**_checkpointing_kwargs())
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if cfg.bf16 else MixedPrecisionPolicy()
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
        model.to_empty(device=device)
        # DTensor's random ops give each shard its part of one global random stream on GPUs;
        # on CPU they fall back to the local generator, so seed it per rank there.
        if device.type == "cpu":
            torch.manual_seed(cfg.seed + dist.get_rank())
        model.init_weights()  # on the local shards; also recomputes the RoPE buffers
        torch.manual_seed(cfg.seed)
        self.model: nn.Module = model
        self.optimizer = build_optimizer(cfg.optimizer, model, cfg.lr, cfg.adam_lr, cfg.momentum, cfg.weight_decay)
        self.scheduler = build_scheduler(self.optimizer, cfg.steps, cfg.warmup_ratio, cfg.min_lr_ratio)

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def train_step(self, micro_batches: list[torch.Tensor]) -> tuple[float, float]:
        losses = []
        for i, batch in enumerate(micro_batches):
            batch = batch.to(self.device)
            # Reduce-scatter gradients only after the last micro-batch.
            self.model.set_requires_gradient_sync(i == len(micro_batches) - 1)
            loss = self.model(input_ids=batch, labels=batch).loss
            (loss / len(micro_batches)).backward()
            losses.append(loss.detach().float())
        max_norm = self.cfg.grad_clip or float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return torch.stack(losses).mean().item(), grad_norm.item()

    @torch.no_grad()
    def eval_loss(self, batches: list[torch.Tensor]) -> float:
        losses = [self.model(input_ids=b.to(self.device), labels=b.to(self.device)).loss.float() for b in batches]
        return torch.stack(losses).mean().item()

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
        client = torch.load(os.path.join(folder, "client_state.pt"), weights_only=False)
        self.scheduler.load_state_dict(client["scheduler"])


ENGINES = {"deepspeed": DeepSpeedEngine, "fsdp": FSDPEngine}
