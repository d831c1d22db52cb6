#!/usr/bin/env bash
# End to end under a real Slurm (the local two-node cluster of scripts/slurm_cluster.sh;
# needs root for it). Three checks, on a tiny LLaMA on CPUs (gloo):
#   1. reference: one node, 2 ranks, `deepspeed --num_gpus 2 launch/train_1b.py`;
#   2. `sbatch -N 2 launch/slurm/train_1b.sbatch` (2 nodes x 1 rank) with the same arguments;
#   3. as soon as the job's first checkpoint is complete, `scontrol requeue` it: the restarted
#      job must resume from a checkpoint and end with the reference's validation losses and
#      bitwise the same fp32 master weights.
#
#   scripts/slurm_e2e.sh                # prints a summary; exit 0 when all three hold
# Environment: PYTHON (default .venv/bin/python), WORK (scratch folder, default a new /tmp one).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$PWD/.venv/bin/python}
WORK=${WORK:-$(mktemp -d /tmp/slurm_e2e.XXXXXX)}
STEPS=12
SAVE_EVERY=4
mkdir -p "$WORK"

scripts/slurm_cluster.sh start >/dev/null
cat >"$WORK/tiny.json" <<'JSON'
{"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
 "num_key_value_heads": 4, "num_hidden_layers": 2, "max_position_embeddings": 64, "vocab_size": 8192,
 "tie_word_embeddings": false}
JSON
ARGS=(--model "$WORK/tiny.json" --steps "$STEPS" --save-every "$SAVE_EVERY" --eval-every "$SAVE_EVERY"
      --global-batch-size 8 --micro-batch-size 2 --seq-len 32 --eval-tokens 256 --log-every 1 --lr 1e-2
      --cache-dir "$WORK/cache")
export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 PYTHONPATH=$PWD
free_port() { "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

echo "== 1. one node, 2 ranks (reference)"
"$(dirname "$PYTHON")/deepspeed" --num_gpus 2 --master_port "$(free_port)" launch/train_1b.py \
    --config configs/zero3_scale.json --run-dir "$WORK/single" "${ARGS[@]}" >"$WORK/single.log" 2>&1
grep -E "validation loss|per step" "$WORK/single.log"

echo "== 2. sbatch on 2 Slurm nodes x 1 rank"
job=$(GPUS_PER_NODE=1 PYTHON=$PYTHON RUN_DIR=$WORK/slurm MASTER_PORT=$(free_port) \
      sbatch --parsable -N 2 --gres=none --cpus-per-task=1 --output="$WORK/slurm-%j.out" \
      launch/slurm/train_1b.sbatch "${ARGS[@]}")
log=$WORK/slurm-$job.out
echo "job $job, log $log"
state() { scontrol show job "$job" | sed -n 's/.*JobState=\([A-Z_]*\).*/\1/p'; }
until [ -s "$WORK/slurm/checkpoints/latest" ]; do
    case $(state) in FAILED|CANCELLED|TIMEOUT|NODE_FAIL|COMPLETED) echo "job ended before its first checkpoint"; cat "$log"; exit 1 ;; esac
    sleep 1
done
first=$(cat "$WORK/slurm/checkpoints/latest")

echo "== 3. checkpoint $first is complete: scontrol requeue $job"
scontrol requeue "$job"
for _ in $(seq 600); do
    [ "$(state)" = COMPLETED ] && grep -q "restart 1" "$log" && break
    case $(state) in FAILED|CANCELLED|TIMEOUT|NODE_FAIL) echo "job $job: $(state)"; cat "$log"; exit 1 ;; esac
    sleep 1
done
[ "$(state)" = COMPLETED ] || { echo "job $job did not complete after the requeue: $(state)"; exit 1; }
grep -E "^job |resumed from|validation loss|per step" "$log"

"$PYTHON" - "$WORK" "$log" <<'PY'
import re, sys, torch
from pathlib import Path
work, log = Path(sys.argv[1]), Path(sys.argv[2]).read_text()
def losses(text):  # the last validation loss printed for each step
    return dict(re.findall(r"step +(\d+) +validation loss ([\d.]+)", text))
reference, slurm = losses((work / "single.log").read_text()), losses(log)
resumed = re.findall(r"resumed from (\S+) at step (\d+)", log)
assert resumed, "the requeued job did not resume from a checkpoint"
common = sorted(set(reference) & set(slurm), key=int)
assert common and all(reference[s] == slurm[s] for s in common), (reference, slurm)
def masters(run):
    ckpt = work / run / "checkpoints" / (work / run / "checkpoints" / "latest").read_text().strip()
    return [t for p in sorted((ckpt / "engine").glob("*optim_states.pt"))
            for t in torch.load(p, weights_only=False)["optimizer_state_dict"]["fp32_flat_groups"]]
same = all(torch.equal(a, b) for a, b in zip(masters("single"), masters("slurm"), strict=True))
assert same, "final fp32 master weights differ"
print(f"OK: requeued job resumed from {resumed[-1][0]} (step {resumed[-1][1]}); validation losses at steps "
      f"{', '.join(common)} equal the one-node run's ({', '.join(slurm[s] for s in common)}); final fp32 master "
      "weights bitwise equal")
PY
