"""Run a function on several real processes (gloo on CPU, the backend a GPU run would use
is chosen the same way by torch.distributed) and collect what each rank returns."""

from __future__ import annotations

import faulthandler
import gc
import os
import socket
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, out_dir, fn, args):
    faulthandler.enable()  # a rank killed by a signal (SIGABRT, SIGSEGV) prints its Python stack
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
        LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)  # ranks share the machine's cores
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        result = fn(*args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        # Tear down in order: the rank's models and optimizers (reference cycles, which hold
        # the engines' pending work) freed while the process group lives, and no rank
        # closing its connections while another still uses them.
        del result
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # The result is on disk: leave without the interpreter's teardown, where objects torch
    # keeps alive (device meshes holding gloo groups) are destroyed with their threads
    # still running, which aborts the process (SIGABRT, seen once in CI after a passing run).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_distributed(fn, world_size: int, *args) -> list:
    """fn(*args) on `world_size` spawned processes with a gloo process group; returns the
    list of per-rank results. A failure on any rank fails the caller."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(world_size, free_port(), out_dir, fn, args), nprocs=world_size)
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=True) for r in range(world_size)]
