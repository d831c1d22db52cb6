"""Tokens/s of full ZeRO-3 training steps, SCALE against DeepSpeed's AdamW (or, with
`--baseline muon`, DeepSpeed's Muon as a reference), on CPU ranks;
and what each step sends: SCALE's all_reduces against ZeRO-3's gradient reduce-scatter and
parameter all-gather, measured, then projected from shapes for LLaMA-7B on 64 ranks.

Both engines live in the same processes (same model, same initial weights, same batches,
configs/zero3_scale.json vs configs/zero3_adamw.json with only the batch fields changed) and
take turns step by step (the order alternating), so a load change on the shared machine hits
both alike; the ratio is taken per round of adjacent steps, then its median.

    PYTHONPATH=$PWD DS_ACCELERATOR=cpu deepspeed --num_gpus 2 benchmarks/throughput.py

writes docs/results/throughput.md (rank 0); add `--master_port N` after `deepspeed` when 29500
is taken. About 4 minutes on 2 shared cores, half of it starting the two engines.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import deepspeed
import deepspeed.comm as ds_comm
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from transformers import LlamaConfig, LlamaForCausalLM

import scale_zero
from scale_zero import SCALE, scale_param_groups
from scale_zero.scale import NORM_DIMS
from scale_zero.shard_layout import ShardLayout, matrix_shape
from scale_zero_train.engines import release_cpu_allreduce_buffer

ROOT = Path(__file__).resolve().parent.parent
# LLaMA-7B (spec section 5), for the communication projection.
LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                vocab_size=32000)
DTYPE_BYTES = {"bf16": 2, "fp32": 4}
BASELINES = {"adamw": "AdamW", "muon": "Muon"}


def arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_argument_group("model (LlamaForCausalLM, untied embeddings)")
    model.add_argument("--hidden", type=int, default=512)
    model.add_argument("--ffn", type=int, default=1376)
    model.add_argument("--layers", type=int, default=4)
    model.add_argument("--heads", type=int, default=8)
    model.add_argument("--vocab", type=int, default=8192)
    run = parser.add_argument_group("run")
    run.add_argument("--micro-batch", type=int, default=2)
    run.add_argument("--seq", type=int, default=128)
    run.add_argument("--accum", type=int, default=1, help="gradient accumulation steps")
    run.add_argument("--dtype", choices=DTYPE_BYTES, default="bf16",
                     help="bf16: the configs as shipped; fp32: bf16 disabled")
    run.add_argument("--warmup", type=int, default=2, help="untimed steps per engine")
    run.add_argument("--rounds", type=int, default=40, help="rounds of one block per engine, order alternating")
    run.add_argument("--block", type=int, default=1, help="timed steps per block")
    run.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    run.add_argument("--baseline", choices=BASELINES, default="adamw",
                     help="DeepSpeed's optimizer to compare with: AdamW, or Muon as a reference")
    run.add_argument("--offload", action="store_true",
                     help="offload_optimizer: cpu for both engines (AdamW becomes DeepSpeedCPUAdam)")
    run.add_argument("--project-world", type=int, default=64, help="ranks for the 7B projection")
    run.add_argument("--out", type=Path, default=ROOT / "docs/results/throughput.md")
    run.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # from the deepspeed launcher
    return parser


def llama_config(args) -> LlamaConfig:
    return LlamaConfig(hidden_size=args.hidden, intermediate_size=args.ffn, num_hidden_layers=args.layers,
                       num_attention_heads=args.heads, vocab_size=args.vocab, tie_word_embeddings=False)


def ds_config(name: str, args) -> dict:
    config = json.loads((ROOT / "configs" / name).read_text())
    config["train_micro_batch_size_per_gpu"] = args.micro_batch
    config["gradient_accumulation_steps"] = args.accum
    config["bf16"]["enabled"] = args.dtype == "bf16"
    if args.offload:  # the optimizer steps the fp32 partitions in host memory
        config["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
        if "optimizer" not in config:
            config["zero_force_ds_cpu_optimizer"] = False  # SCALE is the client, not DeepSpeedCPUAdam
    return config


@dataclass
class Engine:
    name: str
    engine: object
    client_optimizer: torch.optim.Optimizer
    client: list = field(default_factory=lambda: [0.0, 0.0])  # client optimizer step() wall, CPU s (hooks)
    steps: list = field(default_factory=list)  # per timed step: {part: (wall s, CPU s)}


def clock() -> tuple[float, float]:
    """Wall clock and this process's CPU time: other jobs on the machine inflate the first only."""
    return time.perf_counter(), time.process_time()


def since(start: tuple[float, float]) -> tuple[float, float]:
    return tuple(now - then for now, then in zip(clock(), start))


def build(name: str, config_file: str, args) -> Engine:
    config = ds_config(config_file, args)
    torch.manual_seed(0)  # same initial weights for both engines
    with deepspeed.zero.Init(config_dict_or_path=config):
        model = LlamaForCausalLM(llama_config(args))
    if name == "Muon":
        config["optimizer"] = {"type": "Muon", "params": {"lr": 1e-3, "momentum": 0.95}}
        config["zero_optimization"]["reduce_scatter"] = False  # Muon's ZeRO-3 path requires it
    if "optimizer" in config:  # DeepSpeed builds its own optimizer from the config
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    else:
        optimizer = SCALE(scale_param_groups(model), lr=1e-3, adam_lr=1e-3, momentum=0.9)
        engine, *_ = scale_zero.initialize(model=model, optimizer=optimizer, config=config)
    result = Engine(name, engine, engine.basic_optimizer)
    started = []

    def pre(*_):
        started.append(clock())

    def post(*_):
        result.client = [total + part for total, part in zip(result.client, since(started.pop()))]

    result.client_optimizer.register_step_pre_hook(pre)
    result.client_optimizer.register_step_post_hook(post)
    return result


def train_step(run: Engine, batches: list[torch.Tensor]) -> dict[str, tuple[float, float]]:
    """One optimizer step (`accum` micro-batches): (wall, CPU) seconds of the whole step, of
    the engine.step() calls and of the client optimizer's step inside them."""
    run.client = [0.0, 0.0]
    engine_step = [0.0, 0.0]
    start = clock()
    for input_ids in batches:
        loss = run.engine(input_ids=input_ids, labels=input_ids).loss
        run.engine.backward(loss)
        step_start = clock()
        run.engine.step()
        engine_step = [total + part for total, part in zip(engine_step, since(step_start))]
    return {"step": since(start), "engine_step": tuple(engine_step), "client": tuple(run.client)}


def comm_log_of_one_step(run: Engine, batches) -> dict[str, tuple[int, int]]:
    """DeepSpeed's comms logger over one optimizer step: {op: (calls, logged message bytes)}."""
    ds_comm.configure(enabled=True, prof_all=True, debug=True)
    ds_comm.comms_logger.reset_data()
    train_step(run, batches)
    ds_comm.configure(enabled=False)
    log = {}
    for op, sizes in ds_comm.comms_logger.get_raw_data().items():
        log[op] = (sum(v[0] for v in sizes.values()), sum(size * v[0] for size, v in sizes.items()))
    ds_comm.comms_logger.reset_data()
    return log


@dataclass
class CommModel:
    """Per optimizer step, from the parameter shapes alone."""

    params: int  # elements: the gradient ZeRO-3 reduce-scatters, the parameters it all-gathers
    scale_bytes: int  # SCALE's all_reduce buffers: one fp64 per cut matrix/output row, per embedding column
    scale_collectives: int  # one all_reduce per ZeRO-3 sub-group holding a cut normalized parameter


def sub_groups(partition_numels: list[int], sub_group_size: int) -> list[list[int]]:
    """The parameter indices of each sub-group ZeRO-3 splits a param group into
    (stage3 `_create_fp16_sub_groups`)."""
    if sub_group_size >= sum(partition_numels):
        return [list(range(len(partition_numels)))]
    groups, current, size = [], [], 0
    for i, numel in enumerate(partition_numels):
        current.append(i)
        size += numel
        if size >= sub_group_size or i == len(partition_numels) - 1:
            groups.append(current)
            current, size = [], 0
    return groups


def reduction_is_cut(shape: tuple[int, int], dim: int, world: int) -> bool:
    """Whether ZeRO-3's ranges (rank r: [r * pn, (r + 1) * pn), pn = ceil(numel / world))
    cut this parameter's rows (dim 1) or columns (dim 0), so its RMS needs the collective:
    SCALE's own rule (`ShardLayout.flat_range` with every rank's boundaries), for a group
    that exists only on paper."""
    numel = shape[0] * shape[1]
    pn = math.ceil(numel / world)
    boundaries = [min(r * pn, numel) for r in range(world + 1)]
    projected_group = object()  # a stand-in: the layout only records which dims need one
    return dim in ShardLayout.flat_range(shape, 0, 0, projected_group, boundaries).split_groups


def comm_model(config: LlamaConfig, world: int, sub_group_size: int) -> CommModel:
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())
    scale_bytes = collectives = 0
    for group in scale_param_groups(model):
        if group["role"] == "vector" or world == 1:  # AdamW, no collective
            continue
        dim = NORM_DIMS[group["role"]]
        shapes = [matrix_shape(p.shape) for p in group["params"]]
        cut = [reduction_is_cut(shape, dim, world) for shape in shapes]
        scale_bytes += 8 * sum(shape[1 - dim] for shape, is_cut in zip(shapes, cut) if is_cut)  # fp64 sums
        partition_numels = [math.ceil(p.numel() / world) for p in group["params"]]
        collectives += sum(any(cut[i] for i in members) for members in sub_groups(partition_numels, sub_group_size))
    return CommModel(params, scale_bytes, collectives)


def quantiles(values: list[float]) -> tuple[float, float, float]:
    """Median and the interquartile range."""
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return median, q1, q3


def cpu_model() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")),
                platform.processor())


def mb(n: float) -> str:
    return f"{n / 1e6:,.3f} MB"


def round_ratios(adamw: list[float], scale: list[float], args) -> list[float]:
    """Per round, AdamW's median step time over SCALE's (= tokens/s SCALE / AdamW), each
    SCALE block against the AdamW block next to it."""
    blocks = [slice(r * args.block, (r + 1) * args.block) for r in range(args.rounds)]
    return [statistics.median(adamw[b]) / statistics.median(scale[b]) for b in blocks]


def describe(ratios: list[float]) -> str:
    median, q1, q3 = quantiles(ratios)
    return (f"**{median:.3f}** (median of {len(ratios)} per-round ratios; interquartile range "
            f"{q1:.3f}-{q3:.3f}, min {min(ratios):.3f}, max {max(ratios):.3f})")


def report(args, runs: list[Engine], cpu: dict, comm: dict, scale_stats, world: int, loads: tuple,
           seconds: float) -> str:
    """`cpu`: per engine, the CPU seconds of every timed step summed over the ranks."""
    tokens_per_step = world * args.micro_batch * args.seq * args.accum
    base, scale = runs
    B = base.name  # the DeepSpeed baseline: AdamW, or Muon with --baseline muon
    # Rank 0's medians, per engine and clock (0 wall, 1 CPU).
    rows = {}
    for run in runs:
        for c in (0, 1):
            step, engine_step, client = ([t[part][c] for t in run.steps] for part in ("step", "engine_step", "client"))
            rows[run.name, c] = dict(
                step=statistics.median(step), fwd_bwd=statistics.median([s - e for s, e in zip(step, engine_step)]),
                engine_step=statistics.median(engine_step), client=statistics.median(client),
                share=statistics.median([o / s for o, s in zip(client, step)]),
                engine_share=statistics.median([e / s for e, s in zip(engine_step, step)]),
            )
    wall_ratios = round_ratios(*([t["step"][0] for t in run.steps] for run in runs), args)
    # Client step, rank 0 CPU: SCALE / AdamW per round (the inverse of round_ratios' order).
    client_ratios = round_ratios(*([t["client"][1] for t in run.steps] for run in runs[::-1]), args)
    client_wall_ratios = round_ratios(*([t["client"][0] for t in run.steps] for run in runs[::-1]), args)
    cpu_ratios = round_ratios(cpu[B], cpu["SCALE"], args)
    pooled = rows[B, 0]["step"] / rows["SCALE", 0]["step"]
    # If the steps differed only in the client optimizer's CPU time (rank 0).
    only_optimizer = rows[B, 1]["step"] / (rows[B, 1]["step"] - rows[B, 1]["client"]
                                                 + rows["SCALE", 1]["client"])
    columns = [(B, 0), ("SCALE", 0), (B, 1), ("SCALE", 1)]

    command = " ".join(["PYTHONPATH=$PWD DS_ACCELERATOR=cpu deepspeed --num_gpus", str(world),
                        "benchmarks/throughput.py", *[a for a in sys.argv[1:] if not a.startswith("--local_rank")]])
    cfg = llama_config(args)
    bench = comm_model(cfg, world, ds_config("zero3_scale.json", args)["zero_optimization"]["sub_group_size"])
    big = comm_model(LlamaConfig(**LLAMA_7B, tie_word_embeddings=False), args.project_world,
                     ds_config("zero3_scale.json", args)["zero_optimization"]["sub_group_size"])
    grad_bytes = DTYPE_BYTES[args.dtype]
    lines = [
        f"# Throughput and communication: SCALE against {B} under DeepSpeed ZeRO-3",
        "",
        f"Machine: {cpu_model()}, {os.cpu_count()} cores; {world} ranks x {args.threads} torch thread(s); "
        f"torch {torch.__version__}, deepspeed {deepspeed.__version__}. "
        f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC. "
        f"Load average (1 min) {loads[0]:.1f} at the start, {loads[1]:.1f} at the end: the machine was "
        f"shared with other jobs, which is why the two optimizers run interleaved. Run time {seconds:.0f} s.",
        "",
        "```bash",
        command,
        "```",
        "",
        f"Model: LlamaForCausalLM, hidden {args.hidden}, ffn {args.ffn}, {args.layers} layers, {args.heads} heads, "
        f"vocab {args.vocab}, untied: {bench.params:,} parameters. Micro batch {args.micro_batch} x seq {args.seq} "
        f"per rank, accumulation {args.accum}: {tokens_per_step:,} tokens per optimizer step. "
        f"{'bf16' if args.dtype == 'bf16' else 'fp32'} "
        f"({'the configs as shipped; bf16 matmuls are ~3x faster than fp32 on this CPU' if args.dtype == 'bf16' else 'bf16 disabled'}), "
        "gradient accumulation in fp32, ZeRO-3, `sub_group_size` 1e9.",
        "",
        f"- {B}: `configs/zero3_adamw.json`"
        + (" with its `optimizer` section replaced by DeepSpeed's Muon (`{\"type\": \"Muon\"}`, lr 1e-3, "
           "momentum 0.95; `reduce_scatter: false`, which Muon requires): Newton-Schulz on each matrix's full "
           "gradient inside `engine.step()`, an AdamW for the rest" if B == "Muon" else "")
        + ", whose `optimizer` section DeepSpeed turns into "
        f"`{type(base.client_optimizer).__module__}.{type(base.client_optimizer).__name__}` (on the CPU "
        "accelerator its AdamW is a multi-tensor AdamW built from the same C++ kernel, "
        "`csrc/adam/cpu_adam_impl.cpp`, as DeepSpeedCPUAdam).",
        "- SCALE: `configs/zero3_scale.json`, `scale_zero.initialize(optimizer=SCALE(scale_param_groups(model)))`.",
        *(["- `--offload`: both configs with `offload_optimizer: {device: cpu}`: AdamW becomes DeepSpeed's "
           "DeepSpeedCPUAdam; SCALE steps the host-memory fp32 partitions with its CPU kernel."] if args.offload else []),
        "",
        f"Client optimizer step, SCALE / {type(base.client_optimizer).__name__}, rank 0 CPU time = "
        f"{describe(client_ratios)}; wall clock {describe(client_wall_ratios)}.",
        "",
        f"Both engines are built in the same {world} processes (same initial weights, same batches) and run "
        f"{args.warmup} untimed steps each, then {args.rounds} rounds of one {args.block}-step block per engine, "
        "the order alternating between rounds. Medians over all timed steps; the wall clock and the CPU time "
        "(`time.process_time()`) of rank 0, except the last row (CPU of all ranks).",
        "",
        f"| | {B} wall | SCALE wall | {B} CPU | SCALE CPU |",
        "|---|---|---|---|---|",
        *[f"| {label} | " + " | ".join(f"{rows[col][key] * 1e3:,.0f} ms" for col in columns) + " |"
          for label, key in (("full step", "step"), ("forward + backward", "fwd_bwd"),
                             ("`engine.step()`", "engine_step"), ("client optimizer `step()`", "client"))],
        "| optimizer share of the step (client step / full step) | "
        + " | ".join(f"{rows[col]['share']:.1%}" for col in columns) + " |",
        "| `engine.step()` share of the step | " + " | ".join(f"{rows[col]['engine_share']:.1%}" for col in columns) + " |",
        f"| tokens/s; tokens per CPU second of all ranks | {tokens_per_step / rows[B, 0]['step']:,.0f} | "
        f"{tokens_per_step / rows['SCALE', 0]['step']:,.0f} | {tokens_per_step / statistics.median(cpu[B]):,.0f} | "
        f"{tokens_per_step / statistics.median(cpu['SCALE']):,.0f} |",
        "",
        f"tokens/s SCALE / {B} (wall clock) = {describe(wall_ratios)}; ratio of the pooled medians "
        f"{pooled:.3f}. Per round: {', '.join(f'{x:.3f}' for x in wall_ratios)}.",
        "",
        f"tokens per CPU second SCALE / {B} = {describe(cpu_ratios)}. CPU time (`time.process_time()` of "
        "each rank, summed) is what a step costs the ranks themselves; the wall clock also carries the time "
        "other jobs hold the cores, so on this shared machine the CPU ratio is the steadier estimate of the "
        "throughput ratio on a dedicated one. If the two steps differed only by the client optimizer's CPU "
        f"time, the ratio would be {only_optimizer:.3f}.",
        "",
        f"Reading: SCALE's client step costs {rows['SCALE', 1]['client'] / rows[B, 1]['client']:.2f}x the "
        f"CPU time of {type(base.client_optimizer).__name__}'s (pooled medians); the optimizer is "
        f"{rows[B, 1]['share']:.1%} of a full {B} step and {rows['SCALE', 1]['share']:.1%} of a SCALE "
        f"one here, so from the client step alone the throughput ratio would be {only_optimizer:.3f}. "
        "ZeRO-3's own part of `engine.step()` (engine step minus client step, rank 0 CPU) is "
        f"{(rows[B, 1]['engine_step'] - rows[B, 1]['client']) * 1e3:.0f} ms with {B} against "
        f"{(rows['SCALE', 1]['engine_step'] - rows['SCALE', 1]['client']) * 1e3:.0f} ms with SCALE (SCALE's four "
        "role groups are four sub-groups, each with its own gradient-norm all_reduce and copy back"
        + ("; Muon's part holds its Newton-Schulz iterations and the gradient gathers they need, which run "
           "in `engine.step()` before its client step, so for Muon compare the full step, not the client step)."
           if B == "Muon" else ")."),
        "",
        "`engine.step()` is ZeRO-3's whole step: the end of the gradient reduction, the gradient norm, the "
        "client optimizer on each sub-group's flat fp32 partition, the copy back to the bf16 partitions and "
        "the all-gather of the persistent (small) parameters. The client optimizer step is timed with "
        "`register_step_pre_hook`/`post_hook` on the optimizer DeepSpeed calls (SCALE's includes its all_reduces).",
        "",
        "## Communication per optimizer step (measured, rank 0, one step)",
        "",
        "DeepSpeed's comms logger (`deepspeed.comm.configure(enabled=True, prof_all=True, debug=True)`, "
        "outside the timed rounds) for ZeRO-3's own collectives; `optimizer.comm_stats` for SCALE's "
        "(SCALE calls `torch.distributed` directly, so the logger does not see them). Bytes are the logged "
        "message sizes: for `reduce_scatter_tensor` the full input (every gradient, in the communication "
        "dtype), for `all_gather_into_tensor` this rank's input shard (the gathered output is world x that).",
        "",
        f"| collective (caller) | {B} calls | {B} bytes | SCALE calls | SCALE bytes |",
        "|---|---|---|---|---|",
    ]
    for op in sorted(set(comm[B]) | set(comm["SCALE"])):
        a, s = comm[B].get(op, (0, 0)), comm["SCALE"].get(op, (0, 0))
        lines.append(f"| {op.replace('|', '/')} | {a[0]} | {a[1]:,} | {s[0]} | {s[1]:,} |")
    lines.append(f"| SCALE's all_reduce (`comm_stats`) | 0 | 0 | {scale_stats.collectives} | {scale_stats.bytes:,} |")
    reduce_scatter = sum(b for op, (_, b) in comm["SCALE"].items() if op.startswith("reduce_scatter"))
    gather = sum(b for op, (_, b) in comm["SCALE"].items() if op.startswith("all_gather")) * world
    lines += [
        "",
        f"**SCALE's all_reduce bytes / gradient reduce-scatter bytes = {scale_stats.bytes:,} / {reduce_scatter:,} = "
        f"{scale_stats.bytes / reduce_scatter:.2e}** ({scale_stats.bytes / reduce_scatter:.3%}); against the "
        f"gathered parameter bytes ({gather:,}): {scale_stats.bytes / gather:.2e}. DeepSpeed's gradient-norm "
        f"all_reduce (8 bytes) runs once per sub-group: one per {B} param group, one per role group "
        "(embedding, output, matrix, vector) for SCALE's. SCALE issues one all_reduce per sub-group that "
        "holds a piece whose rows (or, for the embedding, columns) a rank boundary cuts, and none for the "
        "others; it cannot merge those of several sub-groups into one per engine step: ZeRO calls the client's `step()` once per "
        "(sub-)group with only that group's flat, prepares that group's gradient just before the call and "
        "copies its updated fp32 partition into the bf16 parameters right after it "
        "(`stage3.py` `step`: `_prepare_sub_group`, `_optimizer_step`, `_reassign_or_swap_out_partitioned_parameters` "
        "per sub-group; `stage_1_and_2.py` the same per param group), so group k's update cannot wait for "
        "group k+1's sums, and group k+1's gradient does not exist yet when group k is stepped.",
        "",
        f"From the shapes, the same model at world {world}: {bench.params:,} gradient elements "
        f"= {bench.params * grad_bytes:,} bytes in {args.dtype} "
        f"({'equal to' if bench.params * grad_bytes == reduce_scatter else 'NOT equal to'} the logged reduce-scatter); "
        f"SCALE {bench.scale_collectives} all_reduces, {bench.scale_bytes:,} bytes "
        f"({'equal to' if (bench.scale_collectives, bench.scale_bytes) == (scale_stats.collectives, scale_stats.bytes) else 'NOT equal to'} "
        "`comm_stats`).",
        "",
        f"## Projected: LLaMA-7B on {args.project_world} ranks",
        "",
        "Same rules, from the shapes (hidden 4096, ffn 11008, 32 layers, vocab 32000, untied; "
        f"{big.params:,} parameters), one optimizer step, accumulation 1, bf16 communication, `sub_group_size` 1e9 "
        f"(each role group is one sub-group at {args.project_world} ranks). Ring algorithms: a reduce-scatter or "
        "all-gather of B bytes moves (n-1)/n B per rank, an all-reduce 2(n-1)/n B.",
        "",
        "| per optimizer step | message bytes | sent per rank (ring) |",
        "|---|---|---|",
    ]
    n = args.project_world
    grad7 = big.params * 2
    for label, size, factor in (
        ("ZeRO-3 gradient reduce-scatter (bf16)", grad7, (n - 1) / n),
        ("ZeRO-3 parameter all-gather, per pass (bf16; forward and again in backward)", grad7, (n - 1) / n),
        (f"SCALE all_reduce ({big.scale_collectives} calls, fp64)", big.scale_bytes, 2 * (n - 1) / n),
    ):
        lines.append(f"| {label} | {mb(size)} | {mb(size * factor)} |")
    wire = (big.scale_bytes * 2) / grad7
    lines += [
        "",
        f"**SCALE bytes / gradient bytes at 7B x {n} = {big.scale_bytes / grad7:.2e}** "
        f"({big.scale_bytes / grad7:.4%}) of the message; {wire:.2e} of what each rank sends "
        f"(all-reduce vs reduce-scatter); against one step's three ZeRO-3 passes (reduce-scatter + two "
        f"all-gathers): {big.scale_bytes * 2 / (3 * grad7):.2e}. With fp32 gradient communication "
        f"(`communication_data_type: fp32`) the gradient bytes double and the ratio halves "
        f"({big.scale_bytes / (2 * grad7):.2e} of the message). With accumulation k ZeRO-3 repeats its "
        "passes every micro-batch and SCALE still sends once per optimizer step: divide by k.",
        "",
        "SCALE's bytes are one fp64 per cut row and per embedding column of the full parameter: which rows "
        "are cut depends on the world size (for LLaMA-7B none from 8 to 256 ranks), the bytes per cut row "
        "do not. AdamW sends "
        "nothing beyond ZeRO-3's own collectives (Muon's own collectives are in the table above).",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    args = arg_parser().parse_args()
    started = time.perf_counter()
    deepspeed.init_distributed()
    if get_accelerator().device_name() == "cpu":
        release_cpu_allreduce_buffer()
    torch.set_num_threads(args.threads)
    rank, world = dist.get_rank(), dist.get_world_size()
    load_start = os.getloadavg()[0]

    runs = [build(BASELINES[args.baseline], "zero3_adamw.json", args), build("SCALE", "zero3_scale.json", args)]
    generator = torch.Generator().manual_seed(1234 + rank)
    batches = [torch.randint(args.vocab, (args.micro_batch, args.seq), generator=generator) for _ in range(args.accum)]

    for run in runs:
        for _ in range(args.warmup):
            train_step(run, batches)
    for r in range(args.rounds):
        for run in runs if r % 2 == 0 else runs[::-1]:
            dist.barrier()
            for _ in range(args.block):
                run.steps.append(train_step(run, batches))
            if rank == 0:
                print(f"round {r} {run.name}: " + " ".join(
                    "{:.2f} s wall, {:.2f} s CPU".format(*t["step"]) for t in run.steps[-args.block:]), flush=True)
    comm = {run.name: comm_log_of_one_step(run, batches) for run in runs}
    per_rank_cpu = [None] * world
    dist.all_gather_object(per_rank_cpu, {run.name: [t["step"][1] for t in run.steps] for run in runs})
    cpu = {run.name: [sum(x) for x in zip(*(r[run.name] for r in per_rank_cpu))] for run in runs}
    if rank == 0:
        text = report(args, runs, cpu, comm, runs[1].client_optimizer.comm_stats, world,
                      (load_start, os.getloadavg()[0]), time.perf_counter() - started)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        print(text)
    dist.barrier()


if __name__ == "__main__":
    main()
