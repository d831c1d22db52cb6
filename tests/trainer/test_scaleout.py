"""Scale-out: the paper presets, and a two-node run emulated on one machine (two `deepspeed`
launchers, node ranks 0 and 1, master 127.0.0.1) against one node with the same ranks."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scale_zero_train.checkpoint import deepspeed_safe_globals, safe_load
from scale_zero_train.config import load_config, parse_args
from scale_zero_train.presets import preset
from tests.support.distributed import free_port

REPO = Path(__file__).resolve().parents[2]
DEEPSPEED = Path(sys.executable).parent / "deepspeed"
# Hidden 32, 2 layers; the vocabulary fits the embedded corpus's tokenizer.
TINY = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
        "num_key_value_heads": 4, "num_hidden_layers": 2, "max_position_embeddings": 64, "vocab_size": 8192,
        "tie_word_embeddings": False}
RUN = ["--steps", "4", "--global-batch-size", "8", "--micro-batch-size", "2", "--seq-len", "32",
       "--eval-tokens", "256", "--log-every", "1", "--eval-every", "2", "--save-every", "2", "--lr", "1e-2",
       "--adam-lr", "1e-3"]


@pytest.mark.parametrize("size, lr, steps", [("1b", 2e-4, 100_000), ("7b", 1e-4, 150_000)])
def test_presets_are_the_paper_recipe_and_overridable(size, lr, steps):
    args = parse_args([], preset(size))
    assert (args.model, args.lr, args.adam_lr, args.steps) == (size, lr, 1e-3, steps)
    assert (args.seq_len, args.global_batch_size, args.warmup_ratio, args.min_lr_ratio) == (256, 512, 0.1, 0.1)
    assert (args.weight_decay, args.momentum) == (0.0, 0.9)
    args = parse_args(["--lr", "3e-4", "--model", "tiny", "--steps", "20"], preset(size))
    assert (args.lr, args.model, args.steps, args.adam_lr) == (3e-4, "tiny", 20, 1e-3)


@pytest.mark.parametrize("world", [1, 8, 64])
def test_global_batch_is_constant_across_rank_counts(world):
    cfg = load_config(parse_args(["--config", "configs/zero3_scale.json", "--micro-batch-size", "8"], preset("7b")), world)
    assert cfg.schedule.global_batch_size == 512
    assert cfg.schedule.micro_batch_size * world * cfg.grad_accum == 512


def _launch(launcher_args: list[str], script: str, run_dir: Path, model: Path, cache: Path) -> subprocess.Popen:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [str(DEEPSPEED), *launcher_args, script, "--config", "configs/zero3_scale.json",
           "--model", str(model), "--run-dir", str(run_dir), "--cache-dir", str(cache), *RUN]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-4000:]
    return out


def _masters(checkpoint: Path) -> dict[int, list[torch.Tensor]]:
    """Each rank's fp32 master partitions in a DeepSpeed ZeRO-3 checkpoint."""
    found = {}
    for path in sorted((checkpoint / "engine").glob("*zero_pp_rank_*_optim_states.pt")):
        rank = int(re.search(r"zero_pp_rank_(\d+)_", path.name).group(1))
        state = safe_load(path, deepspeed_safe_globals())["optimizer_state_dict"]
        found[rank] = state["fp32_flat_groups"]
    return found


def test_two_nodes_emulated_match_one_node(tmp_path):
    """One node runs the 7B preset, the two emulated nodes the 1B one, both with the tiny model:
    every value in which the presets differ is set by RUN, so the runs must agree exactly."""
    model = tmp_path / "tiny.json"
    model.write_text(json.dumps(TINY))
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    one_port, two_port = free_port(), free_port()
    single = _launch(["--num_gpus", "2", "--master_port", str(one_port)], "launch/train_7b.py", tmp_path / "one",
                     model, tmp_path / "c1")
    nodes = [
        _launch(["--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(rank), "--master_addr", "127.0.0.1",
                 "--master_port", str(two_port)], "launch/train_1b.py", tmp_path / "two", model, tmp_path / f"c2{rank}")
        for rank in (0, 1)
    ]
    one_node = _finish(single)
    node0, node1 = (_finish(p) for p in nodes)

    assert "dist_world_size=2" in node1 and "node_rank=1" in node1
    # The global batch and how it is split, stated in the log.
    assert "8 sequences x 32 tokens per step = 2 per rank x 2 ranks x 2 accumulation steps" in node0
    losses = [re.findall(r"validation loss ([\d.]+)", out) for out in (one_node, node0)]
    assert len(losses[0]) == 3 and losses[0] == losses[1]
    assert float(losses[0][-1]) < float(losses[0][0])
    one, two = (_masters(tmp_path / run / "checkpoints" / "step_00000004") for run in ("one", "two"))
    assert sorted(one) == sorted(two) == [0, 1]
    for rank in one:
        for a, b in zip(one[rank], two[rank], strict=True):
            assert torch.equal(a, b)
