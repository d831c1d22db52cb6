"""SCALE under DeepSpeed on the CPU accelerator: the tiny LLaMA, its data, the configurations,
the engine built on the reference's initial weights, and the single-process reference run.
Shared by tests/distributed/test_deepspeed.py and test_deepspeed_client.py; the `build`,
`train`, `full_*` helpers run inside the ranks."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read when deepspeed is imported, here and in the ranks

from tests.support.reference import ReferenceSCALE  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
LR, ADAM_LR, MOMENTUM = 1e-2, 3e-3, 0.9
ACCUMULATION, STEPS, SAVE_AT, COMPARE_AT = 2, 6, 3, 5
VOCAB, SEQ = 97, 17

BASE = {
    "train_micro_batch_size_per_gpu": 2,
    "gradient_accumulation_steps": ACCUMULATION,
    "zero_allow_untested_optimizer": True,
    "zero_force_ds_cpu_optimizer": False,
    "bf16": {"enabled": False},
    "data_types": {"grad_accum_dtype": "fp32"},
    "steps_per_print": 10**6,
}
CLIP = 0.05  # small enough to clip every step here
CASES = {
    "zero0": {"gradient_clipping": CLIP, "zero_optimization": {"stage": 0}},
    "zero1": {"gradient_clipping": CLIP, "zero_optimization": {"stage": 1}},
    "zero2": {"gradient_clipping": 0.0, "zero_optimization": {"stage": 2}},
    "zero2_offload": {"gradient_clipping": CLIP, "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}},
    "zero3": {"gradient_clipping": CLIP, "zero_optimization": {"stage": 3}},
    # sub-groups of <= 400 elements per rank split every role's group into several; no
    # persistent parameters, so every forward gathers
    "zero3_subgroups": {"gradient_clipping": 0.0, "zero_optimization": {
        "stage": 3, "sub_group_size": 400, "stage3_param_persistence_threshold": 0}},
    "zero3_offload": {"gradient_clipping": CLIP, "zero_optimization": {
        "stage": 3, "offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"}}},
    # bf16 + stage 1 + fp32 gradient accumulation: DeepSpeed's BF16_Optimizer
    "bf16_zero1": {"gradient_clipping": CLIP, "bf16": {"enabled": True}, "zero_optimization": {"stage": 1}},
    "bf16_zero3": {"gradient_clipping": 0.0, "bf16": {"enabled": True}, "zero_optimization": {"stage": 3}},
}
FP32 = [name for name in CASES if not name.startswith("bf16")]
ZERO = [name for name in CASES if name != "zero0"]  # partitioned optimizer state


def case_config(name: str) -> dict:
    return {**BASE, **CASES[name]}


def llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB, hidden_size=36, intermediate_size=50, num_hidden_layers=2, num_attention_heads=3,
        num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=False,
    )


def schedule(step: int) -> float:
    return 1.0 - 0.1 * step


def batch(step: int, micro: int, rank: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1000 * step + 10 * micro + rank)
    return torch.randint(0, VOCAB, (2, SEQ), generator=generator)


# ---------------------------------------------------------------- in the ranks


def build(config: dict, plain: bool = False):
    """A fresh engine on the reference's initial weights, and its SCALE: made by
    scale_zero.initialize, or by plain deepspeed.initialize (SCALE binds itself)."""
    import deepspeed
    import torch.distributed as dist
    from transformers import LlamaForCausalLM

    from scale_zero import SCALE, initialize, scale_param_groups

    torch.manual_seed(0)
    initial = LlamaForCausalLM(llama_config()).state_dict()
    stage3 = config["zero_optimization"]["stage"] == 3
    with deepspeed.zero.Init(config_dict_or_path=config, enabled=stage3):
        model = LlamaForCausalLM(llama_config())
    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0, enabled=stage3):
        if not stage3 or dist.get_rank() == 0:
            model.load_state_dict(initial)
    opt = SCALE(scale_param_groups(model), lr=LR, momentum=MOMENTUM, adam_lr=ADAM_LR)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    engine, *_ = (deepspeed.initialize if plain else initialize)(
        model=model, optimizer=opt, lr_scheduler=scheduler, config=config
    )
    return engine, opt


def train(engine, steps) -> None:
    import torch.distributed as dist

    for step in steps:
        for micro in range(ACCUMULATION):
            ids = batch(step, micro, dist.get_rank())
            engine.backward(engine(input_ids=ids, labels=ids).loss)
            engine.step()


def full_fp32(engine) -> dict[str, torch.Tensor]:
    """Every parameter's full fp32 master (a collective under ZeRO-3: all ranks call)."""
    from deepspeed.utils import safe_get_full_fp32_param

    if engine.zero_optimization_stage() == 0:
        return {n: p.detach().float().clone() for n, p in engine.module.named_parameters()}
    return {n: safe_get_full_fp32_param(p).clone() for n, p in engine.module.named_parameters()}


def full_momentum(engine, opt) -> torch.Tensor:
    from deepspeed.utils import safe_get_full_optimizer_state

    weight = engine.module.get_output_embeddings().weight
    if engine.zero_optimization_stage() == 0:
        return opt.state[weight]["momentum_buffer"].clone()
    return safe_get_full_optimizer_state(weight, "momentum_buffer").clone()



@functools.lru_cache(maxsize=None)
def reference(worlds: tuple[int, ...], clip: float):
    """Single-process SCALE on the same data: step t averages the micro-batches of
    `worlds[t]` ranks. Returns (params after each step, output momentum after each step)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: more threads only contend with the ranks
    try:
        return _reference(worlds, clip)
    finally:
        torch.set_num_threads(threads)


def _reference(worlds, clip):
    from transformers import LlamaForCausalLM

    from scale_zero import scale_param_groups

    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config())
    roles = [(p, g["role"]) for g in scale_param_groups(model) for p in g["params"]]
    ref = ReferenceSCALE(roles, lr=LR, momentum=MOMENTUM, adam_lr=ADAM_LR)
    output = model.get_output_embeddings().weight
    params, momenta = [], []
    for step, world in enumerate(worlds):
        model.zero_grad()
        for rank in range(world):
            for micro in range(ACCUMULATION):
                ids = batch(step, micro, rank)
                (model(input_ids=ids, labels=ids).loss / (world * ACCUMULATION)).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        ref.lr = LR * schedule(step)
        ref.step()
        params.append({n: p.detach().clone() for n, p in model.named_parameters()})
        momenta.append(ref.state[output]["m"].clone())
    return params, momenta



def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[n] - b[n]).abs().max().item() for n in a)
