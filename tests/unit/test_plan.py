"""The memory planner: exact shapes, against a real ZeRO-3 engine and a real step's peak memory."""

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
from transformers import LlamaConfig

from benchmarks.memory_model import count_engine_states, model_counts
from scale_zero_train import plan
from scale_zero_train.vocab import load_model_config
from tests.support.distributed import run_distributed

# Small enough for 2 shared cores, large enough (about 80 MiB of activations) that the
# process's resident memory measures it to well under 5%.
ACT_MODEL = dict(hidden_size=64, intermediate_size=172, vocab_size=300, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=False)
ACT_BATCH, ACT_SEQ = 32, 256


@pytest.mark.parametrize("size, millions", [("1b", 1339), ("7b", 6738)])
def test_parameter_counts_on_meta(size, millions):
    params = plan.model_params(load_model_config(size))
    assert round(sum(p.numel for p in params) / 1e6) == millions
    roles = {p.role for p in params}
    assert roles == {"embedding", "output", "matrix", "vector"}


def test_states_match_real_engines():
    """Per-rank bytes of parameters, fp32 master, gradients and optimizer state counted on real
    DeepSpeed ZeRO-2 and ZeRO-3 engines and FSDP2 on 2 ranks (benchmarks/memory_model.py),
    and master-free bf16 (SCALE) under ZeRO-3 and FSDP2."""
    for rank, measured in enumerate(run_distributed(count_engine_states, 2)):
        assert {engine for engine, _ in measured} == {"zero2", "zero3", "fsdp2", "zero3-bf16", "fsdp2-bf16"}
        for (engine, optimizer), counts in measured.items():
            expected = model_counts(engine, optimizer, 2)
            for key, value in counts.items():
                assert value == pytest.approx(expected[key], rel=0.01), (rank, engine, optimizer, key)
            if engine.endswith("-bf16"):  # the same state in bf16
                assert 2 * counts["optimizer"] == measured[engine.removesuffix("-bf16"), "scale"]["optimizer"]
            else:  # SCALE's state (output momentum + 1-D AdamW moments) is a small part of AdamW's.
                assert measured[engine, "scale"]["optimizer"] < 0.25 * measured[engine, "adamw"]["optimizer"]


def test_activations_match_real_step_peak():
    """The planner's activation peak (fake tensors) against the resident-memory peak of a real
    bf16 forward + backward on CPU, above the memory held before it. glibc is told to map
    every large block separately and give it back at once, so resident memory follows the
    live tensors instead of the allocator's cache."""
    config = LlamaConfig(**ACT_MODEL)
    predicted = plan.activation_bytes(config, ACT_BATCH, ACT_SEQ, checkpointing=False)
    script = textwrap.dedent(f"""
        import json, torch
        from transformers import LlamaConfig, LlamaForCausalLM
        torch.set_num_threads(1)
        config = LlamaConfig(**{ACT_MODEL!r})
        config._attn_implementation, config.use_cache = "sdpa", False  # as the trainer
        torch.set_default_dtype(torch.bfloat16)
        model = LlamaForCausalLM(config)
        for p in model.parameters():  # as under ZeRO: each gradient leaves when it is ready
            p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
        def step(batch):
            ids = torch.randint(0, config.vocab_size, (batch, {ACT_SEQ}))
            model(input_ids=ids, labels=ids).loss.backward()
        step(1)  # load the kernels
        def status(key):
            return int(open("/proc/self/status").read().split(key + ":")[1].split()[0]) * 1024
        before = status("VmRSS")
        step({ACT_BATCH})
        print(status("VmHWM") - before)
    """)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    measured = int(out.stdout.split()[-1])
    assert measured == pytest.approx(predicted, rel=0.05)


def test_activation_depth_extrapolation_is_exact():
    config = LlamaConfig(**{**ACT_MODEL, "num_hidden_layers": 4})
    for checkpointing in (False, True):
        fixed, per_sequence = plan.activation_line(config, 64, checkpointing)
        assert fixed + 3 * per_sequence == plan.activation_bytes(config, 3, 64, checkpointing)
    full = plan.activation_bytes(config, 3, 64, False)
    assert plan.activation_bytes(config, 3, 64, True) < full


def test_check_fits_refuses_with_the_numbers():
    with pytest.raises(plan.MemoryPlanError) as err:
        plan.check_fits("7b", world_size=8, micro_batch_size=16, seq_len=256, gpu_memory_gib=40, optimizer="adamw",
                        global_batch_size=512)
    message = str(err.value)
    suggested = int(re.search(r"--micro-batch-size (\d+)", message).group(1))
    assert 512 % (suggested * 8) == 0
    assert plan.check_fits("7b", 8, suggested, 256, 40, "adamw").fits
    assert "needs" in message and "per GPU" in message and "the GPU has 40.00 GiB" in message
    for part in ("parameters", "fp32 master", "gradients", "optimizer state", "activations"):
        assert part in message
    assert "--micro-batch-size" in message and "--activation-checkpointing" in message

    fits = plan.check_fits("7b", world_size=8, micro_batch_size=1, seq_len=256, gpu_memory_gib=40, optimizer="scale")
    assert fits.fits and fits.max_micro_batch >= 1


def test_cli_prints_tables_and_exit_status(capsys):
    assert plan.main(["--model", "1b", "--nodes", "2", "--gpus-per-node", "8", "--gpu-memory", "80",
                      "--micro-batch-size", "4", "--optimizer", "scale"]) == 0
    out = capsys.readouterr().out
    for engine in ("zero2", "zero3", "fsdp2"):
        assert engine in out
    assert "1339.1M parameters, 16 ranks" in out
    assert plan.main(["--model", "7b", "--gpus-per-node", "1", "--gpu-memory", "24", "--optimizer", "adamw",
                      "--engine", "zero3"]) == 1
    assert "needs" in capsys.readouterr().err


def test_ds_config_is_read(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"bf16": {"enabled": True}, "zero_optimization": {"stage": 2, "reduce_bucket_size": 1000}}))
    engine = plan.EngineConfig.from_ds_config(path)
    assert (engine.engine, engine.precision, engine.grad_bytes, engine.reduce_bucket_size) == ("zero2", "bf16", 2, 1000)


def test_master_free_bf16_states():
    """configs/zero*_scale_bf16.json: a bf16 master, bf16 gradients and optimizer state;
    FSDP2: bf16 shards and nothing else."""
    configs = os.path.join(os.path.dirname(__file__), "..", "..", "configs")
    params = plan.model_params(load_model_config("60m"))
    n = sum(p.numel for p in params)
    for stage in (3, 2):
        engine = plan.EngineConfig.from_ds_config(os.path.join(configs, f"zero{stage}_scale_bf16.json"))
        fp32 = plan.EngineConfig.from_ds_config(os.path.join(configs, f"zero{stage}_scale.json"))
        assert engine.master_free and not fp32.master_free
        free, masters = plan.model_states(params, 1, engine), plan.model_states(params, 1, fp32)
        assert (free.master, masters.master) == (2 * n, 4 * n)
        assert (free.grads, masters.grads) == (2 * n, 4 * n)
        assert 2 * free.optimizer["scale"] == masters.optimizer["scale"]
    fsdp = plan.model_states(params, 1, plan.EngineConfig(engine="fsdp2", master_weights="bf16"))
    assert (fsdp.params, fsdp.master, fsdp.grads) == (2 * n, 0, 2 * n)
    kwargs = dict(micro_batch_size=8, seq_len=256, gpu_memory_gib=24, activation_checkpointing=True)
    assert plan.fewest_gpus("7b", engine=plan.EngineConfig(master_weights="bf16"), **kwargs) == 2
    assert plan.fewest_gpus("7b", engine=plan.EngineConfig(), **kwargs) == 4
