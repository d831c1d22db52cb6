"""Start FSDP2 runs: torchrun with the trainer's way of refusing.

    python -m scale_zero_train.launch --nproc-per-node 8 launch/train.py --backend fsdp --model 1b

Every torchrun option works as with `torchrun` (this is `torch.distributed.run` in-process).
Plain torchrun turns any failed rank into a `ChildFailedError`: exit status 1 and a traceback,
even for a refused input. Here, (1) the trainer's arguments, model and DeepSpeed configs, the
checkpoint to resume and the run dir are checked before any rank starts: a problem prints
one `error:` line, exit status 2; (2) a run whose first failed rank exited 2 (bad input only
the ranks find, e.g. the data) or 3 (training diverged) ends with that status after the
ranks' one line, no traceback; any other failure is reported as torchrun reports it, exit 1.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import get_args_parser, parse_min_max_nnodes, run

from scale_zero_train.errors import DIVERGED

# Exit statuses of a rank that stopped with its own one-line message (scale_zero_train.errors).
OWN_MESSAGES = (2, DIVERGED)


def runs_trainer(args) -> bool:
    """Whether the launched program is this trainer (launch/train.py or -m scale_zero_train)."""
    if args.module:
        return args.training_script == "scale_zero_train"
    return Path(args.training_script).as_posix().endswith("launch/train.py")


def world_size(args) -> int | None:
    """Ranks the launch will start, when the options fix it (not for elastic ranges or `auto`)."""
    low, high = parse_min_max_nnodes(args.nnodes)
    if low != high or not str(args.nproc_per_node).isdigit():
        return None
    return low * int(args.nproc_per_node)


def main(argv: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    ranks = world_size(args)
    if runs_trainer(args) and ranks is not None:
        from scale_zero_train.train import check_inputs

        check_inputs(args.training_script_args, ranks)  # exits 2 with one line on bad input
    # The agent logs every failed rank at ERROR; a rank's own message already said why.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        run(args)
    except ChildFailedError as e:
        _, first = e.get_first_failure()
        if first.exitcode in OWN_MESSAGES:
            sys.exit(first.exitcode)
        print(e.format_msg(), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
