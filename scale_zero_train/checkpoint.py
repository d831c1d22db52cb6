"""Checkpoint folders that a crash can never leave half-written.

    <run_dir>/checkpoints/
        step_00000200/          complete checkpoints, one per saved step
            meta.json           what saved it (model, world size, backend, ...), written last
            engine/ or dcp/     the engine's model + optimizer (+ scheduler) state
            trainer_rank00000.pt  per rank: step, data position, RNG
        latest                  name of the newest complete checkpoint, replaced last
        .tmp-step_00000400/     a save in progress (removed by the next save)

Every rank writes into the `.tmp-` folder; then rank 0 fsyncs it, renames it to its final
name (an atomic rename on one file system) and only then replaces `latest`. A process
killed at any point leaves the previous checkpoint and its `latest` pointer intact.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from scale_zero_train.config import TrainConfig
from scale_zero_train.errors import ConfigError

META = "meta.json"
LATEST = "latest"
PREFIX = "step_"
TMP_PREFIX = ".tmp-"
# Test hook: SIGKILL rank 0 in the middle of the save of this step (files written, not committed).
KILL_DURING_SAVE_ENV = "SCALE_ZERO_TEST_KILL_DURING_SAVE"


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a folder only gets its final name when complete)."""
    found = [d for d in root.glob(f"{PREFIX}*") if (d / META).is_file()] if root.is_dir() else []
    return sorted(found, key=lambda d: int(d.name[len(PREFIX):]))


def find_latest(root: Path) -> Path | None:
    """The checkpoint `latest` names if it is complete, else the newest complete one."""
    pointer = root / LATEST
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if (named / META).is_file():
            return named
    found = complete_checkpoints(root)
    return found[-1] if found else None


def read_meta(path: Path) -> dict:
    meta = Path(path) / META
    if not meta.is_file():
        raise ConfigError(f"{path} is not a complete checkpoint (no {META}); pass a step_* folder under <run-dir>/checkpoints or --resume auto")
    return json.loads(meta.read_text())


def run_meta(cfg: TrainConfig) -> dict:
    """What a checkpoint must match to be resumed by this run."""
    model_config = json.loads(cfg.model_config.to_json_string(use_diff=False))  # as meta.json reads back
    return dict(model_config=model_config, world_size=cfg.world_size, backend=cfg.run.backend,
                optimizer=cfg.optim.optimizer, zero_stage=cfg.zero_stage)


def check_compatible(path: Path, cfg: TrainConfig) -> dict:
    """Refuse a checkpoint this run cannot continue, naming what differs and the fix."""
    saved, ours = read_meta(path), run_meta(cfg)
    fix = "resume it with the settings it was saved with, or start a new run with another --run-dir / --job-name"
    if saved["model_config"] != ours["model_config"]:
        diff = sorted(k for k in set(saved["model_config"]) | set(ours["model_config"])
                      if saved["model_config"].get(k) != ours["model_config"].get(k)
                      and k not in ("transformers_version", "dtype", "torch_dtype"))
        if diff:
            details = ", ".join(f"{k}: {saved['model_config'].get(k)} vs {ours['model_config'].get(k)}" for k in diff[:5])
            raise ConfigError(f"checkpoint {path} is from a different model ({details}, checkpoint vs --model {cfg.model.model}); {fix}")
    if saved["world_size"] != ours["world_size"]:
        raise ConfigError(f"checkpoint {path} was saved by {saved['world_size']} ranks and this run has "
                          f"{ours['world_size']}; its sharded optimizer state needs the same number of ranks: {fix}")
    for key in ("backend", "optimizer", "zero_stage"):
        if saved[key] != ours[key]:
            raise ConfigError(f"checkpoint {path} was saved with {key} {saved[key]} and this run uses {ours[key]}; {fix}")
    return saved


def _fsync_tree(path: Path) -> None:
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def begin_save(root: Path, step: int) -> Path:
    """The temporary folder every rank writes this step's checkpoint into."""
    tmp = root / f"{TMP_PREFIX}{PREFIX}{step:08d}"
    if dist.get_rank() == 0:
        for stale in root.glob(f"{TMP_PREFIX}*"):  # left by a killed save
            shutil.rmtree(stale)
        tmp.mkdir(parents=True)
    dist.barrier()
    return tmp


def commit_save(root: Path, tmp: Path, step: int, meta: dict, keep: int) -> Path:
    """Make the checkpoint in `tmp` complete and the newest; prune to the last `keep`."""
    dist.barrier()  # every rank has written its files
    final = root / f"{PREFIX}{step:08d}"
    if dist.get_rank() == 0:
        if os.environ.get(KILL_DURING_SAVE_ENV) == str(step):
            os.kill(os.getpid(), signal.SIGKILL)
        (tmp / META).write_text(json.dumps({**meta, "step": step}, indent=2))
        _fsync_tree(tmp)
        if final.exists():  # saved before by a run resumed from an older checkpoint
            shutil.rmtree(final)
        os.rename(tmp, final)
        pointer = root / f"{LATEST}.tmp"
        pointer.write_text(final.name + "\n")
        with open(pointer) as f:
            os.fsync(f.fileno())
        os.replace(pointer, root / LATEST)
        _fsync_dir(root)
        for old in complete_checkpoints(root)[:-keep]:
            shutil.rmtree(old)
    dist.barrier()
    return final


def rank_state_path(path: Path, rank: int) -> Path:
    return Path(path) / f"trainer_rank{rank:05d}.pt"


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def checkpoint_to_resume(cfg: TrainConfig) -> Path | None:
    """The checkpoint this run continues from, checked against this run's model and ranks."""
    root = checkpoint_root(cfg.run_dir)
    resume = cfg.run.resume
    if resume == "none":
        if complete_checkpoints(root):
            raise ConfigError(f"{root} already holds checkpoints and --resume is none; use --resume auto to "
                              "continue that run, or another --run-dir / --job-name to start a new one")
        return None
    if resume != "auto" and not Path(resume).is_dir():
        raise ConfigError(f"--resume {resume}: no such checkpoint directory; use auto, none or an existing checkpoint path")
    path = find_latest(root) if resume == "auto" else Path(resume)
    if path is not None:
        check_compatible(path, cfg)
    return path


def load_trainer_state(path: Path, rank: int) -> dict:
    """This rank's step, data position and RNG states saved with checkpoint `path`."""
    return torch.load(rank_state_path(path, rank), weights_only=False)


class Checkpointer:
    """Saves every `save_every` steps and at the invocation's last step (--stop-after or
    --steps): the engine's state, and per rank the step, the data position and the RNG."""

    def __init__(self, cfg: TrainConfig, engine, data_state: Callable[[], dict], rank: int, log: Callable[[str], None],
                 resumed_from: Path | None):
        self.cfg, self.engine, self.data_state, self.rank, self.log = cfg, engine, data_state, rank, log
        self.root = checkpoint_root(cfg.run_dir)
        self.last_step = cfg.run.stop_after or cfg.schedule.steps
        self.latest = resumed_from

    def resume(self, path: Path, trainer_state: dict) -> int:
        """Restore the engine and the RNG from checkpoint `path`; the step to continue from."""
        self.engine.load(path)
        set_rng_state(trainer_state["rng"])
        self.log(f"resumed from {path} at step {trainer_state['step']}")
        return trainer_state["step"]

    def maybe_save(self, step: int) -> None:
        every = self.cfg.run.save_every
        if (every and step % every == 0) or step == self.last_step:
            folder = begin_save(self.root, step)
            self.engine.save(folder, client_state={"step": step})
            torch.save({"step": step, "data": self.data_state(), "rng": rng_state()}, rank_state_path(folder, self.rank))
            meta = {**run_meta(self.cfg), "config": self.cfg.summary()}
            self.latest = commit_save(self.root, folder, step, meta, self.cfg.run.keep)
            self.log(f"saved checkpoint {self.latest}")
