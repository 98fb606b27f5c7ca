"""Recipes: every shipped recipe validates; each kind of mistake gives one line naming the key and the file."""
import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from ftlib import recipe as R
from tests.conftest import DEMO, ROOT

SHIPPED = sorted((ROOT / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path, tmp_path):
    r = R.load(path)
    assert r.run.name
    assert r.train.global_batch_size % (r.train.micro_batch_size * r.world_size) == 0
    assert Path(r.run.dir).is_absolute()
    # The saved form loads back to the same recipe (runs are repeatable from runs/<name>/recipe.yaml).
    saved = tmp_path / f"roundtrip-{path.name}"  # every path in it is absolute: it loads from anywhere
    R.save(r, saved)
    assert R.load(saved) == r


def test_notebook_recipe_is_faithful():
    r = R.load(ROOT / "recipes" / "openllama3b-alpaca.yaml")
    assert (r.model.name_or_path, r.model.quantization) == ("openlm-research/open_llama_3b", "8bit")
    assert (r.lora.r, r.lora.alpha) == (8, 16)
    assert set(r.lora.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert (r.data.sequence_len, r.train.learning_rate, r.train.weight_decay) == (256, 2e-4, 0.0)
    assert (r.train.global_batch_size, r.train.micro_batch_size, r.train.epochs) == (16, 4, 3)
    assert (r.train.lr_scheduler, r.train.warmup_steps, r.train.eval_steps) == ("cosine", 10, 50)
    assert (r.train.save_steps, r.train.save_total_limit) == (1000, 3)
    assert (r.train.optimizer, r.train.precision, r.model.gradient_checkpointing) == ("adam_8bit", "fp16", True)
    assert (r.data.eval_fraction, r.data.split_seed, r.data.prompt_style) == (0.02, 42, "instruct")
    assert r.data.train_on_inputs is False
    from ftlib.train import gradient_accumulation_steps

    assert gradient_accumulation_steps(r, r.world_size) == 4


def test_base_inheritance_and_overrides(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text(f"base: {DEMO}\nrun: {{name: child}}\ntrain: {{learning_rate: 1.0e-4}}\n")
    r = R.load(child, ["train.max_steps=7", "resources.train.nodes=1", "lora.target_modules=[q_proj]"])
    assert r.run.name == "child" and r.train.learning_rate == 1e-4 and r.train.max_steps == 7
    assert r.data.sequence_len == 512  # inherited from the demo
    assert r.lora.target_modules == ["q_proj"] and r.world_size == 1


def error(path, overrides=()):
    with pytest.raises(R.RecipeError) as e:
        R.load(path, list(overrides))
    message = str(e.value)
    assert "\n" not in message
    return message


def test_unknown_key_suggests(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"base: {DEMO}\ntrain:\n  lerning_rate: 0.1\n")
    msg = error(bad)
    assert msg.startswith(f"{bad}: train.lerning_rate: unknown key") and "did you mean 'learning_rate'" in msg
    assert "did you mean 'path'" in error(DEMO, ["data.sources[0].pth=x.jsonl"])


def test_wrong_type_names_key_and_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"base: {DEMO}\ntrain:\n  micro_batch_size: four\n")
    msg = error(bad)
    assert msg.startswith(f"{bad}: train.micro_batch_size:") and "four" in msg


def test_value_that_fails_only_when_resolved_names_key_and_file(tmp_path, monkeypatch):
    # A resolver is resolved only when the recipe becomes a dataclass (OmegaConf.to_object), after every merge.
    monkeypatch.setenv("FTLIB_TEST_NOT_A_NUMBER", "four")
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"base: {DEMO}\ntrain:\n  micro_batch_size: ${{oc.env:FTLIB_TEST_NOT_A_NUMBER}}\n")
    msg = error(bad)
    assert msg.startswith(f"{bad}: train.micro_batch_size:") and "four" in msg


def test_missing_required_value(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  sources: [{path: " + str(ROOT / "assets/data/alpaca_gpt4_sample.jsonl") + "}]\n"
                   "model: {name_or_path: " + str(ROOT / "assets/models/stories260K") + "}\n")
    assert error(bad) == f"{bad}: run.name: required value is missing"


def test_missing_files(tmp_path):
    assert "no file matches" in error(DEMO, ["data.sources[0].path=nothere.jsonl"])
    assert error(DEMO, ["model.name_or_path=./no/such/model"]).endswith("not found: " + str(Path.cwd() / "no/such/model"))
    child = tmp_path / "child.yaml"
    child.write_text("base: missing-parent.yaml\n")
    assert error(child) == f"{child}: base: file not found: {tmp_path / 'missing-parent.yaml'}"
    assert error(tmp_path / "none.yaml") == f"recipe: file not found: {tmp_path / 'none.yaml'}"


def test_impossible_combinations():
    msg = error(DEMO, ["resources.train.nodes=3"])
    assert "train.global_batch_size: 16 is not divisible by micro_batch_size × world size = 4 × 3" in msg
    assert "model.quantization: '3bit' is not one of none, 8bit, 4bit" in error(DEMO, ["model.quantization=3bit"])
    assert "deepspeed.offload_params" in error(DEMO, ["deepspeed.offload_params=true"])
    assert "resources.train.tasks_per_node" in error(DEMO, ["resources.train.gpus_per_node=4"])
    assert "train.optimizer: adam_8bit cannot run on offloaded" in error(
        DEMO, ["deepspeed.offload_optimizer=true", "train.optimizer=adam_8bit"])


def test_fast_path_keys_and_pack_to(tmp_path):
    for key in ("model.gradient_checkpointing", "fast_path.loss", "fast_path.zero3"):
        assert error(DEMO, [f"{key}=maybe"]).endswith(f": {key}: 'maybe' is not one of true, false, auto")
    assert error(DEMO, ["fast_path.memory_gb=0"]).endswith(": fast_path.memory_gb: must be positive, got 0.0")
    assert error(DEMO, ["fast_path.lora_dtype=true"]).endswith(
        ": fast_path.lora_dtype: true needs mixed precision (train.precision fp16 or bf16): in fp32 the LoRA matmuls "
        "already run in the weights' dtype")
    assert error(DEMO, ["data.pack_to=1024"]).endswith(": data.pack_to: needs data.packing: true")
    assert error(DEMO, ["data.packing=true", "data.pack_to=100"]).endswith(
        ": data.pack_to: 100 is shorter than data.sequence_len (512)")
    # YAML's own spellings of true and false work too (on/off, yes/no), and auto stays a word.
    mine = tmp_path / "mine.yaml"
    mine.write_text(f"base: {DEMO}\nfast_path: {{kernels: off, loss: on, compile: auto}}\n"
                    f"data: {{packing: true, pack_to: 2048}}\n")
    r = R.load(mine)
    assert (r.fast_path.kernels, r.fast_path.loss, r.fast_path.compile) == (False, True, "auto")
    assert r.data.row_len == 2048
    assert R.load(DEMO, ["data.packing=true"]).data.row_len == R.load(DEMO).data.row_len == 512


def test_section_rules_name_the_full_key(tmp_path):
    # A section checks its own values (__post_init__); the message still names the full key and the file.
    assert error(DEMO, ["train.learning_rate=0"]) == \
        f"{DEMO} (with command-line overrides): train.learning_rate: must be positive, got 0.0"
    assert error(DEMO, ["resources.serve.nodes=0"]).endswith(
        ": resources.serve: nodes, tasks_per_node, cpus_per_task and time_min must be at least 1")
    assert error(DEMO, ["deepspeed.zero_stage=4"]).endswith(": deepspeed.zero_stage: 4 is not one of 0, 1, 2, 3")
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"base: {DEMO}\nresources:\n  train: {{nodes: 0}}\n")
    assert error(bad) == f"{bad}: resources.train: nodes, tasks_per_node, cpus_per_task and time_min must be at least 1"
    bad.write_text(f"base: {DEMO}\nserve: {{max_batch_size: 0}}\n")
    assert error(bad) == f"{bad}: serve.max_batch_size: must be positive, got 0"
    assert error(DEMO, ["data.eval_fraction=1"]).endswith(": data.eval_fraction: must be in [0, 1), got 1.0")


def test_old_slurm_resource_keys_say_where_they_moved(tmp_path):
    old = tmp_path / "old.yaml"
    old.write_text(f"base: {DEMO}\nslurm:\n  train: {{partition: gpu, nodes: 2}}\n")
    assert error(old) == f"{old}: slurm.train.nodes: moved to resources.train.nodes"
    assert error(DEMO, ["slurm.serve.mem_gb=4"]) == "command line: slurm.serve.mem_gb: moved to resources.serve.mem_gb"
    assert error(DEMO, ["slurm.preprocess={array_parallelism: 2}"]) == \
        "command line: slurm.preprocess.array_parallelism: moved to resources.preprocess.array_parallelism"
    r = R.load(DEMO, ["slurm.train.account=proj", "resources.train.nodes=1", "run.group=ml"])
    assert (r.slurm.train.account, r.resources.train.nodes, r.world_size, r.run.group) == ("proj", 1, 1, "ml")


def test_choices_read_and_print_as_their_values():
    r = R.load(DEMO, ["run.launcher=local", "model.quantization=4bit", "train.lr_scheduler=linear"])
    assert isinstance(r.model.quantization, R.Quantization) and r.model.quantization == "4bit"
    assert (f"{r.run.launcher}", str(r.train.lr_scheduler), r.run.launcher != "auto") == ("local", "linear", True)
    assert {"4bit": 1}[r.model.quantization] == 1 and json.dumps(r.data.prompt_style) == '"instruct"'
    assert "  launcher: local\n" in R.to_yaml(r) and "  quantization: 4bit\n" in R.to_yaml(r)
    assert pickle.loads(pickle.dumps(r)) == r
    assert "run.launcher: 'cloud' is not one of auto, local, slurm" in error(DEMO, ["run.launcher=cloud"])


def test_yaml_is_loaded_safely(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("run: !!python/object/apply:os.system ['touch " + str(tmp_path / "pwned") + "']\n")
    assert "not valid YAML" in error(evil)
    assert not (tmp_path / "pwned").exists()


def test_cli_prints_one_line_and_exits_2():
    out = subprocess.run([sys.executable, "-m", "ftlib", "show", str(DEMO), "train.lerning_rate=1"],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "recipe error: command line: train.lerning_rate: unknown key (did you mean 'learning_rate'?)"]
    assert "Traceback" not in out.stderr


def test_cli_show_prints_resolved_recipe():
    out = subprocess.run([sys.executable, "-m", "ftlib", "show", str(DEMO), "train.max_steps=3"],
                         capture_output=True, text=True, cwd=ROOT, check=True)
    assert "max_steps: 3" in out.stdout and str(ROOT / "assets/models/stories260K") in out.stdout


def test_readme_reference_matches_schema():
    text = (ROOT / "README.md").read_text()
    section = text.split(R.README_START)[1].split(R.README_END)[0]
    assert section.strip() == R.schema_reference().strip(), "run `make schema` to regenerate README.md's reference"
    for key in ("train.learning_rate", "resources.train.nodes", "slurm.train.account", "serve.max_batch_size",
                "data.sources[].path", "run.group"):
        assert f"`{key}`" in section
