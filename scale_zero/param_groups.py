"""Param groups for SCALE, one per role, decided by module type (docs/algorithm.md, "The
update"), and the real shape of a parameter, which an engine may hide."""

from __future__ import annotations

import logging

import torch
from torch import nn

from scale_zero.shard_layout import matrix_shape

logger = logging.getLogger(__name__)


def param_shape(p: torch.Tensor) -> tuple[int, ...]:
    """The parameter's real shape, also under `deepspeed.zero.Init` (where p.ndim == 1)."""
    return tuple(getattr(p, "ds_shape", p.shape))


def normalized_shape(p: torch.Tensor, role: str) -> tuple[int, int]:
    """The `(rows, cols)` matrix a parameter of a normalized role is seen as. A 1-D tensor
    here is an engine's flat partition nobody described to SCALE: refused, naming the fix."""
    shape = param_shape(p)
    if len(shape) < 2:
        raise RuntimeError(
            f"SCALE got a 1-D tensor of {p.numel()} elements in its {role!r} group: a flat "
            "partition it was not bound to (SCALE.bind_flat). For DeepSpeed ZeRO, create the "
            "engine with scale_zero.initialize(...) instead of deepspeed.initialize(...)."
        )
    return matrix_shape(shape)


def _module_weight(module: nn.Module | None) -> torch.Tensor | None:
    return getattr(module, "weight", None) if module is not None else None


def scale_param_groups(
    model: nn.Module, embedding: nn.Module | None = None, output: nn.Module | None = None
) -> list[dict]:
    """Groups with `role` in {embedding, output, matrix, vector} for `SCALE`.

    The input embedding is `model.get_input_embeddings()` (Hugging Face) or `embedding`,
    else the model's only `nn.Embedding`; the output layer is
    `model.get_output_embeddings()` or `output`. Other >=2-D parameters are matrices, 1-D
    ones vectors; shapes come from `ds_shape` under `deepspeed.zero.Init`. A weight tied
    between the embedding and the output layer gets the output role, and this is logged.
    Parameters that do not require grad are left out; empty groups are dropped."""
    if embedding is None and hasattr(model, "get_input_embeddings"):
        embedding = model.get_input_embeddings()
    if embedding is None:
        embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
        embedding = embeddings[0] if len(embeddings) == 1 else None
    if output is None and hasattr(model, "get_output_embeddings"):
        output = model.get_output_embeddings()
    embedding_weight, output_weight = _module_weight(embedding), _module_weight(output)
    if embedding_weight is not None and embedding_weight is output_weight:
        logger.warning(
            "SCALE: the input embedding and the output layer share one weight (tied); it gets "
            "the output role (row RMS + momentum). The paper trains untied embeddings."
        )
        embedding_weight = None

    groups: dict[str, list[torch.Tensor]] = {"embedding": [], "output": [], "matrix": [], "vector": []}
    seen = set()
    for p in model.parameters():  # parameters() yields a shared tensor once
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if p is output_weight:
            role = "output"
        elif p is embedding_weight:
            role = "embedding"
        else:
            role = "matrix" if len(param_shape(p)) >= 2 else "vector"
        groups[role].append(p)
    return [{"params": params, "role": role} for role, params in groups.items() if params]
