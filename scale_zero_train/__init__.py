"""The training application around the `scale_zero` optimizer library: the loop
(`scale_zero_train.train`), its config, data, engines (DeepSpeed ZeRO, FSDP2), checkpoints,
metrics, the paper's presets and the memory planner. `scale_zero` never imports this package.

    deepspeed --module scale_zero_train --config configs/zero3_scale.json --model 1b
    python -m scale_zero_train.launch --nproc-per-node 8 -m scale_zero_train --backend fsdp --model 1b
"""
