"""How the trainer refuses: one message naming the problem and the fix, from rank 0, exit status 2
(3: training diverged, a non-finite loss or gradient norm)."""

from __future__ import annotations

import os
import sys
import time

import torch.distributed as dist


class ConfigError(ValueError):
    """A bad argument or input file: the message names the problem and the fix."""


# Exit status of a run stopped by a non-finite loss or gradient norm.
DIVERGED = 3


def fail(message: str, status: int = 2) -> None:
    """Print `error: message` once (rank 0), write nothing, exit with `status` on every rank."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"error: {message}", file=sys.stderr, flush=True)
    else:
        time.sleep(2)  # let rank 0 print before the launcher stops the other ranks
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.exit(status)
