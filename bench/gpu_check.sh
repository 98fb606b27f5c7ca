#!/usr/bin/env bash
# The GPU check of the fast path, in ONE device call of at most 9 minutes (what ../shared/notes/gpu.md describes):
#
#   here, first:     bash bench/gpu_prepare.sh                   # fills .whl/ (wheels + OpenLLaMA's tokenizer, ~27 MB)
#   device call:     run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=570)
#
# Steps, each under its own `timeout`, everything written to $OUT as it comes (check.log: all of the output;
# pytest.log; gpu_lora.json: the table's numbers):
#   1. install the carried wheels into /tmp/site (the machine's Python 3.12 has torch, triton, accelerate, ...)
#   2. the GPU tests: Liger's kernels and flex_attention change no maths (tests/test_fastpath.py), ~1 min
#   3. bench/gpu_lora.py: the notebook's loop and the training stage's configurations side by side, ~6 min
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
START=$SECONDS
BUDGET=${BUDGET:-540}   # seconds for everything, inside the call's 570

step() {  # step NAME SECONDS COMMAND...: run it under its own limit, say how it ended
  local name=$1 limit=$2; shift 2
  echo "=== $name: limit ${limit} s, starting at $((SECONDS - START)) s"
  timeout --kill-after=10 "$limit" "$@"
  local code=$?
  echo "=== $name: exit $code at $((SECONDS - START)) s"
  return $code
}

main() {
[ -d .whl ] || { echo "no .whl/: run bash bench/gpu_prepare.sh here first and carry .whl"; return 2; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'

step install 120 bash -c 'python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && DS_BUILD_OPS=0 python3 -m pip install -q --no-index --no-deps \
    --no-build-isolation --no-compile --target /tmp/site .whl/deepspeed-*.tar.gz' || return 1
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
python3 -c 'import transformers, peft, liger_kernel, deepspeed, bitsandbytes; print("transformers", transformers.__version__, "peft", peft.__version__, "deepspeed", deepspeed.__version__, "bitsandbytes", bitsandbytes.__version__)'

step gpu-tests 150 python3 -m pytest -q -p no:cacheprovider -m "not slow" tests/test_fastpath.py 2>&1 \
  | tee "$OUT/pytest.log"

left=$((BUDGET - (SECONDS - START)))
step bench $((left > 60 ? left : 60)) python3 bench/gpu_lora.py --deadline-s $((left - 30)) --json "$OUT/gpu_lora.json"
echo "=== done in $((SECONDS - START)) s"
}

main 2>&1 | tee -a "$OUT/check.log"
