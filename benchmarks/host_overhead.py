"""The host work of SCALE's client step inside ZeRO-3: the step with the fused kernel's three
entry points replaced by no-ops, so what is left is what the step costs besides moving the
bytes (Python, the all_reduce, torch.optim's hooks). Rank 0's CPU time per engine step (its
main thread, and the whole process) and per client call: DeepSpeed calls the client once per
role group. The kernel doing nothing, the parameters do not change: a cost measurement only.

    PYTHONPATH=$PWD DS_ACCELERATOR=cpu deepspeed --num_gpus 2 benchmarks/host_overhead.py \\
        --out docs/results/host_overhead.md

Model, batch and configs as benchmarks/throughput.py's defaults (its SCALE engine).
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import subprocess
import time
from pathlib import Path

import torch
import torch.distributed as dist

from benchmarks.throughput import ROOT, arg_parser, build, cpu_model
from scale_zero import native


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="timed engine steps (after 3 untimed)")
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--out", type=Path, default=ROOT / "docs/results/host_overhead.md")
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # from the deepspeed launcher
    args = parser.parse_args()
    # benchmarks/throughput.py's model and run defaults, which `build` reads; this run's seq.
    return argparse.Namespace(**{**vars(arg_parser().parse_args([])), **vars(args)})


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    run = build("SCALE", "zero3_scale.json", args)
    library = native._library()
    if library is None:
        raise SystemExit("the fused kernel is not available here: nothing to stub out")
    for entry in native._ENTRIES.values():
        setattr(library, entry, lambda *_: None)
    calls, started = [], []
    run.client_optimizer.register_step_pre_hook(lambda *_: started.append((time.thread_time(), time.process_time())))
    run.client_optimizer.register_step_post_hook(
        lambda *_: calls.append(tuple(now - then for now, then in zip((time.thread_time(), time.process_time()),
                                                                      started.pop())))
    )
    input_ids = torch.randint(0, args.vocab, (args.micro_batch, args.seq), generator=torch.Generator().manual_seed(0))
    for step in range(3 + args.steps):
        if step == 3:
            calls.clear()
        loss = run.engine(input_ids=input_ids, labels=input_ids).loss
        run.engine.backward(loss)
        run.engine.step()
    if dist.get_rank() != 0:
        return
    per_step = len(calls) // args.steps
    steps = [calls[i * per_step : (i + 1) * per_step] for i in range(args.steps)]
    thread = statistics.median(sum(c[0] for c in s) for s in steps) * 1e3
    process = statistics.median(sum(c[1] for c in s) for s in steps) * 1e3
    by_call = [statistics.median(s[j][0] for s in steps) * 1e3 for j in range(per_step)]
    groups = [g.get("role", "?") for g in run.client_optimizer.param_groups]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(native.__file__).parent,
                            capture_output=True, text=True).stdout.strip()
    text = f"""# Host work of SCALE's client step in ZeRO-3 (kernel stubbed out)

Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; {cpu_model()}, \
{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; torch {torch.__version__}; scale_zero at {commit}.

```bash
PYTHONPATH=$PWD DS_ACCELERATOR=cpu deepspeed --num_gpus {dist.get_world_size()} benchmarks/host_overhead.py \
--steps {args.steps} --seq {args.seq} --out {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}
```

ZeRO-3, {dist.get_world_size()} ranks x 1 thread, benchmarks/throughput.py's 21M LLaMA, micro batch \
{args.micro_batch} x seq {args.seq}; {per_step} client calls per engine step (groups {', '.join(groups)}). \
Medians over {args.steps} engine steps, rank 0.

| | CPU ms per engine step |
|---|---|
| main thread | {thread:.2f} |
| whole process | {process:.2f} |
| main thread, per call ({', '.join(groups)}) | {' / '.join(f'{t:.2f}' for t in by_call)} |
"""
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
