"""Time one optimizer step of SCALE against AdamW on the exact LLaMA parameter shapes.

    python benchmarks/optimizer_step.py --sizes 60m,130m,350m

Methods, interleaved round-robin in one process (the start rotates every repeat), on the
same parameters and gradients (fp32, CPU): SCALE with its fused kernel, SCALE on the torch
path (its fallback, and the implementation before the kernel), torch AdamW (foreach and
fused) and DeepSpeed's DeepSpeedCPUAdam; plus a large-tensor `copy_`, which measures the
memory bandwidth under the same conditions. Reports the median step time (wall clock and
CPU time of the process, `time.process_time()`, which other jobs on a shared machine do not
inflate), the per-round ratio SCALE / torch fused AdamW on both clocks, the bytes each step
must move and the bandwidth that achieves, and writes a markdown table (default
docs/results/optimizer_step.md).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from scale_zero import SCALE, native, scale_param_groups, triton_step  # noqa: E402

# Spec section 5: hidden, ffn, heads, layers (vocab 32000, untied, max position 1024).
LLAMA_SIZES = {
    "60m": (512, 1376, 8, 8),
    "130m": (768, 2048, 12, 12),
    "350m": (1024, 2736, 16, 24),
    "1b": (2048, 5461, 32, 24),
    "7b": (4096, 11008, 32, 32),
}
# Bytes per fp32 element the fused step reads and writes from memory. Matrix and output
# rows are summed and updated while the row is in cache (the gradient, or the output's
# momentum, read once); the embedding's columns need every row before any update, so its
# gradient is read twice. AdamW reads grad, param, m, v and writes param, m, v. One core's
# reads are what limit it (a read-only pass runs at about the rate AdamW reads at), so the
# ratio of reads is the floor of SCALE / AdamW on one thread.
READ_WRITE_BYTES = {"matrix": (8, 4), "embedding": (12, 4), "output": (12, 8), "vector": (16, 12)}
ADAMW_READ_WRITE_BYTES = (16, 12)
COPY_NUMEL = 64 << 20  # 256 MiB, far beyond the caches


def llama_groups(size: str, device: str | torch.device = "cpu") -> list[dict]:
    """SCALE's param groups of a LLaMA model of this size, as real fp32 tensors with gradients
    on `device`."""
    hidden, ffn, heads, layers = LLAMA_SIZES[size]
    config = LlamaConfig(
        vocab_size=32000, hidden_size=hidden, intermediate_size=ffn, num_attention_heads=heads,
        num_key_value_heads=heads, num_hidden_layers=layers, max_position_embeddings=1024,
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    groups = []
    for group in scale_param_groups(model):
        params = []
        for meta in group["params"]:
            p = torch.empty(meta.shape, device=device).normal_(0, 0.02).requires_grad_()
            p.grad = torch.randn(meta.shape, device=device)
            params.append(p)
        groups.append({**group, "params": params})
    return groups


@contextlib.contextmanager
def torch_path():
    """SCALE without its fused kernels (C++ and Triton): its fallback, the per-tensor torch ops."""
    kernels = {backend: backend.available for backend in (native, triton_step)}
    for backend in kernels:
        backend.available = lambda: False
    try:
        yield
    finally:
        for backend, available in kernels.items():
            backend.available = available


def scale_steps(groups: list[dict], lr: float, weight_decay: float) -> tuple:
    """The step of a SCALE with its kernels and of one on its torch path, on these groups."""
    with_kernel = SCALE(groups, lr=lr, adam_lr=2e-2, weight_decay=weight_decay)
    on_torch = SCALE(groups, lr=lr, adam_lr=2e-2, weight_decay=weight_decay)

    def torch_path_step():
        with torch_path():
            on_torch.step()

    return with_kernel.step, torch_path_step


def make_methods(groups: list[dict], lr: float, weight_decay: float) -> dict:
    params = [p for g in groups for p in g["params"]]
    methods = dict(zip(("SCALE (fused kernel)", "SCALE (torch path)"), scale_steps(groups, lr, weight_decay)))
    # The AdamWs share one set of moments (timing does not depend on their values): three
    # copies would not fit in memory at 350M next to the other processes on the machine.
    foreach = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=True)
    foreach.step()
    fused = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    fused.state = foreach.state
    methods["AdamW (torch foreach)"], methods["AdamW (torch fused)"] = foreach.step, fused.step
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        ds_adam = DeepSpeedCPUAdam(params, lr=lr, weight_decay=weight_decay, adamw_mode=True)
        for p in params:
            moments = foreach.state[p]
            ds_adam.state[p] = {"step": 1, "exp_avg": moments["exp_avg"], "exp_avg_sq": moments["exp_avg_sq"]}
        methods["DeepSpeedCPUAdam"] = ds_adam.step
    except Exception as error:  # the op needs a compiler; report, don't hide
        print(f"DeepSpeedCPUAdam unavailable: {error}")
    src, dst = torch.ones(COPY_NUMEL), torch.empty(COPY_NUMEL)
    methods["memory copy (256 MiB)"] = lambda: dst.copy_(src)
    return methods


def bench_size(size: str, repeats: int, warmup: int, lr: float, weight_decay: float) -> dict:
    groups = llama_groups(size)
    numel = {g["role"]: sum(p.numel() for p in g["params"]) for g in groups}
    methods = make_methods(groups, lr, weight_decay)
    names = list(methods)
    for name in names:
        for _ in range(warmup):
            methods[name]()
    times = {name: [] for name in names}
    cpu_times = {name: [] for name in names}
    for rep in range(repeats):
        order = names[rep % len(names) :] + names[: rep % len(names)]
        for name in order:
            start, start_cpu = time.perf_counter(), time.process_time()
            methods[name]()
            times[name].append(time.perf_counter() - start)
            cpu_times[name].append(time.process_time() - start_cpu)
    n = sum(numel.values())
    scale_bytes = [sum(READ_WRITE_BYTES[role][i] * k for role, k in numel.items()) for i in (0, 1)]
    adamw_bytes = [b * n for b in ADAMW_READ_WRITE_BYTES]
    step_bytes = {name: scale_bytes if name.startswith("SCALE") else adamw_bytes for name in names}
    step_bytes["memory copy (256 MiB)"] = [4 * COPY_NUMEL, 4 * COPY_NUMEL]
    del methods, groups
    gc.collect()
    return dict(size=size, numel=numel, times=times, cpu_times=cpu_times, bytes=step_bytes)


def describe(ratios: list[float]) -> str:
    """The median and the interquartile range."""
    q1, median, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return f"**{median:.2f}** ({q1:.2f}-{q3:.2f})"


def round_ratios(r: dict, clock: str) -> list[float]:
    """Per round, SCALE (fused) / torch fused AdamW: the two ran in the same round."""
    return [s / a for s, a in zip(r[clock]["SCALE (fused kernel)"], r[clock]["AdamW (torch fused)"])]


def report(results: list[dict], args) -> str:
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("Model name")), "?")
    header = [
        "# Optimizer step: SCALE vs AdamW on LLaMA shapes (CPU, fp32)",
        "",
        f"Command: `python benchmarks/optimizer_step.py --sizes {args.sizes} --repeats {args.repeats}"
        + (f" --threads {args.threads}" if args.threads else "") + "`  ",
        f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; CPU: {model}, "
        f"{os.cpu_count()} cores; torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"python {platform.python_version()}. Load average (other processes on the machine) "
        f"{args.load_before:.1f} before, {args.load_after:.1f} after.  ",
        f"Each method steps the same fp32 parameters and gradients {args.repeats} times, interleaved "
        f"round-robin after {args.warmup} warm-up steps; times are medians (min in brackets). lr "
        f"{args.lr}, weight decay {args.weight_decay} (the paper's recipe). Bytes: what one step must "
        "read and write from memory, per element (SCALE's fused step: matrix 8 read / 4 written, output 12 / 8, "
        "embedding 12 / 4 (its gradient read twice), vector 16 / 12; AdamW: grad, param, m, v read, param, m, v "
        "written, 16 / 12; the torch path moves more). GB/s = bytes read and written / median time. `reads "
        "ratio`: SCALE's bytes read / AdamW's, the floor of the time ratio where a core's reads limit it "
        "(one thread on this machine). CPU ms: `time.process_time()` of the process (all its threads). The "
        "last two summary columns: per round, SCALE's step / torch fused AdamW's step of the same round, "
        "median (interquartile range).",
        "",
    ]
    lines = []
    summary = ["| size | params | SCALE (fused) ms | fastest AdamW | ms | SCALE / fastest AdamW | reads ratio "
               "| SCALE / torch fused AdamW, per round: wall | CPU time |",
               "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        med = {k: statistics.median(v) for k, v in r["times"].items()}
        low = {k: min(v) for k, v in r["times"].items()}
        adamws = [k for k in med if "Adam" in k]
        fastest = min(adamws, key=med.get)
        n = sum(r["numel"].values())
        lines += [
            f"## LLaMA {r['size']}: {n / 1e6:.1f}M parameters "
            + ", ".join(f"{role} {k / 1e6:.1f}M" for role, k in r["numel"].items()),
            "",
            "| method | step ms | CPU ms | vs fastest AdamW | MB read / written | GB/s |",
            "|---|---|---|---|---|---|",
        ]
        for name in med:
            cpu_ms = statistics.median(r["cpu_times"][name]) * 1e3
            read, written = r["bytes"][name]
            lines.append(
                f"| {name} | {med[name] * 1e3:.1f} ({low[name] * 1e3:.1f}) | {cpu_ms:.1f} | "
                f"{med[name] / med[fastest]:.2f} | {read / 1e6:.0f} / {written / 1e6:.0f} | "
                f"{(read + written) / med[name] / 1e9:.1f} |"
            )
        lines.append("")
        scale = med["SCALE (fused kernel)"]
        summary.append(
            f"| {r['size']} | {n / 1e6:.1f}M | {scale * 1e3:.1f} | {fastest} | {med[fastest] * 1e3:.1f} | "
            f"{scale / med[fastest]:.2f} | {r['bytes']['SCALE (fused kernel)'][0] / r['bytes'][fastest][0]:.2f} | "
            + " | ".join(describe(round_ratios(r, clock)) for clock in ("times", "cpu_times"))
            + " |"
        )
    return "\n".join([*header, "## Summary", "", *summary, "", *lines])


def size_arguments(description: str, sizes: str, warmup: int, out: str) -> argparse.ArgumentParser:
    """The arguments this benchmark and benchmarks/gpu_step.py share, with their defaults."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--sizes", default=sizes, help=f"comma-separated, from {list(LLAMA_SIZES)}")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=warmup)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--out", type=Path, default=Path(out))
    return parser


def parse_sizes(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    sizes = args.sizes.split(",")
    unknown = [s for s in sizes if s not in LLAMA_SIZES]
    if unknown:
        parser.error(f"unknown size(s) {unknown}; choose from {list(LLAMA_SIZES)}")
    return sizes


def bench_and_write(sizes: list[str], bench, report, args: argparse.Namespace) -> None:
    """`bench(size, ...)` each size, then write `report(results, args)` to `args.out`
    (through a temporary file: a killed run leaves the last result whole) and print it."""
    results = []
    for size in sizes:
        print(f"LLaMA {size} ...", flush=True)
        results.append(bench(size, args.repeats, args.warmup, args.lr, args.weight_decay))
    args.load_after = os.getloadavg()[0]
    text = report(results, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(args.out)
    print(text)


def main() -> None:
    parser = size_arguments(__doc__.splitlines()[0], "60m,130m,350m", 2, "docs/results/optimizer_step.md")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    args = parser.parse_args()
    sizes = parse_sizes(parser, args)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.load_before = os.getloadavg()[0]
    if not native.available():
        print("warning: the fused SCALE kernel is unavailable; both SCALE rows use the torch path")
    bench_and_write(sizes, bench_size, report, args)


if __name__ == "__main__":
    main()
