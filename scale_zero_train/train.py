"""Pretrain a LLaMA model with SCALE (or AdamW) under DeepSpeed ZeRO or PyTorch FSDP2.

    deepspeed --num_gpus 8 launch/train.py --config configs/zero3_scale.json --model 1b
    python -m scale_zero_train.launch --nproc-per-node 8 -m scale_zero_train --backend fsdp --model 1b

Every flag is in docs/training.md (or --help). The run writes TensorBoard logs to
<run-dir>/tb and checkpoints to <run-dir>/checkpoints; --resume auto (the default)
continues from the newest complete checkpoint there.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from scale_zero_train import data, plan
from scale_zero_train.checkpoint import (
    Checkpointer, ResumePlan, acquire_lock, check_run_dir, checkpoint_root, checkpoint_to_resume, load_trainer_state,
    move_aside, release_lock,
)
from scale_zero_train.config import TrainConfig, load_config, parse_args
from scale_zero_train.engines import build_engine, deepspeed_config, init_distributed
from scale_zero_train.errors import DIVERGED, ConfigError, fail
from scale_zero_train.metrics import Logger, MetricsLogger, Validator, all_reduce, perplexity
from scale_zero_train.vocab import PLANNED_STATE

# Test hook: fill the model's first parameter with NaN just before this step (a diverging run).
NAN_AT_STEP_ENV = "SCALE_ZERO_TEST_NAN_AT_STEP"


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


def gathered_failure(error: str | None, world_size: int) -> None:
    """Any rank's error stops every rank with its message."""
    errors = [None] * world_size
    dist.all_gather_object(errors, error)
    if any(errors):
        fail(next(e for e in errors if e))


def claim_run_dir(cfg: TrainConfig, resume: ResumePlan, rank: int) -> None:
    """Rank 0 locks the run dir, then moves aside what the resume plan says; a refusal stops every rank."""
    error = None
    if rank == 0:
        try:
            acquire_lock(cfg.run_dir)
            for warning in resume.warnings:
                print(warning, flush=True)
            if resume.move_aside:
                moved = move_aside(checkpoint_root(cfg.run_dir), list(resume.move_aside))
                print(f"moved {', '.join(p.name for p in resume.move_aside)} into {moved}", flush=True)
        except (ConfigError, OSError) as e:
            error = str(e)
    gathered_failure(error, cfg.world_size)


def poison_for_test(engine, step: int) -> None:
    if os.environ.get(NAN_AT_STEP_ENV) == str(step):
        with torch.no_grad():
            next(engine.module.parameters()).data.fill_(float("nan"))


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
    gathered_failure(error, cfg.world_size)
    return stream, val_batches, trainer_state


class Trainer:
    """One invocation of a run: the engine and the components that decide their own timing
    (metrics, validation, checkpoints) around the training steps."""

    def __init__(self, cfg: TrainConfig, device: torch.device, rank: int, resume: ResumePlan):
        self.cfg, resume_from = cfg, resume.path
        self.stream, val_batches, trainer_state = load_inputs(cfg, rank, resume_from)
        claim_run_dir(cfg, resume, rank)  # the first write into the run dir
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
            poison_for_test(self.engine, self.step + 1)
            loss, grad_norm = self.engine.train_step([next(self.stream) for _ in range(self.cfg.grad_accum)])
            self.step += 1
            mean_loss = self.check_finite(loss, grad_norm)
            self.metrics.maybe_log(self.step, loss, grad_norm, lr, step_time=time.perf_counter() - started)
            self.validator.maybe_validate(self.step)
            self.checkpointer.maybe_save(self.step, mean_loss)
        return self.close()

    def check_finite(self, loss: float, grad_norm: float) -> float:
        """The step's loss averaged over the ranks; a non-finite loss or gradient norm on any
        rank stops the run (exit status 3) before a checkpoint of its state can be written."""
        total_loss, total_norm = all_reduce([loss, grad_norm])  # NaN and inf survive a sum
        if not (math.isfinite(total_loss) and math.isfinite(total_norm)):
            last = self.checkpointer.latest
            fail(f"step {self.step} has a non-finite loss ({loss}) or gradient norm ({grad_norm}); stopped without "
                 f"saving it. The last good checkpoint is {last or 'none'}: lower --lr / --adam-lr or raise "
                 "--warmup-ratio, in a new --run-dir (the recipe is part of the run)", status=DIVERGED)
        return total_loss / self.cfg.world_size

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


def check_inputs(argv: list[str] | None, world_size: int, preset: dict | None = None) -> tuple[TrainConfig, ResumePlan]:
    """Everything that needs no process group, before writing anything: the resolved config
    and where it resumes from; one message and exit status 2 on a problem (on every rank,
    and in scale_zero_train.launch before any rank starts)."""
    args = parse_args(argv, preset)
    try:
        cfg = load_config(args, world_size)
        resume = checkpoint_to_resume(cfg)
        check_memory(cfg)
        check_run_dir(cfg)
    except (ConfigError, data.DataError, plan.MemoryPlanError) as e:
        fail(str(e))
    return cfg, resume


def main(argv: list[str] | None = None, preset: dict | None = None) -> dict:
    """Train as the command line (and a preset, scale_zero_train.presets) says; the run's summary."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    cfg, resume = check_inputs(argv, world_size, preset)
    torch.manual_seed(cfg.schedule.seed)
    device = init_distributed(cfg.run.backend)
    try:
        summary = Trainer(cfg, device, rank, resume).train()
        dist.barrier()
    finally:
        if rank == 0:
            release_lock(cfg.run_dir)
    dist.destroy_process_group()
    return summary


def cli() -> None:
    """The console script `scale-zero-train` and `python -m scale_zero_train` (exit status 0, not the summary)."""
    main()
