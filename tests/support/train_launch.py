"""Run launch/train.py the way users do: under the real `deepspeed` launcher or ours for FSDP2
(`python -m scale_zero_train.launch`, torchrun in-process),
2 CPU ranks (gloo), a free port, and a tiny LLaMA; or in-process as one rank (`refused`).
Shared by the trainer's tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scale_zero_train.checkpoint import deepspeed_safe_globals, safe_load
from scale_zero_train.train import main
from tests.support.distributed import free_port

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
# A LLaMA small enough for 2 CPU ranks; its vocabulary fits the embedded tokenizer.
TINY_MODEL = {
    "model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
    "num_key_value_heads": 4, "num_hidden_layers": 2, "max_position_embeddings": 64, "vocab_size": 8192,
    "tie_word_embeddings": False, "rms_norm_eps": 1e-6,
}
ZERO3 = {"zero_optimization": {"stage": 3}, "gradient_clipping": 1.0, "bf16": {"enabled": False}}
SMALL_RUN = ["--global-batch-size", "8", "--micro-batch-size", "2", "--seq-len", "32", "--eval-tokens", "256",
             "--log-every", "1", "--eval-every", "3", "--lr", "1e-2"]


def write_json(path: Path, value: dict) -> Path:
    path.write_text(json.dumps(value))
    return path


def train(backend: str, args: list[str], tmp: Path, env: dict | None = None, ranks: int = 2,
          timeout: int = 300) -> subprocess.CompletedProcess:
    """launch/train.py under the backend's own launcher; stdout and stderr merged in .stdout."""
    port = str(free_port())
    if backend == "deepspeed":
        cmd = [str(BIN / "deepspeed"), "--num_gpus", str(ranks), "--master_port", port, "launch/train.py"]
    else:
        cmd = [sys.executable, "-m", "scale_zero_train.launch", "--nproc-per-node", str(ranks),
               "--master-addr", "127.0.0.1", "--master-port", port, "launch/train.py", "--backend", "fsdp"]
    full_env = {
        **os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": str(REPO), **(env or {}),
    }
    result = subprocess.run(cmd + args, cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, timeout=timeout)
    # DeepSpeed's CPU accelerator leaves a ~70 MB shared-memory buffer per rank unless the
    # trainer removes it (engines.release_cpu_allreduce_buffer).
    left = sorted(p.name for p in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    assert not left, f"shared-memory buffers left behind: {left}"
    return result


def tensors(obj, prefix="") -> dict[str, torch.Tensor]:
    """Every tensor in a nested checkpoint structure, by path."""
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    return {k: v for key, value in items for k, v in tensors(value, f"{prefix}/{key}").items()}


def checkpoint_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder: DeepSpeed's files, the FSDP2 DCP folder, per-rank trainer state."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    found, allowed = {}, deepspeed_safe_globals()
    for f in sorted(folder.rglob("*.pt")):
        found.update(tensors(safe_load(f, allowed), f.relative_to(folder).as_posix()))
    if (folder / "dcp").is_dir():
        merged = folder.parent / f"{folder.name}.merged.pt"
        dcp_to_torch_save(folder / "dcp", merged)
        found.update(tensors(safe_load(merged), "dcp"))
        merged.unlink()
    return found


def assert_same_checkpoint(a: Path, b: Path) -> None:
    ta, tb = checkpoint_tensors(a), checkpoint_tensors(b)
    assert ta.keys() == tb.keys()
    assert len(ta) > 10
    different = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not different, f"tensors differ between {a} and {b}: {different[:10]}"


def refused(argv: list[str], capsys) -> str:
    """Run main in-process; it must exit 2 and print exactly one error line."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1, err
    return err


def run_ok(backend, args, tmp, **kw) -> subprocess.CompletedProcess:
    result = train(backend, args, tmp, **kw)
    assert result.returncode == 0, result.stdout[-5000:]
    return result


def straight_run(backend: str, extra: list[str], tmp: Path) -> tuple[list[str], Path]:
    """6 steps of the tiny model, checkpoints at 3 and 6; returns (its arguments, run dir)."""
    model = write_json(tmp / "model.json", TINY_MODEL)
    args = ["--model", str(model), *SMALL_RUN, "--steps", "6", "--save-every", "3", *extra]
    run_ok(backend, [*args, "--run-dir", str(tmp / "straight")], tmp)
    return args, tmp / "straight"

