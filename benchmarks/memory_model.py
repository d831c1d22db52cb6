"""Memory of SCALE against AdamW under DeepSpeed ZeRO-3: the model, checked against real runs.

    python benchmarks/memory_model.py                      # table + cross-check (about 1 min)
    python benchmarks/memory_model.py --rss 350m           # + peak RSS of real ZeRO-3 steps (7 min)
    python benchmarks/memory_model.py --rss 350m --out docs/results/memory.md
    python benchmarks/memory_model.py --skip-states --out docs/results/memory_master_free.md

1. Per-rank bytes of parameters, gradients and optimizer state under ZeRO-3 for every model
   size and 1, 8, 64 ranks, from the exact shapes (`scale_zero_train.plan.model_states`, the
   dtypes of configs/zero3_scale.json: bf16 parameters, fp32 master, fp32 gradient
   accumulation).
2. The same numbers counted on real engines, 2 CPU ranks, a small LLaMA with odd sizes so
   partitions are padded: DeepSpeed ZeRO-3 (bf16 partitions and persistent parameters, fp32
   partitions, gradient partition buffer), ZeRO-2 (bf16 flat buffers, fp32 slices, gradient
   partitions) and FSDP2 (local shards of parameters and gradients), and every tensor in the
   optimizer's state, SCALE and AdamW. The model must agree within 1%.
   Master-free bf16 (configs/zero*_scale_bf16.json, `--master-weights bf16` for FSDP2) is
   checked the same way.
3. Live tensor bytes per rank after two real ZeRO-3 steps (every tensor storage the
   process can reach, deduplicated): DeepSpeed's AdamW (configs/zero3_adamw.json) against
   SCALE with fp32 masters (configs/zero3_scale.json) and master-free
   (configs/zero3_scale_bf16.json).
4. Peak resident memory (ru_maxrss) of real ZeRO-3 training steps on 2 CPU ranks, SCALE
   against AdamW (and master-free SCALE), for a given size.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import resource
import sys
import time
import uuid
from pathlib import Path

# The engines run on CPU ranks (gloo), also on a machine with GPUs: set before deepspeed loads.
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.distributed.launcher.api import LaunchConfig, elastic_launch  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402
from transformers import LlamaConfig  # noqa: E402

from scale_zero_train.plan import GIB, EngineConfig, activation_bytes, engine_buffers, model_params, model_states  # noqa: E402
from scale_zero_train.presets import SIZES as PAPER_SIZES  # noqa: E402
from scale_zero_train.vocab import load_model_config  # noqa: E402

SIZES = tuple(PAPER_SIZES)
RANKS = (1, 8, 64)
# configs/zero3_scale.json: bf16 parameters, fp32 gradient accumulation, default persistence.
ZERO3 = EngineConfig(engine="zero3", precision="bf16", grad_accum_dtype="fp32")
CHECKED_ENGINES = {"zero2": EngineConfig(engine="zero2", precision="bf16", grad_accum_dtype="fp32"), "zero3": ZERO3,
                   "fsdp2": EngineConfig(engine="fsdp2"),
                   "zero3-bf16": EngineConfig(engine="zero3", grad_accum_dtype="bf16", master_weights="bf16"),
                   "fsdp2-bf16": EngineConfig(engine="fsdp2", master_weights="bf16")}
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
MASTER_FREE_BF16 = json.loads((CONFIGS / "zero3_scale_bf16.json").read_text())["bf16"]
# Odd sizes: every partition is padded and rows straddle the two ranks; the embedding and
# output layer are above the persistence threshold (1e5), the rest below.
CHECK_MODEL = dict(hidden_size=48, intermediate_size=130, vocab_size=2111, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)


def ds_config(micro_batch: int, stage: int = 3, master_free: bool = False) -> dict:
    """configs/zero*_scale.json's dtypes, or with master_free configs/zero*_scale_bf16.json's."""
    return {
        "train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
        "bf16": MASTER_FREE_BF16 if master_free else {"enabled": True},
        "data_types": {"grad_accum_dtype": "bf16" if master_free else "fp32"},
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": ZERO3.param_persistence_threshold},
        "zero_allow_untested_optimizer": True, "steps_per_print": 10**9,
    }


def state_table() -> list[str]:
    lines = [
        "| model | params | ranks | bf16 params | fp32 master | grads (fp32) | SCALE state | AdamW state | SCALE/AdamW state | total SCALE | total AdamW |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for size in SIZES:
        params = model_params(load_model_config(size))
        n = sum(p.numel for p in params)
        for world in RANKS:
            s = model_states(params, world, ZERO3)
            scale, adamw = s.optimizer["scale"], s.optimizer["adamw"]
            common = s.params + s.master + s.grads
            lines.append(
                f"| {size} | {n / 1e6:.1f}M | {world} | {_gib(s.params)} | {_gib(s.master)} | {_gib(s.grads)} | "
                f"{_gib(scale)} | {_gib(adamw)} | {scale / adamw:.2%} | {_gib(common + scale)} | {_gib(common + adamw)} |"
            )
    return lines


def _gib(n: int) -> str:
    return f"{n / GIB:.3f} GiB" if n < 10 * GIB else f"{n / GIB:.1f} GiB"


def _nbytes(tensors) -> int:
    """Bytes of distinct storages (a tensor and its views count once)."""
    storages = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.numel():
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


def _engine(config: LlamaConfig, optimizer: str, micro_batch: int, stage: int = 3, master_free: bool = False):
    """A DeepSpeed engine (`ds_config`'s dtypes) with SCALE or torch AdamW."""
    import deepspeed

    import scale_zero
    from scale_zero import SCALE, scale_param_groups

    ds = ds_config(micro_batch, stage, master_free)
    with deepspeed.zero.Init(config_dict_or_path=ds, enabled=stage == 3):
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM(config)
    groups = scale_param_groups(model)
    opt = SCALE(groups, lr=1e-3, adam_lr=1e-3) if optimizer == "scale" else torch.optim.AdamW(groups, lr=1e-3)
    engine, *_ = scale_zero.initialize(model=model, optimizer=opt, config=ds)
    return engine


def _train_step(engine, ids: torch.Tensor) -> float:
    loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    engine.step()
    return loss.item()


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP2 (DTensor) parameter, gradient or state."""
    return t.to_local() if isinstance(t, DTensor) else t


def _state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return _nbytes(_local(v) for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor))


def _count_deepspeed(config: LlamaConfig, optimizer: str, stage: int, ids: torch.Tensor,
                     master_free: bool = False) -> dict[str, int]:
    engine = _engine(config, optimizer, micro_batch=ids.shape[0], stage=stage, master_free=master_free)
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    zero = engine.optimizer
    # ZeRO-2's gradient partitions exist between backward and step; ZeRO-3's buffer always.
    grads = [zero.grad_partitions_flat_buffer] if stage == 3 else [t for g in zero.averaged_gradients.values() for t in g]
    counts = {"grads": _nbytes(grads)}
    engine.step()
    if stage == 3:
        counts.update(
            # this rank's bf16 partitions + the persistent parameters, whole (gathered at the
            # end of a step; the others' data is released between uses: numel 0)
            params=_nbytes([p.data for p in engine.module.parameters()]) + _nbytes(zero.fp16_partitioned_groups_flat),
            master=_nbytes(zero.fp32_partitioned_groups_flat),
        )
    else:
        counts.update(params=_nbytes(zero.bit16_groups_flat), master=_nbytes(zero.single_partition_of_fp32_groups))
    counts["optimizer"] = _state_bytes(zero.optimizer)
    engine.destroy()
    return counts


def _count_fsdp2(config: LlamaConfig, optimizer: str, ids: torch.Tensor, master_free: bool = False) -> dict[str, int]:
    """FSDP2 as the trainer (scale_zero_train.engines) wraps it: each decoder layer, then the model; bf16 compute,
    fp32 reduction; master-free: bf16-stored parameters and SCALE state."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from transformers import LlamaForCausalLM

    from scale_zero import SCALE, scale_param_groups
    from scale_zero_train.engines import store_parameters_in_bf16

    model = LlamaForCausalLM(config)
    if master_free:
        store_parameters_in_bf16(model)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    groups = scale_param_groups(model)
    state_dtype = torch.bfloat16 if master_free else None
    opt = (SCALE(groups, lr=1e-3, adam_lr=1e-3, state_dtype=state_dtype) if optimizer == "scale"
           else torch.optim.AdamW(groups, lr=1e-3))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    return {
        "params": _nbytes(_local(p) for p in model.parameters()),
        "master": 0,
        "grads": _nbytes(_local(p.grad) for p in model.parameters()),
        "optimizer": _state_bytes(opt),
    }


def count_engine_states(config_kwargs: dict = CHECK_MODEL) -> dict:
    """On each rank of a process group, per engine and optimizer: one training step, then
    the bytes of parameters, fp32 master, gradients and optimizer state the engine holds."""
    config = LlamaConfig(**config_kwargs)
    ids = torch.randint(0, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    counts = {}
    for optimizer in ("scale", "adamw"):
        counts["zero2", optimizer] = _count_deepspeed(config, optimizer, 2, ids)
        counts["zero3", optimizer] = _count_deepspeed(config, optimizer, 3, ids)
        counts["fsdp2", optimizer] = _count_fsdp2(config, optimizer, ids)
    # master-free: SCALE's mode (torch AdamW on bf16 storage would round every update to nearest)
    counts["zero3-bf16", "scale"] = _count_deepspeed(config, "scale", 3, ids, master_free=True)
    counts["fsdp2-bf16", "scale"] = _count_fsdp2(config, "scale", ids, master_free=True)
    return counts


def model_counts(engine: str, optimizer: str, world: int, config_kwargs: dict = CHECK_MODEL) -> dict[str, int]:
    """What `count_engine_states` should find, from the shapes."""
    s = model_states(model_params(LlamaConfig(**config_kwargs)), world, CHECKED_ENGINES[engine])
    return {"params": s.params, "master": s.master, "grads": s.grads, "optimizer": s.optimizer[optimizer]}


def _on_rank(fn, *args):
    torch.set_num_threads(1)  # ranks share the machine's cores
    dist.init_process_group("gloo")
    try:
        return fn(*args)
    finally:
        dist.destroy_process_group()


def run_on_ranks(fn, world: int, *args) -> list:
    """fn(*args) on `world` local CPU ranks (gloo), started by torch's elastic launcher; the per-rank results."""
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=world, run_id=uuid.uuid4().hex,
                          rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=0)
    results = elastic_launch(config, _on_rank)(fn, *args)
    return [results[rank] for rank in range(world)]


def cross_check(world: int = 2) -> tuple[list[str], float]:
    """Model vs engines for both optimizers; returns the markdown rows and the worst relative error."""
    rows, worst = [], 0.0
    for rank, measured in enumerate(run_on_ranks(count_engine_states, world)):
        for (engine, optimizer), counts in measured.items():
            model = model_counts(engine, optimizer, world)
            for key, value in counts.items():
                error = abs(value - model[key]) / model[key] if model[key] else float(value != 0)
                worst = max(worst, error)
                rows.append(f"| {engine} | {optimizer} | {rank} | {key} | {model[key]:,} | {value:,} | {error:.3%} |")
    return rows, worst


def live_tensor_bytes() -> int:
    """Bytes of every tensor storage this process can reach (each storage once)."""
    gc.collect()
    return _nbytes(o for o in gc.get_objects() if isinstance(o, torch.Tensor))


# The three runs compared: (label, optimizer, DeepSpeed JSON): the JSON's dtypes and ZeRO settings, with
# DeepSpeed's buffers sized for a small model (LIVE_BUFFERS) so that they do not hide the states.
LIVE_RUNS = (("DeepSpeed AdamW", "deepspeed-adamw", "zero3_adamw.json"),
             ("SCALE, fp32 masters", "scale", "zero3_scale.json"),
             ("SCALE, master-free bf16", "scale", "zero3_scale_bf16.json"))
LIVE_BUFFERS = dict(reduce_bucket_size=100_000, stage3_prefetch_bucket_size=100_000, stage3_param_persistence_threshold=10_000)
# About 4.7M parameters, odd sizes.
LIVE_MODEL = dict(hidden_size=192, intermediate_size=520, vocab_size=8011, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)


def _live_worker(config_kwargs: dict, steps: int, micro_batch: int, seq_len: int) -> dict:
    """Per run of LIVE_RUNS: live tensor bytes on this rank after `steps` ZeRO-3 steps."""
    import deepspeed
    from transformers import LlamaForCausalLM

    import scale_zero
    from scale_zero import SCALE, scale_param_groups

    config = LlamaConfig(**config_kwargs)
    g = torch.Generator().manual_seed(dist.get_rank())
    out = {}
    for label, optimizer, name in LIVE_RUNS:
        ds = json.loads((CONFIGS / name).read_text())
        ds.update(train_micro_batch_size_per_gpu=micro_batch, steps_per_print=10**9)
        ds["zero_optimization"].update(LIVE_BUFFERS)
        baseline = live_tensor_bytes()
        with deepspeed.zero.Init(config_dict_or_path=ds):
            model = LlamaForCausalLM(config)
        opt = None if optimizer == "deepspeed-adamw" else SCALE(scale_param_groups(model), lr=1e-3, adam_lr=1e-3)
        engine, *_ = scale_zero.initialize(model=model, optimizer=opt, config=ds,
                                           model_parameters=model.parameters() if opt is None else None)
        for _ in range(steps):
            _train_step(engine, torch.randint(0, config.vocab_size, (micro_batch, seq_len), generator=g))
        out[label] = live_tensor_bytes() - baseline
        engine.destroy()
        del engine, model, opt
    return out


def live_rows(steps: int = 2, micro_batch: int = 1, seq_len: int = 64, world: int = 2,
              config_kwargs: dict = LIVE_MODEL) -> tuple[list[str], float]:
    """Markdown rows of the live-bytes comparison, and master-free SCALE / AdamW (worst rank)."""
    n = sum(p.numel for p in model_params(LlamaConfig(**config_kwargs)))
    rows, worst = [], 0.0
    for rank, measured in enumerate(run_on_ranks(_live_worker, world, config_kwargs, steps, micro_batch, seq_len)):
        adamw = measured[LIVE_RUNS[0][0]]
        for label, _, name in LIVE_RUNS:
            value = measured[label]
            rows.append(f"| {rank} | {label} | configs/{name} | {value:,} | {value / n:.2f} | {value / adamw:.2f} |")
        worst = max(worst, measured[LIVE_RUNS[2][0]] / adamw)
    return rows, worst


def _rss_worker(size: str, optimizer: str, steps: int, micro_batch: int, seq_len: int, master_free: bool = False) -> dict:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    config = load_model_config(size)
    engine = _engine(config, optimizer, micro_batch, master_free=master_free)
    built = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    g = torch.Generator().manual_seed(torch.distributed.get_rank())
    times, losses = [], []
    for _ in range(steps):
        start = time.perf_counter()
        losses.append(_train_step(engine, torch.randint(0, config.vocab_size, (micro_batch, seq_len), generator=g)))
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    state = _nbytes(v for s in engine.optimizer.optimizer.state.values() for v in s.values())
    return {"before": before, "built": built, "peak": peak, "state": state, "step_s": times, "loss": losses}


def rss_rows(size: str, steps: int, micro_batch: int, seq_len: int, world: int = 2) -> list[str]:
    config = load_model_config(size)
    params = model_params(config)
    activations = activation_bytes(config, micro_batch, seq_len, checkpointing=False)
    buffers = engine_buffers(params, config, ZERO3)
    rows = []
    for optimizer, master_free in (("scale", False), ("adamw", False), ("scale", True)):
        engine = CHECKED_ENGINES["zero3-bf16"] if master_free else ZERO3
        states = model_states(params, world, engine)
        planned = states.params + states.master + states.grads + states.optimizer[optimizer] + activations
        label = f"{optimizer}{' master-free' if master_free else ''}"
        for rank, r in enumerate(run_on_ranks(_rss_worker, world, size, optimizer, steps, micro_batch, seq_len, master_free)):
            rows.append(
                f"| {size} | {label} | {rank} | {_gib(r['peak'])} | {_gib(r['built'] - r['before'])} | "
                f"{_gib(r['peak'] - r['before'])} | {_gib(planned)} | {_gib(planned + buffers)} | "
                f"{_gib(r['state'])} | {min(r['step_s']):.1f} s |"
            )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rss", metavar="SIZE", nargs="+", default=[],
                        help="also measure peak RSS of real ZeRO-3 steps for these sizes")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--out", help="write the markdown report here")
    parser.add_argument("--skip-states", action="store_true", help="leave out the per-size table from the shapes")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    out = [
        "# Memory: SCALE against AdamW under DeepSpeed ZeRO-3", "",
        f"Machine: {platform.node()}, {os.cpu_count()} CPU cores, {_total_memory()}, torch {torch.__version__}. "
        f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC.",
        f"Command: `python benchmarks/memory_model.py {' '.join(argv if argv is not None else sys.argv[1:])}`", "",
    ]
    if not args.skip_states:
        out += ["## Per-rank model states from the shapes (ZeRO-3, bf16 + fp32 master + fp32 grads)", "",
                *state_table(), ""]
    rows, worst = cross_check()
    out += [
        "## The model against real engines (2 CPU ranks, bytes held in a training step)", "",
        "DeepSpeed ZeRO-2 and ZeRO-3 (configs/zero*_scale.json's dtypes) and FSDP2 (the trainer's "
        "wrapping: bf16 compute, fp32 reduction), SCALE bound by `scale_zero.initialize` and torch AdamW.", "",
        f"Model: LlamaConfig({', '.join(f'{k}={v}' for k, v in CHECK_MODEL.items())}).", "",
        "| engine | optimizer | rank | what | model | measured | error |", "|---|---|---|---|---|---|---|", *rows, "",
        f"Largest disagreement: {worst:.3%}.", "",
    ]
    live, ratio = live_rows()
    out += [
        "## Live tensor bytes per rank after two ZeRO-3 steps (2 CPU ranks, micro batch 1 x 64)", "",
        f"Model: LlamaConfig({', '.join(f'{k}={v}' for k, v in LIVE_MODEL.items())}), "
        f"{sum(p.numel for p in model_params(LlamaConfig(**LIVE_MODEL))) / 1e6:.2f}M parameters. "
        "Every tensor storage the rank can reach after the second step (parameters, partitions, gradients, "
        "optimizer state, DeepSpeed's buffers), counted once, less what was live before the engine was built. "
        f"Each JSON as shipped but for DeepSpeed's buffer sizes, the same in all three runs: {LIVE_BUFFERS}.", "",
        "| rank | run | config | bytes | B/param | / AdamW |", "|---|---|---|---|---|---|", *live, "",
        f"Master-free SCALE / AdamW, worst rank: {ratio:.2f} (acceptance: at most 0.40).", "",
    ]
    if args.rss:
        out += [
            f"## Peak resident memory of real ZeRO-3 steps, 2 CPU ranks ({args.steps} steps, micro batch "
            f"{args.micro_batch_size} x {args.seq_len})", "",
            "| model | optimizer | rank | peak RSS | engine built (delta) | peak (delta) | planner: states + activations "
            "| planner + engine buffers | optimizer state | fastest step |",
            "|---|---|---|---|---|---|---|---|---|---|",
            *(row for size in args.rss for row in rss_rows(size, args.steps, args.micro_batch_size, args.seq_len)), "",
        ]
    text = "\n".join(out)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    if worst > 0.01:
        sys.exit(f"the memory model and the engine disagree by {worst:.2%} (> 1%)")


def _total_memory() -> str:
    with open("/proc/meminfo") as f:
        kib = int(f.readline().split()[1])
    return f"{kib / 2**20:.0f} GiB RAM"


if __name__ == "__main__":
    main()
