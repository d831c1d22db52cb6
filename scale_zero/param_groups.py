"""Roles for SCALE's parameters, decided by module type (docs/algorithm.md, "The update")
or, where only names are known, by name; param groups one per role; and the real shape
of a parameter, which an engine may hide."""

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


# Where only a parameter's name is known (named_parameters(), the HF Trainer): the module
# names of the input embedding and the output layer in common model families (LLaMA /
# Mistral / Qwen, GPT-2, GPT-NeoX, Meta's LLaMA, BLOOM).
EMBEDDING_MODULES = ("embed_tokens", "wte", "embed_in", "tok_embeddings", "word_embeddings")
OUTPUT_MODULES = ("lm_head", "embed_out")


def role_from_name(name: str | None) -> str | None:
    """`embedding` / `output` for a weight whose module name says so, else None."""
    if name is None:
        return None
    *_, module, leaf = ["", *name.split(".")]
    if leaf != "weight":
        return None
    return "embedding" if module in EMBEDDING_MODULES else "output" if module in OUTPUT_MODULES else None


def module_roles(
    model: nn.Module, embedding: nn.Module | None = None, output: nn.Module | None = None
) -> dict[torch.Tensor, str]:
    """The role of every parameter of `model` that requires grad, by module type.

    The input embedding is `model.get_input_embeddings()` (Hugging Face) or `embedding`,
    else the model's only `nn.Embedding`; the output layer is
    `model.get_output_embeddings()` or `output`. Other >=2-D parameters are matrices, 1-D
    ones vectors; shapes come from `ds_shape` under `deepspeed.zero.Init`. A weight tied
    between the embedding and the output layer gets the output role, and this is logged."""
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

    roles = {}
    for p in model.parameters():  # parameters() yields a shared tensor once
        if not p.requires_grad:
            continue
        if p is output_weight:
            roles[p] = "output"
        elif p is embedding_weight:
            roles[p] = "embedding"
        else:
            roles[p] = "matrix" if len(param_shape(p)) >= 2 else "vector"
    return roles


def scale_param_groups(
    model: nn.Module, embedding: nn.Module | None = None, output: nn.Module | None = None
) -> list[dict]:
    """Groups with `role` in {embedding, output, matrix, vector} for `SCALE`, one per role,
    roles as `module_roles` decides them. Parameters that do not require grad are left
    out; empty groups are dropped."""
    groups: dict[str, list[torch.Tensor]] = {role: [] for role in ("embedding", "output", "matrix", "vector")}
    for p, role in module_roles(model, embedding, output).items():
        groups[role].append(p)
    return [{"params": params, "role": role} for role, params in groups.items() if params]
