"""LLaMA-1B with the paper's recipe (scale_zero_train/presets.py); every flag of launch/train.py
works and overrides it:

    deepspeed launch/train_1b.py --config configs/zero3_scale.json
    deepspeed launch/train_1b.py --config configs/zero3_scale.json --model tiny --steps 20
"""

from scale_zero_train.presets import preset
from scale_zero_train.train import main

if __name__ == "__main__":
    main(preset=preset("1b"))
