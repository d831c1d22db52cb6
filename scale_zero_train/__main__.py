"""`python -m scale_zero_train` (also `deepspeed --module`, `torchrun -m`): launch/train.py's CLI."""

from scale_zero_train.train import cli

cli()
