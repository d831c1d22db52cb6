#!/usr/bin/env bash
# The body of launch/slurm/train_*.sbatch: one torchrun per node (srun, one task per node),
# GPUS_PER_NODE ranks each, rendezvous on the first node of the allocation. Requeue-safe:
# the run directory is named after the job (not its id) on shared storage and the trainer
# resumes from the newest complete checkpoint there (--resume auto), so `scontrol requeue`,
# a node failure with --requeue, or the time-limit signal below continue the same run.
#
# Environment (all optional):
#   PRESET          launch script, e.g. launch/train_1b.py (set by the .sbatch file)
#   REPO            the checkout on shared storage        (default: the submit directory)
#   CONFIG          DeepSpeed JSON                         (default: configs/zero3_scale.json)
#   RUN_DIR         TensorBoard logs + checkpoints         (default: $REPO/runs/<job name>)
#   GPUS_PER_NODE   ranks per node                         (default: 8; 1 on the CPU cluster)
#   PYTHON          interpreter with the project installed (default: python)
#   MASTER_PORT     rendezvous port                        (default: derived from the job id)
#   DS_ACCELERATOR=cpu  run on CPUs (gloo), e.g. the local cluster of scripts/slurm_cluster.sh
# Arguments are passed to the preset, e.g. --model tiny --steps 20 --micro-batch-size 4.
set -euo pipefail

: "${PRESET:?set PRESET, e.g. PRESET=launch/train_1b.py (the .sbatch files do)}"
REPO=${REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
CONFIG=${CONFIG:-configs/zero3_scale.json}
RUN_DIR=${RUN_DIR:-$REPO/runs/${SLURM_JOB_NAME:-$(basename "$PRESET" .py)}}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
PYTHON=${PYTHON:-python}
cd "$REPO"

nodes=$(scontrol show hostnames "$SLURM_JOB_NODELIST")
first=$(head -n1 <<<"$nodes")
# Slurm node names need not resolve (several nodes on one host do not): use the node's address.
export MASTER_ADDR=${MASTER_ADDR:-$(scontrol show node "$first" | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p')}
export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
cpus=${SLURM_CPUS_ON_NODE:-$(nproc)}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$((cpus / GPUS_PER_NODE > 0 ? cpus / GPUS_PER_NODE : 1))}
# NCCL: fail fast on a hung collective instead of waiting forever; pick the fabric via
# NCCL_SOCKET_IFNAME / NCCL_IB_HCA from the environment when the defaults are wrong.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export PYTHONUNBUFFERED=1
mkdir -p "$RUN_DIR"

echo "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $SLURM_NNODES nodes [$(paste -sd' ' <<<"$nodes")] x $GPUS_PER_NODE ranks," \
     "rendezvous $MASTER_ADDR:$MASTER_PORT, run dir $RUN_DIR"

# sbatch --signal=B:USR1@N delivers USR1 N seconds before the time limit: requeue, and the
# next start resumes from the last checkpoint.
trap 'echo "time limit near: requeueing job $SLURM_JOB_ID"; scontrol requeue "$SLURM_JOB_ID"' USR1

# shellcheck disable=SC2016  # expanded by each task's shell: its own SLURM_NODEID
srun --kill-on-bad-exit=1 --ntasks-per-node=1 bash -c '
    exec "$0" -m torch.distributed.run --nnodes "$SLURM_NNODES" --node-rank "$SLURM_NODEID" \
        --nproc-per-node "$1" --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" "${@:2}"' \
    "$PYTHON" "$GPUS_PER_NODE" "$PRESET" --config "$CONFIG" --run-dir "$RUN_DIR" --resume auto "$@" &
wait $!  # in the background so the USR1 trap runs while training
