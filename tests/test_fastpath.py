"""The fast path (ftlib/fastpath.py): what it chooses and why, that it changes no maths, and what it saves in memory.

On a CPU the fast path is the chunked loss, LoRA in the compute dtype and activation checkpointing chosen to fit the
memory budget; Liger Kernel's Triton kernels and flex_attention's backward need a CUDA GPU, so their test is skipped
here, with that reason, and runs on a GPU (bench/gpu_check.sh runs it there first).
"""
import json
import subprocess
import sys

import pytest
import torch

from ftlib import fastpath
from ftlib.errors import UserError
from ftlib.model import load_model
from tests.conftest import ROOT, SAMPLE_DATA, TINY_MODEL

FAST_RECIPE = ROOT / "recipes" / "openllama3b-alpaca-fast.yaml"
NOTEBOOK_RECIPE = ROOT / "recipes" / "openllama3b-alpaca.yaml"
EVERY_PART_OFF = ["fast_path.attention=false", "fast_path.loss=false", "fast_path.kernels=false",
                  "fast_path.compile=false", "fast_path.lora_dtype=false", "model.gradient_checkpointing=false"]
H200 = dict(cuda=True, name="NVIDIA H200", memory_gb=139.8)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="Liger Kernel's Triton kernels and "
                                "flex_attention's backward run only on a CUDA GPU; this machine has none")


def lines_about(fast, part: str) -> str:
    found = [line for line in fast.lines + fast.model_lines if line.startswith(f"fast path: {part}: ")]
    assert len(found) == 1, fast.lines + fast.model_lines
    return found[0]


# ----------------------------------------------------------------------------------------------------- choices
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the choices on a machine without a GPU")
def test_on_this_cpu_the_fast_path_says_what_it_chose_and_why(make_recipe):
    fast = fastpath.choose(make_recipe("data.packing=true"))
    assert fast.attention is None and "flex_attention has no backward" in lines_about(fast, "attention")
    assert fast.loss == "chunked" and "need a CUDA GPU" in lines_about(fast, "loss")
    assert not fast.kernels and "need a CUDA GPU" in lines_about(fast, "kernels")
    assert not fast.compile and not fast.lora_dtype  # fp32 training: nothing to gain
    assert "fp32 training" in lines_about(fast, "lora_dtype")

    bf16 = fastpath.choose(make_recipe("train.precision=bf16", "deepspeed.enabled=false"))
    assert bf16.lora_dtype and "no fp32 copy" in lines_about(bf16, "lora_dtype")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusals on a machine without a GPU")
@pytest.mark.parametrize("part, why", [("kernels", "Liger's Triton kernels need a CUDA GPU"),
                                       ("attention", "flex_attention has no backward on CPU")])
def test_a_part_set_true_that_cannot_run_here_fails_in_one_line(make_recipe, part, why):
    with pytest.raises(UserError) as e:
        fastpath.choose(make_recipe(f"fast_path.{part}=true"))
    assert str(e.value) == f"fast_path.{part}: true, but {why}" + \
        ("" if part == "kernels" else " and FlashAttention needs a GPU") + "; set it to auto or false"


def test_on_a_gpu_the_fast_recipe_takes_liger_and_flex_attention(make_recipe):
    """The decisions alone, for a GPU described to choose() (nothing runs on it here)."""
    pytest.importorskip("liger_kernel", reason="liger-kernel is not installed (env/setup.sh installs it with a CUDA "
                        "build of torch only)")
    recipe = make_recipe(f"model.name_or_path={TINY_MODEL}", base=FAST_RECIPE)
    fast = fastpath.choose(recipe, fastpath.Device(**H200, liger="0.8.5"))
    assert fast.attention == "flex_attention" and "document mask" in lines_about(fast, "attention")
    assert fast.loss == "liger" and fast.kernels and fast.lora_dtype and not fast.compile
    flash = fastpath.choose(recipe, fastpath.Device(**H200, liger="0.8.5", flash_attn=True))
    assert flash.attention == "flash_attention_2"
    # The notebook's padded rows keep sdpa (CUDA's memory-efficient kernel takes their mask).
    notebook = fastpath.choose(make_recipe(f"model.name_or_path={TINY_MODEL}", base=NOTEBOOK_RECIPE),
                               fastpath.Device(**H200, liger="0.8.5"))
    assert notebook.attention is None and notebook.loss == "liger" and notebook.kernels
    # Without liger-kernel: the chunked loss, no kernels.
    bare = fastpath.choose(recipe, fastpath.Device(**H200))
    assert bare.loss == "chunked" and not bare.kernels and "not installed" in lines_about(bare, "kernels")


def test_zero3_only_where_the_base_does_not_fit_one_gpu(make_recipe):
    qlora = ["model.quantization=4bit", "deepspeed.zero_stage=3"]
    fits = fastpath.choose(make_recipe(*qlora), fastpath.Device(**H200))
    assert fits.recipe.deepspeed.zero_stage == 2 and "fits one 140 GiB GPU" in lines_about(fits, "zero3")
    tight = fastpath.choose(make_recipe(*qlora), fastpath.Device(cuda=True, name="tiny", memory_gb=1e-4))
    assert tight.recipe.deepspeed.zero_stage == 3 and "does not fit" in lines_about(tight, "zero3")
    assert tight.loss == "chunked"  # (ZeRO-3 shards the head: no Liger loss even where it is installed)
    on_cpu = fastpath.choose(make_recipe(*qlora), fastpath.Device(cuda=False))
    assert on_cpu.recipe.deepspeed.zero_stage == 3
    forced = fastpath.choose(make_recipe(*qlora, "fast_path.zero3=false"), fastpath.Device(cuda=False))
    assert forced.recipe.deepspeed.zero_stage == 2
    kept = fastpath.choose(make_recipe(*qlora, "fast_path.zero3=true"), fastpath.Device(**H200))
    assert kept.recipe.deepspeed.zero_stage == 3
    assert make_recipe(*qlora).deepspeed.zero_stage == 3  # the run's own recipe is left as it was


def test_checkpointing_takes_the_fewest_layers_that_fit():
    """26 layers saving 0.1 MiB a token (0.006 checkpointed), 0.02 outside them, 8,192 tokens, 7 GiB resident:
    7 GiB + 8 GiB x (0.02 + 0.2 + (26 - c) x 0.1 + c x 0.006) with c layers checkpointed."""
    mib, gib = 2 ** 20, 2 ** 30

    def every(budget_gib):
        n, need = fastpath.checkpoint_every(0.1 * mib, 0.006 * mib, 0.02 * mib, 26, 8192, budget_gib * gib, 7 * gib)
        return n, round(need / gib, 2)

    assert every(40) == (0, 29.56)   # fits without checkpointing
    assert every(20) == (2, 19.78)   # every 2nd layer (13): 12 layers checkpointed would need 20.53
    assert every(15) == (1, 10.01)   # every layer
    assert every(1) == (1, 10.01)    # nothing fits: every layer, and how much it needs


# ----------------------------------------------------------------------------------------------------- same maths
def _two_models(make_recipe, fast_overrides):
    """The plain path and the fast path as it runs on a CPU, on the tiny model (fp32), with the same LoRA weights,
    B non-zero."""
    plain_recipe = make_recipe(*EVERY_PART_OFF)
    fast_recipe = make_recipe(*fast_overrides)
    torch.manual_seed(0)
    plain = load_model(plain_recipe).train()
    torch.manual_seed(0)
    fast = load_model(fast_recipe, fast=fastpath.choose(fast_recipe, fastpath.Device(cuda=False))).train()
    generator = torch.Generator().manual_seed(1)
    for (name, p), (_, q) in zip(plain.named_parameters(), fast.named_parameters()):
        if "lora_B" in name:
            p.data.normal_(0, 0.05, generator=generator)
            q.data.copy_(p.data)
    return plain, fast


def _loss_and_grads(model, batch, **kwargs):
    model.zero_grad(set_to_none=True)
    loss = model(**batch, **kwargs).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
def test_fast_path_losses_and_gradients_equal_the_plain_paths(make_recipe, packed):
    plain, fast = _two_models(make_recipe, ["model.gradient_checkpointing=true"])
    assert all(layer.gradient_checkpointing for layer in fastpath.decoder_layers(fast))
    assert isinstance(fastpath.causal_lm(fast).loss_function, fastpath.ChunkedLoss)
    # 3 rows of 600 tokens: the chunked loss takes 1,024 tokens at a time, so two chunks.
    batch = fastpath.sample_batch(512, 3, 600, 150, packed, generator=torch.Generator().manual_seed(2))
    if not packed:
        batch["attention_mask"][1, 400:] = 0  # a padded row
        batch["labels"][1, 400:] = -100
    for kwargs in ({}, {"num_items_in_batch": torch.tensor(3000)}):  # the mean, and the Trainer's sum / items
        loss, grads = _loss_and_grads(plain, batch, **kwargs)
        fast_loss, fast_grads = _loss_and_grads(fast, batch, **kwargs)
        assert fast_loss.item() == pytest.approx(loss.item(), rel=1e-6)
        assert grads.keys() == fast_grads.keys() and len(grads) == 5 * 7 * 2
        for name in grads:
            torch.testing.assert_close(fast_grads[name], grads[name], rtol=1e-5, atol=1e-8, msg=name)
    # The fast path ran its own loss: the head saw an empty slice, then two chunks (and two again in the backward).
    calls = []
    head = fastpath.causal_lm(fast).get_output_embeddings()
    handle = head.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    _loss_and_grads(fast, batch)
    handle.remove()
    assert calls == [3, 1024, 1800 - 1024, 1800 - 1024, 1024]  # (the backward takes the chunks last first)


@needs_cuda
def test_gpu_kernels_equal_the_plain_path(make_recipe):
    """Liger's RMSNorm, SwiGLU, RoPE and fused linear cross-entropy and flex_attention, in fp32 on the GPU, against the
    plain path (sdpa, the model's own loss). flex_attention needs heads of >= 16 dimensions: the hd32 copy."""
    pytest.importorskip("liger_kernel", reason="liger-kernel is not installed")
    overrides = [f"model.name_or_path={ROOT / 'assets' / 'models' / 'stories260K-hd32'}", "data.packing=true",
                 "deepspeed.enabled=false"]
    batch = {k: v.cuda() for k, v in fastpath.sample_batch(512, 2, 512, 128, True).items()}
    # The plain path first: Liger replaces transformers' RoPE function for the whole process.
    torch.manual_seed(0)
    plain = load_model(make_recipe(*overrides, *EVERY_PART_OFF))
    generator = torch.Generator().manual_seed(1)
    lora_b = {n: p.data.normal_(0, 0.05, generator=generator).clone() for n, p in plain.named_parameters()
              if "lora_B" in n}
    loss, grads = _loss_and_grads(plain.cuda().train(), batch)
    recipe = make_recipe(*overrides, "model.gradient_checkpointing=true")
    chosen = fastpath.choose(recipe)
    assert (chosen.attention, chosen.loss, chosen.kernels) == ("flex_attention", "liger", True)
    torch.manual_seed(0)
    fast = load_model(recipe, fast=chosen).cuda().train()
    for n, p in fast.named_parameters():
        if n in lora_b:
            p.data.copy_(lora_b[n])
    fast_loss, fast_grads = _loss_and_grads(fast, batch)
    assert fast_loss.item() == pytest.approx(loss.item(), rel=1e-4)
    for name in grads:  # Triton's fp32 matmuls may use TF32: a looser tolerance than on the CPU
        torch.testing.assert_close(fast_grads[name], grads[name], rtol=2e-3, atol=1e-5, msg=name)


# ----------------------------------------------------------------------------------------------------- memory
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_fast_path_saves_a_third_of_the_plain_paths_bytes_per_token(tmp_path):
    """OpenLLaMA-3B's shape cut to 2 layers (config shipped in assets/), random weights, one packed row: the bytes
    autograd saves per token, per path, as bench/memory.py measures them (it prints the same table)."""
    from bench import memory

    model_dir = memory.build_model(tmp_path / "model", layers=2)
    results = {path: memory.measure(path, model_dir, tokens=1024, step=False) for path in memory.PATHS}
    plain, fast, checkpointed = (results[p] for p in memory.PATHS)
    assert fast["other"] <= plain["other"] / 3                     # the head: the chunked loss keeps no fp32 logits
    assert max(fast["per_layer"]) < 0.9 * max(plain["per_layer"])  # LoRA in bf16: no copies of the layer inputs
    assert checkpointed["total"] <= plain["total"] / 3             # every layer checkpointed, measured
    # The whole 26-layer model at the fast recipe's 8,192 tokens per micro-step, with the layers the fast path
    # checkpoints to stay under its 20 GiB.
    full = memory.full_model(results)
    assert full["checkpointed"] >= 1 and full["fast_peak_estimate_gib"] <= full["budget_gib"]
    assert full["ratio"] <= 1 / 3, full


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_memory_benchmark_prints_the_table(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "memory.py"), "--layers", "1", "--tokens", "128",
                          "--json", str(tmp_path / "memory.json")], capture_output=True, text=True, timeout=880)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads((tmp_path / "memory.json").read_text())
    for path in ("plain", "fast", "fast, every layer checkpointed"):
        row = next(line for line in out.stdout.splitlines() if line.startswith(path + " "))
        assert f"{results[path]['total'] / 2 ** 20:.4f}" in row
        assert results[path]["peak_bytes"] > 0
    assert "fast / plain = " in out.stdout


# ----------------------------------------------------------------------------------------------------- training
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_zero3_recipe_trains_under_zero2_where_the_fast_path_drops_it(tmp_path):
    """The QLoRA recipe's ZeRO-3 with fast_path.zero3: false (what auto does where the 4-bit base fits one GPU): two
    ranks train under ZeRO-2, each with the whole 4-bit base (stored as uint8), and the log says why."""
    from tests.test_train import TINY, Ranks, make, preprocess, scalars

    recipe = make(tmp_path, *TINY, "train.max_steps=3", "deepspeed.zero_stage=3", "fast_path.zero3=false",
                  "model.quantization=4bit", "model.quant_type=nf4", "model.compute_dtype=float32", "data.packing=true")
    preprocess(recipe)
    ranks = Ranks(recipe)
    assert ranks.finish() == {0: "completed", 1: "completed"}
    from ftlib.rundir import RunDir

    run = RunDir.of(recipe)
    assert json.loads(run.deepspeed.read_text())["zero_optimization"]["stage"] == 2
    assert ("fast path: zero3: ZeRO-2 instead of deepspeed.zero_stage 3: fast_path.zero3: false, so no rank gathers "
            "parameters layer by layer") in ranks.log(0)
    loss = scalars(run.root, "train/loss")
    assert sorted(loss) == [1, 2, 3] and all(v == v for v in loss.values())
    assert (run.adapter / "adapter_model.safetensors").is_file()


# ----------------------------------------------------------------------------------------------------- the recipe
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_fast_recipe_reaches_the_notebook_recipes_eval_loss_at_equal_tokens(tmp_path):
    """The fast recipe and the notebook's, as shipped, on the tiny model and 320 rows of the shipped sample: one
    epoch each, so both train the very same examples (the fast recipe packs them, cut at the same 256 tokens), with
    their learning rates scaled alike for the tiny model (x15: the notebook's 2e-4 becomes the demo's 3e-3). Both
    train at once, one thread each. The held-out loss of each adapter on the same evaluation examples (the
    token-weighted mean of `make eval`) must agree within 2%."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ftlib import recipe as recipe_mod
    from ftlib.data.collate import make_collator
    from ftlib.data.merge import load_splits
    from ftlib.evaluate import held_out_loss
    from ftlib.model import load_tokenizer
    from ftlib.rundir import RunDir
    from tests.test_train import Ranks, preprocess, scalars

    def recipe(path, name, *more):
        common = [f"run.dir={tmp_path / name}", f"data.cache_dir={tmp_path / 'cache'}",
                  f"model.name_or_path={TINY_MODEL}",
                  f"data.sources=[{{path: '{SAMPLE_DATA}', format: alpaca, max_rows: 320}}]", "data.num_shards=1",
                  "data.eval_fraction=0.1", "train.epochs=1", "train.eval_steps=1000", "train.save_steps=1000",
                  "train.logging_steps=1", "train.sample_prompts=[]", "resources.train.gpus_per_node=0"]
        return recipe_mod.load(path, common + list(more))

    notebook, fast = recipe(NOTEBOOK_RECIPE, "notebook"), recipe(FAST_RECIPE, "fast")
    notebook, fast = (recipe(r_path, name, f"train.learning_rate={15 * r.train.learning_rate}")
                      for r_path, name, r in ((NOTEBOOK_RECIPE, "notebook", notebook), (FAST_RECIPE, "fast", fast)))
    preprocess(notebook)  # (the fast recipe's examples are the same: one tokenized cache)
    runs = [Ranks(r, ranks=(0,), single=True) for r in (notebook, fast)]
    assert [run.finish(timeout=1700) for run in runs] == [{0: "completed"}] * 2
    assert "fast path: lora_dtype: LoRA matmuls in bf16" in runs[1].log(0)

    tokens = [sum(scalars(RunDir.of(r).root, "train/tokens").values()) for r in (notebook, fast)]
    steps = [len(scalars(RunDir.of(r).root, "train/tokens")) for r in (notebook, fast)]
    assert tokens[0] == tokens[1] > 0 and steps[1] < steps[0] / 1.5, (tokens, steps)  # same tokens, fewer steps

    _, evaluation = load_splits(notebook)
    collate = make_collator(notebook, load_tokenizer(notebook))
    losses = {}
    for r in (notebook, fast):
        base = AutoModelForCausalLM.from_pretrained(str(TINY_MODEL), dtype=torch.float32)
        model = PeftModel.from_pretrained(base, str(RunDir.of(r).adapter)).eval()
        losses[r.run.name] = held_out_loss(model, evaluation, collate, batch_size=8)
    base_loss = losses[notebook.run.name]["base"]["loss"]
    notebook_loss, fast_loss = (losses[r.run.name]["adapter"]["loss"] for r in (notebook, fast))
    print(f"held-out loss: base {base_loss:.4f}, notebook recipe {notebook_loss:.4f}, fast recipe {fast_loss:.4f}")
    assert notebook_loss < base_loss - 0.5, losses  # both learned something
    assert fast_loss == pytest.approx(notebook_loss, rel=0.02), losses
