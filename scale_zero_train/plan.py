"""Per-GPU memory plan for LLaMA pretraining with SCALE or AdamW under ZeRO-1/2/3 and FSDP2.

    python -m scale_zero_train.plan --model 7b --nodes 2 --gpus-per-node 8 --gpu-memory 80

Model states come from the model's exact parameter shapes (LlamaForCausalLM built on the
meta device) and each engine's partitioning rules:

    ZeRO-3  every parameter is split into `partition_numel = ceil(numel / world)` elements
            per rank (the tail of the last rank is padding): bf16 partition, fp32 master
            partition, gradient partition in the accumulation dtype, optimizer state over
            the fp32 partition. Parameters below the persistence threshold also stay whole.
    ZeRO-0/1/2 each param group is one flat buffer padded to a multiple of 2 * world; a rank
            holds a 1/world slice of its fp32 master, optimizer state (and, ZeRO-2, grads);
            the bf16 parameters stay whole on every rank (stage 0: everything is whole).
    FSDP2   every parameter is `Shard(0)`: ceil(rows / world) whole rows per rank, kept in
            fp32 (the sharded parameter is the master), fp32 gradients; bf16 copies are
            transient, per module.

Master-free bf16 (`master_weights="bf16"`: configs/zero*_scale_bf16.json, the trainer's
--master-weights bf16; docs/optimizer.md, "Master-free bf16"): no fp32 copy anywhere. ZeRO
keeps a bf16 master partition (ZeRO-3) or slice (ZeRO-1/2) next to the bf16 parameters,
FSDP2 bf16 shards and nothing else; gradients and optimizer state are bf16.

SCALE's state is the output layer's fp32 momentum plus AdamW's two fp32 moments of the 1-D
parameters; AdamW keeps two fp32 moments of every parameter. Activations are measured, not
guessed: one forward and backward of the real Hugging Face model runs on fake tensors
(`FakeTensorMode`, nothing allocated) under PyTorch's `MemTracker`, which gives the peak of
every live activation and temporary (saved tensors, logits, the fp32 loss, gradients of
activations) with and without activation checkpointing; it is linear in the micro batch.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import sys
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from unittest import mock

import torch
from transformers import LlamaConfig, LlamaForCausalLM, masking_utils

from scale_zero import scale_param_groups
from scale_zero_train.errors import ConfigError
from scale_zero_train.vocab import MODEL_SIZES, PLANNER_OPTIMIZERS as OPTIMIZERS, SHARDINGS, load_model_config

GIB = 2**30
# DeepSpeed 0.19.8's defaults, used when no DeepSpeed config is given.
DS_DEFAULTS = dict(reduce_bucket_size=int(5e8), prefetch_bucket_size=int(5e7), param_persistence_threshold=int(1e5))
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


class MemoryPlanError(ValueError):
    """The run cannot fit in GPU memory; the message has the numbers and the ways out."""


@dataclass(frozen=True)
class Param:
    name: str
    shape: tuple[int, ...]
    role: str  # matrix, embedding, output or vector (SCALE's roles)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def model_params(config: LlamaConfig) -> list[Param]:
    """Every trainable parameter with its shape and SCALE role, from a meta-device model."""
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    names = {p: n for n, p in model.named_parameters()}
    return [Param(names[p], tuple(p.shape), g["role"]) for g in scale_param_groups(model) for p in g["params"]]


@dataclass
class EngineConfig:
    """What the engine keeps and in which dtype; `from_ds_config` reads a DeepSpeed JSON."""

    engine: str = "zero3"
    precision: str = "bf16"  # parameter / compute dtype
    # fp32 as in configs/zero*_scale.json; None = the parameter dtype (DeepSpeed's default)
    grad_accum_dtype: str | None = "fp32"
    reduce_bucket_size: int = DS_DEFAULTS["reduce_bucket_size"]
    prefetch_bucket_size: int = DS_DEFAULTS["prefetch_bucket_size"]
    param_persistence_threshold: int = DS_DEFAULTS["param_persistence_threshold"]
    master_weights: str = "fp32"  # or "bf16": master-free (see the module docstring)

    @classmethod
    def from_ds_config(cls, ds_config: dict | str | Path) -> EngineConfig:
        if not isinstance(ds_config, dict):
            ds_config = json.loads(Path(ds_config).read_text())
        zero = ds_config.get("zero_optimization", {})
        stage = zero.get("stage", 0)
        enabled = [name for name in ("bf16", "fp16") if ds_config.get(name, {}).get("enabled")]
        precision = enabled[0] if enabled else "fp32"
        master_free = ds_config.get("bf16", {}).get("bf16_master_weights_and_grads", False)

        def size(key: str, alias: str | None = None) -> int:
            value = zero.get(key, zero.get(alias, DS_DEFAULTS[key]))
            return DS_DEFAULTS[key] if value == "auto" else int(value)

        return cls(
            engine=f"zero{stage}", precision=precision,
            grad_accum_dtype=ds_config.get("data_types", {}).get("grad_accum_dtype"),
            reduce_bucket_size=size("reduce_bucket_size"),
            prefetch_bucket_size=size("prefetch_bucket_size", "stage3_prefetch_bucket_size"),
            param_persistence_threshold=size("param_persistence_threshold", "stage3_param_persistence_threshold"),
            master_weights="bf16" if master_free else "fp32",
        )

    @property
    def param_bytes(self) -> int:
        return DTYPE_BYTES[self.precision]

    @property
    def master_free(self) -> bool:
        return self.master_weights == "bf16"

    @property
    def grad_bytes(self) -> int:
        """ZeRO's gradient partitions; master-free ones are in the masters' bf16."""
        return 2 if self.master_free else DTYPE_BYTES[self.grad_accum_dtype or self.precision]

    @property
    def master_bytes(self) -> int:
        """Per element of the partition: none in fp32, a bf16 copy master-free, else fp32."""
        if self.precision == "fp32":
            return 0
        return 2 if self.master_free else 4

    @property
    def state_bytes(self) -> int:
        """Per element of optimizer state."""
        return 2 if self.master_free else 4


@dataclass
class ModelStates:
    """Persistent per-rank bytes (the largest rank)."""

    params: int  # the parameters as the engine stores them between steps
    master: int  # fp32 master copy (mixed precision under ZeRO)
    grads: int
    optimizer: dict[str, int]  # per optimizer name


def _partitioned(numels: list[int], world: int, align: int) -> int:
    """Largest rank's slice of a flat group padded to a multiple of `align * world`."""
    total = sum(numels)
    return math.ceil(total / (align * world)) * align


def model_states(params: list[Param], world: int, engine: EngineConfig) -> ModelStates:
    """Per-rank bytes of parameters, master, gradients and optimizer state."""
    e = engine
    vector = [p for p in params if p.role == "vector"]
    output = [p for p in params if p.role == "output"]
    if e.engine == "zero3":
        shard = {p: math.ceil(p.numel / world) for p in params}  # partition_numel, padding included
        persistent = sum(p.numel for p in params if p.numel <= e.param_persistence_threshold)
        total = sum(shard.values())
        return ModelStates(
            params=e.param_bytes * (total + persistent), master=e.master_bytes * total, grads=e.grad_bytes * total,
            optimizer=_optimizer_bytes(sum(shard[p] for p in output), sum(shard[p] for p in vector), total,
                                       e.state_bytes),
        )
    if e.engine in ("zero0", "zero1", "zero2"):
        world = 1 if e.engine == "zero0" else world  # stage 0: every rank holds everything
        # One flat group per SCALE role (the groups train.py builds), each padded separately.
        groups = {role: [p.numel for p in params if p.role == role] for role in ("embedding", "output", "matrix", "vector")}
        slices = {role: _partitioned(n, world, align=2) for role, n in groups.items() if n}
        total = sum(slices.values())
        full = sum(p.numel for p in params)
        return ModelStates(
            params=e.param_bytes * full, master=e.master_bytes * total,
            grads=e.grad_bytes * (total if e.engine == "zero2" else full),
            optimizer=_optimizer_bytes(slices.get("output", 0), slices.get("vector", 0), total, e.state_bytes),
        )
    if e.engine == "fsdp2":
        def rows(p: Param) -> int:  # Shard(0): ceil(rows / world) rows on the first ranks
            return math.ceil(p.shape[0] / world) * math.prod(p.shape[1:])

        shard = {p: rows(p) for p in params}
        total = sum(shard.values())
        stored = 2 if e.master_free else 4  # the shards are the master weights, their gradients alike
        return ModelStates(
            params=stored * total, master=0, grads=stored * total,
            optimizer=_optimizer_bytes(sum(shard[p] for p in output), sum(shard[p] for p in vector), total,
                                       e.state_bytes),
        )
    raise ValueError(f"unknown engine {e.engine!r}; expected one of {SHARDINGS}")


def _optimizer_bytes(output_numel: int, vector_numel: int, total_numel: int, state_bytes: int = 4) -> dict[str, int]:
    return {
        "scale": state_bytes * (output_numel + 2 * vector_numel),  # output momentum; AdamW moments of 1-D params
        "adamw": state_bytes * 2 * total_numel,  # exp_avg + exp_avg_sq
    }


def engine_buffers(params: list[Param], config: LlamaConfig, engine: EngineConfig) -> int:
    """Engine memory outside the model states (from the engines' designs; not measured here):
    ZeRO's contiguous gradient bucket (`reduce_bucket_size` elements of the parameter dtype)
    and ZeRO-3's gathered parameters (the largest block plus the prefetch bucket); FSDP2's two
    all-gathered bf16 blocks (current and prefetched) and one block's unsharded gradients
    with their fp32 reduce-scatter copy."""
    blocks = [sum(p.numel for p in params if p.name.startswith(f"model.layers.{i}.")) for i in range(config.num_hidden_layers)]
    largest = max([*blocks, *(p.numel for p in params if p.role in ("embedding", "output"))])
    bucket = engine.param_bytes * engine.reduce_bucket_size
    if engine.engine == "zero3":
        return bucket + engine.param_bytes * (largest + engine.prefetch_bucket_size)
    if engine.engine in ("zero0", "zero1", "zero2"):
        return bucket
    return 2 * 2 * largest + (2 + 4) * largest


@lru_cache(maxsize=64)
def _activation_peak(
    config_json: str, micro_batch: int, seq_len: int, checkpointing: bool, dtype: torch.dtype, layers: int
) -> int:
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType

    config = LlamaConfig.from_dict(json.loads(config_json))
    config.num_hidden_layers = layers
    config.use_cache = False
    config._attn_implementation = "sdpa"
    # Transformers cannot read fake position ids, so it would build an explicit attention mask
    # for possibly packed sequences; a real unpacked batch gets none (SDPA's is_causal).
    unpacked = mock.patch.object(masking_utils, "find_packed_sequence_indices", lambda position_ids: None)
    with FakeTensorMode(), _default_dtype(dtype), unpacked, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MemTracker warns about untyped storages of fake tensors
        model = LlamaForCausalLM(config)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        for p in model.parameters():
            # ZeRO and FSDP reduce each gradient away as soon as it is ready: count it only then.
            p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
        ids = torch.zeros(micro_batch, seq_len, dtype=torch.long)
        tracker = MemTracker()
        tracker.track_external(model, ids)
        with tracker:
            model(input_ids=ids, labels=ids).loss.backward()
        peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
    return peak["Total"] - peak[_MemRefType.PARAM] - peak[_MemRefType.BUFFER]


def activation_bytes(config: LlamaConfig, micro_batch: int, seq_len: int, checkpointing: bool,
                     precision: str = "bf16", layers: int | None = None) -> int:
    """Peak bytes of activations and temporaries of one forward + backward (not parameters,
    not parameter gradients), measured on fake tensors; see the module docstring."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    layers = config.num_hidden_layers if layers is None else layers
    return _activation_peak(config.to_json_string(), micro_batch, seq_len, checkpointing, dtype, layers)


def activation_line(config: LlamaConfig, seq_len: int, checkpointing: bool, precision: str = "bf16") -> tuple[int, int]:
    """(fixed, per sequence) bytes at the config's depth. The peak is affine in the micro
    batch and in the number of decoder layers (identical layers; with checkpointing each keeps
    its input and one is recomputed at a time), so it is measured at 1 and 2 sequences on 1
    and 2 layers and extended: tracking every op of a 32-layer model would take minutes."""
    depth = config.num_hidden_layers
    def at(batch: int, layers: int) -> int:
        return activation_bytes(config, batch, seq_len, checkpointing, precision, layers)

    peak = {b: at(b, 1) + (depth - 1) * (at(b, 2) - at(b, 1)) for b in (1, 2)}
    return peak[1] - (peak[2] - peak[1]), peak[2] - peak[1]


@dataclass
class Estimate:
    model: str
    engine: str
    optimizer: str
    world: int
    micro_batch_size: int
    seq_len: int
    activation_checkpointing: bool
    states: ModelStates
    activations: int
    buffers: int
    reserve: int
    gpu_memory: int | None
    max_micro_batch: int | None = None
    parts: dict[str, int] = field(init=False)

    def __post_init__(self):
        self.parts = {
            "parameters": self.states.params, "fp32 master": self.states.master, "gradients": self.states.grads,
            "optimizer state": self.states.optimizer[self.optimizer], "activations": self.activations,
            "engine buffers": self.buffers, "reserve": self.reserve,
        }

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    @property
    def fits(self) -> bool:
        return self.gpu_memory is None or self.total <= self.gpu_memory


def estimate(
    model: str | Path | LlamaConfig,
    world_size: int,
    micro_batch_size: int,
    seq_len: int,
    optimizer: str = "scale",
    engine: str | EngineConfig = "zero3",
    activation_checkpointing: bool = False,
    gpu_memory_gib: float | None = None,
    reserve_gib: float = 2.0,
) -> Estimate:
    """Per-GPU bytes of one configuration and, given the GPU's memory, the largest micro batch."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; the planner knows {OPTIMIZERS}")
    config = load_model_config(model)
    engine = engine if isinstance(engine, EngineConfig) else EngineConfig(engine=engine)
    params = model_params(config)
    states = model_states(params, world_size, engine)
    fixed, per_sequence = activation_line(config, seq_len, activation_checkpointing, engine.precision)
    gpu_memory = None if gpu_memory_gib is None else int(gpu_memory_gib * GIB)
    name = f"a {sum(p.numel for p in params) / 1e6:.1f}M-parameter LLaMA" if isinstance(model, LlamaConfig) else str(model)
    result = Estimate(
        model=name, engine=engine.engine, optimizer=optimizer, world=world_size,
        micro_batch_size=micro_batch_size, seq_len=seq_len, activation_checkpointing=activation_checkpointing,
        states=states, activations=fixed + per_sequence * micro_batch_size,
        buffers=engine_buffers(params, config, engine), reserve=int(reserve_gib * GIB), gpu_memory=gpu_memory,
    )
    if gpu_memory is not None:
        free = gpu_memory - (result.total - result.activations) - fixed
        result.max_micro_batch = max(0, free // per_sequence)
    return result


def check_fits(
    model: str | Path | LlamaConfig,
    world_size: int,
    micro_batch_size: int,
    seq_len: int,
    gpu_memory_gib: float,
    optimizer: str = "scale",
    *,
    global_batch_size: int | None = None,
    **options,
) -> Estimate:
    """Refuse up front a run that cannot fit: raises MemoryPlanError with the per-GPU numbers
    and what would fit (a smaller micro batch, dividing `global_batch_size` over the ranks
    when given; activation checkpointing; more ranks). `options` are `estimate`'s (engine,
    activation_checkpointing, reserve_gib)."""
    plan = estimate(model, world_size, micro_batch_size, seq_len, optimizer, gpu_memory_gib=gpu_memory_gib, **options)
    if plan.fits:
        return plan
    parts = ", ".join(f"{name} {gib(b)}" for name, b in plan.parts.items())
    ways = []
    smaller = [
        b for b in range(plan.max_micro_batch, 0, -1)
        if global_batch_size is None or global_batch_size % (b * world_size) == 0
    ]
    if smaller:
        ways.append(f"--micro-batch-size {smaller[0]} (gradient accumulation keeps the global batch)")
    if not plan.activation_checkpointing:
        with_ac = estimate(model, world_size, micro_batch_size, seq_len, optimizer, gpu_memory_gib=gpu_memory_gib,
                           **{**options, "activation_checkpointing": True})
        if with_ac.fits:
            ways.append(f"--activation-checkpointing (needs {gib(with_ac.total)} GiB)")
    if plan.engine != "zero3":
        ways.append("ZeRO-3 (partitions the parameters too)")
    ways.append("more GPUs")
    raise MemoryPlanError(
        f"{plan.model} with {optimizer} under {plan.engine} on {world_size} ranks, micro batch "
        f"{micro_batch_size} x {seq_len} tokens, needs {gib(plan.total)} GiB per GPU ({parts}) but the "
        f"GPU has {gib(plan.gpu_memory)} GiB. Use " + ", or ".join(ways) + "."
    )


def fewest_gpus(
    model: str | Path | LlamaConfig, micro_batch_size: int, seq_len: int, gpu_memory_gib: float,
    optimizer: str = "scale", engine: str | EngineConfig = "zero3", activation_checkpointing: bool = False,
    reserve_gib: float = 2.0, most: int = 4096,
) -> int | None:
    """The fewest data-parallel GPUs on which the run fits (None: not even on `most`)."""
    config = load_model_config(model)
    engine = engine if isinstance(engine, EngineConfig) else EngineConfig(engine=engine)
    params = model_params(config)
    fixed, per_sequence = activation_line(config, seq_len, activation_checkpointing, engine.precision)
    rest = fixed + per_sequence * micro_batch_size + engine_buffers(params, config, engine) + int(reserve_gib * GIB)
    for world in range(1, most + 1):
        states = model_states(params, world, engine)
        if states.params + states.master + states.grads + states.optimizer[optimizer] + rest <= gpu_memory_gib * GIB:
            return world
    return None


def format_fewest_gpus(model: str, micro_batch: int, seq_len: int, gpu_memory_gib: float, engines: list[EngineConfig],
                       checkpointing: bool, reserve_gib: float) -> str:
    """Per engine and optimizer, the fewest GPUs that fit, with fp32 masters and master-free."""
    lines = [f"fewest GPUs of {gpu_memory_gib:g} GiB for {model}, micro batch {micro_batch} x {seq_len} tokens"
             f"{', activation checkpointing' if checkpointing else ''}:",
             f"{'engine':7} {'optim':6} {'fp32 masters':>13} {'master-free':>12}"]
    for engine in engines:
        for optimizer in OPTIMIZERS:
            counts = [
                fewest_gpus(model, micro_batch, seq_len, gpu_memory_gib, optimizer,
                            dataclasses.replace(engine, master_weights=mode), checkpointing, reserve_gib)
                for mode in ("fp32", "bf16")
            ]
            lines.append(f"{engine.engine:7} {optimizer:6} " + " ".join(
                f"{'-' if n is None else n:>{w}}" for n, w in zip(counts, (13, 12))))
    return "\n".join(lines)


def gib(n: int) -> str:
    return f"{n / GIB:.2f}"


def format_plan(model: str, world: int, micro_batch: int, seq_len: int, gpu_memory_gib: float | None,
                engines: list[EngineConfig], checkpointing: bool, reserve_gib: float) -> str:
    """The per-GPU table for every engine x optimizer, activations with and without
    checkpointing, and the largest micro batch that fits."""
    config = load_model_config(model)
    params = model_params(config)
    n = sum(p.numel for p in params)
    acts = {ac: activation_line(config, seq_len, ac, engines[0].precision) for ac in (False, True)}
    lines = [
        f"{model}: {n / 1e6:.1f}M parameters, {world} ranks, micro batch {micro_batch} x {seq_len} tokens, "
        f"{engines[0].precision}{', master-free' if engines[0].master_free else ''}; GiB per GPU (largest rank)",
        f"activations per micro batch: {gib(acts[False][0] + acts[False][1] * micro_batch)} without, "
        f"{gib(acts[True][0] + acts[True][1] * micro_batch)} with activation checkpointing "
        f"(per sequence {acts[False][1] / 2**20:.1f} / {acts[True][1] / 2**20:.1f} MiB)",
        "",
    ]
    header = (
        f"{'engine':7} {'optim':6} {'params':>8} {'master':>8} {'grads':>8} {'optim':>8} {'buffers':>8} "
        f"{'total':>8} {'total+AC':>9} {'max mb':>7} {'max mb AC':>9}"
    )
    lines += [header, "-" * len(header)]
    for engine in engines:
        for optimizer in OPTIMIZERS:
            est = {
                ac: estimate(config, world, micro_batch, seq_len, optimizer, engine, ac, gpu_memory_gib, reserve_gib)
                for ac in (False, True)
            }
            s = est[False].states
            fmt = lambda v: "-" if v is None else str(v)  # noqa: E731
            lines.append(
                f"{engine.engine:7} {optimizer:6} {gib(s.params):>8} {gib(s.master):>8} {gib(s.grads):>8} "
                f"{gib(s.optimizer[optimizer]):>8} {gib(est[False].buffers):>8} {gib(est[False].total):>8} "
                f"{gib(est[True].total):>9} {fmt(est[False].max_micro_batch):>7} {fmt(est[True].max_micro_batch):>9}"
            )
    lines.append("")
    lines.append(
        f"total = params + master + grads + optimizer + activations + buffers + {reserve_gib:g} GiB reserve "
        "(CUDA context, NCCL, fragmentation); AC = activation checkpointing per decoder layer"
    )
    if gpu_memory_gib is not None:
        lines.append(f"max mb = largest micro batch that fits in {gpu_memory_gib:g} GiB")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scale_zero_train.plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help=f"size ({', '.join(MODEL_SIZES)}) or a LlamaConfig JSON path")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--gpu-memory", type=float, default=None, help="GiB per GPU; with it, the largest micro batch that fits")
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--activation-checkpointing", action="store_true",
                        help="check the fit with activation checkpointing (the table shows both)")
    parser.add_argument("--engine", choices=SHARDINGS, action="append", help="default: zero2, zero3, fsdp2")
    parser.add_argument("--ds-config", help="DeepSpeed JSON: precision, grad accumulation dtype, bucket sizes")
    parser.add_argument("--precision", choices=sorted(DTYPE_BYTES), default="bf16")
    parser.add_argument("--grad-accum-dtype", choices=sorted(DTYPE_BYTES), default="fp32",
                        help="ZeRO gradient partitions (configs/zero*_scale.json use fp32); FSDP2 keeps fp32")
    parser.add_argument("--master-weights", choices=("fp32", "bf16"), default="fp32",
                        help="bf16: master-free (bf16 weights, gradients and optimizer state; no fp32 copy)")
    parser.add_argument("--fewest-gpus", action="store_true",
                        help="with --gpu-memory: also the fewest GPUs that fit, with fp32 masters and master-free")
    parser.add_argument("--reserve", type=float, default=2.0, help="GiB kept for the CUDA context, NCCL, fragmentation")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default=None,
                        help="with --gpu-memory: exit 1 if this run does not fit")
    args = parser.parse_args(argv)
    world = args.nodes * args.gpus_per_node
    if args.ds_config:
        engines = [EngineConfig.from_ds_config(args.ds_config)]
    else:
        engines = [
            EngineConfig(engine=e, precision=args.precision, grad_accum_dtype=args.grad_accum_dtype,
                         master_weights=args.master_weights)
            for e in (args.engine or ["zero2", "zero3", "fsdp2"])
        ]
    try:
        print(format_plan(args.model, world, args.micro_batch_size, args.seq_len, args.gpu_memory, engines,
                          args.activation_checkpointing, args.reserve))
        if args.fewest_gpus and args.gpu_memory is not None:
            print("\n" + format_fewest_gpus(args.model, args.micro_batch_size, args.seq_len, args.gpu_memory, engines,
                                            args.activation_checkpointing, args.reserve))
        if args.optimizer and args.gpu_memory is not None:
            for engine in engines:
                check_fits(args.model, world, args.micro_batch_size, args.seq_len, args.gpu_memory, args.optimizer,
                           engine=engine, activation_checkpointing=args.activation_checkpointing,
                           reserve_gib=args.reserve)
            print(f"\n{args.optimizer} fits under {', '.join(e.engine for e in engines)}.")
    except (MemoryPlanError, ConfigError) as err:
        print(f"\nerror: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
