"""Convergence at small scale: SCALE against AdamW, SGD with momentum and column-normalized
SGD (the paper's ablation, docs/algorithm.md), each tuned on its own learning-rate grid, on
the embedded Shakespeare corpus with the same token budget for every run.

    python benchmarks/convergence.py --out docs/results               # the campaign, then the report
    python benchmarks/convergence.py --out docs/results --report-only # the report from finished run dirs

The campaign is a fixed procedure whose next step depends only on earlier results, so the
same command gives the same runs:

1. sweep: every method's lr grid at seed 0;
2. extend: where a method's best lr is at an edge of its grid, one more grid step beyond it
   (at most --max-extensions times), so every reported best is interior;
3. SCALE's 1-D rate (adam_lr, AdamW inside SCALE for the RMSNorm gains) as its own knob at
   SCALE's best lr, extended the same way;
4. the AdamW paper recipe where the grid does not already hold it;
5. the spread at each method's best point: SCALE's fused-kernel point again on the torch
   path (SCALE_ZERO_NATIVE=0), then every best point with the --repeat-seeds.

Every run is the real trainer (launch/train.py, FSDP2 backend, one rank, started with the
environment torchrun would give it, one thread), read back from its TensorBoard events; its
run dir also gets run.json (the command, the environment it changed, the code path, times)
and train.log. A run is skipped when --time-budget-min would be exceeded, and the report then
says the campaign is partial. Methods and variants are data (METHODS, VARIANTS): a variant is
extra trainer flags and environment variables, so new ones (another dtype or rounding mode)
are one entry each.

Writes <out>/convergence.md (tables, spreads, ranking, machine, versions, commands),
<out>/convergence.json (every run: its configuration, curves and outcome) and
<out>/convergence.png (curves at each method's best point, final perplexity against lr).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
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
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL = "benchmarks/convergence_model.json"  # LLaMA, hidden 128, 2 layers, the embedded 8k vocabulary


@dataclass(frozen=True)
class Method:
    """One `--optimizer` with its lr grid. SCALE-family updates have unit RMS per column, so
    their lr is the per-element step (like Adam's); plain SGD steps with the raw (clipped)
    gradient, whose entries are ~1e-3, hence its larger lrs. The 1-D parameters of every
    SCALE-family method use AdamW at adam_lr = adam_lr_ratio x lr, or the fixed adam_lr."""

    optimizer: str
    label: str
    lrs: tuple[float, ...]
    adam_lr_ratio: float | None = None
    adam_lr: float | None = None

    def default_adam_lr(self, lr: float) -> float | None:
        return nice(self.adam_lr_ratio * lr) if self.adam_lr_ratio is not None else self.adam_lr


# The paper's 60M-350M recipe has adam_lr = 20 x the matrix lr (2e-2 / 1e-3).
PAPER_ADAM_LR_RATIO = 20.0
METHODS = {
    m.optimizer: m
    for m in (
        Method("scale", "SCALE", (1e-3, 3e-3, 1e-2), adam_lr_ratio=PAPER_ADAM_LR_RATIO),
        Method("adamw", "AdamW", (1e-3, 3e-3, 1e-2)),
        Method("colnorm-sgd", "column-normalized SGD (no momentum)", (1e-3, 3e-3, 1e-2),
               adam_lr_ratio=PAPER_ADAM_LR_RATIO),
        # plain SGD's lrs are not on Adam's scale: its 1-D parameters get the paper's 2e-2
        Method("sgd", "SGD with momentum", (1.0, 3.0, 10.0), adam_lr=2e-2),
    )
}
# SCALE's 1-D rate as its own knob, as multiples of its best matrix lr (20 is the sweep's).
SCALE_ADAM_LR_RATIOS = (1.0, 5.0, PAPER_ADAM_LR_RATIO)
# The paper's Adam baseline (the GaLore protocol it follows at 60M-350M): lr 1e-3, betas
# (0.9, 0.999), 10% linear warmup, cosine to 0.1x. The trainer's AdamW has exactly these betas
# (beta1 = --momentum, beta2 fixed at 0.999) and the schedule below, so it differs from ours only
# by the lr, which the grid tunes.
PAPER_ADAMW_LR = 1e-3


@dataclass(frozen=True)
class Variant:
    """What a run changes beyond method, lr, adam_lr and seed: trainer flags and environment."""

    label: str
    flags: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()


VARIANTS = {
    "default": Variant("default"),
    "torch-path": Variant("torch path", env=(("SCALE_ZERO_NATIVE", "0"),)),
    # master-free bf16 (docs/optimizer.md): the FSDP2 shards, gradients and SCALE's state in bf16
    "bf16-sr": Variant("master-free bf16, stochastic rounding", flags=("--master-weights", "bf16")),
    "bf16-nearest": Variant("master-free bf16, round-to-nearest", flags=("--master-weights", "bf16-nearest")),
}
# Variants that only change rounding, not the method: their spread is part of each best point's.
SPREAD_VARIANTS = ("default", "torch-path")

# Schedule and numerics every run shares (the trainer's defaults, spelled out so the record holds them).
COMMON_FLAGS = ("--warmup-ratio", "0.1", "--min-lr-ratio", "0.1", "--momentum", "0.9", "--grad-clip", "1.0",
                "--weight-decay", "0", "--bf16")
# One thread, and glibc malloc told to keep freed memory instead of unmapping it after every step
# (the logits are larger than its mmap threshold): a quarter less CPU time, bitwise the same losses.
RUN_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "1073741824",
           "MALLOC_TRIM_THRESHOLD_": "4294967296", "MALLOC_TOP_PAD_": "268435456"}
KERNEL_FAILED = "fused CPU kernel did not build"
CODE = ("scale_zero", "launch", "benchmarks", "models", "pyproject.toml")  # what decides a run's numbers
FIRST_BUDGET = 60 * 16 * 128  # tokens per run of this benchmark's first version


@dataclass
class Run:
    method: str
    lr: float
    adam_lr: float | None
    seed: int
    variant: str
    stage: str
    run_dir: Path
    argv: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    code_path: str = ""
    cpu_s: float = math.nan
    wall_s: float = math.nan
    error: str | None = None
    val: list[tuple[int, float]] = field(default_factory=list)  # (step, loss)
    train: list[tuple[int, float]] = field(default_factory=list)

    @property
    def point(self) -> tuple:
        """The tuned configuration; seeds and rounding variants of it are its spread."""
        return self.method, self.lr, self.adam_lr

    @property
    def final_val_ppl(self) -> float:
        return math.exp(min(self.val[-1][1], 50.0)) if self.val and math.isfinite(self.val[-1][1]) else math.nan

    @property
    def best_val_ppl(self) -> float:
        losses = [loss for _, loss in self.val if math.isfinite(loss)]
        return math.exp(min(min(losses), 50.0)) if losses else math.nan

    @property
    def score(self) -> float:
        """Final validation perplexity; a failed or diverged run ranks last."""
        return self.final_val_ppl if math.isfinite(self.final_val_ppl) else math.inf

    def record(self) -> dict:
        return {**asdict(self), "run_dir": str(self.run_dir), "final_val_ppl": self.final_val_ppl,
                "best_val_ppl": self.best_val_ppl}


def nice(x: float) -> float:
    """Three significant digits, so that 20 x 3e-3 and 6e-2 name the same run."""
    return float(f"{x:.3g}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def new_run(args, method: str, lr: float, adam_lr: float | None, seed: int, variant: str, stage: str) -> Run:
    name = f"{method}-lr{lr:g}" + (f"-alr{adam_lr:g}" if adam_lr is not None else "") + f"-seed{seed}-{variant}"
    run_dir = args.run_root.resolve() / name
    argv = ["launch/train.py", "--backend", "fsdp", "--model", MODEL, "--data", "embedded",
            "--optimizer", method, "--lr", f"{lr:g}", *COMMON_FLAGS,
            "--steps", str(args.steps), "--global-batch-size", str(args.batch), "--micro-batch-size", str(args.batch),
            "--seq-len", str(args.seq_len), "--eval-every", str(args.eval_every), "--eval-tokens", str(args.eval_tokens),
            "--log-every", str(args.log_every), "--save-every", "0", "--resume", "none", "--seed", str(seed),
            "--run-dir", str(run_dir)]
    if adam_lr is not None:
        argv += ["--adam-lr", f"{adam_lr:g}"]
    argv += VARIANTS[variant].flags
    return Run(method, lr, adam_lr, seed, variant, stage, run_dir, argv, {**RUN_ENV, **dict(VARIANTS[variant].env)})


def code_path(run: Run, stderr: str) -> str:
    if run.method == "adamw":
        return "torch.optim.AdamW (default implementation)"
    if run.env.get("SCALE_ZERO_NATIVE") == "0":
        return "SCALE torch path (SCALE_ZERO_NATIVE=0)"
    if "--master-weights" in run.argv and run.argv[run.argv.index("--master-weights") + 1] != "fp32":
        return "SCALE torch path (bf16 shards; the fused kernel takes fp32 only)"
    if KERNEL_FAILED in stderr:
        return "SCALE torch path (the fused kernel did not build)"
    return "SCALE fused CPU kernel"


def train(run: Run) -> None:
    """One trainer process on one rank; its CPU time is what the run cost, whatever the load."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
           "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), **run.env}
    shutil.rmtree(run.run_dir, ignore_errors=True)
    run.run_dir.mkdir(parents=True)
    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    proc = subprocess.run([sys.executable, *run.argv], cwd=REPO, env=env, capture_output=True, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    run.wall_s = time.perf_counter() - start
    run.cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    (run.run_dir / "train.log").write_text(proc.stdout + proc.stderr)
    run.code_path = code_path(run, proc.stderr)
    if proc.returncode != 0:
        run.error = f"exit status {proc.returncode}: " + (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
    else:
        read_curves(run)
    shutil.rmtree(run.run_dir / "checkpoints", ignore_errors=True)  # the losses are the result, not the weights
    meta = {k: v for k, v in asdict(run).items() if k not in ("val", "train", "run_dir")}
    (run.run_dir / "run.json").write_text(json.dumps(meta, indent=1) + "\n")


def read_curves(run: Run) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run.run_dir / "tb"), size_guidance={"scalars": 0})  # 0: keep every point
    events.Reload()
    tags = events.Tags()["scalars"]
    run.val, run.train = ([(e.step, e.value) for e in events.Scalars(tag)] if tag in tags else []
                          for tag in ("val/loss", "train/loss"))


def load_run(run_dir: Path) -> Run:
    meta = json.loads((run_dir / "run.json").read_text())
    run = Run(**meta, run_dir=run_dir)
    if (log := run_dir / "train.log").exists():  # the path from what the run printed, by today's rule
        run.code_path = code_path(run, log.read_text())
    if run.error is None:
        read_curves(run)
    return run


def finished(run: Run) -> Run | None:
    """The run already in its dir, if that ran the same command in the same environment."""
    if not (run.run_dir / "run.json").exists():
        return None
    kept = load_run(run.run_dir)
    return kept if (kept.argv, kept.env, kept.error) == (run.argv, run.env, None) else None


class Campaign:
    """The runs in order, each started only if the time budget still holds one more."""

    def __init__(self, args, record: dict, record_path: Path):
        self.args, self.runs, self.skipped = args, [], []
        self.record, self.record_path = record, record_path
        self.started = time.perf_counter()
        self.save()

    def save(self) -> None:
        """campaign.json after every run, so --report-only works on a campaign cut short."""
        self.record.update(runs=[r.run_dir.name for r in self.runs], skipped=[r.run_dir.name for r in self.skipped])
        self.record_path.write_text(json.dumps(self.record, indent=1) + "\n")

    def find(self, method, lr, adam_lr, seed=0, variant="default") -> Run | None:
        return next((r for r in self.runs if (r.method, r.lr, r.adam_lr, r.seed, r.variant)
                     == (method, lr, adam_lr, seed, variant)), None)

    def run(self, method, lr, adam_lr, stage, seed=0, variant="default") -> Run | None:
        if (done := self.find(method, lr, adam_lr, seed, variant)) is not None:
            return done
        run = new_run(self.args, method, lr, adam_lr, seed, variant, stage)
        if self.args.reuse and (kept := finished(run)) is not None:
            self.runs.append(kept)
            self.save()
            print(f"[{stage} {len(self.runs)}] {run.run_dir.name:<44} reused", flush=True)
            return kept
        elapsed = time.perf_counter() - self.started
        typical = max((r.wall_s for r in self.runs), default=0.0)
        if elapsed + typical > 60 * self.args.time_budget_min:
            self.skipped.append(run)
            self.save()
            print(f"[{stage}] skipped {run.run_dir.name}: the time budget ({self.args.time_budget_min:g} min) "
                  f"would be exceeded", flush=True)
            return None
        train(run)
        self.runs.append(run)
        self.save()
        outcome = run.error or f"val ppl best {fmt_ppl(run.best_val_ppl)} final {fmt_ppl(run.final_val_ppl)}"
        print(f"[{stage} {len(self.runs)}] {run.run_dir.name:<44} {outcome}  ({run.cpu_s:.0f} s CPU, "
              f"{run.wall_s:.0f} s wall, {elapsed / 60 + run.wall_s / 60:.1f} min elapsed)", flush=True)
        return run

    def tune(self, values, make, stage) -> float | None:
        """The value (lr or adam_lr) whose seed-0 run `make(value)` scores best. While that is
        at an edge of the grid, one more step of the grid's ratio beyond it."""
        values = sorted(values)
        for v in values:
            self.run(*make(v), stage)
        for _ in range(self.args.max_extensions):
            best = self.best_value(values, make)
            if best not in (values[0], values[-1]):
                break
            new = nice(best * values[0] / values[1] if best == values[0] else best * values[-1] / values[-2])
            if self.run(*make(new), "extend") is None:
                break
            values = sorted([*values, new])
        return self.best_value(values, make)

    def best_value(self, values, make) -> float | None:
        done = {v: run for v in values if (run := self.find(*make(v))) is not None}
        return min(done, key=lambda v: done[v].score) if done else None


def campaign(args, record: dict, record_path: Path) -> Campaign:
    c = Campaign(args, record, record_path)
    best = {}
    for name in args.methods:
        m = METHODS[name]
        lr = c.tune(m.lrs, lambda lr, m=m: (m.optimizer, lr, m.default_adam_lr(lr)), "sweep")
        if lr is not None:
            best[name] = (lr, m.default_adam_lr(lr))
    # The first repeat seed and the kernel path before SCALE's 1-D rate: a campaign cut short by
    # its time budget then still has a spread at every best point of the lr sweep.
    spread(c, best, args.repeat_seeds[:1])
    if "scale" in best:
        lr = best["scale"][0]
        best["scale"] = (lr, c.tune([nice(r * lr) for r in SCALE_ADAM_LR_RATIOS], lambda a: ("scale", lr, a),
                                    "1-D rate"))
    if "adamw" in args.methods:
        c.run("adamw", PAPER_ADAMW_LR, None, "paper recipe")
    spread(c, best, args.repeat_seeds)  # runs already done are not repeated
    return c


# --campaign master-free: the quality of master-free bf16 SCALE at the main campaign's tuned points
# (runs/convergence: SCALE lr 1e-3 with adam_lr 2e-2, AdamW lr 3e-3), each (method, variant) at every
# seed. In this order, each stage at every seed before the next, so that a campaign cut short by its
# budget still has the goal's comparison (stochastic rounding against fp32 masters) seed for seed.
MASTER_FREE_POINTS = {"scale": (1e-3, 2e-2), "adamw": (3e-3, None)}
MASTER_FREE_STAGES = ((("scale", "default"), ("scale", "bf16-sr")), (("scale", "bf16-nearest"),), (("adamw", "default"),))
MASTER_FREE_SEEDS = (0, 1)


def master_free(args, record: dict, record_path: Path) -> Campaign:
    c = Campaign(args, record, record_path)
    for stage in MASTER_FREE_STAGES:
        for seed in MASTER_FREE_SEEDS:
            for method, variant in stage:
                c.run(method, *MASTER_FREE_POINTS[method], "master-free", seed=seed, variant=variant)
    return c


def spread(c: Campaign, best: dict, seeds: list[int]) -> None:
    """SCALE's best point on the other kernel path (the variants change SCALE's kernel, which the
    other SCALE-family methods share), then every best point with each seed."""
    for variant in SPREAD_VARIANTS[1:]:
        if "scale" in best:
            c.run("scale", *best["scale"], "kernel path", variant=variant)
    for seed in seeds:
        for name, (lr, adam_lr) in best.items():
            c.run(name, lr, adam_lr, "seeds", seed=seed)
    return c


# ---- the record: what decides the numbers ----------------------------------------------------

def machine() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "unknown CPU"
    return f"{model}, {os.cpu_count()} cores visible, {platform.system()} {platform.release()}"


def environment() -> dict:
    """Versions, commit, CPU and the thread counts a trainer process actually gets."""
    probe = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.get_num_threads(), torch.get_num_interop_threads(), "
         "torch.backends.cpu.get_cpu_capability())"],
        env={**os.environ, **RUN_ENV}, capture_output=True, text=True, check=True).stdout.split()
    git = lambda *a: subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True).stdout.strip()  # noqa: E731
    return {
        "machine": machine(),
        # the code the runs execute; the results this benchmark writes do not count as changes
        "commit": git("rev-parse", "HEAD") + (" (with uncommitted changes)" if git(
            "status", "--porcelain", "--untracked-files=no", "--", *CODE) else ""),
        "python": platform.python_version(),
        **{pkg: importlib.metadata.version(pkg) for pkg in ("torch", "transformers", "tensorboard")},
        "torch_threads": int(probe[0]), "torch_interop_threads": int(probe[1]), "cpu_capability": probe[2],
        "run_env": RUN_ENV,
        "dtype": "bf16 autocast compute (--bf16), fp32 weights, gradients and optimizer state",
    }


def parameter_count() -> int:
    from transformers import LlamaConfig, LlamaForCausalLM

    with __import__("torch").device("meta"):
        model = LlamaForCausalLM(LlamaConfig.from_json_file(str(REPO / MODEL)))
    return sum(p.numel() for p in model.parameters())


# ---- the report ----------------------------------------------------------------------------

def fmt_ppl(x: float) -> str:
    return f"{x:.1f}" if math.isfinite(x) else "diverged"


def fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:g}"


@dataclass
class Best:
    """A method's best seed-0 point and every run of it that only changes seed or rounding."""

    run: Run
    spread: list[Run]

    @property
    def ppl(self) -> list[float]:
        return [r.score for r in self.spread]

    @property
    def mean(self) -> float:
        return sum(self.ppl) / len(self.ppl)

    @property
    def low(self) -> float:
        return min(self.ppl)

    @property
    def high(self) -> float:
        return max(self.ppl)


def best_points(runs: list[Run]) -> dict[str, Best]:
    best = {}
    for method in METHODS:
        tuned = [r for r in runs if r.method == method and r.seed == 0 and r.variant == "default"]
        if tuned:
            top = min(tuned, key=lambda r: r.score)
            best[method] = Best(top, [r for r in runs if r.point == top.point and r.variant in SPREAD_VARIANTS])
    return best


def ranking(best: dict[str, Best]) -> str:
    """Methods by mean; `<` only where both spreads are measured (2+ runs) and their min-max
    ranges do not overlap, `~` where they overlap, `?` where a spread is missing."""
    order = sorted(best.values(), key=lambda b: b.mean)
    text = ""
    for i, b in enumerate(order):
        if i:
            a = order[i - 1]
            text += " ? " if min(len(a.spread), len(b.spread)) < 2 else " < " if a.high < b.low else " ~ "
        text += f"{METHODS[b.run.method].label} ({fmt_ppl(b.mean)}, {fmt_ppl(b.low)}-{fmt_ppl(b.high)}"
        text += ")" if len(b.spread) > 1 else ", one run)"
    return text


def interior(runs: list[Run], best: Run) -> str:
    """Whether each knob tuned at the best point has a finished seed-0 run on both sides of it."""
    tuned = [r for r in runs if r.method == best.method and r.seed == 0 and r.variant == "default"
             and r.error is None]
    knobs = {"lr": {r.lr for r in tuned if r.adam_lr == METHODS[best.method].default_adam_lr(r.lr)} | {best.lr}}
    adam_lrs = {r.adam_lr for r in tuned if r.lr == best.lr and r.adam_lr is not None}
    if len(adam_lrs) > 1:
        knobs["adam_lr"] = adam_lrs
    edges = [f"{name}: none {'below' if value == min(values) else 'above'}"
             for name, values in knobs.items() if (value := getattr(best, name)) in (min(values), max(values))]
    return "no (" + "; ".join(edges) + ")" if edges else "yes"


def write_plot(runs: list[Run], best: dict[str, Best], tokens_per_step: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_val, ax_train, ax_lr) = plt.subplots(1, 3, figsize=(16, 4.6))
    for (method, b), color in zip(best.items(), plt.rcParams["axes.prop_cycle"].by_key()["color"]):
        for run in b.spread:
            first = run is b.run
            label = f"{METHODS[method].label}, lr {run.lr:g}" + (f", adam_lr {run.adam_lr:g}" if run.adam_lr else "")
            for ax, points in ((ax_val, run.val), (ax_train, run.train)):
                if points:
                    steps, losses = zip(*points)
                    ax.plot([s * tokens_per_step / 1e6 for s in steps], losses, color=color,
                            lw=1.4 if first else 0.6, alpha=1 if first else 0.6,
                            marker="o" if ax is ax_val and first else None, markersize=2.5,
                            label=label if first and ax is ax_val else None)
        grid = sorted((r for r in runs if r.method == method and r.seed == 0 and r.variant == "default"
                       and r.adam_lr == METHODS[method].default_adam_lr(r.lr)), key=lambda r: r.lr)
        ax_lr.plot([r.lr for r in grid], [min(r.score, 5e3) for r in grid], color=color, marker="o",
                   label=METHODS[method].label)
    for ax, title in ((ax_val, "validation loss (thin: other seeds, torch path)"),
                      (ax_train, "training loss (mean over each log interval)")):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("training tokens (millions)")
        ax.set_ylabel("cross-entropy (nats)")
        ax.set_ylim(top=min(7.0, ax.get_ylim()[1]))
        ax.grid(alpha=0.3)
    ax_val.legend(fontsize=7)
    ax_lr.set_xscale("log")
    ax_lr.set_yscale("log")
    ax_lr.set_title("final validation perplexity against peak lr (seed 0)", fontsize=10)
    ax_lr.set_xlabel("peak lr")
    ax_lr.grid(alpha=0.3, which="both")
    ax_lr.legend(fontsize=7)
    fig.suptitle(f"Best point per method: LLaMA {parameter_count() / 1e6:.2f}M parameters (hidden 128, 2 layers), "
                 "embedded Shakespeare")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def head_lines(args, record: dict, runs: list[Run], title: str, numerics: str) -> list[str]:
    """The title, how to reproduce, what ran and what decides the numbers: the same on every page."""
    env = record["environment"]
    tokens_per_step = args.batch * args.seq_len
    cpu = [r.cpu_s for r in runs]
    partial = record["skipped"]
    lines = [
        title,
        "",
        f"Reproduce: `{record['command']}` (`--report-only` rebuilds this page from the run dirs).",
        "",
    ]
    if record.get("invocations", [record["command"]]) != [record["command"]]:
        lines += ["This page's campaign ran as " + ", then ".join(f"`{c}`" for c in record["invocations"])
                  + " (`--reuse` kept the finished runs of the one before).", ""]
    if partial:
        lines += [f"**Partial**: the time budget ran out before {len(partial)} planned runs: "
                  + ", ".join(f"`{name}`" for name in partial) + ".", ""]
    lines += [
        "## What decides these numbers",
        "",
        f"- Date: {record['started']}; machine: {env['machine']}, shared with other jobs (wall times are noisy; "
        "the losses are not affected).",
        f"- Code: commit {env['commit']}; Python {env['python']}, torch {env['torch']} (CPU capability "
        f"{env['cpu_capability']}), transformers {env['transformers']}, tensorboard {env['tensorboard']}.",
        f"- Threads: {env['torch_threads']} intra-op, {env['torch_interop_threads']} inter-op per trainer, one "
        "trainer at a time. Environment of every run: "
        + ", ".join(f"`{k}={v}`" for k, v in env["run_env"].items()) + " (the malloc settings only save CPU time).",
        f"- Numerics: {numerics}",
        f"- Model: `{MODEL}`, LLaMA with {parameter_count() / 1e6:.2f}M parameters (hidden 128, ffn 344, 4 heads, "
        "2 layers, vocabulary 8192, untied embeddings).",
        f"- Data: the embedded Shakespeare corpus (`--data embedded`) and its 8k SentencePiece tokenizer; validation "
        f"on {args.eval_tokens:,} held-out tokens every {args.eval_every} steps.",
        f"- Budget, the same for every run: {args.steps} steps x {args.batch} sequences x {args.seq_len} tokens = "
        f"{args.steps * tokens_per_step:,} training tokens ({args.steps * tokens_per_step / FIRST_BUDGET:g}x the "
        f"{FIRST_BUDGET:,} of this benchmark's first version, which measured only the first descent).",
        "- Schedule: linear warmup over the first 10% of the steps, cosine decay to 0.1x the peak; gradient "
        "clipping 1.0; no weight decay; momentum 0.9 (AdamW: betas 0.9, 0.999, which with this schedule and lr 1e-3 "
        "is the paper's Adam recipe).",
        f"- {len(runs)} runs took {sum(cpu) / 60:.1f} CPU-minutes ({min(cpu):.0f}-{max(cpu):.0f} s each) and "
        f"{sum(r.wall_s for r in runs) / 60:.1f} minutes of wall time.",
        "",
    ]
    return lines


def command_lines(runs: list[Run], changes: str) -> list[str]:
    """The first run's trainer command; `changes` says what the others change."""
    return [
        "",
        f"One trainer command (the others change {changes}):",
        "",
        "```",
        "RANK=0 LOCAL_RANK=0 WORLD_SIZE=1 LOCAL_WORLD_SIZE=1 MASTER_ADDR=127.0.0.1 MASTER_PORT=<free port> \\",
        "  " + " ".join(f"{k}={v}" for k, v in runs[0].env.items()) + " \\",
        f"  python {shlex.join(runs[0].argv)}",
        "```",
        "",
    ]


def run_row(run: Run, what: str, bold: str = "") -> str:
    """A row of the "Every run" table: `what` names the run, then lr, adam_lr, seed, path, perplexities, CPU."""
    final = fmt_ppl(run.final_val_ppl) if run.error is None else f"failed ({run.error})"
    return (f"| {what} | {bold}{run.lr:g}{bold} | {fmt(run.adam_lr)} | {run.seed} | {run.code_path} | "
            f"{fmt_ppl(run.best_val_ppl)} | {bold}{final}{bold} | {run.cpu_s:.0f} |")


def write_page(path: Path, lines: list[str], what: str, rows: list[str], runs: list[Run], changes: str) -> None:
    """The page: `lines`, then the "Every run" table (`what`: its first columns, see run_row) and a command."""
    columns = f"| {what} | peak lr | adam_lr (1-D) | seed | code path | best val ppl | final val ppl | CPU s |"
    lines += [columns, "|---" * columns.count(" | ") + "|---|", *rows, *command_lines(runs, changes)]
    path.write_text("\n".join(lines))


def write_markdown(args, record: dict, runs: list[Run], best: dict[str, Best], path: Path) -> None:
    numerics = (f"{record['environment']['dtype']}. SCALE-family runs use the fused CPU kernel unless the table "
                "says torch path (`SCALE_ZERO_NATIVE=0`); the two agree to rounding per step, which the spread below "
                "includes.")
    lines = head_lines(args, record, runs, "# Convergence at small scale: SCALE, AdamW, SGD, column-normalized SGD",
                       numerics)
    lines += [
        "## Result",
        "",
        "Final validation perplexity (exp of the cross-entropy) at each method's best seed-0 point, and the spread "
        "of that point: every run that changes only the seed (initialization and data order) or SCALE's kernel "
        "path. Spread = max - min over those runs.",
        "",
        "| method | best peak lr | adam_lr (1-D) | interior | runs (seed, variant) | final val ppl | mean | min-max "
        "| spread |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for method, b in best.items():
        what = ", ".join(f"{r.seed}" + ("" if r.variant == "default" else f" {VARIANTS[r.variant].label}")
                         for r in b.spread)
        lines.append(f"| {METHODS[method].label} | {b.run.lr:g} | {fmt(b.run.adam_lr)} | {interior(runs, b.run)} | "
                     f"{what} | "
                     + " / ".join(fmt_ppl(x) for x in b.ppl)
                     + f" | **{fmt_ppl(b.mean)}** | "
                     + (f"{fmt_ppl(b.low)}-{fmt_ppl(b.high)} | {fmt_ppl(b.high - b.low)} |" if len(b.spread) > 1
                        else "- | not measured |"))
    lines += [
        "",
        "Interior: the best value of each tuned knob has a finished run on both sides. Ranking by mean; `<` only "
        "where both spreads are measured and the two min-max ranges do not overlap, `~` where they overlap, `?` "
        "where a spread is missing (one run): " + ranking(best) + ".",
        "",
        "![curves and lr sensitivity](convergence.png)",
        "",
        "## Every run",
        "",
        "In campaign order. sweep: the lr grid at seed 0; extend: one grid step past an edge best; 1-D rate: "
        "SCALE's adam_lr at its best lr; paper recipe: AdamW at lr 1e-3 if the grid lacks it; kernel path, seeds: "
        "the spread of the best points. **Bold**: each method's best seed-0 point.",
        "",
    ]
    bold = lambda run: "**" if best.get(run.method) and best[run.method].run is run else ""  # noqa: E731
    rows = [run_row(run, f"{run.stage} | {METHODS[run.method].label}", bold(run)) for run in runs]
    write_page(path, lines, "stage | method", rows, runs, "`--optimizer`, `--lr`, `--adam-lr`, `--seed`, "
               "`--run-dir` and, for the torch path, `SCALE_ZERO_NATIVE=0`")


def report(args, record: dict, runs: list[Run]) -> None:
    best = best_points(runs)
    args.out.mkdir(parents=True, exist_ok=True)
    write_plot(runs, best, args.batch * args.seq_len, args.out / "convergence.png")
    write_markdown(args, record, runs, best, args.out / "convergence.md")
    summary = {**record, "best": {m: {"lr": b.run.lr, "adam_lr": b.run.adam_lr, "final_val_ppl": b.ppl,
                                      "mean": b.mean, "min": b.low, "max": b.high} for m, b in best.items()},
               "runs": [r.record() for r in runs]}
    (args.out / "convergence.json").write_text(json.dumps(summary, indent=1) + "\n")
    print((args.out / "convergence.md").read_text())


MASTER_FREE_GOAL_PCT = 1.0  # stochastic rounding's mean final perplexity at most this much above fp32 masters


def master_free_label(method: str, variant: str) -> str:
    return f"{METHODS[method].label}, " + ("fp32 master weights" if variant == "default" else VARIANTS[variant].label)


def master_free_groups(runs: list[Run]) -> dict[tuple[str, str], Best]:
    """Every (method, variant) of MASTER_FREE_POINTS with its runs, one per seed (the first is seed 0's)."""
    groups = {}
    for method, variant in (key for stage in MASTER_FREE_STAGES for key in stage):
        point = (method, *MASTER_FREE_POINTS[method], variant)
        done = sorted((r for r in runs if (r.method, r.lr, r.adam_lr, r.variant) == point), key=lambda r: r.seed)
        if done:
            groups[method, variant] = Best(done[0], done)
    return groups


def gap_pct(groups: dict, variant: str) -> float:
    """How much variant's mean final perplexity is above SCALE with fp32 masters, in %."""
    if ("scale", variant) not in groups or ("scale", "default") not in groups:
        return math.nan
    return 100 * (groups["scale", variant].mean / groups["scale", "default"].mean - 1)


def write_master_free_plot(groups: dict[tuple[str, str], Best], tokens_per_step: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_val, ax_end) = plt.subplots(1, 2, figsize=(13, 4.6), gridspec_kw={"width_ratios": (2, 1)})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, ((method, variant), g) in enumerate(groups.items()):
        label = master_free_label(method, variant)
        for run, style in zip(g.spread, ("-", "--", ":", "-.")):
            if run.val:
                steps, losses = zip(*run.val)
                ax_val.plot([s * tokens_per_step / 1e6 for s in steps], losses, color=colors[i], ls=style, lw=1.2,
                            label=f"{label}, seed {run.seed}")
        ax_end.scatter([i] * len(g.spread), g.ppl, color=colors[i], s=18)
        ax_end.scatter([i], [g.mean], color=colors[i], marker="_", s=400)
    ax_val.set_title("validation loss (line style: seed)", fontsize=10)
    ax_val.set_xlabel("training tokens (millions)")
    ax_val.set_ylabel("cross-entropy (nats)")
    ax_val.set_ylim(top=min(7.0, ax_val.get_ylim()[1]))
    ax_val.grid(alpha=0.3)
    ax_val.legend(fontsize=6.5)
    ax_end.set_xticks(range(len(groups)), [master_free_label(*k).replace(", ", ",\n", 1) for k in groups], fontsize=7)
    ax_end.set_xlim(-0.5, len(groups) - 0.5)
    ax_end.set_title("final validation perplexity (dots: seeds, bar: mean)", fontsize=10)
    ax_end.grid(alpha=0.3, axis="y")
    fig.suptitle("Master-free bf16 SCALE against fp32 master weights and AdamW: LLaMA "
                 f"{parameter_count() / 1e6:.2f}M parameters, embedded Shakespeare")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_master_free_markdown(args, record: dict, runs: list[Run], groups: dict, path: Path) -> None:
    numerics = ("bf16 autocast compute (`--bf16`) for every run. fp32 master weights (the default, and AdamW): fp32 "
                "weights, gradients and optimizer state. Master-free (`--master-weights bf16`, `bf16-nearest`): the "
                "FSDP2 shards, their gradients and SCALE's state in bf16, every update computed in fp32 chunk by "
                "chunk and written back with stochastic rounding or rounded to nearest. SCALE with fp32 masters "
                "uses the fused CPU kernel; bf16 pieces go through the torch path (the kernel takes fp32 only).")
    lines = head_lines(args, record, runs, "# Master-free bf16 SCALE: quality against fp32 master weights", numerics)
    lines += [
        "## Result",
        "",
        "Each method at its tuned point of the main campaign ([convergence.md](convergence.md): SCALE lr 1e-3 with "
        "adam_lr 2e-2, AdamW lr 3e-3), every variant with seeds " + ", ".join(map(str, MASTER_FREE_SEEDS))
        + " (initialization, data order and the rounding stream). Final validation perplexity (exp of the "
        "cross-entropy after the last step); spread = max - min over the seeds; gap = the mean's excess over SCALE "
        "with fp32 master weights.",
        "",
        "| method, weights | peak lr | adam_lr (1-D) | seeds | final val ppl | mean | min-max | spread | gap |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (method, variant), g in groups.items():
        gap = gap_pct(groups, variant) if method == "scale" else math.nan
        lines.append(f"| {master_free_label(method, variant)} | {g.run.lr:g} | {fmt(g.run.adam_lr)} | "
                     + ", ".join(str(r.seed) for r in g.spread) + " | " + " / ".join(fmt_ppl(x) for x in g.ppl)
                     + f" | **{fmt_ppl(g.mean)}** | {fmt_ppl(g.low)}-{fmt_ppl(g.high)} | {fmt_ppl(g.high - g.low)} | "
                     + (f"{gap:+.2f}% |" if math.isfinite(gap) else "- |"))
    sr = gap_pct(groups, "bf16-sr")
    if math.isfinite(sr):
        verdict = "holds" if sr <= MASTER_FREE_GOAL_PCT else "does not hold"
        fp32 = groups["scale", "default"]
        spread_pct = 100 * (fp32.high - fp32.low) / fp32.mean
        paired = {r.seed: r.score for r in fp32.spread}
        per_seed = ", ".join(f"seed {r.seed} {100 * (r.score / paired[r.seed] - 1):+.2f}%"
                             for r in groups["scale", "bf16-sr"].spread if r.seed in paired)
        lines += ["", f"Goal, stochastic rounding's mean at most {MASTER_FREE_GOAL_PCT:g}% above fp32 master weights: "
                  f"**{verdict}** (gap {sr:+.2f}%; seed for seed {per_seed}). The fp32-masters seed spread is "
                  f"{spread_pct:.2f}% of its mean, so "
                  + ("the gap is inside it: these seeds do not tell the two apart." if abs(sr) < spread_pct
                     else "the gap is larger than the seed spread.")]
    lines += [
        "",
        "![curves and final perplexity](convergence_master_free.png)",
        "",
        "## Every run",
        "",
    ]
    rows = [run_row(run, master_free_label(run.method, run.variant)) for run in runs]
    write_page(path, lines, "method, weights", rows, runs, "`--optimizer`, `--lr`, `--adam-lr`, `--seed`, "
               "`--run-dir` and add `--master-weights bf16` or `--master-weights bf16-nearest`")


def report_master_free(args, record: dict, runs: list[Run]) -> None:
    groups = master_free_groups(runs)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / "convergence_master_free"
    write_master_free_plot(groups, args.batch * args.seq_len, stem.with_suffix(".png"))
    write_master_free_markdown(args, record, runs, groups, stem.with_suffix(".md"))
    summary = {**record, "goal_pct": MASTER_FREE_GOAL_PCT,
               "gap_pct": {v: gap_pct(groups, v) for v in ("bf16-sr", "bf16-nearest")},
               "variants": {f"{m}/{v}": {"label": master_free_label(m, v), "lr": g.run.lr, "adam_lr": g.run.adam_lr,
                                         "seeds": [r.seed for r in g.spread], "final_val_ppl": g.ppl,
                                         "mean": g.mean, "min": g.low, "max": g.high} for (m, v), g in groups.items()},
               "runs": [r.record() for r in runs]}
    stem.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    print(stem.with_suffix(".md").read_text())


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("docs/results"), help="folder for convergence.{md,json,png}")
    p.add_argument("--campaign", choices=("main", "master-free"), default="main",
                   help="main: every method tuned (convergence.*); master-free: SCALE's master-free bf16 variants "
                   "against fp32 masters and AdamW at the tuned points (convergence_master_free.*)")
    p.add_argument("--run-root", type=Path, default=None,
                   help="trainer run folders (default: runs/convergence, runs/convergence-master-free)")
    p.add_argument("--report-only", action="store_true", help="no training: the report from the run dirs of "
                   "--run-root (and its campaign.json)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {', '.join(METHODS)}")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=16, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-tokens", type=int, default=16384)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--repeat-seeds", default="1,2", help="seeds to rerun each best point with ('' = none)")
    p.add_argument("--max-extensions", type=int, default=1, help="grid steps past an edge best, per knob")
    p.add_argument("--reuse", action="store_true", help="keep runs whose dir holds a finished run of the same "
                   "command (to continue a campaign cut short)")
    p.add_argument("--time-budget-min", type=float, default=math.inf,
                   help="start no run that would end past this many minutes (the report says what was skipped)")
    args = p.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        p.error(f"--methods: unknown {unknown or 'empty list'}; choose from {', '.join(METHODS)}")
    if args.out.exists() and not args.out.is_dir():
        p.error(f"--out {args.out} is a file; give a folder (it is created if missing)")
    for name in ("steps", "batch", "seq_len", "eval_every", "eval_tokens", "log_every", "time_budget_min"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.max_extensions < 0:
        p.error(f"--max-extensions must be >= 0, got {args.max_extensions}")
    args.methods = methods
    if args.run_root is None:
        args.run_root = Path("runs/convergence" if args.campaign == "main" else "runs/convergence-master-free")
    try:
        args.repeat_seeds = [int(s) for s in args.repeat_seeds.split(",") if s.strip()]
    except ValueError:
        p.error(f"--repeat-seeds must be comma-separated integers, got {args.repeat_seeds!r}")
    if 0 in args.repeat_seeds:
        p.error("--repeat-seeds: seed 0 is the sweep's; give the other seeds")
    return args


def reproduce_command(args) -> str:
    """The campaign's command without the options that only decide how much of it ran when."""
    argv = ["python", "benchmarks/convergence.py", "--out", str(args.out)]
    argv += ["--campaign", args.campaign] if args.campaign != "main" else []
    defaults = parse_args(["--campaign", args.campaign])
    for name in ("run_root", "methods", "steps", "batch", "seq_len", "eval_every", "eval_tokens", "log_every",
                 "repeat_seeds", "max_extensions"):
        if getattr(args, name) != getattr(defaults, name):
            value = getattr(args, name)
            argv += [f"--{name.replace('_', '-')}", ",".join(map(str, value)) if isinstance(value, list) else str(value)]
    return shlex.join(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    record_path = args.run_root / "campaign.json"
    if args.report_only:
        if not record_path.exists():
            sys.exit(f"--report-only: {record_path} is missing; run the campaign first (without --report-only)")
        record = json.loads(record_path.read_text())
        vars(args).update({k: record["args"][k] for k in ("steps", "batch", "seq_len", "eval_every", "eval_tokens")})
        runs = [load_run(args.run_root.resolve() / name) for name in record["runs"]]
        (report if args.campaign == "main" else report_master_free)(args, record, runs)
        return
    command = shlex.join(["python", "benchmarks/convergence.py", *(sys.argv[1:] if argv is None else argv)])
    earlier = json.loads(record_path.read_text()) if args.reuse and record_path.exists() else {}
    record = {"command": reproduce_command(args),
              "invocations": [*(c for c in earlier.get("invocations", []) if c != command), command],
              "started": earlier.get("started", f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"),
              "environment": environment(),
              "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "runs": [], "skipped": []}
    args.run_root.mkdir(parents=True, exist_ok=True)
    c = (campaign if args.campaign == "main" else master_free)(args, record, record_path)
    (report if args.campaign == "main" else report_master_free)(args, record, c.runs)
    if any(r.error for r in c.runs):
        sys.exit(1)


if __name__ == "__main__":
    main()
