"""Pretrain a LLaMA model with SCALE (or AdamW) under DeepSpeed ZeRO or PyTorch FSDP2.

    deepspeed --num_gpus 8 launch/train.py --config configs/zero3_scale.json --model 1b
    torchrun --nproc-per-node 8 -m scale_zero_train --backend fsdp --model 1b

Every flag is in docs/training.md (or --help). The run writes TensorBoard logs to
<run-dir>/tb and checkpoints to <run-dir>/checkpoints; --resume auto (the default)
continues from the newest complete checkpoint there.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from scale_zero_train import data, plan
from scale_zero_train.checkpoint import Checkpointer, checkpoint_to_resume, load_trainer_state
from scale_zero_train.config import TrainConfig, load_config, parse_args
from scale_zero_train.engines import build_engine, deepspeed_config, init_distributed
from scale_zero_train.errors import ConfigError, fail
from scale_zero_train.metrics import Logger, MetricsLogger, Validator, perplexity
from scale_zero_train.vocab import PLANNED_STATE


def check_memory(cfg: TrainConfig) -> None:
    """On GPUs, refuse up front a run whose model states and activations cannot fit."""
    if not torch.cuda.is_available():
        return
    engine = plan.EngineConfig.from_ds_config(deepspeed_config(cfg)) if cfg.run.backend == "deepspeed" else "fsdp2"
    s = cfg.schedule
    plan.check_fits(cfg.model_config, cfg.world_size, s.micro_batch_size, s.seq_len,
                    gpu_memory_gib=torch.cuda.get_device_properties(0).total_memory / 2**30,
                    optimizer=PLANNED_STATE[cfg.optim.optimizer], engine=engine,
                    activation_checkpointing=cfg.model.activation_checkpointing, global_batch_size=s.global_batch_size)


def load_data(cfg: TrainConfig, rank: int) -> tuple[data.TokenStream, list[torch.Tensor]]:
    """The training stream (this rank's shard) and the fixed held-out batches."""
    d, s = cfg.data, cfg.schedule
    tokenizer_spec = d.tokenizer or ("t5-base" if d.data == "c4" else None)  # None: the embedded BPE
    # Rank 0 first: it may train and cache the embedded corpus's tokenizer.
    for turn in (0, 1):
        if (rank == 0) == (turn == 0):
            tokenizer = data.load_tokenizer(tokenizer_spec, d.cache_dir)
        dist.barrier()
    data.check_vocab_fits(tokenizer, cfg.model_config.vocab_size)
    stream = data.TokenStream(d.data, tokenizer, s.seq_len, s.micro_batch_size, rank, cfg.world_size, s.seed)
    val_batches = data.validation_batches(d.data, tokenizer, s.seq_len, s.micro_batch_size, cfg.logs.eval_tokens,
                                          rank, cfg.world_size)
    return stream, val_batches


def load_inputs(cfg: TrainConfig, rank: int, resume_from: Path | None):
    """Data (tokenizer, sources, vocabulary) and the saved trainer state, restored into the
    stream now: a checkpoint of other data settings is refused before anything is built.
    Any rank's problem stops every rank with its message."""
    error = stream = val_batches = trainer_state = None
    try:
        stream, val_batches = load_data(cfg, rank)
        if resume_from is not None:
            trainer_state = load_trainer_state(resume_from, rank)
            stream.load_state_dict(trainer_state["data"])
    except (data.DataError, ConfigError) as e:
        error = str(e)
    errors = [None] * cfg.world_size
    dist.all_gather_object(errors, error)
    if any(errors):
        fail(next(e for e in errors if e))
    return stream, val_batches, trainer_state


class Trainer:
    """One invocation of a run: the engine and the components that decide their own timing
    (metrics, validation, checkpoints) around the training steps."""

    def __init__(self, cfg: TrainConfig, device: torch.device, rank: int, resume_from: Path | None):
        self.cfg = cfg
        self.stream, val_batches, trainer_state = load_inputs(cfg, rank, resume_from)
        self.log = Logger(cfg.run_dir, cfg.schedule.steps, enabled=rank == 0)
        self.log.print("resolved config:\n" + json.dumps(cfg.summary(), indent=2, default=str))
        self.engine = build_engine(cfg, device)
        self.checkpointer = Checkpointer(cfg, self.engine, self.stream.state_dict, rank, self.log.print, resume_from)
        self.step = 0 if resume_from is None else self.checkpointer.resume(resume_from, trainer_state)
        self.validator = Validator(cfg, self.engine, val_batches, self.log)
        self.metrics = MetricsLogger(cfg, self.engine, device, self.log)
        s = cfg.schedule
        self.log.print(f"{s.global_batch_size} sequences x {s.seq_len} tokens per step = {s.micro_batch_size} per "
                       f"rank x {cfg.world_size} ranks x {cfg.grad_accum} accumulation steps")

    def train(self) -> dict:
        self.validator.validate_initial(self.step)
        self.metrics.begin(self.step)
        last_step = self.cfg.run.stop_after or self.cfg.schedule.steps
        while self.step < last_step:
            lr, started = self.engine.lr, time.perf_counter()
            loss, grad_norm = self.engine.train_step([next(self.stream) for _ in range(self.cfg.grad_accum)])
            self.step += 1
            self.metrics.maybe_log(self.step, loss, grad_norm, lr, step_time=time.perf_counter() - started)
            self.validator.maybe_validate(self.step)
            self.checkpointer.maybe_save(self.step)
        return self.close()

    def close(self) -> dict:
        self.log.close()
        first, last, checkpoint = self.validator.first_loss, self.validator.loss, self.checkpointer.latest
        summary = {"step": self.step, "first_val_loss": first, "val_loss": last,
                   "checkpoint": str(checkpoint) if checkpoint else None, "tensorboard": str(self.cfg.run_dir / "tb")}
        if first is not None and last is not None:
            self.log.print(f"validation perplexity {perplexity(first):.2f} -> {perplexity(last):.2f}")
        self.log.print(f"checkpoint: {summary['checkpoint']}\nTensorBoard logs: {summary['tensorboard']}  "
                       f"(view with: tensorboard --logdir {summary['tensorboard']})")
        return summary


def main(argv: list[str] | None = None, preset: dict | None = None) -> dict:
    """Train as the command line (and a preset, scale_zero_train.presets) says; the run's summary."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    args = parse_args(argv, preset)
    # Everything that needs no process group, on every rank, before writing anything.
    try:
        cfg = load_config(args, world_size)
        resume_from = checkpoint_to_resume(cfg)
        check_memory(cfg)
    except (ConfigError, plan.MemoryPlanError) as e:
        fail(str(e))
    torch.manual_seed(cfg.schedule.seed)
    device = init_distributed(cfg.run.backend)
    summary = Trainer(cfg, device, rank, resume_from).train()
    dist.barrier()
    dist.destroy_process_group()
    return summary


def cli() -> None:
    """The console script `scale-zero-train` and `python -m scale_zero_train` (exit status 0, not the summary)."""
    main()
