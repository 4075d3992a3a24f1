#!/usr/bin/env bash
# Create (or reuse) the project virtualenv and install rntp_megatron with its dependencies.
#   tools/setup_venv.sh [VENV_DIR] [EXTRAS]     defaults: .venv dev
# On a machine without an NVIDIA driver, torch is the CPU wheel (torch==2.13.0), installed first so that no
# dependency pulls a CUDA build. megatron-core 0.19.x declares Python>=3.12 but runs on 3.11: it is installed
# on its own with --ignore-requires-python and --no-deps (letting that flag loose on the whole resolve makes
# pip pick sources of other packages that need 3.12).
set -euo pipefail
VENV=${1:-.venv}
EXTRAS=${2:-dev}
cd "$(dirname "$0")/.."
STAMP="$VENV/.rntp-installed-$EXTRAS"
if [ -f "$STAMP" ] && [ "$STAMP" -nt pyproject.toml ]; then
    exit 0
fi
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
if ! command -v nvidia-smi >/dev/null 2>&1; then
    "${PIP[@]}" "torch==2.13.0"
fi
"${PIP[@]}" --no-deps --ignore-requires-python "megatron-core>=0.19,<0.20"
"${PIP[@]}" -e ".[$EXTRAS]"
touch "$STAMP"
echo "virtualenv ready: $VENV ($("$VENV/bin/python" -c 'import torch, megatron.core as m; print("torch", torch.__version__, "megatron-core", m.__version__)'))"
