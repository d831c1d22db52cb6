"""launch/train.py end to end under the real launchers (2 CPU ranks): resume exactness,
a save killed half-way, the TensorBoard scalars, checkpoints this run cannot continue."""

from __future__ import annotations

import json

import pytest

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.support.train_launch import (
    TINY_MODEL, ZERO3, assert_same_checkpoint, refused, run_ok, straight_run, train, write_json,
)


@pytest.fixture(scope="module")
def fsdp_straight(tmp_path_factory):
    """One FSDP2 + SCALE run that the tests below compare with or resume from."""
    return straight_run("fsdp", ["--no-bf16", "--optimizer", "scale", "--activation-checkpointing"],
                        tmp_path_factory.mktemp("fsdp"))

SCALARS = {
    "train/loss", "train/ppl", "train/lr", "train/grad_norm", "val/loss", "val/ppl", "perf/tokens_per_s",
    "perf/step_time_s", "perf/mfu", "memory/peak_bytes", "memory/optimizer_state_bytes",
}
SCALE_SCALARS = {"comm/scale_collectives", "comm/scale_bytes"}


def final_checkpoint(run_dir):
    return run_dir / "checkpoints/step_00000006"


def test_deepspeed_zero3_resume_is_bitwise_exact(tmp_path):
    """6 steps in one go == 3 steps + a fresh process resuming for 3 more, every tensor."""
    # The config's activation_checkpointing section switches recomputation on.
    config = write_json(tmp_path / "ds.json", {**ZERO3, "activation_checkpointing": {}})
    args, straight = straight_run("deepspeed", ["--config", str(config), "--optimizer", "scale"], tmp_path)
    split = ["--run-dir", str(tmp_path / "split")]
    first = run_ok("deepspeed", [*args, *split, "--stop-after", "3"], tmp_path)
    second = run_ok("deepspeed", [*args, *split], tmp_path)
    assert "resumed from" not in first.stdout and "step_00000003 at step 3" in second.stdout
    assert '"activation_checkpointing": true' in first.stdout
    assert_same_checkpoint(final_checkpoint(straight), final_checkpoint(tmp_path / "split"))


def scalars(run_dir) -> EventAccumulator:
    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    return events


def assert_every_scalar(run_dir, collectives: int):
    events = scalars(run_dir)
    tags = set(events.Tags()["scalars"])
    assert SCALARS | SCALE_SCALARS <= tags, f"missing: {(SCALARS | SCALE_SCALARS) - tags}"
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]
    assert [e.step for e in events.Scalars("val/ppl")] == [0, 3, 6]
    assert events.Scalars("comm/scale_collectives")[-1].value == collectives
    assert events.Scalars("memory/optimizer_state_bytes")[-1].value > 0
    assert events.Scalars("val/loss")[-1].value < events.Scalars("val/loss")[0].value


def test_deepspeed_scale_tensorboard_has_every_scalar(tmp_path):
    config = write_json(tmp_path / "ds.json", ZERO3)
    _, run_dir = straight_run("deepspeed", ["--config", str(config), "--optimizer", "scale"], tmp_path)
    # ZeRO-3 steps each role group separately; on 2 ranks the tiny model's matrices and output
    # layer split between whole rows, so only the embedding's column sums need an all_reduce
    assert_every_scalar(run_dir, collectives=1)


def test_fsdp_tensorboard_has_every_scalar(fsdp_straight):
    assert_every_scalar(fsdp_straight[1], collectives=1)  # the embedding's column sums, one batched all_reduce


def test_fsdp_killed_save_then_resume_is_bitwise_exact(tmp_path, fsdp_straight):
    """Rank 0 is SIGKILLed in the save of step 6 (every rank's files written, not committed):
    step 3 stays the newest complete checkpoint, --resume auto picks it, and 3 + resume + 3
    steps end bitwise where 6 uninterrupted steps do."""
    args, straight = fsdp_straight
    args = [*args, "--run-dir", str(tmp_path / "run")]
    killed = train("fsdp", args, tmp_path, env={"SCALE_ZERO_TEST_KILL_DURING_SAVE": "6"})
    assert killed.returncode != 0
    checkpoints = tmp_path / "run/checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step_00000003"
    assert sorted(p.name for p in checkpoints.iterdir()) == [".tmp-step_00000006", "latest", "step_00000003"]
    assert json.loads((checkpoints / "step_00000003/meta.json").read_text())["step"] == 3

    resumed = run_ok("fsdp", args, tmp_path)
    assert "step_00000003 at step 3" in resumed.stdout
    assert not (checkpoints / ".tmp-step_00000006").exists()
    assert_same_checkpoint(final_checkpoint(straight), final_checkpoint(tmp_path / "run"))


def snapshot(folder) -> dict:
    return {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(folder.rglob("*"))}


def test_checkpoint_from_another_model(tmp_path, fsdp_straight, capsys):
    args, run_dir = fsdp_straight
    before = snapshot(run_dir)
    other = write_json(tmp_path / "other.json", {**TINY_MODEL, "hidden_size": 64})
    err = refused([*args, "--backend", "fsdp", "--run-dir", str(run_dir), "--model", str(other)], capsys)
    assert "is from a different model (" in err and "hidden_size: 32 vs 64" in err and "--run-dir" in err
    assert snapshot(run_dir) == before


def test_checkpoint_from_another_world_size(fsdp_straight, capsys):
    args, run_dir = fsdp_straight  # saved by 2 ranks; main() here is 1 rank
    before = snapshot(run_dir)
    err = refused([*args, "--backend", "fsdp", "--run-dir", str(run_dir), "--resume", str(run_dir / "checkpoints/step_00000003")], capsys)
    assert "saved by 2 ranks and this run has 1" in err
    assert snapshot(run_dir) == before


def test_fresh_start_over_existing_checkpoints(fsdp_straight, capsys):
    args, run_dir = fsdp_straight
    before = snapshot(run_dir)
    err = refused([*args, "--backend", "fsdp", "--run-dir", str(run_dir), "--resume", "none"], capsys)
    assert "already holds checkpoints" in err and "--resume auto" in err
    assert snapshot(run_dir) == before
