"""Bad input to launch/train.py: one message naming the problem and the fix, exit status 2,
before any training, and nothing on disk created or changed.

Checks that need no process group run in-process (`main(argv)` as one rank); those that
need the data (tokenizer vocabulary, data path) under the real launchers on 2 ranks.
Checkpoints from another model or world size: tests/trainer/test_train.py (they need a real one)."""

from __future__ import annotations

import pytest

from tests.support.train_launch import SMALL_RUN, TINY_MODEL, ZERO3, refused, train, write_json


@pytest.fixture
def base(tmp_path):
    model = write_json(tmp_path / "model.json", TINY_MODEL)
    return ["--backend", "fsdp", "--model", str(model), *SMALL_RUN, "--steps", "6", "--run-dir", str(tmp_path / "run")]


def test_missing_deepspeed_config(tmp_path, base, capsys):
    err = refused([*base, "--backend", "deepspeed", "--config", str(tmp_path / "nope.json")], capsys)
    assert "nope.json does not exist" in err and "--config" in err
    assert not (tmp_path / "run").exists()


def test_malformed_deepspeed_config(tmp_path, base, capsys):
    (tmp_path / "bad.json").write_text('{"zero_optimization": {"stage": 3},}')
    err = refused([*base, "--backend", "deepspeed", "--config", str(tmp_path / "bad.json")], capsys)
    assert "is not valid JSON" in err and "line 1" in err
    assert not (tmp_path / "run").exists()


def test_deepspeed_config_optimizer_contradicts_flag(tmp_path, base, capsys):
    config = write_json(tmp_path / "adamw.json", {**ZERO3, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}})
    err = refused([*base, "--backend", "deepspeed", "--config", str(config), "--optimizer", "scale"], capsys)
    assert "defines an optimizer (AdamW)" in err and "--optimizer adamw" in err


def test_unknown_model_size(base, capsys):
    err = refused([*base, "--model", "13b"], capsys)
    assert "unknown model '13b'" in err and "60m" in err


def test_malformed_model_config(tmp_path, base, capsys):
    (tmp_path / "m.json").write_text("[1, 2]")
    err = refused([*base, "--model", str(tmp_path / "m.json")], capsys)
    assert "must hold a JSON object" in err


def test_unknown_optimizer(base, capsys):
    err = refused([*base, "--optimizer", "lion"], capsys)
    assert "invalid choice: 'lion'" in err and "scale" in err


def test_batch_sizes_that_do_not_divide(base, capsys):
    err = refused([*base, "--global-batch-size", "10", "--micro-batch-size", "4"], capsys)
    assert "not divisible" in err and "multiple of 4" in err


def launched_refusal(result, tmp_path) -> str:
    assert result.returncode != 0
    assert result.stdout.count("error:") == 1, result.stdout[-3000:]
    assert 'train.py", line' not in result.stdout  # no traceback from the ranks (torchrun prints its own)
    assert not (tmp_path / "run").exists()
    return result.stdout


def test_tokenizer_vocab_larger_than_model(tmp_path, base):
    small = write_json(tmp_path / "small.json", {**TINY_MODEL, "vocab_size": 100})
    config = write_json(tmp_path / "ds.json", ZERO3)
    args = [*base[2:], "--model", str(small), "--config", str(config)]
    out = launched_refusal(train("deepspeed", args, tmp_path), tmp_path)
    assert "vocab_size" in out and "100" in out


def test_data_path_matching_nothing(tmp_path, base):
    out = launched_refusal(train("fsdp", [*base[2:], "--data", str(tmp_path / "missing/*.txt")], tmp_path), tmp_path)
    assert "missing/*.txt" in out
