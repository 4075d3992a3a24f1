#!/usr/bin/env bash
# Create (or reuse) the SGLang server's own virtualenv; the trainer talks to the server over HTTP and never
# imports sglang itself.
#   tools/install_sglang.sh [VENV_DIR]          default: <repo>/sglang-venv
# GPU machine (nvidia-smi present): a plain `pip install sglang==0.5.21`.
# CPU machine: the recipe of docs/design.md ("Running on CPU") (~3 min, ~3.4 GB): torch 2.13.0 (CPU wheel, the version sglang 0.5.21
# pins), sglang without its CUDA-only dependencies, torchvision (transformers' image processors import it)
# with its CUDA op registrations skipped, SGLang's routed-experts host buffer left unpinned (no CUDA to pin with),
# and a pure-torch stand-in for the two sgl-kernel CPU ops
# (tools/sglang_cpu/sgl_kernel_cpu_standin.py, installed as the `sgl_kernel` module).
# Idempotent: a stamp file newer than this script and its inputs makes a rerun exit at once.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(dirname "$HERE")"
VENV="${1:-$ROOT/sglang-venv}"
SGLANG_VERSION=0.5.21
REQS="$HERE/sglang_cpu/requirements_cpu.txt"
STANDIN="$HERE/sglang_cpu/sgl_kernel_cpu_standin.py"
STAMP="$VENV/.rntp-sglang-$SGLANG_VERSION"

if [ -f "$STAMP" ] && [ "$STAMP" -nt "$0" ] && [ "$STAMP" -nt "$REQS" ] && [ "$STAMP" -nt "$STANDIN" ]; then
    exit 0
fi
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)

if command -v nvidia-smi >/dev/null 2>&1; then
    "${PIP[@]}" "sglang==$SGLANG_VERSION"
else
    "${PIP[@]}" "torch==2.13.0"
    "${PIP[@]}" --no-deps "sglang==$SGLANG_VERSION"
    "${PIP[@]}" -r "$REQS"
    "${PIP[@]}" --no-deps "torchvision==0.28.0"
    SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    # PyPI's torchvision is a CUDA build whose compiled ops cannot load under CPU torch; its __init__ would then
    # die registering meta/autograd kernels for them. Register those only when the ops loaded.
    "$VENV/bin/python" - "$SITE/torchvision/__init__.py" <<'PY'
import sys
path = sys.argv[1]
text = open(path).read()
original = "from torchvision import (\n    _autograd_registrations,\n    _meta_registrations,\n    datasets,"
patched = ("if extension._has_ops():\n    from torchvision import _autograd_registrations, _meta_registrations  # noqa: F401\n"
           "from torchvision import (\n    datasets,")
if original in text:
    open(path, "w").write(text.replace(original, patched))
elif patched not in text:
    sys.exit(f"install_sglang.sh: unexpected torchvision/__init__.py layout in {path}; update the patch")
PY
    # SGLang's routed-experts capture (--enable-return-routed-experts) pins its host buffer with cudaHostRegister,
    # which a CPU torch lacks: a CPU server keeps that buffer in plain memory instead.
    "$VENV/bin/python" - "$SITE/sglang/srt/state_capturer/base.py" <<'PY'
import sys
path = sys.argv[1]
text = open(path).read()
original = '            device="cpu",\n            pin_memory=True,\n'
patched = '            device="cpu",\n            pin_memory=device != "cpu",  # rntp: CPU server, no CUDA to pin with\n'
if original in text:
    open(path, "w").write(text.replace(original, patched))
elif patched not in text:
    sys.exit(f"install_sglang.sh: unexpected sglang state_capturer/base.py layout in {path}; update the patch")
PY
    mkdir -p "$SITE/sgl_kernel"
    cp "$STANDIN" "$SITE/sgl_kernel/__init__.py"
fi
SGLANG_USE_CPU_ENGINE=1 "$VENV/bin/python" -c "import sglang, sgl_kernel, torch, transformers"
touch "$STAMP"
echo "sglang virtualenv ready: $VENV ($("$VENV/bin/python" -c 'import sglang, torch; print("sglang", sglang.__version__, "torch", torch.__version__)'))"
