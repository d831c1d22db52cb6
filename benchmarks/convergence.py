"""Convergence at small scale: SCALE against AdamW, SGD with momentum and column-normalized
SGD (the paper's ablation, spec section 5), each with a 3-point learning-rate sweep, on the
embedded Shakespeare corpus with the same token budget for every run.

    python benchmarks/convergence.py --out docs/results

Every run is the real trainer (launch/train.py, FSDP2 backend, one rank, started with the
environment torchrun would give it), read back from its TensorBoard events. Writes
<out>/convergence.md (table, machine, date, exact commands) and <out>/convergence.png
(validation and training loss of the best learning rate per method). The runs themselves
go to --run-root (default runs/convergence, git-ignored) and are started afresh each time.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import resource
import shlex
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL = "benchmarks/convergence_model.json"  # LLaMA, hidden 128, 2 layers, the embedded 8k vocabulary

# Peak learning rates per method: 3 values spanning the plausible range. SCALE-family
# updates have unit RMS per row, so their lr is the per-element step (like Adam's); plain
# SGD steps with the raw (clipped) gradient, whose entries are ~1e-3, hence its larger lrs.
SWEEP = {
    "scale": (1e-3, 3e-3, 1e-2),
    "adamw": (1e-3, 3e-3, 1e-2),
    "colnorm-sgd": (1e-3, 3e-3, 1e-2),
    "sgd": (0.1, 1.0, 10.0),
}
LABELS = {"scale": "SCALE", "adamw": "AdamW", "colnorm-sgd": "column-normalized SGD (no momentum)",
          "sgd": "SGD with momentum"}
# The paper's 60M-350M recipe: 1-D (AdamW inside SCALE) lr = 20 x the matrix lr (2e-2 / 1e-3).
ADAM_LR_RATIO = 20.0
SGD_ADAM_LR = 2e-2  # plain SGD's lrs are not on Adam's scale: its 1-D parameters get the paper's 2e-2


def adam_lr(method: str, lr: float) -> float | None:
    if method == "adamw":
        return None
    return SGD_ADAM_LR if method == "sgd" else ADAM_LR_RATIO * lr


@dataclass
class Run:
    method: str
    lr: float
    seed: int
    run_dir: Path
    argv: list[str] = field(default_factory=list)
    cpu_s: float = math.nan
    wall_s: float = math.nan
    error: str | None = None
    val: list[tuple[int, float]] = field(default_factory=list)  # (step, loss)
    train: list[tuple[int, float]] = field(default_factory=list)

    @property
    def final_val_ppl(self) -> float:
        return math.exp(min(self.val[-1][1], 50.0)) if self.val else math.nan

    @property
    def best_val_ppl(self) -> float:
        losses = [loss for _, loss in self.val if math.isfinite(loss)]
        return math.exp(min(min(losses), 50.0)) if losses else math.nan


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def trainer_argv(args, method: str, lr: float, seed: int, run_dir: Path) -> list[str]:
    argv = ["launch/train.py", "--backend", "fsdp", "--model", MODEL, "--data", "embedded",
            "--optimizer", method, "--lr", f"{lr:g}",
            "--steps", str(args.steps), "--global-batch-size", str(args.batch), "--micro-batch-size", str(args.batch),
            "--seq-len", str(args.seq_len), "--warmup-ratio", "0.1", "--min-lr-ratio", "0.1",
            "--eval-every", str(args.eval_every), "--eval-tokens", str(args.eval_tokens),
            "--log-every", str(args.log_every), "--save-every", "0", "--resume", "none", "--seed", str(seed),
            "--run-dir", str(run_dir)]
    if adam_lr(method, lr) is not None:
        argv += ["--adam-lr", f"{adam_lr(method, lr):g}"]
    return argv


def train(run: Run) -> None:
    """One trainer process on one rank; its CPU time is what the run cost, whatever the load."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
           "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "OMP_NUM_THREADS": "1"}
    shutil.rmtree(run.run_dir, ignore_errors=True)
    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    proc = subprocess.run([sys.executable, *run.argv], cwd=REPO, env=env, capture_output=True, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    run.wall_s = time.perf_counter() - start
    run.cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode != 0:
        run.error = f"exit status {proc.returncode}: " + (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return
    run.val, run.train = read_scalars(run.run_dir / "tb", "val/loss"), read_scalars(run.run_dir / "tb", "train/loss")


def read_scalars(tb_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})  # 0: keep every point
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)] if tag in events.Tags()["scalars"] else []


def best_per_method(runs: list[Run]) -> dict[str, Run]:
    """The lr with the lowest final validation perplexity (diverged runs count as infinite)."""
    best = {}
    for run in runs:
        score = run.final_val_ppl if math.isfinite(run.final_val_ppl) else math.inf
        current = best.get(run.method)
        if current is None or score < (current.final_val_ppl if math.isfinite(current.final_val_ppl) else math.inf):
            best[run.method] = run
    return best


def fmt_ppl(x: float) -> str:
    return f"{x:.1f}" if math.isfinite(x) else "diverged"


def write_plot(best: dict[str, Run], tokens_per_step: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_val, ax_train) = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for method, run in best.items():
        label = f"{LABELS[method]}, lr {run.lr:g}"
        for ax, points in ((ax_val, run.val), (ax_train, run.train)):
            if points:
                steps, losses = zip(*points)
                ax.plot([s * tokens_per_step / 1e3 for s in steps], losses, marker="o" if ax is ax_val else None,
                        markersize=3, label=label)
    for ax, title in ((ax_val, "validation loss"), (ax_train, "training loss (mean over each log interval)")):
        ax.set_title(title)
        ax.set_xlabel("training tokens (thousands)")
        ax.grid(alpha=0.3)
    ax_val.set_ylabel("cross-entropy (nats)")
    ax_val.set_ylim(top=min(9.5, ax_val.get_ylim()[1]))
    ax_val.legend(fontsize=8)
    fig.suptitle(f"Best learning rate per method: LLaMA {parameter_count() / 1e6:.2f}M parameters "
                 "(hidden 128, 2 layers), embedded Shakespeare")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def machine() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "unknown CPU"
    return f"{model}, {os.cpu_count()} cores visible, {platform.system()} {platform.release()}"


def parameter_count() -> int:
    from transformers import LlamaConfig, LlamaForCausalLM

    with __import__("torch").device("meta"):
        model = LlamaForCausalLM(LlamaConfig.from_json_file(str(REPO / MODEL)))
    return sum(p.numel() for p in model.parameters())


def write_markdown(args, sweep: list[Run], repeats: list[Run], best: dict[str, Run], path: Path,
                   started: datetime.datetime, command: str) -> None:
    tokens_per_step = args.batch * args.seq_len
    runs = sweep + repeats
    cpu = [r.cpu_s for r in runs]
    lines = [
        "# Convergence at small scale: SCALE, AdamW, SGD, column-normalized SGD",
        "",
        f"Reproduce: `{command}`",
        "",
        f"- Date: {started:%Y-%m-%d %H:%M} UTC; machine: {machine()}, shared with other jobs "
        "(wall times are noisy; the losses are not affected).",
        f"- Model: `{MODEL}`, LLaMA with {parameter_count() / 1e6:.2f}M parameters (hidden 128, ffn 344, 4 heads, "
        "2 layers, vocabulary 8192, untied embeddings).",
        f"- Data: the embedded Shakespeare corpus (`--data embedded`) and its 8k SentencePiece tokenizer; validation "
        f"on {args.eval_tokens} held-out tokens every {args.eval_every} steps.",
        f"- Budget, the same for every run: {args.steps} steps x {args.batch} sequences x {args.seq_len} tokens = "
        f"{args.steps * tokens_per_step:,} training tokens. The sweep uses seed {args.seed} (initialization and "
        f"data order); the best lr of each method is rerun with seeds {', '.join(map(str, args.repeat_seeds)) or 'none'}.",
        "- Schedule (the trainer's): linear warmup over the first 10% of the steps, cosine decay to 0.1x the peak; "
        "gradient clipping 1.0; no weight decay; bf16 compute; momentum 0.9 (AdamW: betas 0.9, 0.999).",
        f"- 1-D parameters (RMSNorm gains) in the SCALE family use AdamW at adam_lr = {ADAM_LR_RATIO:g} x lr (the "
        f"paper's 60M-350M ratio, 2e-2 / 1e-3); for plain SGD, whose lrs are on another scale, adam_lr = {SGD_ADAM_LR:g}.",
        f"- Each run is `python launch/train.py --backend fsdp` on one rank; {len(runs)} runs took "
        f"{sum(cpu) / 60:.1f} CPU-minutes in all ({min(cpu):.0f}-{max(cpu):.0f} s each) and "
        f"{sum(r.wall_s for r in runs) / 60:.1f} minutes of wall time.",
        "",
        "Perplexity = exp(validation cross-entropy). **Bold**: the best lr of each method (lowest final perplexity).",
        "",
        "| method | `--optimizer` | peak lr | adam_lr (1-D) | best val ppl | final val ppl |",
        "|---|---|---|---|---|---|",
    ]
    for run in sweep:
        bold = "**" if best.get(run.method) is run else ""
        a = adam_lr(run.method, run.lr)
        final = fmt_ppl(run.final_val_ppl) if run.error is None else f"failed ({run.error})"
        lines.append(f"| {LABELS[run.method]} | `{run.method}` | {bold}{run.lr:g}{bold} | {'-' if a is None else f'{a:g}'} "
                     f"| {fmt_ppl(run.best_val_ppl)} | {bold}{final}{bold} |")
    ranking = sorted(best.values(), key=lambda r: r.final_val_ppl if math.isfinite(r.final_val_ppl) else math.inf)
    lines += [
        "",
        f"Ranking by the best final validation perplexity (seed {args.seed}): "
        + " < ".join(f"{LABELS[r.method]} ({fmt_ppl(r.final_val_ppl)})" for r in ranking) + ".",
        "",
    ]
    if repeats:
        seeds = [args.seed, *args.repeat_seeds]
        lines += [
            "Seed spread at each method's best lr (final validation perplexity):",
            "",
            "| method | peak lr | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | min-max |",
            "|---|---|" + "---|" * len(seeds) + "---|---|",
        ]
        for method, run in best.items():
            ppl = [r.final_val_ppl for r in [run, *(r for r in repeats if r.method == method)]]
            lines.append(f"| {LABELS[method]} | {run.lr:g} | " + " | ".join(fmt_ppl(x) for x in ppl)
                         + f" | {fmt_ppl(sum(ppl) / len(ppl))} | {fmt_ppl(min(ppl))}-{fmt_ppl(max(ppl))} |")
        lines.append("")
    lines += [
        "![validation and training loss](convergence.png)",
        "",
        "One trainer command of the sweep (the others change `--optimizer`, `--lr`, `--adam-lr`, `--run-dir`):",
        "",
        "```",
        "RANK=0 LOCAL_RANK=0 WORLD_SIZE=1 MASTER_ADDR=127.0.0.1 MASTER_PORT=<free port> OMP_NUM_THREADS=1 \\",
        f"  python {shlex.join(runs[0].argv)}",
        "```",
        "",
    ]
    path.write_text("\n".join(lines))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("docs/results"), help="folder for convergence.md and convergence.png")
    p.add_argument("--run-root", type=Path, default=Path("runs/convergence"), help="trainer run folders (replaced)")
    p.add_argument("--methods", default=",".join(SWEEP), help=f"comma-separated subset of {', '.join(SWEEP)}")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=16, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--seed", type=int, default=0, help="seed of the sweep")
    p.add_argument("--repeat-seeds", default="1,2", help="seeds to rerun each method's best lr with ('' = none)")
    args = p.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in SWEEP]
    if unknown or not methods:
        p.error(f"--methods: unknown {unknown or 'empty list'}; choose from {', '.join(SWEEP)}")
    if args.out.exists() and not args.out.is_dir():
        p.error(f"--out {args.out} is a file; give a folder (it is created if missing)")
    for name in ("steps", "batch", "seq_len", "eval_every", "eval_tokens", "log_every"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    args.methods = methods
    try:
        args.repeat_seeds = [int(s) for s in args.repeat_seeds.split(",") if s.strip()]
    except ValueError:
        p.error(f"--repeat-seeds must be comma-separated integers, got {args.repeat_seeds!r}")
    return args


def new_run(args, method: str, lr: float, seed: int) -> Run:
    run_dir = args.run_root.resolve() / f"{method}-lr{lr:g}-seed{seed}"
    return Run(method, lr, seed, run_dir, trainer_argv(args, method, lr, seed, run_dir))


def train_all(runs: list[Run], what: str) -> None:
    for i, run in enumerate(runs, 1):
        train(run)
        outcome = run.error or f"val ppl best {fmt_ppl(run.best_val_ppl)} final {fmt_ppl(run.final_val_ppl)}"
        print(f"[{what} {i}/{len(runs)}] {run.method:<12} lr {run.lr:<6g} seed {run.seed}  {outcome}  "
              f"({run.cpu_s:.0f} s CPU, {run.wall_s:.0f} s wall)", flush=True)


def main(argv=None) -> None:
    args = parse_args(argv)
    command = shlex.join(["python", "benchmarks/convergence.py", *(sys.argv[1:] if argv is None else argv)])
    started = datetime.datetime.now(datetime.timezone.utc)
    sweep = [new_run(args, m, lr, args.seed) for m in args.methods for lr in SWEEP[m]]
    train_all(sweep, "sweep")
    best = best_per_method(sweep)
    repeats = [new_run(args, m, run.lr, seed) for m, run in best.items() for seed in args.repeat_seeds]
    train_all(repeats, "seeds")
    args.out.mkdir(parents=True, exist_ok=True)
    write_plot(best, args.batch * args.seq_len, args.out / "convergence.png")
    write_markdown(args, sweep, repeats, best, args.out / "convergence.md", started, command)
    runs = sweep + repeats
    print((args.out / "convergence.md").read_text())
    if any(r.error for r in runs):
        sys.exit(1)


if __name__ == "__main__":
    main()
