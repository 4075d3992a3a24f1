#!/usr/bin/env bash
# Download the wheels that tools/gpu_check.py installs on a lent GPU machine (Python 3.12, CUDA torch, no network):
# what its image lacks of the project's dependencies. Run here, with network; the folder (git-ignored) travels
# with the tree.
#   tools/fetch_gpu_wheels.sh [DEST]            default: <repo>/wheels/gpu
# megatron-core is the cp312 build; the rest are the pure-Python or manylinux wheels of the project's imports
# (rapidfuzz, psutil, pyyaml). No dependencies are resolved: the image has torch, numpy, packaging, transformers.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEST="${1:-$ROOT/wheels/gpu}"
PY=${PYTHON:-python3}
mkdir -p "$DEST"
"$PY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
    --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --platform any \
    -d "$DEST" "megatron-core>=0.19,<0.20" rapidfuzz psutil pyyaml
ls -l "$DEST"
du -sh "$DEST"
