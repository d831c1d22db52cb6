"""Throughput, MFU, memory, validation, and the TensorBoard / console logs (rank 0 writes)."""

from __future__ import annotations

import math
import resource
import time
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import LlamaConfig

from scale_zero_train.config import TrainConfig

# Dense bf16 peak TFLOP/s per device, by a substring of the CUDA device name.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "V100": 125.0}
CPU_PEAK_TFLOPS = 1.0  # nominal: MFU on CPU is only comparable with itself


def peak_tflops(device: torch.device) -> float:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in PEAK_TFLOPS.items():
            if key in name:
                return value
        return PEAK_TFLOPS["A100"]
    return CPU_PEAK_TFLOPS


def flops_per_token(config: LlamaConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x (parameters that do matmuls) + attention scores
    (12 x layers x hidden x seq_len), as torchtitan counts them."""
    h, layers, ffn, vocab = config.hidden_size, config.num_hidden_layers, config.intermediate_size, config.vocab_size
    kv = h * config.num_key_value_heads // config.num_attention_heads
    matmul_params = layers * (2 * h * h + 2 * h * kv + 3 * h * ffn) + vocab * h  # + lm_head; the embedding is a lookup
    return 6 * matmul_params + 12 * layers * h * seq_len


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated accelerator memory, or on CPU the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def all_reduce(values: list[float], op=dist.ReduceOp.SUM) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=op)
    return t.tolist()


def _human(n: float) -> str:
    for unit in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.3g}{unit}"
        n /= 1000
    return f"{n:.3g}P"


class Logger:
    """Scalars to TensorBoard (`<run_dir>/tb`) and a progress line to the console, on rank 0."""

    def __init__(self, run_dir: Path, total_steps: int, enabled: bool):
        self.total_steps = total_steps
        self.enabled = enabled
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(run_dir) / "tb"))
        self.start, self.start_step = time.perf_counter(), 0

    def begin(self, step: int) -> None:
        """Training starts (or resumes) at `step`: the ETA counts from here."""
        self.start, self.start_step = time.perf_counter(), step

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(name, value, step)
            self.writer.flush()

    def print(self, *args) -> None:
        if self.enabled:
            print(*args, flush=True)

    def progress(self, step: int, loss: float, lr: float, grad_norm: float, tokens_per_s: float, mfu: float,
                 peak_bytes: float) -> None:
        done = step - self.start_step
        eta = (time.perf_counter() - self.start) / done * (self.total_steps - step)
        self.print(
            f"step {step:>6}/{self.total_steps}  loss {loss:.4f}  lr {lr:.3e}  grad_norm {grad_norm:.3f}  "
            f"tokens/s {_human(tokens_per_s)}  mfu {mfu:.2%}  mem {_human(peak_bytes)}B  "
            f"eta {time.strftime('%H:%M:%S', time.gmtime(eta))}"
        )

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))


class MetricsLogger:
    """Every `log_every` steps and at the invocation's last step: the interval's training loss
    (mean over steps and ranks), lr, gradient norm, throughput, MFU, peak memory (max over
    ranks) and the engine's optimizer scalars, to TensorBoard and one console line."""

    def __init__(self, cfg: TrainConfig, engine, device: torch.device, log: Logger):
        self.engine, self.device, self.log = engine, device, log
        self.every, self.world_size = cfg.logs.log_every, cfg.world_size
        self.last_step = cfg.run.stop_after or cfg.schedule.steps
        self.tokens_per_step = cfg.tokens_per_step
        self.flops_per_step = flops_per_token(cfg.model_config, cfg.schedule.seq_len) * cfg.tokens_per_step
        self.peak_flops = (cfg.logs.peak_tflops or peak_tflops(device)) * 1e12 * cfg.world_size
        self.begin(0)

    def begin(self, step: int) -> None:
        """Training starts (or resumes) at `step`: the first interval and the ETA count from here."""
        self.losses, self.interval_start = [], time.perf_counter()
        self.log.begin(step)

    def maybe_log(self, step: int, loss: float, grad_norm: float, lr: float, step_time: float) -> None:
        self.losses.append(loss)
        if step % self.every and step != self.last_step:
            return
        elapsed, steps = time.perf_counter() - self.interval_start, len(self.losses)
        (loss_sum,) = all_reduce([sum(self.losses) / steps])
        (peak_mem,) = all_reduce([peak_memory_bytes(self.device)], op=dist.ReduceOp.MAX)
        train_loss = loss_sum / self.world_size
        tokens_per_s = self.tokens_per_step * steps / elapsed
        mfu = self.flops_per_step * steps / elapsed / self.peak_flops
        self.log.scalars(step, {
            "train/loss": train_loss, "train/ppl": perplexity(train_loss), "train/lr": lr, "train/grad_norm": grad_norm,
            "perf/step_time_s": step_time, "perf/tokens_per_s": tokens_per_s, "perf/mfu": mfu,
            "memory/peak_bytes": peak_mem, **self.engine.optimizer_metrics(),
        })
        self.log.progress(step, train_loss, lr, grad_norm, tokens_per_s, mfu, peak_mem)
        self.losses, self.interval_start = [], time.perf_counter()


class Validator:
    """The held-out loss (mean over ranks): of the untrained model, every `eval_every` steps
    and at the last step of the schedule (--steps)."""

    def __init__(self, cfg: TrainConfig, engine, batches: list[torch.Tensor], log: Logger):
        self.engine, self.batches, self.log = engine, batches, log
        self.every, self.steps = cfg.logs.eval_every, cfg.schedule.steps
        self.first_loss = self.loss = None

    def validate_initial(self, step: int) -> None:
        if step == 0:  # a fresh run, not a resumed one
            self.validate(step)
            self.first_loss = self.loss

    def maybe_validate(self, step: int) -> None:
        if (self.every and step % self.every == 0) or step == self.steps:
            self.validate(step)

    def validate(self, step: int) -> None:
        (loss_sum,) = all_reduce([self.engine.eval_loss(self.batches)])
        self.loss = loss_sum / dist.get_world_size()
        self.log.scalars(step, {"val/loss": self.loss, "val/ppl": perplexity(self.loss)})
        self.log.print(f"step {step:>6}  validation loss {self.loss:.4f}  perplexity {perplexity(self.loss):.2f}")
