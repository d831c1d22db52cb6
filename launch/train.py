"""Pretrain a LLaMA model with SCALE (or AdamW) under DeepSpeed ZeRO or PyTorch FSDP2.

    deepspeed --num_gpus 8 launch/train.py --config configs/zero3_scale.json --model 1b
    torchrun --nproc-per-node 8 launch/train.py --backend fsdp --model 1b

Every flag is in docs/training.md (or --help). The run writes TensorBoard logs to
<run-dir>/tb and checkpoints to <run-dir>/checkpoints; --resume auto (the default)
continues from the newest complete checkpoint there.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `deepspeed launch/train.py` / `torchrun launch/train.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist

from scale_zero import data, plan
from scale_zero.trainer import checkpoint as ckpt
from scale_zero.trainer.config import ConfigError, TrainConfig, parse_args, resolve
from scale_zero.trainer.engines import ENGINES, init_distributed
from scale_zero.trainer.metrics import Logger, all_reduce, flops_per_token, peak_memory_bytes, peak_tflops, perplexity
from scale_zero.trainer.optim import state_bytes


def fail(message: str, rank: int) -> None:
    """One message (from rank 0), exit status 2, nothing written."""
    if rank == 0:
        print(f"error: {message}", file=sys.stderr, flush=True)
    else:
        time.sleep(2)  # let rank 0 print before the launcher stops the other ranks
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.exit(2)


def checkpoint_to_resume(cfg: TrainConfig) -> Path | None:
    """The checkpoint this run continues from, checked against this run's model and ranks."""
    root = ckpt.checkpoint_root(cfg.run_dir)
    if cfg.resume == "none":
        if ckpt.complete_checkpoints(root):
            raise ConfigError(f"{root} already holds checkpoints and --resume is none; use --resume auto to "
                              "continue that run, or another --run-dir / --job-name to start a new one")
        return None
    path = ckpt.find_latest(root) if cfg.resume == "auto" else Path(cfg.resume)
    if path is not None:
        ckpt.check_compatible(path, cfg)
    return path


def check_memory(cfg: TrainConfig) -> None:
    """On GPUs, refuse up front a run whose model states and activations cannot fit."""
    if not torch.cuda.is_available():
        return
    engine = plan.EngineConfig.from_ds_config(cfg.ds_config) if cfg.backend == "deepspeed" else "fsdp2"
    # SGD with momentum on every role keeps one buffer per parameter: AdamW's bound covers it.
    optimizer = "adamw" if cfg.optimizer in ("adamw", "sgd") else "scale"
    plan.check_fits(cfg.model_config, cfg.world_size, cfg.micro_batch_size, cfg.seq_len,
                    gpu_memory_gib=torch.cuda.get_device_properties(0).total_memory / 2**30,
                    optimizer=optimizer, engine=engine, activation_checkpointing=cfg.activation_checkpointing,
                    global_batch_size=cfg.global_batch_size)


def load_data(cfg: TrainConfig, rank: int) -> tuple[data.TokenStream, list[torch.Tensor]]:
    """The training stream (this rank's shard) and the fixed held-out batches."""
    tokenizer_spec = cfg.tokenizer or ("t5-base" if cfg.data == "c4" else None)  # None: the embedded BPE
    # Rank 0 first: it may train and cache the embedded corpus's tokenizer.
    for turn in (0, 1):
        if (rank == 0) == (turn == 0):
            tokenizer = data.load_tokenizer(tokenizer_spec, cfg.cache_dir)
        dist.barrier()
    data.check_vocab_fits(tokenizer, cfg.model_config.vocab_size)
    stream = data.TokenStream(cfg.data, tokenizer, cfg.seq_len, cfg.micro_batch_size, rank, cfg.world_size, cfg.seed)
    val_batches = data.validation_batches(cfg.data, tokenizer, cfg.seq_len, cfg.micro_batch_size,
                                          cfg.eval_tokens, rank, cfg.world_size)
    return stream, val_batches


def save_checkpoint(engine, cfg: TrainConfig, step: int, stream: data.TokenStream, rank: int) -> Path:
    root = ckpt.checkpoint_root(cfg.run_dir)
    folder = ckpt.begin_save(root, step)
    engine.save(folder, client_state={"step": step})
    torch.save({"step": step, "data": stream.state_dict(), "rng": ckpt.rng_state()}, ckpt.rank_state_path(folder, rank))
    return ckpt.commit_save(root, folder, step, {**ckpt.run_meta(cfg), "config": cfg.summary()}, cfg.keep)


def load_trainer_state(path: Path, stream: data.TokenStream, rank: int) -> dict:
    """This rank's step, data position (restored into `stream` now: a checkpoint of other
    data settings is refused before anything is built) and RNG states."""
    state = torch.load(ckpt.rank_state_path(path, rank), weights_only=False)
    stream.load_state_dict(state["data"])
    return state


def evaluate(engine, val_batches: list[torch.Tensor]) -> float:
    (loss_sum,) = all_reduce([engine.eval_loss(val_batches)])
    return loss_sum / dist.get_world_size()


def main(argv: list[str] | None = None, preset: dict | None = None) -> dict:
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    args = parse_args(argv, preset)

    # 1. Check everything that needs no process group, on every rank, before writing anything.
    try:
        cfg = resolve(args, world_size)
        resume_from = checkpoint_to_resume(cfg)
        check_memory(cfg)
    except (ConfigError, plan.MemoryPlanError) as e:
        fail(str(e), rank)
    torch.manual_seed(cfg.seed)
    device = init_distributed(cfg.backend)

    # 2. Data (tokenizer, sources, vocabulary, saved position): any rank's problem stops every rank.
    error = trainer_state = None
    try:
        stream, val_batches = load_data(cfg, rank)
        if resume_from is not None:
            trainer_state = load_trainer_state(resume_from, stream, rank)
    except (data.DataError, ConfigError) as e:
        error = str(e)
    errors = [None] * world_size
    dist.all_gather_object(errors, error)
    if any(errors):
        fail(next(e for e in errors if e), rank)

    # 3. Build, resume, train.
    log = Logger(cfg.run_dir, cfg.steps, enabled=rank == 0)
    log.print("resolved config:\n" + json.dumps(cfg.summary(), indent=2, default=str))
    engine = ENGINES[cfg.backend](cfg, device)
    step = 0
    if resume_from is not None:
        engine.load(resume_from)
        ckpt.set_rng_state(trainer_state["rng"])
        step = trainer_state["step"]
        log.print(f"resumed from {resume_from} at step {step}")
    tokens_per_step = cfg.global_batch_size * cfg.seq_len
    flops_per_step = flops_per_token(cfg.model_config, cfg.seq_len) * tokens_per_step
    peak_flops = (cfg.peak_tflops or peak_tflops(device)) * 1e12 * cfg.world_size
    log.print(f"{cfg.global_batch_size} sequences x {cfg.seq_len} tokens per step = {cfg.micro_batch_size} per rank "
              f"x {cfg.world_size} ranks x {cfg.grad_accum} accumulation steps")

    val_loss = first_val_loss = None
    if step == 0:
        val_loss = first_val_loss = evaluate(engine, val_batches)
        log.scalars(0, {"val/loss": val_loss, "val/ppl": perplexity(val_loss)})
        log.print(f"step      0  validation loss {val_loss:.4f}  perplexity {perplexity(val_loss):.2f}")
    interval_losses, interval_start = [], time.perf_counter()
    log.begin(step)
    checkpoint = resume_from
    last_step = cfg.stop_after or cfg.steps
    while step < last_step:
        step_start, lr = time.perf_counter(), engine.lr
        loss, grad_norm = engine.train_step([next(stream) for _ in range(cfg.grad_accum)])
        step += 1
        step_time = time.perf_counter() - step_start
        interval_losses.append(loss)

        if step % cfg.log_every == 0 or step == last_step:
            elapsed, steps_done = time.perf_counter() - interval_start, len(interval_losses)
            loss_sum, opt_bytes = all_reduce([sum(interval_losses) / steps_done, state_bytes(engine.optimizer)])
            (peak_mem,) = all_reduce([peak_memory_bytes(device)], op=dist.ReduceOp.MAX)
            train_loss = loss_sum / cfg.world_size
            values = {
                "train/loss": train_loss, "train/ppl": perplexity(train_loss), "train/lr": lr,
                "train/grad_norm": grad_norm, "perf/step_time_s": step_time,
                "perf/tokens_per_s": tokens_per_step * steps_done / elapsed,
                "perf/mfu": flops_per_step * steps_done / elapsed / peak_flops,
                "memory/peak_bytes": peak_mem, "memory/optimizer_state_bytes": opt_bytes,
            }
            comm = getattr(engine.optimizer, "comm_stats", None)
            if comm is not None:  # SCALE: what its last step issued on this rank
                values.update({"comm/scale_collectives": comm.collectives, "comm/scale_bytes": comm.bytes})
            log.scalars(step, values)
            log.progress(step, values)
            interval_losses, interval_start = [], time.perf_counter()

        if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps:
            val_loss = evaluate(engine, val_batches)
            log.scalars(step, {"val/loss": val_loss, "val/ppl": perplexity(val_loss)})
            log.print(f"step {step:>6}  validation loss {val_loss:.4f}  perplexity {perplexity(val_loss):.2f}")

        if (cfg.save_every and step % cfg.save_every == 0) or step == last_step:
            checkpoint = save_checkpoint(engine, cfg, step, stream, rank)
            log.print(f"saved checkpoint {checkpoint}")

    log.close()
    summary = {"step": step, "first_val_loss": first_val_loss, "val_loss": val_loss,
               "checkpoint": str(checkpoint) if checkpoint else None, "tensorboard": str(Path(cfg.run_dir) / "tb")}
    if first_val_loss is not None and val_loss is not None:
        log.print(f"validation perplexity {perplexity(first_val_loss):.2f} -> {perplexity(val_loss):.2f}")
    log.print(f"checkpoint: {summary['checkpoint']}\nTensorBoard logs: {summary['tensorboard']}  "
              f"(view with: tensorboard --logdir {summary['tensorboard']})")
    dist.barrier()
    dist.destroy_process_group()
    return summary


if __name__ == "__main__":
    main()
