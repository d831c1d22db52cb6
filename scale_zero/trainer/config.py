"""The training command line, and everything that can be checked about it before a step.

`parse_args(argv, preset)` builds the arguments (a preset, e.g. launch/train_7b.py, only
changes the defaults). `resolve(args, world_size)` reads the model and DeepSpeed configs,
derives gradient accumulation and checks every value; a problem raises `ConfigError`
with one message that names it and the fix. Nothing here writes to disk.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from transformers import LlamaConfig

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL_DIR = REPO_ROOT / "models"
MODEL_SIZES = ("tiny", "60m", "130m", "350m", "1b", "7b")
OPTIMIZERS = ("scale", "adamw", "colnorm-sgd", "sgd", "row-scale")
BACKENDS = ("deepspeed", "fsdp")


class ConfigError(ValueError):
    """A bad argument or input file: the message names the problem and the fix."""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # unset (None) defaults are explained in the help text
        return action.help if action.default is None else super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        """Usage errors as every other bad input: one message (rank 0's), exit status 2."""
        if int(os.environ.get("RANK", 0)) == 0:
            super().error(message)
        time.sleep(2)  # let rank 0 print before the launcher stops the other ranks
        sys.exit(2)


def build_parser(preset: dict | None = None) -> argparse.ArgumentParser:
    p = _Parser(
        prog="launch/train.py",
        description="Pretrain a LLaMA model with SCALE (or AdamW) under DeepSpeed ZeRO or FSDP2.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--backend", choices=BACKENDS, default="deepspeed",
                   help="deepspeed: start with the `deepspeed` launcher; fsdp: start with `torchrun`")
    p.add_argument("--config", help="DeepSpeed JSON config (deepspeed backend), e.g. configs/zero3_scale.json")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)

    g = p.add_argument_group("model and optimizer")
    g.add_argument("--model", default="tiny", help=f"one of {', '.join(MODEL_SIZES)} or a path to a LlamaConfig JSON")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default="scale",
                   help="scale; adamw (baseline); ablations: colnorm-sgd = SCALE without momentum, "
                        "sgd = SGD with momentum on every matrix, row-scale = SCALE normalizing the paper's rows")
    g.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (SCALE's matrix lr, or AdamW's lr)")
    g.add_argument("--adam-lr", type=float, default=2e-2, help="SCALE's peak lr for 1-D parameters (AdamW inside SCALE)")
    g.add_argument("--momentum", type=float, default=0.9, help="SCALE's output-layer momentum (AdamW's beta1)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="decoupled weight decay (the paper uses none)")
    g.add_argument("--grad-clip", type=float, default=None,
                   help="max global gradient norm, 0 = off (default: the DeepSpeed config's gradient_clipping, else 1.0)")

    g = p.add_argument_group("batch and schedule")
    g.add_argument("--global-batch-size", type=int, default=None,
                   help="sequences per optimizer step over all ranks (default: the DeepSpeed config's "
                        "train_batch_size, else 512)")
    g.add_argument("--micro-batch-size", type=int, default=None,
                   help="sequences per rank per forward pass (default: the DeepSpeed config's "
                        "train_micro_batch_size_per_gpu, else 1); gradient accumulation = "
                        "global / (micro * data-parallel ranks)")
    g.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (packed documents)")
    g.add_argument("--steps", type=int, default=1000, help="optimizer steps")
    g.add_argument("--warmup-ratio", type=float, default=0.1, help="linear warmup from 0 over this fraction of steps")
    g.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine decay ends at this fraction of the peak lr")
    g.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 compute (default: the DeepSpeed config's bf16.enabled; on for fsdp)")
    g.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute each decoder layer in backward (default: on if the DeepSpeed config "
                        "has an activation_checkpointing section)")
    g.add_argument("--seed", type=int, default=0, help="model initialization and data order")

    g = p.add_argument_group("data")
    g.add_argument("--data", default="embedded", help="embedded | c4 | a path or glob of text/jsonl/parquet files")
    g.add_argument("--tokenizer", default=None,
                   help="SentencePiece model or Hugging Face tokenizer (path or name); default: the embedded "
                        "corpus's own SentencePiece model, t5-base for c4")
    g.add_argument("--cache-dir", default=None, help="tokenizer/dataset cache (default: ~/.cache/scale-zero)")

    g = p.add_argument_group("run, logs and checkpoints")
    g.add_argument("--job-name", default=None, help="default: <model>-<optimizer>-<backend>")
    g.add_argument("--run-dir", default=None, help="default: runs/<job-name>; holds tb/ and checkpoints/")
    g.add_argument("--save-every", type=int, default=500, help="checkpoint every N steps (and at the end); 0 = only at the end")
    g.add_argument("--keep", type=int, default=3, help="keep the last K checkpoints")
    g.add_argument("--resume", default="auto", help="auto (newest complete checkpoint in the run dir, if any) | none | PATH")
    g.add_argument("--stop-after", type=int, default=None,
                   help="end this invocation after this step with a checkpoint, keeping the schedule of --steps "
                        "(for time-limited jobs; the next start resumes)")
    g.add_argument("--log-every", type=int, default=10, help="TensorBoard scalars and a console line every N steps")
    g.add_argument("--eval-every", type=int, default=100, help="validation every N steps (and at the end); 0 = only at the end")
    g.add_argument("--eval-tokens", type=int, default=65536, help="held-out tokens per validation (over all ranks)")
    g.add_argument("--peak-tflops", type=float, default=None,
                   help="per-device peak bf16 TFLOP/s for MFU (default: known GPUs by name, else 1.0 per CPU rank)")
    if preset:
        unknown = set(preset) - {a.dest for a in p._actions}
        if unknown:
            raise ConfigError(f"preset sets unknown arguments {sorted(unknown)}")
        p.set_defaults(**preset)
    return p


def parse_args(argv: list[str] | None = None, preset: dict | None = None) -> argparse.Namespace:
    return build_parser(preset).parse_args(argv)


def load_json(path: str | Path, what: str, fix: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist; {fix}")
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{what} {path} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); fix the file")
    if not isinstance(value, dict):
        raise ConfigError(f"{what} {path} must hold a JSON object, not {type(value).__name__}; fix the file")
    return value


def load_model_config(model: str) -> LlamaConfig:
    """A model size name (models/<size>.json) or a path to a LlamaConfig JSON."""
    if model.lower() in MODEL_SIZES:
        path = MODEL_DIR / f"{model.lower()}.json"
    elif model.endswith(".json") or "/" in model:
        path = Path(model)
    else:
        raise ConfigError(f"unknown model {model!r}; use one of {', '.join(MODEL_SIZES)} or a path to a LlamaConfig JSON")
    raw = load_json(path, "model config", f"use one of {', '.join(MODEL_SIZES)} or a LlamaConfig JSON path")
    if raw.get("model_type", "llama") != "llama":
        raise ConfigError(f"model config {path} has model_type {raw['model_type']!r}; this trainer builds LLaMA (model_type llama)")
    try:
        config = LlamaConfig(**raw)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model config {path} is not a valid LlamaConfig ({e}); fix the file")
    config.use_cache = False
    return config


@dataclass
class TrainConfig:
    """The resolved run: the arguments plus what was read or derived from them."""

    args: argparse.Namespace
    model_config: LlamaConfig
    world_size: int
    grad_accum: int
    ds_config: dict = field(default_factory=dict)  # deepspeed backend only

    def __getattr__(self, name):  # the arguments read as attributes: cfg.lr, cfg.steps
        return getattr(self.__dict__["args"], name)

    @property
    def run_dir(self) -> Path:
        return Path(self.args.run_dir)

    @property
    def zero_stage(self) -> int | None:
        return self.ds_config.get("zero_optimization", {}).get("stage", 0) if self.backend == "deepspeed" else None

    def summary(self) -> dict:
        """The resolved configuration, printed at start and saved with every checkpoint."""
        out = {k: v for k, v in vars(self.args).items() if k != "local_rank"}
        out.update(world_size=self.world_size, grad_accum=self.grad_accum,
                   tokens_per_step=self.global_batch_size * self.seq_len,
                   model_config=self.model_config.to_diff_dict())
        if self.backend == "deepspeed":
            out["zero_stage"] = self.zero_stage
        return out


def _positive(args, *names):
    for name in names:
        value = getattr(args, name)
        if value is None or value <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {value}")


def resolve(args: argparse.Namespace, world_size: int) -> TrainConfig:
    """Check the arguments and read the configs they name; raises ConfigError."""
    model_config = load_model_config(args.model)
    ds_config: dict = {}
    if args.backend == "deepspeed":
        if not args.config:
            raise ConfigError("the deepspeed backend needs --config, a DeepSpeed JSON (e.g. configs/zero3_scale.json)")
        ds_config = load_json(args.config, "DeepSpeed config", "pass --config with an existing DeepSpeed JSON, e.g. configs/zero3_scale.json")
        _merge_deepspeed_config(args, ds_config, world_size)
    elif args.config:
        raise ConfigError("--config is a DeepSpeed config; the fsdp backend takes its settings from the command line: drop --config")
    args.global_batch_size = args.global_batch_size or 512
    args.micro_batch_size = args.micro_batch_size or 1
    if args.grad_clip is None:
        args.grad_clip = 1.0
    if args.bf16 is None:
        args.bf16 = True
    if args.activation_checkpointing is None:
        args.activation_checkpointing = False

    _positive(args, "global_batch_size", "micro_batch_size", "seq_len", "steps", "lr", "adam_lr", "log_every", "keep", "eval_tokens")
    for name in ("save_every", "eval_every", "weight_decay", "grad_clip"):
        if getattr(args, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if not 0 <= args.warmup_ratio < 1:
        raise ConfigError(f"--warmup-ratio must be in [0, 1), got {args.warmup_ratio}")
    if not 0 <= args.min_lr_ratio <= 1:
        raise ConfigError(f"--min-lr-ratio must be in [0, 1], got {args.min_lr_ratio}")
    if not 0 <= args.momentum < 1:
        raise ConfigError(f"--momentum must be in [0, 1), got {args.momentum}")
    if args.seq_len > model_config.max_position_embeddings:
        raise ConfigError(
            f"--seq-len {args.seq_len} exceeds the model's max_position_embeddings "
            f"{model_config.max_position_embeddings}; lower --seq-len or use a model config with more positions"
        )
    per_pass = args.micro_batch_size * world_size
    if args.global_batch_size % per_pass:
        raise ConfigError(
            f"--global-batch-size {args.global_batch_size} is not divisible by --micro-batch-size "
            f"{args.micro_batch_size} x {world_size} data-parallel ranks = {per_pass}; choose a global batch "
            f"that is a multiple of {per_pass} (gradient accumulation = global / (micro x ranks))"
        )
    grad_accum = args.global_batch_size // per_pass
    if args.stop_after is not None and not 0 < args.stop_after <= args.steps:
        raise ConfigError(f"--stop-after must be in [1, --steps={args.steps}], got {args.stop_after}")
    if args.resume not in ("auto", "none") and not Path(args.resume).is_dir():
        raise ConfigError(f"--resume {args.resume}: no such checkpoint directory; use auto, none or an existing checkpoint path")
    args.cache_dir = args.cache_dir or str(Path("~/.cache/scale-zero").expanduser())
    args.job_name = args.job_name or f"{Path(args.model).stem}-{args.optimizer}-{args.backend}"
    args.run_dir = args.run_dir or str(Path("runs") / args.job_name)
    if args.backend == "deepspeed":
        ds_config.update(
            train_batch_size=args.global_batch_size,
            train_micro_batch_size_per_gpu=args.micro_batch_size,
            gradient_accumulation_steps=grad_accum,
            gradient_clipping=args.grad_clip,
        )
        ds_config.setdefault("bf16", {})["enabled"] = args.bf16
    return TrainConfig(args, model_config, world_size, grad_accum, ds_config)


def _merge_deepspeed_config(args: argparse.Namespace, ds: dict, world_size: int) -> None:
    """Fill unset arguments from the DeepSpeed config and refuse contradictions."""
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"DeepSpeed config {args.config}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    if "scheduler" in ds:
        raise ConfigError(
            f"DeepSpeed config {args.config} has a scheduler section; the schedule comes from --lr, "
            "--warmup-ratio and --min-lr-ratio: remove the section"
        )
    if "optimizer" in ds and args.optimizer != "adamw":
        raise ConfigError(
            f"DeepSpeed config {args.config} defines an optimizer ({ds['optimizer'].get('type')}) but "
            f"--optimizer is {args.optimizer}; use a config without an optimizer section "
            "(configs/zero3_scale.json) or --optimizer adamw"
        )
    for name, key in (("global_batch_size", "train_batch_size"), ("micro_batch_size", "train_micro_batch_size_per_gpu")):
        value = ds.get(key)
        if getattr(args, name) is None and isinstance(value, int):
            setattr(args, name, value)
    accumulation = ds.get("gradient_accumulation_steps")
    if args.global_batch_size is None and args.micro_batch_size and isinstance(accumulation, int):
        args.global_batch_size = args.micro_batch_size * accumulation * world_size  # as DeepSpeed derives it
    if args.grad_clip is None and isinstance(ds.get("gradient_clipping"), (int, float)):
        args.grad_clip = float(ds["gradient_clipping"])
    if args.bf16 is None:
        args.bf16 = bool(ds.get("bf16", {}).get("enabled", False))
    if args.bf16 and ds.get("fp16", {}).get("enabled"):
        raise ConfigError(f"DeepSpeed config {args.config} enables fp16 and bf16 is requested; use one (this trainer uses bf16)")
    if args.activation_checkpointing is None:
        args.activation_checkpointing = "activation_checkpointing" in ds

