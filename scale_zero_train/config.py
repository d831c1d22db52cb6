"""The training configuration as data: one frozen dataclass per concern, a docstring under
every field, each default in one place (the field). The command line is generated from the
dataclasses (flag `--foo-bar` for field `foo_bar`, its help the field's docstring).

    args = parse_args(argv, preset)            # a preset (scale_zero_train.presets) only changes defaults
    cfg = load_config(args, world_size)        # reads the model and DeepSpeed JSONs, then resolve()

`resolve(args, deepspeed_json, model_config, world_size)` is a pure function to a frozen
`TrainConfig`. Fields marked `DEEPSPEED` have no command-line default: resolution takes the
flag if given, else the DeepSpeed JSON's value, else the field's default (the one documented
resolution step, `_deepspeed_values`). A problem raises `ConfigError` with one message that
names it and the fix. Nothing here writes to disk.
"""

import argparse
import ast
import dataclasses
import difflib
import inspect
import math
import os
import sys
import types
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from transformers import LlamaConfig

from scale_zero_train.errors import ConfigError, fail
from scale_zero_train.vocab import BACKENDS, MASTER_WEIGHTS, MODEL_SIZES, OPTIMIZERS, load_json, load_model_config

__all__ = ["ConfigError", "TrainConfig", "load_config", "parse_args", "resolve"]

# Field metadata: read from the DeepSpeed JSON when the flag is not given (deepspeed backend).
DEEPSPEED = {"deepspeed": True}
# DeepSpeed's documented top-level config keys (deepspeed 0.19): DeepSpeed ignores any other
# key, so a misspelt section ("zero_optimizaton") would silently train without it.
DEEPSPEED_KEYS = (
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "optimizer", "scheduler",
    "communication_data_type", "seq_parallel_communication_data_type", "prescale_gradients",
    "gradient_predivide_factor", "gradient_allreduce_op", "sparse_gradients", "fp16", "bf16", "amp",
    "torch_autocast", "gradient_clipping", "zero_optimization", "zero_allow_untested_optimizer",
    "zero_force_ds_cpu_optimizer", "aio", "activation_checkpointing", "sparse_attention", "flops_profiler",
    "tensorboard", "wandb", "csv_monitor", "comet", "comms_logger", "monitor_config", "autotuning", "elasticity",
    "pipeline", "checkpoint", "data_types", "data_efficiency", "curriculum_learning", "compression_training",
    "quantize_training", "progressive_layer_drop", "eigenvalue", "steps_per_print", "wall_clock_breakdown",
    "memory_breakdown", "dump_state", "disable_allgather", "dataloader_drop_last", "hybrid_engine", "nebula",
    "weight_quantization", "compile", "use_data_before_expert_parallelism", "disable_python_gc", "log_level",
    "managed_gradient_accumulation", "timers", "graph_harvesting", "tensor_parallel", "sequence_parallel_size",
)


def unknown_key_error(what: str, key: str, valid) -> ConfigError:
    """`what` has a key no one reads: name it and the nearest valid key."""
    near = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.6)
    hint = f"did you mean {near[0]!r}?" if near else f"valid keys: {', '.join(sorted(valid))}"
    return ConfigError(f"{what} has an unknown key {key!r}; {hint} Fix or remove it")


@dataclass(frozen=True)
class Run:
    """run and checkpoints"""

    backend: str = field(default="deepspeed", metadata={"choices": BACKENDS})
    """deepspeed: start with the `deepspeed` launcher; fsdp: start with `python -m scale_zero_train.launch` (torchrun)"""
    config: str | None = None
    """DeepSpeed JSON config (deepspeed backend), e.g. configs/zero3_scale.json"""
    job_name: str | None = None
    """default: <model>-<optimizer>-<backend>"""
    run_dir: str | None = None
    """default: runs/<job-name>; holds tb/ and checkpoints/"""
    save_every: int = 500
    """checkpoint every N steps (and at the end); 0 = only at the end"""
    keep: int = 3
    """keep the last K checkpoints"""
    resume: str = "auto"
    """auto (newest complete checkpoint in the run dir, if any) | none | PATH"""
    move_newer_aside: bool = False
    """resuming from a checkpoint older than the newest in the run dir (a rollback or a branch): move the newer
    ones into checkpoints/moved-<UTC time>/ (without it such a resume is refused)"""
    allow_data_change: bool = False
    """resume although the data files differ from those the checkpoint was trained on (the held-out split and the
    data position then refer to the new files)"""
    stop_after: int | None = None
    """end this invocation after this step with a checkpoint, keeping the schedule of --steps (for time-limited
    jobs; the next start resumes)"""


@dataclass(frozen=True)
class Model:
    """model"""

    model: str = "tiny"
    """one of {sizes} or a path to a LlamaConfig JSON"""
    bf16: bool = field(default=True, metadata=DEEPSPEED)
    """bf16 compute (default: the DeepSpeed config's bf16.enabled; on for fsdp)"""
    activation_checkpointing: bool = field(default=False, metadata=DEEPSPEED)
    """recompute each decoder layer in backward (default: on if the DeepSpeed config has an
    activation_checkpointing section)"""
    master_weights: str = field(default="fp32", metadata={**DEEPSPEED, "choices": MASTER_WEIGHTS})
    """fp32: fp32 master weights and gradients; bf16: master-free, weights, gradients and SCALE's state in bf16,
    updates stochastically rounded; bf16-nearest: the same rounded to nearest (an ablation). fsdp: how the shards
    are stored; deepspeed: default and must match the JSON's bf16.bf16_master_weights_and_grads
    (configs/zero3_scale_bf16.json)"""


@dataclass(frozen=True)
class Optimizer:
    """optimizer"""

    optimizer: str = field(default="scale", metadata={"choices": OPTIMIZERS})
    """scale; adamw (baseline); ablations: colnorm-sgd = SCALE without momentum, sgd = SGD with momentum on
    every matrix, row-scale = SCALE normalizing the paper's rows"""
    lr: float = 1e-3
    """peak learning rate (SCALE's matrix lr, or AdamW's lr)"""
    adam_lr: float = 2e-2
    """SCALE's peak lr for 1-D parameters (AdamW inside SCALE)"""
    momentum: float = 0.9
    """SCALE's output-layer momentum (AdamW's beta1)"""
    weight_decay: float = 0.0
    """decoupled weight decay (the paper uses none)"""
    grad_clip: float = field(default=1.0, metadata=DEEPSPEED)
    """max global gradient norm, 0 = off (default: the DeepSpeed config's gradient_clipping, else 1.0)"""


@dataclass(frozen=True)
class Schedule:
    """batch and schedule"""

    global_batch_size: int = field(default=512, metadata=DEEPSPEED)
    """sequences per optimizer step over all ranks (default: the DeepSpeed config's train_batch_size, else 512)"""
    micro_batch_size: int = field(default=1, metadata=DEEPSPEED)
    """sequences per rank per forward pass (default: the DeepSpeed config's train_micro_batch_size_per_gpu,
    else 1); gradient accumulation = global / (micro * data-parallel ranks)"""
    seq_len: int = 256
    """tokens per sequence (packed documents)"""
    steps: int = 1000
    """optimizer steps"""
    warmup_ratio: float = 0.1
    """linear warmup from 0 over this fraction of steps"""
    min_lr_ratio: float = 0.1
    """cosine decay ends at this fraction of the peak lr"""
    seed: int = 0
    """model initialization and data order"""


@dataclass(frozen=True)
class Data:
    """data"""

    data: str = "embedded"
    """embedded | c4 | a path or glob of text/jsonl/parquet files"""
    tokenizer: str | None = None
    """SentencePiece model or Hugging Face tokenizer (path or name); default: the embedded corpus's own
    SentencePiece model, t5-base for c4"""
    cache_dir: str = "~/.cache/scale-zero"
    """tokenizer/dataset cache"""


@dataclass(frozen=True)
class Logging:
    """logs and validation"""

    log_every: int = 10
    """TensorBoard scalars and a console line every N steps"""
    eval_every: int = 100
    """validation every N steps (and at the end); 0 = only at the end"""
    eval_tokens: int = 65536
    """held-out tokens per validation (over all ranks)"""
    peak_tflops: float | None = None
    """per-device peak bf16 TFLOP/s for MFU (default: known GPUs by name, else 1.0 per CPU rank)"""


SECTIONS = {"run": Run, "model": Model, "optim": Optimizer, "schedule": Schedule, "data": Data, "logs": Logging}


@dataclass(frozen=True)
class TrainConfig:
    """The resolved run: every section, and what was read or derived from them."""

    run: Run
    model: Model
    optim: Optimizer
    schedule: Schedule
    data: Data
    logs: Logging
    model_config: LlamaConfig
    world_size: int
    grad_accum: int
    """optimizer step = micro batches of grad_accum forward passes on each of world_size ranks"""
    deepspeed_json: dict
    """the DeepSpeed JSON as read, never modified ({} for fsdp); engines derive theirs from it"""

    @property
    def run_dir(self) -> Path:
        return Path(self.run.run_dir)

    @property
    def zero_stage(self) -> int | None:
        return self.deepspeed_json.get("zero_optimization", {}).get("stage", 0) if self.run.backend == "deepspeed" else None

    @property
    def tokens_per_step(self) -> int:
        return self.schedule.global_batch_size * self.schedule.seq_len

    def summary(self) -> dict:
        """The resolved configuration, printed at start and saved with every checkpoint."""
        out = {k: v for name in SECTIONS for k, v in dataclasses.asdict(getattr(self, name)).items()}
        out.update(world_size=self.world_size, grad_accum=self.grad_accum, tokens_per_step=self.tokens_per_step,
                   model_config=self.model_config.to_diff_dict())
        if self.run.backend == "deepspeed":
            out["zero_stage"] = self.zero_stage
        return out


@cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass (as torchtitan documents its job config)."""
    body = ast.parse(inspect.getsource(cls)).body[0].body
    docs = {}
    for node, following in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant) and isinstance(following.value.value, str)):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def _value_type(annotation) -> type:
    """int for `int | None`, and so on."""
    if isinstance(annotation, types.UnionType):
        (annotation,) = [a for a in annotation.__args__ if a is not type(None)]
    return annotation


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # unset (None) defaults are explained in the help text
        return action.help if action.default is None else super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        """Usage errors as every other bad input: one message (rank 0's), exit status 2."""
        if int(os.environ.get("RANK", 0)) == 0:
            self.print_usage(sys.stderr)
        fail(f"{self.prog}: {message}")


def build_parser(preset: dict | None = None) -> argparse.ArgumentParser:
    p = _Parser(prog="launch/train.py", formatter_class=_HelpFormatter,
                description="Pretrain a LLaMA model with SCALE (or AdamW) under DeepSpeed ZeRO or FSDP2.")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    for cls in SECTIONS.values():
        group, docs = p.add_argument_group(cls.__doc__), field_docs(cls)
        for f in dataclasses.fields(cls):
            kind = _value_type(f.type)
            default = None if f.metadata.get("deepspeed") else f.default
            options = ({"action": argparse.BooleanOptionalAction} if kind is bool
                       else {"type": kind, "choices": f.metadata.get("choices")})
            help = docs[f.name].format(sizes=", ".join(MODEL_SIZES))
            group.add_argument(f"--{f.name.replace('_', '-')}", default=default, help=help, **options)
    if preset:
        unknown = set(preset) - {f.name for cls in SECTIONS.values() for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"preset sets unknown arguments {sorted(unknown)}")
        p.set_defaults(**preset)
    return p


def parse_args(argv: list[str] | None = None, preset: dict | None = None) -> argparse.Namespace:
    return build_parser(preset).parse_args(argv)


def load_config(args: argparse.Namespace, world_size: int) -> TrainConfig:
    """Read the model config and (deepspeed backend) the DeepSpeed JSON the arguments name, then resolve."""
    model_config = load_model_config(args.model)
    deepspeed_json = {}
    if args.backend == "deepspeed" and args.config:
        deepspeed_json = load_json(args.config, "DeepSpeed config",
                                   "pass --config with an existing DeepSpeed JSON, e.g. configs/zero3_scale.json")
    return resolve(args, deepspeed_json, model_config, world_size)


def _deepspeed_values(args: argparse.Namespace, ds: dict, world_size: int) -> dict:
    """The DEEPSPEED fields' values that the DeepSpeed JSON sets, for the flags not given:
    train_batch_size (or micro batch x gradient_accumulation_steps x ranks, as DeepSpeed
    derives it), train_micro_batch_size_per_gpu, gradient_clipping, bf16.enabled (absent:
    off, as in DeepSpeed) and the presence of an activation_checkpointing section."""
    found = {"bf16": bool(ds.get("bf16", {}).get("enabled", False)),
             "activation_checkpointing": "activation_checkpointing" in ds,
             "master_weights": "bf16" if ds.get("bf16", {}).get("bf16_master_weights_and_grads") else "fp32"}
    for name, key in (("global_batch_size", "train_batch_size"), ("micro_batch_size", "train_micro_batch_size_per_gpu")):
        if isinstance(ds.get(key), int):
            found[name] = ds[key]
    micro = args.micro_batch_size or found.get("micro_batch_size")
    accumulation = ds.get("gradient_accumulation_steps")
    if "global_batch_size" not in found and micro and isinstance(accumulation, int):
        found["global_batch_size"] = micro * accumulation * world_size
    if isinstance(ds.get("gradient_clipping"), (int, float)):
        found["grad_clip"] = float(ds["gradient_clipping"])
    return {name: value for name, value in found.items() if getattr(args, name) is None}


def _auto_values(value, path: str = ""):
    """The key paths whose value is the Hugging Face Trainer's placeholder "auto"."""
    if value == "auto":
        yield path
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _auto_values(item, f"{path}.{key}" if path else key)


def _check_deepspeed_keys(name: str, ds: dict) -> None:
    """Every key DeepSpeed would read, and no "auto": DeepSpeed's own errors name a pydantic
    model, not the file; its silence on an unknown top-level key trains something else."""
    for key in ds:
        if key not in DEEPSPEED_KEYS:
            raise unknown_key_error(f"DeepSpeed config {name}", key, DEEPSPEED_KEYS)
    auto = list(_auto_values(ds))
    if auto:
        raise ConfigError(f"DeepSpeed config {name} sets {', '.join(auto)} to \"auto\", which only the Hugging Face "
                          "Trainer fills in; give a number, or drop the key and use the flag "
                          "(--global-batch-size, --micro-batch-size, --grad-clip)")
    if not isinstance(ds.get("zero_optimization", {}), dict):
        raise ConfigError(f"DeepSpeed config {name}: zero_optimization must be an object, e.g. {{\"stage\": 3}}")
    from pydantic import ValidationError
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    try:
        DeepSpeedZeroConfig(**ds.get("zero_optimization", {}))
    except ValidationError as e:
        first = e.errors()[0]
        key = ".".join(str(part) for part in first["loc"])
        if first["type"] == "extra_forbidden":
            valid = set(DeepSpeedZeroConfig.model_fields) | {f.alias for f in DeepSpeedZeroConfig.model_fields.values() if f.alias}
            raise unknown_key_error(f"DeepSpeed config {name}: zero_optimization", key, valid) from None
        raise ConfigError(f"DeepSpeed config {name}: zero_optimization.{key}: {first['msg']} "
                          f"(got {first.get('input')!r}); fix the value") from None


def _check_deepspeed_json(args: argparse.Namespace, ds: dict, bf16: bool) -> None:
    _check_deepspeed_keys(args.config, ds)
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
    if bf16 and ds.get("fp16", {}).get("enabled"):
        raise ConfigError(f"DeepSpeed config {args.config} enables fp16 and bf16 is requested; use one (this trainer uses bf16)")


def _check_master_weights(model: Model, optim: Optimizer, ds: dict | None) -> None:
    if model.master_weights == "fp32":
        if ds is not None and ds.get("bf16", {}).get("bf16_master_weights_and_grads"):
            raise ConfigError("the DeepSpeed config keeps bf16 master weights but --master-weights is fp32: drop "
                              "--master-weights fp32, or use a config with fp32 masters (configs/zero3_scale.json)")
        return
    if optim.optimizer == "adamw":
        raise ConfigError(f"--master-weights {model.master_weights} is for SCALE (its bf16 writes round "
                          "stochastically); AdamW needs --master-weights fp32")
    if not model.bf16:
        raise ConfigError(f"--master-weights {model.master_weights} needs bf16 compute: drop --no-bf16")
    bf16 = (ds or {}).get("bf16", {})
    if ds is not None and not (bf16.get("bf16_master_weights_and_grads") and bf16.get("bf16_optimizer_states")):
        raise ConfigError(f"--master-weights {model.master_weights} needs the DeepSpeed config's bf16 section to "
                          "set bf16_master_weights_and_grads and bf16_optimizer_states: use "
                          "configs/zero3_scale_bf16.json or configs/zero2_scale_bf16.json")


def _section(cls, values: dict):
    """The section from the given values; a field left unset (None) where it has a default takes that default."""
    return cls(**{f.name: f.default if values[f.name] is None else values[f.name] for f in dataclasses.fields(cls)})


def resolve(args: argparse.Namespace, deepspeed_json: dict, model_config: LlamaConfig, world_size: int) -> TrainConfig:
    """The frozen config of this run from the arguments, the DeepSpeed JSON (deepspeed backend)
    and the number of data-parallel ranks; raises ConfigError. Pure: reads and writes nothing."""
    values = dict(vars(args))
    if args.backend == "deepspeed":
        if not args.config:
            raise ConfigError("the deepspeed backend needs --config, a DeepSpeed JSON (e.g. configs/zero3_scale.json)")
        values.update(_deepspeed_values(args, deepspeed_json, world_size))
        _check_deepspeed_json(args, deepspeed_json, Model.bf16 if values["bf16"] is None else values["bf16"])
    elif args.config:
        raise ConfigError("--config is a DeepSpeed config; the fsdp backend takes its settings from the command line: drop --config")
    job_name = args.job_name or f"{Path(args.model).stem}-{args.optimizer}-{args.backend}"
    values.update(job_name=job_name, run_dir=args.run_dir or str(Path("runs") / job_name),
                  cache_dir=str(Path(args.cache_dir or Data.cache_dir).expanduser()))
    sections = {name: _section(cls, values) for name, cls in SECTIONS.items()}
    optim, schedule = sections["optim"], sections["schedule"]
    values = {k: v for section in sections.values() for k, v in dataclasses.asdict(section).items()}
    for name in ("global_batch_size", "micro_batch_size", "seq_len", "steps", "lr", "adam_lr", "log_every", "keep",
                 "eval_tokens"):
        if values[name] is None or values[name] <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {values[name]}")
    for name, value in values.items():  # NaN passes every comparison below, inf most
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"--{name.replace('_', '-')} must be a finite number, got {value}")
    for name in ("save_every", "eval_every", "weight_decay", "grad_clip"):
        if values[name] < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {values[name]}")
    if not 0 <= schedule.warmup_ratio < 1:
        raise ConfigError(f"--warmup-ratio must be in [0, 1), got {schedule.warmup_ratio}")
    if not 0 <= schedule.min_lr_ratio <= 1:
        raise ConfigError(f"--min-lr-ratio must be in [0, 1], got {schedule.min_lr_ratio}")
    if not 0 <= optim.momentum < 1:
        raise ConfigError(f"--momentum must be in [0, 1), got {optim.momentum}")
    if schedule.seq_len > model_config.max_position_embeddings:
        raise ConfigError(
            f"--seq-len {schedule.seq_len} exceeds the model's max_position_embeddings "
            f"{model_config.max_position_embeddings}; lower --seq-len or use a model config with more positions"
        )
    per_pass = schedule.micro_batch_size * world_size
    if schedule.global_batch_size % per_pass:
        raise ConfigError(
            f"--global-batch-size {schedule.global_batch_size} is not divisible by --micro-batch-size "
            f"{schedule.micro_batch_size} x {world_size} data-parallel ranks = {per_pass}; choose a global batch "
            f"that is a multiple of {per_pass} (gradient accumulation = global / (micro x ranks))"
        )
    _check_master_weights(sections["model"], optim, deepspeed_json if args.backend == "deepspeed" else None)
    stop_after = sections["run"].stop_after
    if stop_after is not None and not 0 < stop_after <= schedule.steps:
        raise ConfigError(f"--stop-after must be in [1, --steps={schedule.steps}], got {stop_after}")
    return TrainConfig(**sections, model_config=model_config, world_size=world_size,
                       grad_accum=schedule.global_batch_size // per_pass, deepspeed_json=deepspeed_json)

