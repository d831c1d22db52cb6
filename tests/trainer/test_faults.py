"""Fault injection: the trainer never loses a good checkpoint nor silently trains something
else (issue 12, findings 1-8). Pure functions where they prove the point (config validation,
retention, the lock); otherwise the trainer runs in this process as one FSDP2 rank (gloo) on
the tiny model, and under our launcher only where the launcher is the point."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from scale_zero_train import data
from scale_zero_train.checkpoint import acquire_lock, check_loadable, checkpoint_to_resume, file_digests, release_lock, to_prune
from scale_zero_train.config import load_config, parse_args
from scale_zero_train.errors import ConfigError
from scale_zero_train.train import main
from tests.support.distributed import free_port
from tests.support.train_launch import SMALL_RUN, TINY_MODEL, ZERO3, refused, train, write_json

STEP = "step_{:08d}".format


class Planted:
    """A pickle that, if unpickled, creates a marker file (stands in for arbitrary code)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.fixture
def args(tmp_path):
    model = write_json(tmp_path / "model.json", TINY_MODEL)
    return ["--backend", "fsdp", "--no-bf16", "--model", str(model), *SMALL_RUN, "--steps", "6"]


def run_here(argv: list[str], monkeypatch, capsys) -> tuple[int, str]:
    """main() in this process as one FSDP2 rank: (exit status, stdout + stderr)."""
    for name, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(name, value)
    capsys.readouterr()
    try:
        main(argv)
        status = 0
    except SystemExit as e:
        status = e.code
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    out = capsys.readouterr()
    return status, out.out + out.err


def checkpoints(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))


def latest(run_dir: Path) -> str:
    return (run_dir / "checkpoints/latest").read_text().strip()


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 6-step run with checkpoints at 2, 4, 6 (--keep 3); tests copy it."""
    tmp = tmp_path_factory.mktemp("finished")
    model = write_json(tmp / "model.json", TINY_MODEL)
    argv = ["--backend", "fsdp", "--no-bf16", "--model", str(model), *SMALL_RUN, "--steps", "6", "--save-every", "2",
            "--run-dir", str(tmp / "run")]
    with pytest.MonkeyPatch.context() as mp:
        for name, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                            "MASTER_PORT": str(free_port())}.items():
            mp.setenv(name, value)
        main(argv)
    assert checkpoints(tmp / "run") == [STEP(2), STEP(4), STEP(6)]
    return argv[:-2], tmp / "run"


def copy_of(finished, tmp_path) -> tuple[list[str], Path]:
    argv, run_dir = finished
    shutil.copytree(run_dir, tmp_path / "run")
    return [*argv, "--run-dir", str(tmp_path / "run")], tmp_path / "run"


# --------------------------------------------------------------------------- 1. retention


def test_retention_prunes_only_the_own_lineage():
    """A branch from step 3 next to another run's 6 and 8: by step number, keeping 2 deleted the
    save just made (step 5); by lineage, only the branch's own ancestors go."""
    parents = {STEP(3): None, STEP(6): STEP(3), STEP(8): STEP(6), STEP(5): STEP(3)}
    assert to_prune(parents, STEP(5), keep=2) == []
    assert to_prune(parents, STEP(5), keep=1) == [STEP(3)]
    assert to_prune(parents, STEP(8), keep=2) == [STEP(3)]
    assert STEP(5) not in to_prune(parents, STEP(5), keep=0)  # never the newest


def test_rollback_is_refused_then_moves_newer_aside(finished, tmp_path, monkeypatch, capsys):
    argv, run_dir = copy_of(finished, tmp_path)
    branch = [*argv, "--resume", str(run_dir / "checkpoints" / STEP(2)), "--stop-after", "3", "--save-every", "1",
              "--keep", "1"]
    err = refused(branch, capsys)
    assert "holds newer checkpoints" in err and STEP(6) in err and "--move-newer-aside" in err
    status, out = run_here([*branch, "--move-newer-aside"], monkeypatch, capsys)
    assert status == 0, out
    assert f"saved checkpoint {run_dir / 'checkpoints' / STEP(3)}" in out
    assert checkpoints(run_dir) == [STEP(3)] and latest(run_dir) == STEP(3)  # step 2, its parent, pruned
    (moved,) = (run_dir / "checkpoints").glob("moved-*")
    assert sorted(p.name for p in moved.iterdir()) == [STEP(4), STEP(6)]
    assert json.loads((run_dir / "checkpoints" / STEP(3) / "meta.json").read_text())["parent"] == STEP(2)


# --------------------------------------------------------------------------- 2. non-finite values


@pytest.mark.parametrize("flag, value", [("--lr", "nan"), ("--weight-decay", "nan"), ("--adam-lr", "inf")])
def test_non_finite_hyperparameters_are_refused(args, tmp_path, capsys, flag, value):
    err = refused([*args, "--run-dir", str(tmp_path / "run"), flag, value], capsys)
    assert f"{flag} must be a finite number" in err
    assert not (tmp_path / "run").exists()


def test_nan_loss_stops_before_saving_it(args, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    monkeypatch.setenv("SCALE_ZERO_TEST_NAN_AT_STEP", "3")
    status, out = run_here([*args, "--run-dir", str(run_dir), "--save-every", "1", "--keep", "3"], monkeypatch, capsys)
    assert status == 3, out
    assert out.count("error:") == 1 and "step 3 has a non-finite loss" in out and STEP(2) in out
    assert checkpoints(run_dir) == [STEP(1), STEP(2)] and latest(run_dir) == STEP(2)
    losses = [json.loads((run_dir / "checkpoints" / c / "meta.json").read_text())["loss"] for c in checkpoints(run_dir)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert not (run_dir / "lock").exists()


# --------------------------------------------------------------------------- 3. a run's identity


def test_changed_recipe_is_refused(finished, tmp_path, capsys):
    argv, run_dir = copy_of(finished, tmp_path)
    for change, shown in ((["--lr", "5e-3"], "--lr 0.01 (this run: 0.005)"), (["--seed", "1"], "--seed 0"),
                          (["--global-batch-size", "4"], "--global-batch-size 8")):
        err = refused([*argv, *change], capsys)
        assert "another recipe" in err and shown in err and "--run-dir" in err


def test_finished_run_says_so(finished, tmp_path, capsys):
    argv, run_dir = copy_of(finished, tmp_path)
    err = refused(argv, capsys)
    assert "already finished" in err and "step 6 of --steps 6" in err


# --------------------------------------------------------------------------- 4. strict configs


@pytest.mark.parametrize("ds, expected", [
    ({"zero_optimizaton": {"stage": 3}}, "unknown key 'zero_optimizaton'; did you mean 'zero_optimization'?"),
    ({"zero_optimization": {"stag": 3}}, "zero_optimization has an unknown key 'stag'; did you mean 'stage'?"),
    ({**ZERO3, "train_batch_size": "auto"}, 'sets train_batch_size to "auto"'),
    ({"zero_optimization": {"stage": 3, "overlap_comm": "often"}}, "zero_optimization.overlap_comm"),
])
def test_deepspeed_config_is_strict(args, tmp_path, capsys, ds, expected):
    config = write_json(tmp_path / "ds.json", ds)
    err = refused([*args, "--backend", "deepspeed", "--config", str(config), "--run-dir", str(tmp_path / "run")], capsys)
    assert expected in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("change, expected", [
    ({"hidden_sise": 32}, "unknown key 'hidden_sise'; did you mean 'hidden_size'?"),
    ({"num_attention_heads": 3}, "not a multiple of the number of attention heads (3)"),
])
def test_model_config_is_strict(args, tmp_path, capsys, change, expected):
    model = write_json(tmp_path / "bad_model.json", {**TINY_MODEL, **change})
    err = refused([*args, "--model", str(model), "--run-dir", str(tmp_path / "run")], capsys)
    assert expected in err, err
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- 5. code execution


def reseal(checkpoint: Path) -> None:
    """Update meta.json's checksums, as an attacker who can write the folder can."""
    meta = json.loads((checkpoint / "meta.json").read_text())
    (checkpoint / "meta.json").write_text(json.dumps({**meta, "files": file_digests(checkpoint)}))


@pytest.mark.parametrize("file", ["trainer_rank00000.pt", "client_state.pt"])
def test_planted_pickle_in_our_files_never_runs(finished, tmp_path, capsys, file):
    argv, run_dir = copy_of(finished, tmp_path)
    checkpoint, marker = run_dir / "checkpoints" / STEP(4), tmp_path / "pwned"
    torch.save({"step": 4, "payload": Planted(marker)}, checkpoint / file)
    reseal(checkpoint)
    err = refused([*argv, "--resume", str(checkpoint), "--move-newer-aside"], capsys)
    assert f"{file} cannot be loaded safely" in err
    assert not marker.exists()


def test_planted_pickle_in_deepspeed_and_export_files_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    engine = tmp_path / "step/engine"
    engine.mkdir(parents=True)
    torch.save({"module": Planted(marker)}, engine / "zero_pp_rank_0_mp_rank_00_model_states.pt")
    with pytest.raises(ConfigError, match="model_states.pt cannot be loaded safely"):
        check_loadable(tmp_path / "step", "deepspeed")
    export = tmp_path / "export"  # scale_zero.resharding's export of SCALE's ZeRO state
    export.mkdir()
    torch.save({"pieces": [Planted(marker)]}, export / "rank00000.pt")
    from scale_zero.resharding import _load_pieces

    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        _load_pieces(export, {"world_size": 1})
    assert not marker.exists()


# --------------------------------------------------------------------------- 6. one message, not a traceback


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of 8 MiB (root with CAP_SYS_ADMIN only); unmounted after the test."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def test_full_disk_at_save_keeps_the_last_good_checkpoint(args, small_disk, monkeypatch, capsys):
    """Each checkpoint of the tiny model is ~3.3 MiB: the third save fills the 8 MiB disk."""
    run_dir = small_disk / "run"
    status, out = run_here([*args, "--run-dir", str(run_dir), "--save-every", "1", "--keep", "5"], monkeypatch, capsys)
    assert status == 2, out
    assert out.count("error:") == 1 and f"no space left on {run_dir / 'checkpoints'}: about" in out
    assert "Traceback" not in out
    assert checkpoints(run_dir) == [STEP(1), STEP(2)] and latest(run_dir) == STEP(2)
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))  # the partial folder is removed


def test_disk_too_small_or_read_only_is_refused_up_front(args, small_disk, tmp_path, capsys):
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (6 << 20))
    err = refused([*args, "--run-dir", str(small_disk / "run")], capsys)
    assert "no space left on" in err and "MiB needed" in err
    filler.unlink()
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    err = refused([*args, "--run-dir", str(small_disk / "run")], capsys)
    assert f"cannot write to {small_disk}" in err and "--run-dir" in err


@pytest.mark.parametrize("damage", ["trainer_rank00000.pt", "dcp/__0_0.distcp", "meta.json"])
def test_truncated_newest_checkpoint_falls_back(finished, tmp_path, capsys, damage):
    argv, run_dir = copy_of(finished, tmp_path)
    newest = run_dir / "checkpoints" / STEP(6)
    (newest / damage).write_bytes((newest / damage).read_bytes()[:100])
    plan = checkpoint_to_resume(load_config(parse_args(argv), 1))
    assert plan.path == run_dir / "checkpoints" / STEP(4) and plan.move_aside == (newest,)
    assert "falling back to" in plan.warnings[0] and damage.split("/")[-1] in plan.warnings[0]
    err = refused([*argv, "--resume", str(newest)], capsys)
    assert "is damaged" in err


@pytest.mark.parametrize("content, expected", [
    (b"", "is empty"), (b"\x89PNG\r\n\x1a\n\0\0\0", "is binary"), ("caf\xe9 cr\xe8me\n\nmore".encode("latin-1"), "is not UTF-8"),
])
def test_unreadable_text_file_is_one_message(tmp_path, content, expected):
    path = tmp_path / "corpus.txt"
    path.write_bytes(content)
    with pytest.raises(data.DataError, match=expected):
        data.load_documents(str(path), "train")


def test_launcher_exits_2_with_one_line(tmp_path):
    """Plain torchrun exits 1 with a ChildFailedError traceback for any failed rank."""
    model = write_json(tmp_path / "model.json", TINY_MODEL)
    base = ["--model", str(model), *SMALL_RUN, "--steps", "2", "--run-dir", str(tmp_path / "run")]
    before_spawn = train("fsdp", [*base, "--lr", "nan"], tmp_path, ranks=1)
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\0\1\2")
    in_ranks = train("fsdp", [*base, "--data", str(binary)], tmp_path, ranks=1)
    for result, expected in ((before_spawn, "--lr must be a finite number"), (in_ranks, "is binary")):
        assert result.returncode == 2, result.stdout[-3000:]
        assert result.stdout.count("error:") == 1 and expected in result.stdout
        assert "Traceback" not in result.stdout and "ChildFailedError" not in result.stdout
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- 7. the lock


def test_lock_refuses_a_live_holder_and_replaces_a_dead_one(tmp_path):
    acquire_lock(tmp_path)
    with pytest.raises(ConfigError, match=f"in use by another run \\(pid {os.getpid()}"):
        acquire_lock(tmp_path)
    release_lock(tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    holder = json.loads((acquire_lock(tmp_path)).read_text())
    (tmp_path / "lock").write_text(json.dumps({**holder, "pid": dead.pid}))
    assert json.loads(acquire_lock(tmp_path).read_text())["pid"] == os.getpid()


def test_second_run_into_a_locked_run_dir_is_refused(args, tmp_path, monkeypatch, capsys):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        run_dir = tmp_path / "run"
        run_dir.mkdir()
        (run_dir / "lock").write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(), "started": "x"}))
        status, out = run_here([*args, "--run-dir", str(run_dir)], monkeypatch, capsys)
        assert status == 2 and out.count("error:") == 1 and f"in use by another run (pid {holder.pid}" in out
        assert not (run_dir / "checkpoints").exists()
    finally:
        holder.kill()


# --------------------------------------------------------------------------- 8. the data


def test_changed_data_is_refused_unless_allowed(args, tmp_path, monkeypatch, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"document {i}: " + "to be or not to be " * 20 for i in range(40)))
    run = [*args, "--data", str(corpus), "--run-dir", str(tmp_path / "run"), "--eval-tokens", "64"]
    status, out = run_here([*run, "--stop-after", "1"], monkeypatch, capsys)
    assert status == 0, out
    corpus.write_text(corpus.read_text() + "\n\na new document")
    err = refused(run, capsys)
    assert "changed since checkpoint" in err and "--allow-data-change" in err
    status, out = run_here([*run, "--stop-after", "2", "--allow-data-change"], monkeypatch, capsys)
    assert status == 0 and "at step 1" in out, out
