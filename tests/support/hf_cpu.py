"""Accelerate and the Hugging Face Trainer on CPU ranks (gloo), the recipe of
docs/integrations.md ("On CPU"). Without an accelerator, Accelerate picks no process-group
backend for DeepSpeed and sees world size 1; so the state is made first, by hand, and the
Trainer is told to use it (`TrainingArguments(accelerator_config=CONFIGURED_STATE)`)."""

from __future__ import annotations

import os

CONFIGURED_STATE = {"use_configured_state": True}


def cpu_state(engine: str):
    """Accelerate's process state for this rank, for `engine` "deepspeed" or "fsdp"; run in
    each rank before building the Accelerator or the TrainingArguments."""
    from accelerate import PartialState
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    AcceleratorState._reset_state(reset_partial_state=True)  # a fresh state per run in one process
    os.environ["ACCELERATE_USE_DEEPSPEED"] = str(engine == "deepspeed").lower()
    if engine == "deepspeed":  # Accelerate takes the DEEPSPEED type from the variable
        return PartialState(backend="gloo")
    # FSDP: cpu=True gives MULTI_CPU, for which Accelerate never enables its FSDP plugin;
    # declared MULTI_GPU (only the type: the device stays the CPU), it does.
    state = PartialState(cpu=True, backend="gloo")
    state.distributed_type = DistributedType.MULTI_GPU
    return state
