#!/usr/bin/env bash
# Install what the launch tests need: Debian's Slurm (slurm-wlm, munge, and for `sacct` slurmdbd + MariaDB)
# and NeMo-Run into the project virtualenv. Idempotent, and quick when everything is already there.
#   tools/install_launch.sh [VENV_DIR]          default: .venv
# apt needs root (CI runs as root); without root and without the binaries it says so and stops.
# NeMo-Run is pinned with leptonai<0.47 (0.47.1 breaks `import nemo_run`) under a constraint that keeps the
# installed torch, so pip never swaps in a CUDA build.
set -euo pipefail
VENV=${1:-.venv}
cd "$(dirname "$0")/.."

APT_PACKAGES=(slurm-wlm munge slurmdbd mariadb-server iproute2)  # iproute2: tools/slurm_cluster.sh
NEED_APT=0
for bin in slurmctld slurmd munged slurmdbd mariadbd sacct ip; do
    command -v "$bin" >/dev/null 2>&1 || [ -x "/usr/sbin/$bin" ] || NEED_APT=1
done
if [ "$NEED_APT" = 1 ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "install_launch.sh: Slurm is missing and apt-get needs root: run as root or install ${APT_PACKAGES[*]}" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${APT_PACKAGES[@]}" >/dev/null
fi

PY="$VENV/bin/python"
if ! "$PY" -c "import nemo_run" >/dev/null 2>&1; then
    TORCH=$("$PY" -c "import torch; print(torch.__version__.split('+')[0])")
    CONSTRAINTS=$(mktemp)
    trap 'rm -f "$CONSTRAINTS"' EXIT
    echo "torch==$TORCH" > "$CONSTRAINTS"
    "$PY" -m pip install --quiet --disable-pip-version-check -c "$CONSTRAINTS" "nemo-run==0.11.1" "leptonai<0.47"
fi
echo "launch tools ready: $(/usr/sbin/slurmctld -V), nemo-run $("$PY" -c 'import importlib.metadata as m; print(m.version("nemo_run"))')"
