"""Accelerate and the Hugging Face Trainer on CPU ranks (gloo): the recipe of
docs/integrations.md ("On CPU"), run from that page. Without an accelerator, Accelerate
picks no process-group backend for DeepSpeed, sees world size 1 and never enables FSDP;
so the state is made first, by hand, and the Trainer is told to use it
(`TrainingArguments(accelerator_config=CONFIGURED_STATE)`)."""

from __future__ import annotations

from tests.support.docs import run_snippet

CONFIGURED_STATE = {"use_configured_state": True}


def cpu_state(engine: str):
    """Accelerate's process state for this rank, for `engine` "deepspeed" or "fsdp"; run in
    each rank before building the Accelerator or the TrainingArguments."""
    return run_snippet("integrations.md", "cpu", engine=engine)["state"]
