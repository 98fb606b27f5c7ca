"""The model loader and export: the tiny real LLaMA, real bitsandbytes quantization, real PEFT adapters."""
import pytest
import torch

from ftlib.export import export
from ftlib.model import load_for_inference, load_model, load_tokenizer
from ftlib.rundir import RunDir

PROMPT = "### Instruction:\nTell me a story about a dog.\n\n### Response:\n"


def logits(model, recipe):
    ids = load_tokenizer(recipe).encode(PROMPT, return_tensors="pt")
    with torch.no_grad():
        return model(input_ids=ids).logits


def write_adapter(recipe, folder, seed):
    """A LoRA adapter with non-zero B matrices (a freshly initialised one would change nothing)."""
    torch.manual_seed(seed)
    model = load_model(recipe, for_training=True)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.2)
    model.save_pretrained(str(folder))
    return folder


def test_lora_goes_on_every_linear_layer_but_the_head(make_recipe):
    model = load_model(make_recipe("lora.target_modules=[all-linear]", "lora.r=4"), for_training=True)
    wrapped = {name.split(".")[-1] for name, m in model.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.shape[0] == 4
    assert model.config.use_cache is False  # packed batches rely on it


def test_dora_and_gradient_checkpointing_options(make_recipe):
    model = load_model(make_recipe("lora.use_dora=true", "model.gradient_checkpointing=true"), for_training=True)
    assert any("lora_magnitude_vector" in n for n, _ in model.named_parameters())
    assert model.base_model.model.is_activation_checkpointing


@pytest.mark.parametrize("quantization, layer", [("8bit", "Linear8bitLt"), ("4bit", "Linear4bit")])
def test_quantized_base_trains_only_the_adapter(make_recipe, quantization, layer):
    recipe = make_recipe(f"model.quantization={quantization}", "model.quant_type=fp4", "model.compute_dtype=float32")
    model = load_model(recipe, for_training=True)
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert type(q_proj.base_layer).__name__ == layer
    if quantization == "4bit":
        assert q_proj.base_layer.weight.quant_type == "fp4"
    ids = torch.randint(3, 500, (2, 24))
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads)
    model.eval()  # an evaluation-style forward (no grad) must work too, whatever the layer widths
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids, labels=ids).loss)


def test_inference_loader_switches_between_named_adapters(make_recipe, tmp_path):
    recipe = make_recipe()
    a = write_adapter(recipe, tmp_path / "a", seed=1)
    b = write_adapter(recipe, tmp_path / "b", seed=2)
    base_logits = logits(load_for_inference(recipe), recipe)

    model = load_for_inference(recipe, {"alpha": str(a), "beta": str(b)})
    assert not model.training and model.active_adapter == "alpha"
    alpha = logits(model, recipe)
    model.set_adapter("beta")
    beta = logits(model, recipe)
    with model.disable_adapter():
        bare = logits(model, recipe)
    assert (alpha - base_logits).abs().max() > 1e-3 and (beta - alpha).abs().max() > 1e-3
    torch.testing.assert_close(bare, base_logits)


def test_inference_loader_names_a_missing_adapter(make_recipe, tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter 'nope': no adapter_config.json in"):
        load_for_inference(make_recipe(), {"nope": str(tmp_path)})


def test_export_merges_the_adapter_into_an_ordinary_model(make_recipe):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    recipe = make_recipe()
    run = RunDir.of(recipe)
    write_adapter(recipe, run.adapter, seed=3)
    merged_dir = export(recipe)
    assert merged_dir == run.merged and (merged_dir / "tokenizer.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir))
    assert not any("lora" in n for n, _ in merged.named_parameters())
    expected = logits(PeftModel.from_pretrained(load_for_inference(recipe), str(run.adapter)), recipe)
    torch.testing.assert_close(logits(merged, recipe), expected, atol=1e-4, rtol=1e-4)


def test_export_without_adapter_or_checkpoint_says_so(make_recipe):
    with pytest.raises(FileNotFoundError, match="nothing to export: no adapter/ and no complete checkpoint"):
        export(make_recipe())
