"""How the trainer refuses: one message naming the problem and the fix, from rank 0, exit status 2."""

from __future__ import annotations

import os
import sys
import time

import torch.distributed as dist


class ConfigError(ValueError):
    """A bad argument or input file: the message names the problem and the fix."""


def fail(message: str) -> None:
    """Print `error: message` once (rank 0), write nothing, exit with status 2 on every rank."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"error: {message}", file=sys.stderr, flush=True)
    else:
        time.sleep(2)  # let rank 0 print before the launcher stops the other ranks
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.exit(2)
