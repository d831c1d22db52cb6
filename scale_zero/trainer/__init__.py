"""The training loop's parts: config/CLI checks, engines (DeepSpeed, FSDP2), optimizer and
schedule, checkpoints, metrics. launch/train.py puts them together."""
