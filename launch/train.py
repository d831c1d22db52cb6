"""Pretrain a LLaMA model with SCALE (or AdamW) under DeepSpeed ZeRO or PyTorch FSDP2: the
entry point of scale_zero_train (installed by scripts/setup.sh; also `python -m scale_zero_train`).

    deepspeed --num_gpus 8 launch/train.py --config configs/zero3_scale.json --model 1b
    torchrun --nproc-per-node 8 launch/train.py --backend fsdp --model 1b

Every flag is in docs/training.md (or --help).
"""

from scale_zero_train.train import main

if __name__ == "__main__":
    main()
