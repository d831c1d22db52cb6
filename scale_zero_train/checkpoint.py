"""Checkpoint folders that a crash can never leave half-written.

    <run_dir>/checkpoints/
        step_00000200/          complete checkpoints, one per saved step
            meta.json           what saved it (model, world size, backend, ...), written last
            engine/ or dcp/     the engine's model + optimizer (+ scheduler) state
            trainer_rank00000.pt  per rank: step, data position, RNG
        latest                  name of the newest complete checkpoint, replaced last
        .tmp-step_00000400/     a save in progress (removed by the next save)
        moved-<UTC time>/       checkpoints moved aside by --move-newer-aside or a fall-back
    <run_dir>/lock              pid, host and start time of the run using the folder

Every rank writes into the `.tmp-` folder; then rank 0 fsyncs it, renames it to its final
name (an atomic rename on one file system) and only then replaces `latest`. A process
killed at any point leaves the previous checkpoint and its `latest` pointer intact.

meta.json also records the run's recipe, the data fingerprint, the loss of the saved step,
the checkpoint it descends from (`parent`) and the size and SHA-256 of every other file.
Retention follows `parent` links from the newest save: only this run's own older
checkpoints are pruned, never the newest, never one of another lineage.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import random
import re
import shutil
import signal
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from scale_zero_train import plan
from scale_zero_train.config import TrainConfig
from scale_zero_train.data import fingerprint
from scale_zero_train.errors import ConfigError, fail
from scale_zero_train.vocab import PLANNED_STATE

META = "meta.json"
LATEST = "latest"
PREFIX = "step_"
TMP_PREFIX = ".tmp-"
MOVED_PREFIX = "moved-"
LOCK = "lock"
# The recipe: what makes two invocations one run. A checkpoint resumes only under the same one
# (changing lr or the schedule mid-run is not supported: the saved scheduler and moments encode them).
RECIPE = ("lr", "adam_lr", "momentum", "weight_decay", "grad_clip", "global_batch_size", "seq_len", "steps",
          "warmup_ratio", "min_lr_ratio", "seed", "data", "tokenizer", "bf16")
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
    try:
        return json.loads(meta.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{meta} is corrupt ({e}); resume from another checkpoint") from None


def step_of(path: Path) -> int:
    return int(Path(path).name[len(PREFIX):])


def file_digests(folder: Path) -> dict[str, list]:
    """[size, SHA-256] of every file under `folder` but meta.json, by relative path."""
    found = {}
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.name != META):
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
        found[path.relative_to(folder).as_posix()] = [path.stat().st_size, digest.hexdigest()]
    return found


def verify(path: Path) -> str | None:
    """Why checkpoint `path` is not intact (a file missing, truncated or changed), or None."""
    try:
        meta = read_meta(path)
    except ConfigError as e:
        return str(e)
    saved = meta.get("files")
    if saved is None:
        return f"{path}/{META} records no checksums"
    for name, (size, digest) in saved.items():
        file = Path(path) / name
        if not file.is_file():
            return f"{file} is missing"
        if file.stat().st_size != size:
            return f"{file} has {file.stat().st_size} bytes, {size} were saved (truncated?)"
    found = file_digests(path)
    changed = [name for name in saved if found[name][1] != saved[name][1]]
    return f"{Path(path) / changed[0]} does not match its checksum" if changed else None


def run_meta(cfg: TrainConfig) -> dict:
    """What a checkpoint must match to be resumed by this run."""
    model_config = json.loads(cfg.model_config.to_json_string(use_diff=False))  # as meta.json reads back
    summary = cfg.summary()
    return dict(model_config=model_config, world_size=cfg.world_size, backend=cfg.run.backend,
                optimizer=cfg.optim.optimizer, zero_stage=cfg.zero_stage,
                recipe={k: summary[k] for k in RECIPE}, data_fingerprint=fingerprint(cfg.data.data))


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
    recipe = saved.get("recipe", {})
    diff = [k for k in RECIPE if recipe.get(k) != ours["recipe"][k]]
    if diff:
        details = ", ".join(f"--{k.replace('_', '-')} {recipe.get(k)} (this run: {ours['recipe'][k]})" for k in diff)
        raise ConfigError(f"checkpoint {path} is another recipe: it was trained with {details}; a run continues "
                          f"only with its own recipe (lr, schedule, batch, data, seed): {fix}")
    if saved.get("data_fingerprint") != ours["data_fingerprint"] and not cfg.run.allow_data_change:
        raise ConfigError(f"the data files of --data {cfg.data.data} changed since checkpoint {path} was saved "
                          "(size or content); restore them, or pass --allow-data-change to resume on the new files "
                          "(the held-out split and the data position then refer to them)")
    if cfg.run.stop_after is not None and cfg.run.stop_after <= saved["step"]:
        raise ConfigError(f"--stop-after {cfg.run.stop_after} is not after checkpoint {path}'s step {saved['step']}; "
                          "nothing to train: raise --stop-after or drop it")
    if saved["step"] >= cfg.schedule.steps:
        raise ConfigError(f"the run in {cfg.run_dir} already finished: checkpoint {path} is at step {saved['step']} "
                          f"of --steps {cfg.schedule.steps}; nothing to train. Start a new run with another "
                          "--run-dir / --job-name")
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


def lineage(parents: dict[str, str | None], newest: str) -> list[str]:
    """`newest` and the checkpoints it descends from in this folder, newest first
    (`parents`: each checkpoint's name -> its parent's name, from meta.json)."""
    chain = [newest]
    while parents.get(chain[-1]) in parents and parents[chain[-1]] not in chain:
        chain.append(parents[chain[-1]])
    return chain


def to_prune(parents: dict[str, str | None], newest: str, keep: int) -> list[str]:
    """What retention deletes after saving `newest`: its own ancestors beyond the last `keep`.
    Never `newest` (the save just made, which `latest` names), never another lineage."""
    return lineage(parents, newest)[max(1, keep):]


def move_aside(root: Path, folders: list[Path]) -> Path:
    """Move checkpoint folders into root/moved-<UTC time>/ (nothing is deleted); that folder."""
    target = root / f"{MOVED_PREFIX}{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    target.mkdir(exist_ok=True)
    for folder in folders:
        os.rename(folder, target / folder.name)
    return target


def commit_save(root: Path, tmp: Path, step: int, meta: dict, keep: int) -> Path:
    """Make the checkpoint in `tmp` complete and the newest; prune its lineage to the last `keep`."""
    dist.barrier()  # every rank has written its files
    final = root / f"{PREFIX}{step:08d}"
    if dist.get_rank() == 0:
        if os.environ.get(KILL_DURING_SAVE_ENV) == str(step):
            os.kill(os.getpid(), signal.SIGKILL)
        (tmp / META).write_text(json.dumps({**meta, "step": step, "files": file_digests(tmp)}, indent=2))
        _fsync_tree(tmp)
        if final.exists():  # another lineage's save of this step (checkpoint_to_resume refuses that): keep it
            move_aside(root, [final])
        os.rename(tmp, final)
        pointer = root / f"{LATEST}.tmp"
        pointer.write_text(final.name + "\n")
        with open(pointer) as f:
            os.fsync(f.fileno())
        os.replace(pointer, root / LATEST)
        _fsync_dir(root)
        parents = {c.name: read_meta(c).get("parent") for c in complete_checkpoints(root)}
        for old in to_prune(parents, final.name, keep):
            shutil.rmtree(root / old)
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


@dataclass(frozen=True)
class ResumePlan:
    """Where this run starts: the checkpoint (None: from scratch), and the checkpoints of the
    run dir that rank 0 moves aside first (newer than it, or corrupt); warnings to print."""

    path: Path | None
    move_aside: tuple[Path, ...] = ()
    warnings: tuple[str, ...] = field(default_factory=tuple)


def checkpoint_to_resume(cfg: TrainConfig) -> ResumePlan:
    """The checkpoint this run continues from, checked against this run's whole recipe; reads only."""
    root = checkpoint_root(cfg.run_dir)
    resume, found = cfg.run.resume, complete_checkpoints(root)
    if resume == "none":
        if found:
            raise ConfigError(f"{root} already holds checkpoints and --resume is none; use --resume auto to "
                              "continue that run, or another --run-dir / --job-name to start a new one")
        return ResumePlan(None)
    warnings, corrupt = [], []
    if resume == "auto":
        path = find_latest(root)
        # A damaged newest checkpoint: fall back to the newest intact one, moving the damaged ones aside.
        while path is not None and (problem := verify(path)) is not None:
            corrupt.append(path)
            older = [c for c in found if step_of(c) < step_of(path)]
            path = older[-1] if older else None
            warnings.append(f"warning: {problem}; falling back to {path or 'a fresh start'} "
                            f"(moving {corrupt[-1].name} into {root}/{MOVED_PREFIX}<time>/)")
    else:
        path = Path(resume)
        if not path.is_dir():
            raise ConfigError(f"--resume {resume}: no such checkpoint directory; use auto, none or an existing checkpoint path")
        problem = verify(path)
        if problem:
            raise ConfigError(f"checkpoint {path} is damaged: {problem}; resume from another checkpoint")
    if path is None:
        return ResumePlan(None, tuple(corrupt), tuple(warnings))
    check_compatible(path, cfg)
    check_loadable(path, cfg.run.backend)
    newer = [c for c in found if step_of(c) > step_of(path) and c not in corrupt]
    if newer and not cfg.run.move_newer_aside:
        raise ConfigError(f"resuming from {path} (step {step_of(path)}) but {root} holds newer checkpoints "
                          f"({', '.join(c.name for c in newer)}) that this run would overwrite or prune; pass "
                          f"--move-newer-aside to move them into {root}/{MOVED_PREFIX}<time>/ and continue from "
                          f"step {step_of(path)}, or resume into a new --run-dir")
    return ResumePlan(path, tuple(corrupt + newer), tuple(warnings))


# --------------------------------------------------------------------------- the run dir


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_lock_reason(holder: dict, host: str) -> str | None:
    """Why a lock left in a run dir no longer holds (its process is gone), or None while it may."""
    if holder.get("host") == host and not _process_alive(int(holder.get("pid", -1))):
        return f"pid {holder.get('pid')} on {host} is no longer running"
    return None


def acquire_lock(run_dir: Path) -> Path:
    """Take <run_dir>/lock (O_EXCL) for this process: refused while another live run holds it;
    a lock of a dead process on this host is replaced."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lock, host = run_dir / LOCK, socket.gethostname()
    mine = json.dumps({"pid": os.getpid(), "host": host, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(lock.read_text() or "{}")
            except (OSError, json.JSONDecodeError):
                holder = {}
            reason = stale_lock_reason(holder, host)
            if reason is None:
                raise ConfigError(f"{run_dir} is in use by another run (pid {holder.get('pid')} on "
                                  f"{holder.get('host')}, started {holder.get('started')}); wait for it to end, use "
                                  f"another --run-dir, or if that run is gone delete {lock}") from None
            lock.unlink(missing_ok=True)  # stale: its process is gone
            continue
        with os.fdopen(fd, "w") as f:
            f.write(mine)
        return lock
    raise ConfigError(f"cannot take the lock {lock}: another run keeps replacing it; use another --run-dir")


def release_lock(run_dir: Path) -> None:
    lock = run_dir / LOCK
    if lock.is_file() and json.loads(lock.read_text() or "{}").get("pid") == os.getpid():
        lock.unlink()


def checkpoint_bytes(cfg: TrainConfig) -> int:
    """About how large one checkpoint is: fp32 weights, the optimizer's state as the memory
    planner counts it, and under DeepSpeed its fp32 master copy besides the module's weights."""
    params = plan.model_params(cfg.model_config)
    total = sum(p.numel for p in params)
    numel = {role: sum(p.numel for p in params if p.role == role) for role in ("output", "vector")}
    optimizer = plan._optimizer_bytes(numel["output"], numel["vector"], total)[PLANNED_STATE[cfg.optim.optimizer]]
    return 4 * total * (2 if cfg.run.backend == "deepspeed" else 1) + optimizer


def _existing_ancestor(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return path


def check_run_dir(cfg: TrainConfig) -> None:
    """Before step 1: the run dir can be written (probed with a file, removed at once, since
    permission bits do not tell for root or read-only mounts) and has room for a checkpoint."""
    where = _existing_ancestor(checkpoint_root(cfg.run_dir))
    probe = where / f".write-probe-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"cannot write to {where} ({e.strerror}); checkpoints go to {checkpoint_root(cfg.run_dir)}: "
                          "choose a writable --run-dir") from None
    needed, free = checkpoint_bytes(cfg), shutil.disk_usage(where).free
    if free < needed:
        raise ConfigError(f"no space left on {where} for a checkpoint: about {_size(needed)} needed, "
                          f"{_size(free)} free; free space or choose another --run-dir")


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _disk_full(error: BaseException, root: Path, needed: int) -> bool:
    """torch.save reports a full disk as a RuntimeError from its iostream, DCP wraps it, so
    besides ENOSPC anywhere in the chain, a disk with less room than a checkpoint counts."""
    while error is not None:
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return True
        error = error.__cause__ or error.__context__
    return shutil.disk_usage(_existing_ancestor(root)).free < needed


def save_failure(error: BaseException, root: Path, needed: int) -> str:
    """One message for a save that failed."""
    if _disk_full(error, root, needed):
        return (f"no space left on {root}: about {_size(needed)} needed for a checkpoint; the last good "
                "checkpoint is kept: free space and resume with --resume auto")
    reason = " ".join(str(error).split())[:300]
    return (f"saving a checkpoint into {root} failed ({type(error).__name__}: {reason}); the last good checkpoint "
            "is kept: fix the cause and resume with --resume auto")


def deepspeed_safe_globals() -> list:
    """The non-container types DeepSpeed pickles into its optimizer files (their attributes
    still pass the weights-only unpickler)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    return [ZeroStageEnum, LossScaler, DynamicLossScaler]


def safe_load(path: Path, safe_globals: list = ()):
    """torch.load without unpickling anything but tensors, plain containers and `safe_globals`."""
    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            return torch.load(path, weights_only=True, map_location="cpu", mmap=True)
    except Exception as e:  # UnpicklingError for a planted object, RuntimeError for a truncated file, ...
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        reason = f"it names {found.group(1)}" if found else " ".join(str(e).split())[:300]
        raise ConfigError(f"{path} cannot be loaded safely ({type(e).__name__}: {reason}); it is corrupt or holds "
                          "objects other than tensors and plain data: resume from another checkpoint") from None


# What DCP's .metadata (a plain pickle, which torch's weights-only unpickler cannot read) may name.
DCP_METADATA_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "MetadataIndex", "StorageMeta", "TensorProperties",
                                              "TensorStorageMetadata", "BytesStorageMetadata",
                                              "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath"},
    "collections": {"OrderedDict"},
}


class _DCPMetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if name in DCP_METADATA_GLOBALS.get(module, ()) or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in DCP metadata")


def check_dcp_metadata(path: Path) -> None:
    """DCP unpickles .metadata in full: read it first with only DCP's own metadata types allowed."""
    try:
        with open(path, "rb") as f:
            _DCPMetadataUnpickler(f).load()
    except Exception as e:
        raise ConfigError(f"{path} cannot be loaded safely ({type(e).__name__}: {e}); it is corrupt or holds "
                          "objects other than DCP's metadata: resume from another checkpoint") from None


def check_loadable(path: Path, backend: str) -> None:
    """Every torch file of checkpoint `path` passes torch's weights-only unpickler (DeepSpeed's
    with its ZeroStageEnum allowed) before DeepSpeed loads them its own (unrestricted) way."""
    safe_globals = deepspeed_safe_globals() if backend == "deepspeed" else []
    for file in sorted(Path(path).rglob("*.pt")):
        safe_load(file, safe_globals)
    metadata = Path(path) / "dcp" / ".metadata"
    if metadata.is_file():
        check_dcp_metadata(metadata)


def load_trainer_state(path: Path, rank: int) -> dict:
    """This rank's step, data position and RNG states saved with checkpoint `path`."""
    return safe_load(rank_state_path(path, rank))


class Checkpointer:
    """Saves every `save_every` steps and at the invocation's last step (--stop-after or
    --steps): the engine's state, and per rank the step, the data position and the RNG."""

    def __init__(self, cfg: TrainConfig, engine, data_state: Callable[[], dict], rank: int, log: Callable[[str], None],
                 resumed_from: Path | None):
        self.cfg, self.engine, self.data_state, self.rank, self.log = cfg, engine, data_state, rank, log
        self.root = checkpoint_root(cfg.run_dir)
        self.last_step = cfg.run.stop_after or cfg.schedule.steps
        self.latest = resumed_from
        self.needed = checkpoint_bytes(cfg)

    def resume(self, path: Path, trainer_state: dict) -> int:
        """Restore the engine and the RNG from checkpoint `path`; the step to continue from."""
        self.engine.load(path)
        set_rng_state(trainer_state["rng"])
        self.log(f"resumed from {path} at step {trainer_state['step']}")
        return trainer_state["step"]

    def maybe_save(self, step: int, loss: float) -> None:
        every = self.cfg.run.save_every
        if (every and step % every == 0) or step == self.last_step:
            self.save(step, loss)

    def save(self, step: int, loss: float) -> None:
        """A checkpoint of `step` (whose all-reduced training loss is `loss`), or one message
        and exit status 2 on every rank if the disk refuses it; the last good one stays."""
        parent = None if self.latest is None else (self.latest.name if self.latest.parent == self.root
                                                   else str(self.latest))
        meta = {**run_meta(self.cfg), "config": self.cfg.summary(), "loss": loss, "parent": parent}
        folder = self.root / f"{TMP_PREFIX}{PREFIX}{step:08d}"
        error = None
        try:
            folder = begin_save(self.root, step)
            self.engine.save(folder, client_state={"step": step})
            torch.save({"step": step, "data": self.data_state(), "rng": rng_state()}, rank_state_path(folder, self.rank))
        except (Exception, CheckpointException) as e:  # DCP raises CheckpointException, a BaseException
            error = save_failure(e, self.root, self.needed)
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
        if any(errors):
            if self.rank == 0:
                shutil.rmtree(folder, ignore_errors=True)
            fail(next(e for e in errors if e))
        self.latest = commit_save(self.root, folder, step, meta, self.cfg.run.keep)
        self.log(f"saved checkpoint {self.latest}")
