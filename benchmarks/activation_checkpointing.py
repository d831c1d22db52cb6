"""Peak memory of training steps with and without activation checkpointing, under DeepSpeed
ZeRO-3 and FSDP2: the trainer (`torchrun --standalone -m scale_zero_train`) on 2 CPU ranks,
the peak read back from its TensorBoard log (memory/peak_bytes: max over ranks of the CUDA
peak allocation, or on CPU of the process's peak resident set).

    python benchmarks/activation_checkpointing.py [--ranks 2] [--seq-len 512] ...

The shape is chosen so that activations dominate: the tiny model (4 layers, hidden 256) on
long sequences. The numbers are in docs/training.md."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ZERO3 = {"zero_optimization": {"stage": 3}, "gradient_clipping": 1.0, "bf16": {"enabled": False}}


def peak_bytes(run_dir: Path) -> float:
    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    return max(e.value for e in events.Scalars("memory/peak_bytes"))


def measure(backend: str, checkpointing: bool, args: argparse.Namespace, tmp: Path) -> float:
    run_dir = tmp / f"{backend}-{'ac' if checkpointing else 'plain'}"
    argv = ["--backend", backend, "--model", "tiny", "--optimizer", "adamw", "--no-bf16", "--seq-len", str(args.seq_len),
            "--micro-batch-size", str(args.micro_batch_size),
            "--global-batch-size", str(args.micro_batch_size * args.ranks), "--steps", str(args.steps),
            "--eval-every", "0", "--eval-tokens", str(args.seq_len * args.ranks), "--log-every", "1",
            "--run-dir", str(run_dir), "--activation-checkpointing" if checkpointing else "--no-activation-checkpointing"]
    if backend == "deepspeed":
        config = tmp / "zero3.json"
        config.write_text(json.dumps(ZERO3))
        argv += ["--config", str(config)]
    # torchrun starts both backends (the DeepSpeed engine joins torchrun's process group);
    # --standalone picks a free port.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.ranks),
           "-m", "scale_zero_train", *argv]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=1200)
    if result.returncode:
        raise SystemExit(result.stdout[-4000:])
    return peak_bytes(run_dir)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=2)
    args = p.parse_args()
    print(f"tiny LLaMA, {args.ranks} ranks, micro-batch {args.micro_batch_size} x {args.seq_len} tokens, fp32\n")
    print("| backend | peak without | peak with activation checkpointing | reduction |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for backend in ("deepspeed", "fsdp"):
            plain, ac = (measure(backend, on, args, Path(tmp)) for on in (False, True))
            print(f"| {backend} | {plain / 2**20:.0f} MiB | {ac / 2**20:.0f} MiB | {(plain - ac) / 2**20:.0f} MiB "
                  f"({1 - ac / plain:.0%}) |", flush=True)


if __name__ == "__main__":
    main()
