"""Resume SCALE under DeepSpeed ZeRO on a different number of ranks.

`engine.save_checkpoint` / `load_checkpoint` restore SCALE bitwise, but only on the same
world size and sub-group layout (each rank's file holds its flat partitions), and
DeepSpeed's universal-checkpoint converter knows only Adam's state. So:

- `export_state(engine, path)`: every rank writes only what it owns, per parameter:
  (name, shape, range [start, end) of its row-major flattening) with the fp32 master
  values and each per-element SCALE state of that range (output momentum, vector AdamW
  moments), plus the per-partition scalars (the AdamW step). Rank 0 adds the optimizer
  hyperparameters (lr as scheduled), the engine's step counters, the lr scheduler and
  your `client_state`. Written into `<path>.tmp` and renamed into place when complete.
- `import_state(engine, path)`: a freshly initialized engine of any world size, ZeRO
  stage or sub-group size reads, for each range it now owns, the overlapping saved
  pieces, then refreshes the low-precision model weights from the fp32 masters.

The directory holds `meta.pt` and `rank00000.pt`, ... (torch.save; loaded with mmap, so a
rank reads only the bytes of the ranges it needs). It must be on a filesystem every rank
sees.
"""

from __future__ import annotations

import os
import shutil
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist

from scale_zero.deepspeed_zero import FlatPartition, refresh_low_precision_params, zero_partitions

FORMAT = "scale_zero.resharding/1"
ENGINE_COUNTERS = ("global_steps", "global_samples", "skipped_steps")


def _partitions(engine) -> list[FlatPartition]:
    partitions = zero_partitions(engine)
    if not partitions:
        raise ValueError(
            "export_state/import_state need a ZeRO stage 1, 2 or 3 engine with a SCALE optimizer; "
            "without ZeRO the optimizer state is not partitioned: use engine.save_checkpoint/load_checkpoint"
        )
    return partitions


def _save(obj, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _split_state(part: FlatPartition, state: dict) -> tuple[dict, dict]:
    """SCALE's state of one flat: per-element buffers (flat-sized) and scalars (step)."""
    per_element, scalars = {}, {}
    for key, value in state.items():
        if torch.is_tensor(value) and value.dim() > 0:
            if value.shape != part.flat.shape:
                raise ValueError(f"SCALE state {key!r} has shape {tuple(value.shape)}, not its partition's")
            per_element[key] = value
        else:
            scalars[key] = value.item() if torch.is_tensor(value) else value
    return per_element, scalars


def export_state(engine, path: str | os.PathLike, client_state: dict | None = None) -> None:
    """Write SCALE's fp32 master weights and optimizer state per parameter range (all ranks
    call it). `path` must not exist yet: an earlier export is never overwritten."""
    partitions = _partitions(engine)
    scale = engine.basic_optimizer
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if path.exists():
        raise FileExistsError(f"{path} exists; export into a new directory (an export is never overwritten)")
    rank = dist.get_rank()
    if rank == 0:  # a leftover of a crashed export is incomplete by construction
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()

    pieces = []
    for part in partitions:
        per_element, scalars = _split_state(part, scale.state.get(part.flat, {}))
        for piece in part.pieces:
            if piece.numel == 0:
                continue
            span = slice(piece.offset, piece.offset + piece.numel)
            pieces.append({
                "name": piece.name, "shape": piece.shape, "start": piece.start, "end": piece.end,
                "role": part.role, "scalars": scalars,
                "fp32": part.flat.detach()[span].float().cpu().clone(),
                "state": {key: value.detach()[span].cpu().clone() for key, value in per_element.items()},
            })
    _save({"format": FORMAT, "pieces": pieces}, tmp / f"rank{rank:05d}.pt")
    dist.barrier()

    if rank == 0:
        scheduler = engine.lr_scheduler
        _save({
            "format": FORMAT,
            "world_size": dist.get_world_size(),
            "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in scale.param_groups],
            "engine": {name: getattr(engine, name) for name in ENGINE_COUNTERS},
            "lr_scheduler": scheduler.state_dict() if hasattr(scheduler, "state_dict") else None,
            "client_state": client_state,
        }, tmp / "meta.pt")
        tmp.rename(path)
    dist.barrier()


def _load_pieces(path: Path, meta: dict) -> dict[str, list[dict]]:
    files = sorted(path.glob("rank*.pt"))
    if len(files) != meta["world_size"]:
        raise ValueError(f"{path} has {len(files)} rank files, its meta.pt says {meta['world_size']}: incomplete export")
    by_name = defaultdict(list)
    for file in files:
        for piece in torch.load(file, mmap=True, weights_only=True)["pieces"]:
            by_name[piece["name"]].append(piece)
    return by_name


def import_state(engine, path: str | os.PathLike) -> dict | None:
    """Load an `export_state` directory into a freshly initialized engine, whatever its world
    size (all ranks call it). Returns the exported `client_state`."""
    partitions = _partitions(engine)
    scale = engine.basic_optimizer
    path = Path(path)
    if not (path / "meta.pt").is_file():
        raise FileNotFoundError(f"{path} is not a complete scale_zero export (no meta.pt)")
    meta = torch.load(path / "meta.pt", weights_only=True)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: unknown format {meta.get('format')!r}, expected {FORMAT!r}")
    roles = [g["role"] for g in scale.param_groups]
    if [g["role"] for g in meta["param_groups"]] != roles:
        raise ValueError(f"{path} was exported with param groups {[g['role'] for g in meta['param_groups']]}, "
                         f"this optimizer has {roles}")
    saved = _load_pieces(path, meta)

    for part in partitions:
        state = scale.state[part.flat]
        scalars = {}
        for piece in part.pieces:
            if piece.numel == 0:
                continue
            covered = 0
            for old in saved.get(piece.name, []):
                if tuple(old["shape"]) != piece.shape:
                    raise ValueError(f"{piece.name}: exported with shape {tuple(old['shape'])}, the model has {piece.shape}")
                lo, hi = max(piece.start, old["start"]), min(piece.end, old["end"])
                if lo >= hi:
                    continue
                dst = slice(piece.offset + lo - piece.start, piece.offset + hi - piece.start)
                src = slice(lo - old["start"], hi - old["start"])
                part.flat.data[dst] = old["fp32"][src]
                for key, values in old["state"].items():
                    if key not in state:
                        state[key] = torch.zeros_like(part.flat, dtype=torch.float32)
                    state[key][dst] = values[src]
                for key, value in old["scalars"].items():
                    if scalars.setdefault(key, value) != value:
                        raise ValueError(f"{path}: pieces of one partition disagree on {key!r}")
                covered += hi - lo
            if covered != piece.numel:
                raise ValueError(f"{path} holds {covered} of the {piece.numel} elements [{piece.start}, {piece.end}) "
                                 f"of {piece.name} this rank needs: not an export of this model")
        state.update(scalars)

    for group, hyper in zip(scale.param_groups, meta["param_groups"]):
        group.update(hyper)
    for name, value in meta["engine"].items():
        setattr(engine, name, value)
    if meta["lr_scheduler"] is not None and engine.lr_scheduler is not None:
        engine.lr_scheduler.load_state_dict(meta["lr_scheduler"])
    refresh_low_precision_params(engine)
    return meta["client_state"]
