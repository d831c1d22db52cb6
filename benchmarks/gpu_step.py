"""Time SCALE's optimizer step on a CUDA GPU on the exact LLaMA parameter shapes: its Triton
kernel against its torch path and torch's fused AdamW.

    PYTHONPATH=$PWD python benchmarks/gpu_step.py --sizes 1b,7b --out docs/results/gpu_step.md

Methods, interleaved round-robin in one process (the start rotates every round), on the same
fp32 parameters and gradients on the GPU (`benchmarks/optimizer_step.py` builds them and
switches SCALE's kernels off for its torch path): SCALE with its Triton kernel
(`scale_zero/triton_step.py`: one launch per phase), SCALE on its torch path (about four
launches per block) and `torch.optim.AdamW(fused=True)`. Reports per method the median
device time of a step (`torch.cuda.Event`s around it, so time the GPU waits for the host's
launches counts), the host time until `step()` returns, the kernels and copies one step
launches (counted with torch.profiler), the bandwidth of the bytes a step must move, and per
round the ratio of each SCALE to AdamW; writes a markdown file with machine, date and
command. 7B needs about 110 GB of GPU memory (parameters, gradients, AdamW's two moments).
Needs CUDA and Triton: without them it says so and exits with status 2.
"""

from __future__ import annotations

import datetime
import gc
import platform
import statistics
import sys
import time
from collections import Counter

import torch

from benchmarks.optimizer_step import (
    ADAMW_READ_WRITE_BYTES, READ_WRITE_BYTES, bench_and_write, describe, llama_groups, parse_sizes, scale_steps,
    size_arguments,
)
from scale_zero import kernel, triton_step

TRITON, TORCH_PATH, ADAMW = "SCALE (Triton kernel)", "SCALE (torch path)", "AdamW (torch fused)"


def make_methods(groups: list[dict], lr: float, weight_decay: float) -> dict:
    params = [p for g in groups for p in g["params"]]
    on_triton, on_torch = scale_steps(groups, lr, weight_decay)
    adamw = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    return {TRITON: on_triton, TORCH_PATH: on_torch, ADAMW: adamw.step}


def device_work(step) -> Counter:
    """What one call of `step` runs on the GPU: kernels, and copies and memsets."""
    torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        step()
        torch.cuda.synchronize()
    work = Counter()
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            work["copies" if event.name.startswith(("Memcpy", "Memset")) else "kernels"] += 1
    return work


def bench_size(size: str, repeats: int, warmup: int, lr: float, weight_decay: float) -> dict:
    groups = llama_groups(size, device="cuda")
    numel = {g["role"]: sum(p.numel() for p in g["params"]) for g in groups}
    methods = make_methods(groups, lr, weight_decay)
    names = list(methods)
    for name in names:
        for _ in range(warmup):
            methods[name]()
    work = {name: device_work(methods[name]) for name in names}
    times = {name: [] for name in names}
    host = {name: [] for name in names}
    for rep in range(repeats):
        order = names[rep % len(names) :] + names[: rep % len(names)]
        events = {}
        for name in order:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            began = time.perf_counter()
            methods[name]()
            host[name].append(time.perf_counter() - began)
            end.record()
            events[name] = (start, end)
        torch.cuda.synchronize()
        for name, (start, end) in events.items():
            times[name].append(start.elapsed_time(end) / 1e3)
    n = sum(numel.values())
    scale_bytes = sum(sum(READ_WRITE_BYTES[role]) * k for role, k in numel.items())
    step_bytes = {TRITON: scale_bytes, TORCH_PATH: scale_bytes, ADAMW: sum(ADAMW_READ_WRITE_BYTES) * n}
    del methods, groups
    gc.collect()
    torch.cuda.empty_cache()
    return dict(size=size, numel=numel, times=times, host=host, work=work, bytes=step_bytes)


def round_ratios(r: dict, method: str, baseline: str) -> list[float]:
    return [a / b for a, b in zip(r["times"][method], r["times"][baseline])]


def report(results: list[dict], args) -> str:
    props = torch.cuda.get_device_properties(0)
    lines = [
        "# Optimizer step on a GPU: SCALE (Triton kernel, torch path) vs torch fused AdamW, LLaMA shapes, fp32",
        "",
        f"Command: `python {' '.join(sys.argv)}`  ",
        f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; GPU: {props.name}, "
        f"{props.total_memory / 2**30:.0f} GiB; torch {torch.__version__} (CUDA {torch.version.cuda}), "
        f"triton {args.triton_version}; python {platform.python_version()}.  ",
        f"Each method steps the same fp32 parameters and gradients {args.repeats} times, interleaved round-robin "
        f"after {args.warmup} warm-up steps; lr {args.lr}, weight decay {args.weight_decay}. Device ms: "
        "`torch.cuda.Event`s around the step, median (min); host ms: until `step()` returns. Kernels and "
        "copies: what one step runs on the GPU (torch.profiler). GB/s: the bytes a step must move from memory "
        "(SCALE: per element matrix 12, output 20, embedding 16, the row re-read from cache where it is "
        "whole; AdamW: 28) / median device time. Ratios: "
        "per round, of two methods' steps in that round, median (interquartile range).",
        "",
        "| size | params | SCALE Triton / AdamW | SCALE torch path / AdamW | Triton / torch path |",
        "|---|---|---|---|---|",
    ]
    details = []
    for r in results:
        n = sum(r["numel"].values())
        lines.append(
            f"| {r['size']} | {n / 1e6:.0f}M | {describe(round_ratios(r, TRITON, ADAMW))} | "
            f"{describe(round_ratios(r, TORCH_PATH, ADAMW))} | {describe(round_ratios(r, TRITON, TORCH_PATH))} |"
        )
        details += [
            "",
            f"## LLaMA {r['size']}: {n / 1e6:.0f}M parameters "
            + ", ".join(f"{role} {k / 1e6:.1f}M" for role, k in r["numel"].items()),
            "",
            "| method | device ms | host ms | kernels per step | copies per step | GB/s |",
            "|---|---|---|---|---|---|",
        ]
        for name, times in r["times"].items():
            median = statistics.median(times)
            details.append(
                f"| {name} | {median * 1e3:.2f} ({min(times) * 1e3:.2f}) | "
                f"{statistics.median(r['host'][name]) * 1e3:.2f} | {r['work'][name]['kernels']} | "
                f"{r['work'][name]['copies']} | {r['bytes'][name] / median / 1e9:.0f} |"
            )
    return "\n".join(lines + details) + "\n"


def refuse(message: str) -> None:
    print(f"benchmarks/gpu_step.py: {message}; nothing was measured.", file=sys.stderr)
    sys.exit(2)


def main() -> None:
    parser = size_arguments(__doc__.splitlines()[0], "1b,7b", 3, "docs/results/gpu_step.md")
    args = parser.parse_args()
    sizes = parse_sizes(parser, args)
    if not torch.cuda.is_available():
        refuse("it needs a CUDA GPU and torch.cuda.is_available() is False")
    probe = torch.zeros(1, device="cuda")
    if kernel.backend_for(probe, probe) is not triton_step:
        refuse("SCALE's Triton kernel does not take CUDA tensors here (is Triton installed? TRITON_INTERPRET set?)")
    import triton

    args.triton_version = triton.__version__
    bench_and_write(sizes, bench_size, report, args)


if __name__ == "__main__":
    main()
