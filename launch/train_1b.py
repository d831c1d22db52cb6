"""LLaMA-1B with the paper's recipe (launch/presets.py); every flag of launch/train.py works
and overrides it:

    deepspeed launch/train_1b.py --config configs/zero3_scale.json
    deepspeed launch/train_1b.py --config configs/zero3_scale.json --model tiny --steps 20
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launch.presets import preset  # noqa: E402
from launch.train import main  # noqa: E402

if __name__ == "__main__":
    main(preset=preset("1b"))
