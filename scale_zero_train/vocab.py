"""The trainer's names, in one place: model sizes (and the one model-config loader), backends,
optimizers, and the engines the memory planner models."""

from __future__ import annotations

import difflib
import inspect
import json
from pathlib import Path

from transformers import LlamaConfig

from scale_zero_train.errors import ConfigError

# Package data: a non-editable install ships them.
MODELS_DIR = Path(__file__).resolve().parent / "models"
# The paper's LLaMA sizes (docs/algorithm.md, "The paper's setup") and a tiny one for CPU runs.
MODEL_SIZES = ("tiny", "60m", "130m", "350m", "1b", "7b")
# deepspeed: started with the `deepspeed` launcher; fsdp (FSDP2): with `python -m scale_zero_train.launch` (torchrun).
BACKENDS = ("deepspeed", "fsdp")
# SCALE, the AdamW baseline and SCALE's ablations (scale_zero_train.optim.SCALE_VARIANTS).
OPTIMIZERS = ("scale", "adamw", "colnorm-sgd", "sgd", "row-scale")
# What the memory planner models: DeepSpeed ZeRO stages and FSDP2 ...
SHARDINGS = ("zero0", "zero1", "zero2", "zero3", "fsdp2")
# ... and the optimizer states it models, for each optimizer: SGD with momentum on every role
# keeps one buffer per parameter, which AdamW's bound covers; the SCALE ablations keep at most SCALE's.
PLANNER_OPTIMIZERS = ("scale", "adamw")
# Where the weights an update is applied to live (docs/optimizer.md, "Master-free bf16").
MASTER_WEIGHTS = ("fp32", "bf16", "bf16-nearest")
PLANNED_STATE = {"scale": "scale", "adamw": "adamw", "colnorm-sgd": "scale", "sgd": "adamw", "row-scale": "scale"}


def load_json(path: str | Path, what: str, fix: str) -> dict:
    """A JSON object from `path`; ConfigError naming `what` and `fix` if it is missing or malformed."""
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


# Keys older transformers versions wrote, which LlamaConfig still reads.
LEGACY_MODEL_KEYS = ("rope_theta", "rope_scaling", "torch_dtype")


def model_config_keys() -> set[str]:
    """Every key a LlamaConfig JSON may hold: its constructor's arguments and what it saves."""
    return (set(inspect.signature(LlamaConfig.__init__).parameters) - {"self", "kwargs"}
            | set(LlamaConfig().to_dict()) | set(LEGACY_MODEL_KEYS))


def _check_model_keys(path: Path, raw: dict) -> None:
    """LlamaConfig keeps an unknown key as an attribute no layer reads ("hidden_sise"): refuse it."""
    valid = model_config_keys()
    for key in raw:
        if key not in valid:
            near = difflib.get_close_matches(key, sorted(valid), n=1, cutoff=0.6)
            hint = f"did you mean {near[0]!r}?" if near else "see transformers' LlamaConfig for the valid keys."
            raise ConfigError(f"model config {path} has an unknown key {key!r}; {hint} Fix or remove it")


def load_model_config(model: str | Path | LlamaConfig) -> LlamaConfig:
    """A model size name (scale_zero_train/models/<size>.json), a path to a LlamaConfig JSON,
    or a LlamaConfig (returned as it is)."""
    if isinstance(model, LlamaConfig):
        return model
    model = str(model)
    if model.lower() in MODEL_SIZES:
        path = MODELS_DIR / f"{model.lower()}.json"
    elif model.endswith(".json") or "/" in model:
        path = Path(model)
    else:
        raise ConfigError(f"unknown model {model!r}; use one of {', '.join(MODEL_SIZES)} or a path to a LlamaConfig JSON")
    raw = load_json(path, "model config", f"use one of {', '.join(MODEL_SIZES)} or a LlamaConfig JSON path")
    if raw.get("model_type", "llama") != "llama":
        raise ConfigError(f"model config {path} has model_type {raw['model_type']!r}; this trainer builds LLaMA (model_type llama)")
    _check_model_keys(path, raw)
    try:
        config = LlamaConfig(**raw)
    except Exception as e:  # TypeError, ValueError, huggingface_hub's StrictDataclassClassValidationError, ...
        reason = " ".join(str(e).split())
        raise ConfigError(f"model config {path} is not a valid LlamaConfig ({reason}); fix the file") from None
    config.use_cache = False
    return config
