"""The model configs (parameter counts of the paper's table, docs/algorithm.md "The paper's
setup", on the meta device), the schedule, and the derived batch arithmetic."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from scale_zero import SCALE
from scale_zero_train.config import ConfigError, load_config, parse_args
from scale_zero_train.optim import build_optimizer, lr_lambda
from scale_zero_train.vocab import load_model_config

# docs/algorithm.md, "The paper's setup": hidden, ffn, heads, layers, max positions, parameters.
TABLE = {
    "60m": (512, 1376, 8, 8, 1024, 58.1e6),
    "130m": (768, 2048, 12, 12, 1024, 134.1e6),
    "350m": (1024, 2736, 16, 24, 1024, 368.0e6),
    "1b": (2048, 5461, 32, 24, 1024, 1339e6),
    "7b": (4096, 11008, 32, 32, 2048, 6738e6),
}


@pytest.mark.parametrize("size", TABLE)
def test_model_configs_match_the_paper(size):
    hidden, ffn, heads, layers, positions, params = TABLE[size]
    config = load_model_config(size)
    assert (config.hidden_size, config.intermediate_size, config.num_attention_heads, config.num_hidden_layers,
            config.max_position_embeddings, config.vocab_size) == (hidden, ffn, heads, layers, positions, 32000)
    assert not config.tie_word_embeddings
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - params) / params < 1e-3, f"{size}: {count / 1e6:.1f}M parameters"


def test_tiny_model_fits_the_embedded_tokenizer():
    config = load_model_config("tiny")
    assert config.vocab_size == 8192 and not config.tie_word_embeddings


def test_schedule_warmup_from_zero_then_cosine_to_floor():
    f = lr_lambda(steps=100, warmup_ratio=0.1, min_lr_ratio=0.1)
    assert [f(s) for s in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    assert f(9) == pytest.approx(1.0)  # the 10th step is the peak
    assert f(54) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert f(99) == pytest.approx(0.1)  # the last step is at the floor
    values = [f(s) for s in range(9, 100)]
    assert values == sorted(values, reverse=True)


def test_gradient_accumulation_is_derived():
    cfg = load_config(parse_args(["--backend", "fsdp", "--global-batch-size", "512", "--micro-batch-size", "16"]), world_size=8)
    assert cfg.grad_accum == 4
    with pytest.raises(ConfigError, match="not divisible by --micro-batch-size 16 x 8"):
        load_config(parse_args(["--backend", "fsdp", "--global-batch-size", "500", "--micro-batch-size", "16"]), world_size=8)


def test_preset_changes_defaults_and_the_command_line_wins():
    args = parse_args(["--lr", "3e-4"], preset={"model": "1b", "lr": 2e-4, "adam_lr": 1e-3})
    assert (args.model, args.lr, args.adam_lr) == ("1b", 3e-4, 1e-3)


@pytest.mark.parametrize("name", ["scale", "colnorm-sgd", "sgd", "row-scale"])
def test_scale_variants(name):
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1,
        tie_word_embeddings=False))
    opt = build_optimizer(name, model, lr=1e-3, adam_lr=1e-2, momentum=0.9, weight_decay=0.0)
    assert isinstance(opt, SCALE)
    assert {g["role"] for g in opt.param_groups} == {"embedding", "output", "matrix", "vector"}
    expected = {"scale": ("output",), "colnorm-sgd": (), "sgd": ("matrix", "embedding", "output"), "row-scale": ()}
    assert opt.momentum_roles == expected[name]
