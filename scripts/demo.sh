#!/usr/bin/env bash
# The embedded demo: a small LLaMA (scale_zero_train/models/tiny.json, 7.4M parameters) pretrained with SCALE
# under DeepSpeed ZeRO-3 on 2 CPU processes, on the embedded Shakespeare corpus with its own
# 8k BPE tokenizer; no network, no GPU. It prints the validation perplexity as it falls,
# writes TensorBoard logs and checkpoints under runs/demo-<time>/, and ends with a summary.
# Extra arguments go to launch/train.py (e.g. --steps 50). Run scripts/setup.sh first.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${VENV:-.venv}
run_dir=${RUN_DIR:-runs/demo-$(date -u +%Y%m%d-%H%M%S)}
port=$("$venv/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export DS_ACCELERATOR=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

start=$(date +%s)
"$venv/bin/deepspeed" --num_gpus 2 --master_port "$port" launch/train.py \
    --config configs/zero3_scale.json --model tiny --optimizer scale --data embedded \
    --seq-len 128 --micro-batch-size 8 --global-batch-size 16 --steps 150 \
    --lr 2e-3 --adam-lr 2e-2 --log-every 10 --eval-every 25 --eval-tokens 16384 \
    --save-every 50 --keep 2 --run-dir "$run_dir" "$@" 2>&1 \
    | grep --line-buffered -v -e '^\[20' -e 'Warning' -e 'warnings.warn' -e 'return func(' -e '^  warn'

cat <<SUMMARY

Demo finished in $(( $(date +%s) - start )) s: SCALE, DeepSpeed ZeRO-3, 2 CPU ranks.
  TensorBoard logs: $run_dir/tb
      open them with: $venv/bin/tensorboard --logdir $run_dir/tb   (then browse http://localhost:6006)
  Checkpoints:      $run_dir/checkpoints  (newest: $(cat "$run_dir/checkpoints/latest" 2>/dev/null || echo none))
      train on from the last one: RUN_DIR=$run_dir scripts/demo.sh --steps 300
SUMMARY
