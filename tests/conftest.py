"""Shared test set-up: offline hub, CPU DeepSpeed, and a factory for recipes that write into tmp_path."""
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = ROOT / "assets" / "models" / "stories260K"
SAMPLE_DATA = ROOT / "assets" / "data" / "alpaca_gpt4_sample.jsonl"
DEMO = ROOT / "recipes" / "demo.yaml"

# No hub access here; fail fast instead of waiting on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def make_recipe(tmp_path):
    """make_recipe("train.max_steps=4", ..., base=DEMO) -> a validated Recipe whose run dir and data cache are
    inside this test's tmp_path, so tests never share state."""
    from ftlib import recipe as recipe_mod

    def make(*overrides: str, base: Path = DEMO):
        fixed = [f"run.dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}"]
        return recipe_mod.load(base, fixed + list(overrides))

    return make
