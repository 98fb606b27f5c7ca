#!/usr/bin/env bash
# Run HERE, before the device call of bench/gpu_check.sh: fills .whl/ (ignored by git, ~40 MB) with what that call
# carries (../shared/notes/gpu.md): the wheels the GPU machine's Python 3.12 lacks, at the versions of
# env/requirements.lock, and OpenLLaMA-3B's tokenizer and config (the benchmark builds the model from them).
#
#   bash bench/gpu_prepare.sh
#   then, with the device tool: run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=570)
set -euo pipefail
cd "$(dirname "$0")/.."
SHAPE=${SHAPE:-../shared/models/open_llama_3b_shape}
PY=${PY:-.venv/bin/python}
rm -rf .whl && mkdir -p .whl
lock() { grep -i "^$1==" env/requirements.lock; }  # the locked version of a package, as NAME==VERSION

platforms=()
for n in 28 27 24 17 31 34 35; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
  "$(lock transformers)" "$(lock peft)" "$(lock bitsandbytes)" "$(lock omegaconf)" "$(lock submitit)" \
  "$(lock datasets)" "$(lock dill)" "$(lock multiprocess)" "$(lock pydantic)" "$(lock pydantic_core)" \
  "$(lock annotated-types)" "$(lock typing-inspection)" "$(lock hjson)" "$(lock liger-kernel)" \
  "$(lock py-cpuinfo)" "$(lock msgpack)" "$(lock einops)" "$(lock ninja)" "$(lock pytest-timeout)"
# (the last five: DeepSpeed's and the suite's small requirements that the image may lack; under 1 MB together)
"$PY" -m pip download -q --no-deps --no-binary=:all: -d .whl "$(lock deepspeed)"  # an sdist only

# bitsandbytes ships a library per CUDA version (43 MB): keep the one for the machine's CUDA 13.0.
bnb=$(ls .whl/bitsandbytes-*.whl)
work=$(mktemp -d)
(cd "$work" && unzip -q "$OLDPWD/$bnb" && find . -name 'libbitsandbytes_cuda*.so' ! -name '*cuda130*' -delete \
  && find . -name 'libbitsandbytes_rocm*' -delete && rm "$OLDPWD/$bnb" && zip -q -r "$OLDPWD/$bnb" .)
rm -rf "$work"

mkdir -p .whl/open_llama_3b_shape
cp "$SHAPE"/{config.json,tokenizer.json,tokenizer_config.json,special_tokens_map.json,added_tokens.json} \
  .whl/open_llama_3b_shape/
du -sh .whl && ls .whl
