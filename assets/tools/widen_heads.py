"""Make assets/models/stories260K-hd32: stories260K with attention heads of 32 dimensions instead of 8, computing
exactly the same function (vLLM's CPU backend has no attention kernel for head size 8; 32 is its smallest).

    .venv/bin/python assets/tools/widen_heads.py [SRC] [DST]      # then it checks itself against SRC

Per head of q, k (and v): original dimension k of the first half goes to 4k and dimension k+4 (its RoPE partner)
to 4k+16, so each pair keeps its rotation frequency (theta^(-2k/8) = theta^(-2*4k/32)); every other new dimension is
zero. q is scaled by sqrt(32/8) to undo the smaller softmax scale 1/sqrt(32). v's 8 dimensions go to 0-7 of the new
head and o_proj reads them from there. Everything else (embeddings, norms, MLP, tokenizer) is copied as it is."""
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[2]
OLD, NEW = 8, 32


def qk_rows(heads: int) -> torch.Tensor:
    """For each original row (head h, dim d) of q/k, its row in the widened projection."""
    half = OLD // 2
    where = []
    for h in range(heads):
        for d in range(OLD):
            k, second = d % half, d >= half
            where.append(h * NEW + 4 * k + (NEW // 2 if second else 0))
    return torch.tensor(where)


def v_rows(heads: int) -> torch.Tensor:
    return torch.tensor([h * NEW + d for h in range(heads) for d in range(OLD)])


def widen(src: Path, dst: Path) -> None:
    config = json.loads((src / "config.json").read_text())
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    assert config["hidden_size"] // heads == OLD
    weights = load_file(src / "model.safetensors")
    out = {}
    for name, w in weights.items():
        if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")):
            n = heads if "q_proj" in name else kv
            rows = v_rows(n) if "v_proj" in name else qk_rows(n)
            wide = torch.zeros(n * NEW, w.shape[1], dtype=w.dtype)
            wide[rows] = w * ((NEW / OLD) ** 0.5 if "q_proj" in name else 1.0)
            out[name] = wide
        elif name.endswith("o_proj.weight"):
            wide = torch.zeros(w.shape[0], heads * NEW, dtype=w.dtype)
            wide[:, v_rows(heads)] = w
            out[name] = wide
        else:
            out[name] = w.clone()
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.name not in ("model.safetensors", "config.json"):
            shutil.copy(f, dst / f.name)
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps({**config, "head_dim": NEW}, indent=2) + "\n")


def check(src: Path, dst: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src)
    a, b = (AutoModelForCausalLM.from_pretrained(p, torch_dtype=torch.float32).eval() for p in (src, dst))
    ids = tok(["Once upon a time, there was a little girl named Lily. She"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        diff = (a(ids).logits - b(ids).logits).abs().max().item()
        ga = a.generate(ids, max_new_tokens=48, do_sample=False)
        gb = b.generate(ids, max_new_tokens=48, do_sample=False)
    print(f"max |logit difference| {diff:.2e}; greedy text identical: {torch.equal(ga, gb)}")
    assert diff < 1e-4 and torch.equal(ga, gb)


if __name__ == "__main__":
    src = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "assets" / "models" / "stories260K"
    dst = Path(sys.argv[2]) if len(sys.argv) > 2 else ROOT / "assets" / "models" / "stories260K-hd32"
    widen(src, dst)
    check(src, dst)
