#!/usr/bin/env bash
# Creates (or brings up to date) the project's virtual environment from the pinned lock file.
# Idempotent: a stamp records what was installed; an unchanged lock returns at once.
#
#   env/setup.sh                       # CPU torch (laptops, login nodes without GPUs, CI)
#   TORCH_SPEC="torch==2.13.0" TORCH_INDEX=https://download.pytorch.org/whl/cu126 env/setup.sh   # a GPU cluster
#
# See env/README.md for picking the CUDA build on a cluster and the `module load` lines.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
TORCH_INDEX=${TORCH_INDEX:-}
stamp="$VENV/.ftlib-setup"
want="$(cat env/requirements.lock pyproject.toml | sha256sum | cut -c1-16) $TORCH_SPEC $TORCH_INDEX"

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$VENV/bin/python" ]; then
  exit 0
fi
echo "setting up $VENV (torch: $TORCH_SPEC${TORCH_INDEX:+ from $TORCH_INDEX}) ..."
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
# torch first and on its own: without a pin pip resolves a CUDA build and several GB of nvidia wheels.
"${pip[@]}" ${TORCH_INDEX:+--index-url "$TORCH_INDEX" --extra-index-url https://pypi.org/simple} "$TORCH_SPEC"
torch_version=$("$VENV/bin/python" -c 'import torch; print(torch.__version__.split("+")[0])')
# DeepSpeed ships as an sdist; DS_BUILD_OPS=0 defers its C++/CUDA ops to JIT compilation at first use.
DS_BUILD_OPS=0 "${pip[@]}" -r env/requirements.lock -c <(echo "torch==$torch_version")
"${pip[@]}" --no-deps -e .
"$VENV/bin/python" -m pip check
echo "$want" > "$stamp"
echo "environment ready: $VENV"
